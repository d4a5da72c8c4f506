"""Reading and writing safetensors files safely: atomic writes, and reads that refuse damaged files."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..errors import CheckpointError, OptionError

PathLike = Union[str, os.PathLike]
_MAX_HEADER = 100 * 1024 * 1024


def check_path(path: object) -> None:
    """A file path is a str or an os.PathLike; anything else is an OptionError naming what it got."""
    if not isinstance(path, (str, os.PathLike)) or (isinstance(path, str) and not path):
        raise OptionError(f"expected a file path (str or os.PathLike), got {path!r}")


def write_atomic(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> int:
    """Write a safetensors file through a temporary file and a rename; returns its size in bytes.

    Either the whole new file is at ``path`` afterwards, or whatever was there before is untouched.

    Permissions: a file that already exists keeps its permission bits; a new file gets what ``open()``
    would give it, ``0o666`` less the process umask.

    Symlinks: a symbolic link at ``path`` is written through: the file it finally names (which need not
    exist yet, but whose directory must) is replaced, and the link stays a link to the updated file.

    A missing directory, a directory at ``path``, or any I/O failure raises CheckpointError naming ``path``;
    the temporary file (``.petl-<random>.tmp``, next to the file replaced) is removed.
    """
    target = Path(path)
    temporary: Optional[str] = None
    try:
        final = _file_to_replace(target)
        mode = _mode_for(final)
        data = save_safetensors(dict(tensors), metadata=dict(metadata))
        handle, temporary = tempfile.mkstemp(dir=final.parent, prefix=".petl-", suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, final)
    except BaseException as error:
        if temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        if isinstance(error, OSError):
            raise CheckpointError(f"cannot save to {target}: {error.strerror or error}") from error
        raise
    return len(data)


def _file_to_replace(target: Path) -> Path:
    """``target`` itself, or the file a symbolic link there finally names; refuses a missing directory,
    a directory and a symbolic link loop."""
    final = Path(os.path.realpath(target)) if target.is_symlink() else target
    if final.is_symlink():  # realpath stops at a loop and leaves a link
        raise CheckpointError(f"cannot save to {target}: it is a loop of symbolic links")
    if not final.parent.is_dir():
        raise CheckpointError(f"cannot save to {target}: directory {final.parent} does not exist")
    if final.is_dir():
        raise CheckpointError(f"cannot save to {target}: it is a directory")
    return final


def _mode_for(final: Path) -> int:
    """The permission bits of the existing file ``final``, or ``0o666`` less the umask for a new one."""
    try:
        return stat.S_IMODE(final.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # the only way to read the umask; restored at once
        os.umask(umask)
        return 0o666 & ~umask


def read(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and raw metadata of a safetensors file; a missing, unreadable, truncated or corrupt file
    raises CheckpointError."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"no checkpoint file at {source}")
    try:
        data = source.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read {source}: {error.strerror or error}") from error
    if len(data) < 8:
        raise CheckpointError(f"{source} is not a safetensors file: {len(data)} bytes is shorter than its header")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(len(data) - 8, _MAX_HEADER):
        raise CheckpointError(f"{source} is truncated or not a safetensors file: its header claims {header_size} bytes")
    try:
        header = json.loads(data[8 : 8 + header_size])
        tensors = load_safetensors(data)
    except Exception as error:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{source} is corrupt or truncated: {error}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return tensors, dict(metadata or {})
