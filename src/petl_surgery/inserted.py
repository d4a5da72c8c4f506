"""The base class of every module surgery inserts, below everything that needs to recognise one (site
discovery skips them, methods derive from it)."""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, Mapping

from torch import nn

from .errors import SurgeryError
from .hooks import remove_hooks_of

CHILD_PREFIX = "petl_"
# The block index of a module inserted on a layer chosen by name pattern rather than in a block (LoRA's
# and SSF's ``modules`` option): such surgery is recorded with blocks ``[OUTSIDE_BLOCKS]``.
OUTSIDE_BLOCKS = -1
# The block index of an inserted module that no single block owns: tensors shared by the blocks of its
# apply call (FacT's factors), a child of the model itself. Recorded surgery lists the blocks of the
# modules that are owned; ``summary`` shows such a module as "shared". Never recorded in a checkpoint.
SHARED_BLOCK = -2


class PetlModule(nn.Module):
    """Base class of every module petl_surgery inserts into a model.

    Each instance carries the user-facing method name that inserted it (``"bapat"`` for both halves of
    BAPAT), that method's resolved options, and its block index (``SHARED_BLOCK`` for tensors the
    blocks of one apply call share): ``summary``, ``save`` and ``remove`` read the module tree and
    nothing else.
    """

    component: ClassVar[str] = ""

    def __init__(self, method: str, options: Mapping[str, Any], block: int) -> None:
        super().__init__()
        self.method = method
        self.options = dict(options)
        self.block = block
        self.order = 0  # which apply call inserted it, counted per model; set when committed
        self.uid = uuid.uuid4().hex  # owns the patches it needs (see petl_surgery.patches)

    def detach_hooks(self, root: nn.Module) -> None:
        """Remove every hook this module registered anywhere under ``root``."""
        remove_hooks_of(root, self)

    def keep_out_of_quantization(self) -> None:
        """Mark this module and its children ``qconfig = None``, which torch.ao.quantization reads as "leave
        in float": ``quantize_dynamic`` (and eager ``prepare``/``convert``) then quantize the base's layers
        and leave the branches, which read their own weights as tensors, as they are."""
        for module in self.modules():
            module.qconfig = None

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` on every module before it compiles any: refuse with the ways
        that work, instead of TorchScript's error about a hook it cannot compile."""
        raise SurgeryError(
            f"torch.jit.script cannot compile a model carrying petl_surgery's {self.method!r} (an inserted "
            f"{type(self).__name__}): its branches run in forward hooks and patched forwards, which TorchScript "
            "does not compile. Use torch.jit.trace(model, example_inputs), torch.export.export, or the ONNX "
            "exporter (torch.onnx.export(..., dynamo=True)); or merge (petl_surgery.merge) or remove the surgery "
            "first"
        )
