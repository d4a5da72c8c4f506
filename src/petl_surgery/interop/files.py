"""Reading other codes' checkpoint files into a flat ``{name: tensor}`` state dict, without unpickling code.

``.pth``/``.pt``/``.bin``/``.ckpt`` files go through ``torch.load(..., weights_only=True)`` only: PyTorch's
restricted unpickler, which builds tensors, containers and primitive values and refuses every other
class. The one class allowed besides is ``argparse.Namespace``: the MAE-derived training scripts of
AdaptFormer and V-PETL save their command-line arguments beside the weights
(``{"model": ..., "optimizer": ..., "epoch": ..., "scaler": ..., "args": Namespace}``, AdaptFormer's
``util/misc.py``), and a Namespace holds only attribute values. ``.safetensors`` files are read with
safetensors, which holds tensors only.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..checkpoints.files import PathLike, read
from ..errors import CheckpointError, SurgeryError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Where training scripts keep the weights inside a saved dict, tried in this order.
WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")


def load_pickle(path: PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` (plus ``argparse.Namespace``); any
    failure, a file that is not there or that holds other classes, raises SurgeryError naming it."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"no checkpoint file at {source}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{source} cannot be read with torch.load(weights_only=True), the only way petl_surgery reads "
            f"pickled checkpoints (nothing else is unpickled): {reason}. Save the model's state_dict alone "
            "(torch.save(checkpoint['model'], path)) with the code that wrote it"
        ) from None


def state_dict_of(loaded: Any, source: str) -> Dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: the dict itself, or the one under ``model``/``state_dict``/...;
    a ``module.`` prefix that every name carries (DistributedDataParallel) is dropped."""
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{source} holds a {type(loaded).__name__}, not a dict of tensors")
    for key in WRAPPER_KEYS:
        inner = loaded.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            loaded = inner
            break
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} holds no tensors (keys: {', '.join(map(str, list(loaded)[:8]))})")
    if all(name.startswith("module.") for name in tensors):
        tensors = {name[len("module.") :]: tensor for name, tensor in tensors.items()}
    return tensors


def read_state(path: PathLike) -> Dict[str, torch.Tensor]:
    """The flat state dict of a ``.safetensors`` file or of a pickled checkpoint (see the module doc)."""
    source = Path(path)
    if source.suffix == ".safetensors":
        return read(source)[0]
    return state_dict_of(load_pickle(source), str(source))


def safetensors_header(path: PathLike) -> Optional[Tuple[List[str], Dict[str, str]]]:
    """Tensor names and metadata of a safetensors file from its header alone; None if it is not one."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(8)
            if len(head) < 8:
                return None
            (size,) = struct.unpack("<Q", head)
            if size > 100 * 1024 * 1024:
                return None
            header = json.loads(stream.read(size))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.pop("__metadata__", None) or {}
    return list(header), dict(metadata)
