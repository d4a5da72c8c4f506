"""Interop with other codes' PETL checkpoints: import PEFT LoRA (and DoRA) adapters, AdaptFormer adapters,
V-PETL PATT branches (and adapters) and VPT prompts onto a model by surgery; export our LoRA (or DoRA) as a
PEFT adapter.

    import petl_surgery.interop as interop
    interop.detect("run/checkpoint.pth")             # "adaptformer", "vpetl", "vpt", "peft", "petl_surgery" or None
    interop.load_any(model, "run/checkpoint.pth")    # dispatches on detect (or format=...)
    interop.export(model, "peft_adapter/")           # PeftModel.from_pretrained(model, "peft_adapter/") agrees

Every importer checks everything before it changes the model and raises SurgeryError naming what does
not fit. Pickled files (``.pth``, ``.bin``) are read only through ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..checkpoints.delta import load_delta
from ..checkpoints.files import PathLike
from ..errors import CheckpointError, OptionError, SurgeryError
from . import adaptformer, vpetl, vpt
from .adaptformer import import_adaptformer
from .detect import FORMATS, classify, detect
from .files import read_state
from .peft_lora import export_peft, import_peft, is_adapter_directory
from .vpetl import import_vpetl
from .vpt import import_vpt

EXPORT_FORMATS = ("peft",)
_FROM_STATE = {"adaptformer": adaptformer.from_state, "vpetl": vpetl.from_state, "vpt": vpt.from_state}


def load_any(model: nn.Module, path: PathLike, format: Optional[str] = None, **options: Any) -> nn.Module:
    """Load ``path`` into ``model`` in place, whatever its format; return the model.

    ``format`` (one of :data:`FORMATS`) skips detection. ``options`` go to the format's importer (e.g.
    ``head=True`` for AdaptFormer, ``mode="qv"`` for V-PETL, ``dropout=`` for VPT); our own delta
    checkpoints take none.
    """
    if not isinstance(model, nn.Module):
        raise OptionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if format is not None and format not in FORMATS:
        raise OptionError(f"unknown checkpoint format {format!r}; known formats: {', '.join(FORMATS)}")
    source = Path(path)
    if format is None and not source.exists():
        raise CheckpointError(f"no checkpoint at {source}")
    chosen = format or ("peft" if is_adapter_directory(source) is not None else detect(source))
    if chosen in (None, "petl_surgery", "peft"):
        if chosen is None:
            raise CheckpointError(
                f"cannot tell the format of {source}: it is none of {', '.join(FORMATS)}; pass format= if it is one"
            )
        if options:
            raise OptionError(f"format {chosen!r} takes no options; got {', '.join(options)}")
        if chosen == "peft":
            folder = is_adapter_directory(source)
            return import_peft(model, folder if folder is not None else source)
        return load_delta(model, source)
    state = read_state(source)
    found = classify(state)
    if format is not None and found not in (format, None):
        raise CheckpointError(f"{source} looks like a {found!r} checkpoint, not {format!r}")
    return _FROM_STATE[chosen](model, state, str(source), **_checked(chosen, options))


def _checked(format: str, options: dict) -> dict:
    import inspect

    allowed = [p.name for p in inspect.signature(_FROM_STATE[format]).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = [name for name in options if name not in allowed]
    if unknown:
        raise OptionError(f"unknown option {unknown[0]!r} for format {format!r}; valid options: {', '.join(allowed)}")
    return options


def export(model: nn.Module, directory: PathLike, format: str = "peft") -> Path:
    """Write the model's surgery in another code's format; ``"peft"`` (a PEFT LoRA adapter directory) is
    the one there is. Returns the directory."""
    if format not in EXPORT_FORMATS:
        raise OptionError(f"cannot export to format {format!r}; export formats: {', '.join(EXPORT_FORMATS)}")
    return export_peft(model, directory)


__all__ = [
    "EXPORT_FORMATS",
    "FORMATS",
    "classify",
    "is_adapter_directory",
    "detect",
    "export",
    "export_peft",
    "import_adaptformer",
    "import_peft",
    "import_vpetl",
    "import_vpt",
    "load_any",
]
