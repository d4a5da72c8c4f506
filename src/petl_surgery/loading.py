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
from .deprecation import renamed
from .errors import CheckpointError, OptionError
from .interop import FORMATS, detect, is_adapter_directory, load_any
from .interop.files import safetensors_header
from .tasks.named import load_task, task_names


def load(
    model: nn.Module,
    path: PathLike,
    *,
    format: Optional[str] = None,
    load_head: Optional[bool] = None,
    methods: Optional[Sequence[str]] = None,
    layers: Optional[Sequence[int]] = None,
    block_map: Optional[Mapping[int, int]] = None,
    head: Optional[bool] = None,
    blocks: Optional[Sequence[int]] = None,
    name: Optional[str] = None,
    **options: Any,
) -> nn.Module:
    """Load a delta checkpoint, or another code's PETL checkpoint, into ``model`` in place; return it.

    Args:
        model: the model to load into, with or without the checkpoint's surgery already on it.
        path: the checkpoint file (or PEFT adapter directory).
        format: detected when not given: ``"petl_surgery"`` (ours), ``"peft"`` (a PEFT LoRA adapter
            directory), ``"adaptformer"``, ``"vpetl"``, ``"vpt"`` (see :mod:`petl_surgery.interop`, which
            also documents the ``options`` each importer takes).
        load_head: load the checkpoint's classifier head (None: the default of the format; ours loads
            it). False keeps the model's own head, trainable: a new task from pre-trained modules (PVP).
            Importers that take a head read it too.
        methods: take only these of the recorded methods (ours only).
        layers: take only these block indices of the saved model, as ``apply``'s ``layers`` counts
            blocks (ours only).
        block_map: ``{saved block: model block}`` for a model of another depth (ours only).
        name: load a petl_surgery delta as a named task beside the tasks already loaded (see
            :func:`petl_surgery.tasks.load_task`); without it, a model carrying named tasks is refused.
        head: deprecated spelling of ``load_head``; it works and warns.
        blocks: deprecated spelling of ``layers``; it works and warns.
    """
    if head is not None:
        renamed("load", "head", "load_head")
        load_head = _one_of("load_head", load_head, "head", head)
    if blocks is not None:
        renamed("load", "blocks", "layers")
        layers = _one_of("layers", layers, "blocks", blocks)
    if not isinstance(model, nn.Module):
        raise OptionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_path(path)
    if load_head is not None and not isinstance(load_head, bool):
        raise OptionError(f"load_head must be True, False or None; got {load_head!r}")
    if format is not None and format not in FORMATS:
        raise OptionError(f"unknown checkpoint format {format!r}; known formats: {', '.join(FORMATS)}")
    if name is not None or task_names(model):
        if name is None:
            raise OptionError(f"the model carries named tasks ({', '.join(task_names(model))}); load with name=")
        if format not in (None, "petl_surgery") or options:
            raise OptionError("name= loads petl_surgery delta checkpoints; import other formats into a model of their own")
        choices = {"methods": methods, "blocks": layers, "block_map": block_map}
        return load_task(model, path, name, head=True if load_head is None else load_head,
                         **{k: v for k, v in choices.items() if v is not None})
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
        given = {"methods": methods, "layers": layers, "block_map": block_map}
        only_ours = [name for name, value in given.items() if value is not None]
        if only_ours:
            raise OptionError(f"{', '.join(only_ours)} apply to petl_surgery delta checkpoints, not to {chosen!r} ones")
        return load_any(model, source, chosen, **options, **({} if load_head is None else {"head": load_head}))
    if options:
        raise OptionError(f"unknown option {next(iter(options))!r} for a petl_surgery delta checkpoint")
    head_taken = True if load_head is None else load_head
    return load_delta(model, source, head=head_taken, methods=methods, blocks=layers, block_map=block_map)


def _one_of(new: str, new_value: Any, old: str, old_value: Any) -> Any:
    """The value of an argument given under its deprecated name ``old``; refused when both are given."""
    if new_value is not None:
        raise OptionError(f"load takes {new}= and its deprecated spelling {old}=; give {new}= alone")
    return old_value
