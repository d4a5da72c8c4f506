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
from .errors import SurgeryError
from .interop import FORMATS, detect, is_adapter_directory, load_any
from .interop.files import safetensors_header
from .tasks.named import load_task, task_names


def load(
    model: nn.Module,
    path: PathLike,
    *,
    format: Optional[str] = None,
    head: Optional[bool] = None,
    methods: Optional[Sequence[str]] = None,
    blocks: Optional[Sequence[int]] = None,
    block_map: Optional[Mapping[int, int]] = None,
    name: Optional[str] = None,
    **options: Any,
) -> nn.Module:
    """Load a delta checkpoint, or another code's PETL checkpoint, into ``model`` in place; return it.

    ``format`` is detected when not given: ``"petl_surgery"`` (ours), ``"peft"`` (a PEFT LoRA adapter
    directory), ``"adaptformer"``, ``"vpetl"``, ``"vpt"`` (see :mod:`petl_surgery.interop`, which also
    documents the ``options`` each importer takes; ``head`` goes to importers that take one).

    ``name``: load a petl_surgery delta as a named task beside the tasks already loaded (see
    :func:`petl_surgery.tasks.load_task`); without it, a model carrying named tasks is refused.
    """
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_path(path)
    if head is not None and not isinstance(head, bool):
        raise SurgeryError(f"head must be True, False or None; got {head!r}")
    if format is not None and format not in FORMATS:
        raise SurgeryError(f"unknown checkpoint format {format!r}; known formats: {', '.join(FORMATS)}")
    if name is not None or task_names(model):
        if name is None:
            raise SurgeryError(f"the model carries named tasks ({', '.join(task_names(model))}); load with name=")
        if format not in (None, "petl_surgery") or options:
            raise SurgeryError("name= loads petl_surgery delta checkpoints; import other formats into a model of their own")
        choices = {"methods": methods, "blocks": blocks, "block_map": block_map}
        return load_task(model, path, name, head=True if head is None else head, **{k: v for k, v in choices.items() if v is not None})
    source = Path(path)
    chosen = format
    if chosen is None and source.exists():
        chosen = "peft" if is_adapter_directory(source) is not None else detect(source)
        if chosen is None and source.suffix != ".safetensors" and safetensors_header(source) is None:
            raise SurgeryError(
                f"cannot tell the format of {source}: it is not a safetensors file, nor a checkpoint of one of "
                f"{', '.join(FORMATS)} (pass format= if it is one)"
            )
    if chosen not in (None, "petl_surgery"):
        given = {"methods": methods, "blocks": blocks, "block_map": block_map}
        only_ours = [name for name, value in given.items() if value is not None]
        if only_ours:
            raise SurgeryError(f"{', '.join(only_ours)} apply to petl_surgery delta checkpoints, not to {chosen!r} ones")
        return load_any(model, source, chosen, **options, **({} if head is None else {"head": head}))
    if options:
        raise SurgeryError(f"unknown option {next(iter(options))!r} for a petl_surgery delta checkpoint")
    return load_delta(model, source, head=True if head is None else head, methods=methods, blocks=blocks, block_map=block_map)
