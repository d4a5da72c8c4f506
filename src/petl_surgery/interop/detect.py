"""Telling the format of a checkpoint from its names, without changing anything."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from ..checkpoints.files import PathLike
from ..checkpoints.format import METADATA_KEY
from ..errors import SurgeryError
from .adaptformer import ADAPTER_KEY
from .files import PICKLE_SUFFIXES, read_state, safetensors_header
from .peft_lora import is_adapter_directory
from .vpetl import PATT_KEY
from .vpt import SHALLOW

FORMATS = ("petl_surgery", "peft", "adaptformer", "vpetl", "vpt")


def classify(names: Iterable[str]) -> Optional[str]:
    """The format a set of tensor names belongs to: V-PETL (``attn.qkv_adapter``, with or without
    ``adaptmlp``), AdaptFormer (``adaptmlp`` alone), VPT (``prompt_embeddings``), or None."""
    names = list(names)
    if any(PATT_KEY.match(name) for name in names):
        return "vpetl"
    if any(ADAPTER_KEY.match(name) for name in names):
        return "adaptformer"
    if any(name.rpartition(".")[2] == SHALLOW for name in names):
        return "vpt"
    return None


def detect(path: PathLike) -> Optional[str]:
    """The format of ``path``: "petl_surgery" (our delta checkpoint), "peft" (a PEFT adapter directory,
    or its config or weights file), "adaptformer", "vpetl", "vpt"; None when it is none of them or
    cannot be read. Pickled files are read with ``torch.load(weights_only=True)`` only."""
    source = Path(path)
    if is_adapter_directory(source) is not None:
        return "peft"
    if not source.is_file():
        return None
    header = safetensors_header(source)
    if header is not None:
        names, metadata = header
        return "petl_surgery" if METADATA_KEY in metadata else classify(names)
    if source.suffix not in PICKLE_SUFFIXES:
        return None
    try:
        return classify(read_state(source))
    except SurgeryError:
        return None
