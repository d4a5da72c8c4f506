"""Reading and writing safetensors files safely: atomic writes, and reads that refuse damaged files."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Tuple, Union

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..errors import SurgeryError

PathLike = Union[str, os.PathLike]
_MAX_HEADER = 100 * 1024 * 1024


def write_atomic(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> int:
    """Write a safetensors file through a temporary file and a rename; returns its size in bytes.

    Either the whole new file is at ``path`` afterwards, or whatever was there before is untouched.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise SurgeryError(f"cannot save to {target}: directory {target.parent} does not exist")
    if target.is_dir():
        raise SurgeryError(f"cannot save to {target}: it is a directory")
    data = save_safetensors(dict(tensors), metadata=dict(metadata))
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return len(data)


def read(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and raw metadata of a safetensors file; a missing, truncated or corrupt file raises
    SurgeryError."""
    source = Path(path)
    if not source.is_file():
        raise SurgeryError(f"no checkpoint file at {source}")
    data = source.read_bytes()
    if len(data) < 8:
        raise SurgeryError(f"{source} is not a safetensors file: {len(data)} bytes is shorter than its header")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(len(data) - 8, _MAX_HEADER):
        raise SurgeryError(f"{source} is truncated or not a safetensors file: its header claims {header_size} bytes")
    try:
        header = json.loads(data[8 : 8 + header_size])
        tensors = load_safetensors(data)
    except Exception as error:  # safetensors raises its own error types for every kind of damage
        raise SurgeryError(f"{source} is corrupt or truncated: {error}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return tensors, dict(metadata or {})
