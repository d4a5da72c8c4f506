"""``petl_surgery.load``: one entry point for every checkpoint format; it detects the format and hands
the file to the delta loader (ours) or to an importer (other codes').

It sits above both :mod:`petl_surgery.checkpoints` and :mod:`petl_surgery.interop`, which import
downward only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from torch import nn

from .checkpoints.delta import load_delta
from .checkpoints.files import PathLike, check_path
from .errors import CheckpointError, OptionError
from .interop import FORMATS, detect, is_adapter_directory, load_any
from .interop.files import safetensors_header


def load(
    model: nn.Module,
    path: PathLike,
    *,
    format: Optional[str] = None,
    head: Optional[bool] = None,
    methods: Optional[Sequence[str]] = None,
    blocks: Optional[Sequence[int]] = None,
    block_map: Optional[Mapping[int, int]] = None,
    **options: Any,
) -> nn.Module:
    """Load a delta checkpoint, or another code's PETL checkpoint, into ``model`` in place; return it.

    ``format`` is detected when not given: ``"petl_surgery"`` (ours), ``"peft"`` (a PEFT LoRA adapter
    directory), ``"adaptformer"``, ``"vpetl"``, ``"vpt"`` (see :mod:`petl_surgery.interop`, which also
    documents the ``options`` each importer takes; ``head`` goes to importers that take one).
    """
    if not isinstance(model, nn.Module):
        raise OptionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_path(path)
    if head is not None and not isinstance(head, bool):
        raise OptionError(f"head must be True, False or None; got {head!r}")
    if format is not None and format not in FORMATS:
        raise OptionError(f"unknown checkpoint format {format!r}; known formats: {', '.join(FORMATS)}")
    source = Path(path)
    chosen = format
    if chosen is None and source.exists():
        chosen = "peft" if is_adapter_directory(source) is not None else detect(source)
        if chosen is None and source.suffix != ".safetensors" and safetensors_header(source) is None:
            raise CheckpointError(
                f"cannot tell the format of {source}: it is not a safetensors file, nor a checkpoint of one of "
                f"{', '.join(FORMATS)} (pass format= if it is one)"
            )
    if chosen not in (None, "petl_surgery"):
        given = {"methods": methods, "blocks": blocks, "block_map": block_map}
        only_ours = [name for name, value in given.items() if value is not None]
        if only_ours:
            raise OptionError(f"{', '.join(only_ours)} apply to petl_surgery delta checkpoints, not to {chosen!r} ones")
        return load_any(model, source, chosen, **options, **({} if head is None else {"head": head}))
    if options:
        raise OptionError(f"unknown option {next(iter(options))!r} for a petl_surgery delta checkpoint")
    return load_delta(model, source, head=True if head is None else head, methods=methods, blocks=blocks, block_map=block_map)
