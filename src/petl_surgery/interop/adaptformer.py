"""AdaptFormer checkpoints (Chen et al., NeurIPS 2022; github.com/ShoufaChen/AdaptFormer) onto a model's
blocks, with AdaptFormer's own semantics.

AdaptFormer's ViT (``models/custom_modules.py``, ``models/adapter.py``) gives each block an
``adaptmlp``: ``down_proj`` Linear(d, r), ReLU, dropout 0.1, ``up_proj`` Linear(r, d), times ``scale``
(0.1 in ``main_image.py``/``main_video.py``, or a learnable scalar ``adaptmlp.scale``), with an optional
LayerNorm ``adapter_layer_norm_before`` before it ("in") or after it ("out"). In parallel mode (its
default) the adapter reads the block's residual stream x (after attention, before ``norm2``) and its
output is added after the MLP's drop-path: ``x + drop_path(mlp(norm2(x))) + s * up(relu(down(x)))``.

Mapping, per block ``<prefix>blocks.N`` (any prefix; blocks matched as in
:func:`petl_surgery.interop.common.map_blocks`), onto our adapter with ``input="residual"``::

    blocks.N.adaptmlp.down_proj.{weight,bias}          -> <mlp>.petl_adapter.down.{weight,bias}
    blocks.N.adaptmlp.up_proj.{weight,bias}            -> <mlp>.petl_adapter.up.{weight,bias}
    blocks.N.adaptmlp.scale                             -> <mlp>.petl_adapter.scale  (scale="learnable")
    blocks.N.adaptmlp.adapter_layer_norm_before.*       -> layernorm_in.* / layernorm_out.* (layernorm=)

The bottleneck comes from the tensors. The base weights in the file (AdaptFormer's own ViT with
separate q/k/v projections) are not taken: they are the pre-trained backbone the user's model already
has. The head is taken only with ``head=True``: a plain ``head.{weight,bias}``, or the linear-probe head
of ``main_image.py`` (``head.0`` BatchNorm1d without affine, eps 1e-6, then ``head.1`` Linear), which is
folded into one Linear with the BatchNorm's running statistics (its evaluation-mode function).
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from ..checkpoints.files import PathLike
from ..errors import CheckpointError, SurgeryError
from ..sites import discover
from .common import Call, group_calls, head_tensors, install, map_blocks
from .files import read_state

ADAPTER_KEY = re.compile(r"^(?P<block>.+)\.adaptmlp\.(?P<name>.+)$")
LOCAL_NAMES = {
    "down_proj.weight": "down.weight",
    "down_proj.bias": "down.bias",
    "up_proj.weight": "up.weight",
    "up_proj.bias": "up.bias",
    "scale": "scale",
}
BATCHNORM_EPS = 1e-6  # main_image.py: BatchNorm1d(head.in_features, affine=False, eps=1e-6)


def adapter_groups(
    state: Mapping[str, torch.Tensor], layernorm: Optional[str], source: str
) -> Dict[str, Dict[str, torch.Tensor]]:
    """The ``adaptmlp`` tensors per checkpoint block path, under our adapter's names."""
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = ADAPTER_KEY.match(key)
        if not match:
            continue
        name = match.group("name")
        if name.startswith("adapter_layer_norm_before."):
            if layernorm not in ("in", "out"):
                raise CheckpointError(
                    f"{source} has adapter LayerNorm tensors ({key}); pass layernorm='in' or 'out' "
                    "(AdaptFormer's adapter_layernorm_option) to say where it goes"
                )
            local = f"layernorm_{layernorm}.{name.split('.', 1)[1]}"
        elif name in LOCAL_NAMES:
            local = LOCAL_NAMES[name]
        else:
            raise CheckpointError(f"{source}: tensor {key!r} is not part of an AdaptFormer adapter")
        groups.setdefault(match.group("block"), {})[local] = tensor
    return groups


def adapter_calls(
    model: nn.Module,
    groups: Mapping[str, Dict[str, torch.Tensor]],
    mapping: Mapping[str, Any],
    options: Mapping[str, Any],
    source: str,
) -> List[Call]:
    """One adapter call per bottleneck width (and learnable-or-not scale), over the mapped blocks."""
    items = []
    for key, tensors in groups.items():
        if "down.weight" not in tensors:
            raise CheckpointError(f"{source}: the adapter of {key!r} has no down_proj.weight")
        block_options = {
            **options,
            "bottleneck": int(tensors["down.weight"].shape[0]),
            "scale": "learnable" if "scale" in tensors else options["scale"],
        }
        items.append((mapping[key].index, block_options, tensors))
    return group_calls("adapter", items)


def head_from(model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str, source: str) -> Dict[str, torch.Tensor]:
    """The file's head as the model's head tensors: plain, or BatchNorm1d(affine=False) + Linear folded."""
    plain = (f"{prefix}head.weight", f"{prefix}head.bias")
    if all(name in state for name in plain):
        return head_tensors(model, state[plain[0]], state[plain[1]], source)
    probe = [f"{prefix}head.1.weight", f"{prefix}head.1.bias", f"{prefix}head.0.running_mean", f"{prefix}head.0.running_var"]
    if all(name in state for name in probe):
        weight, bias, mean, var = (state[name].double() for name in probe)
        weight = weight / torch.sqrt(var + BATCHNORM_EPS)
        bias = bias - weight @ mean
        dtype = state[probe[0]].dtype
        return head_tensors(model, weight.to(dtype), bias.to(dtype), source)
    raise CheckpointError(f"{source} has no head ({prefix}head.weight and .bias); load with load_head=False")


def from_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    *,
    scale: Union[float, str] = 0.1,
    dropout: float = 0.1,
    position: str = "parallel",
    layernorm: Optional[str] = None,
    head: bool = False,
) -> nn.Module:
    """:func:`import_adaptformer` on an already read state dict."""
    groups = adapter_groups(state, layernorm, source)
    if not groups:
        raise CheckpointError(f"{source} holds no AdaptFormer adapter (no '<block>.adaptmlp.down_proj.weight')")
    mapping, prefix = map_blocks(discover(model).blocks, list(groups), source)
    options = {
        "scale": scale,
        "dropout": dropout,
        "position": position,
        "layernorm": layernorm,
        "input": "residual" if position == "parallel" else "mlp",
    }
    calls = adapter_calls(model, groups, mapping, options, source)
    base = head_from(model, state, prefix, source) if head else {}
    return install(model, calls, base, source)


def import_adaptformer(
    model: nn.Module,
    path: PathLike,
    *,
    scale: Union[float, str] = 0.1,
    dropout: float = 0.1,
    position: str = "parallel",
    layernorm: Optional[str] = None,
    head: bool = False,
) -> nn.Module:
    """Apply AdaptFormer's adapters from a checkpoint (``.pth`` with a ``model`` dict, or a state dict)
    to ``model`` in place, with AdaptFormer's semantics; return the model.

    Args:
        scale: the fixed scale (0.1, AdaptFormer's ``ffn_adapter_scalar``); a file with ``adaptmlp.scale``
            tensors gets a learnable scale holding them.
        dropout: the adapter's dropout (0.1, as AdaptFormer's Block).
        position: "parallel" (AdaptFormer's default; the adapter reads the residual stream) or
            "sequential" (AdaptFormer's ``ffn_option="sequential"``: on the MLP's output).
        layernorm: None, "in" or "out" (``ffn_adapter_layernorm_option``), needed when the file holds
            ``adapter_layer_norm_before`` tensors.
        head: also take the file's classifier head (see the module docstring).

    Afterwards the adapters (and the head, if taken) are trainable. Anything that does not fit raises
    SurgeryError before the model changes.
    """
    return from_state(
        model, read_state(path), str(path), scale=scale, dropout=dropout, position=position, layernorm=layernorm, head=head
    )

