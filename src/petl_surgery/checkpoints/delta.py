"""save and load: the delta of a model, and the surgery that produced it, in one safetensors file."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping

import torch
from torch import nn

from .. import __version__
from ..errors import SurgeryError
from ..freezing import set_trainable
from ..inventory import delta_names, inserted_modules, surgery_record
from ..methods import Insertion
from ..sites import discover
from .files import PathLike, read, write_atomic
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    base_shapes,
    decode,
    encode,
    fingerprint,
    model_description,
    tensors_digest,
)


def save(model: nn.Module, path: PathLike) -> None:
    """Write the delta of ``model`` to ``path`` (a ``.safetensors`` file), atomically.

    The file holds every tensor of the inserted modules and every other trainable parameter (the head,
    base tensors made trainable) under its state_dict name, and metadata describing the surgery (see
    :mod:`petl_surgery.checkpoints.format`). No pickle is involved.
    """
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not inserted_modules(model):
        raise SurgeryError(f"{type(model).__name__} carries no petl_surgery method: there is no delta to save")
    delta = delta_names(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    tensors = {
        name: tensor.detach().to("cpu", copy=True).contiguous()
        for name, tensor in _unique_state(model).items()
        if name in delta or name in trainable
    }
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "methods": surgery_record(model),
        "model": model_description(model, len(discover(model).blocks)),
        "fingerprint": fingerprint(base_shapes(model, delta)),
        "tensors_sha256": tensors_digest(tensors),
    }
    write_atomic(path, tensors, encode(metadata))


def _unique_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state_dict with each tensor under its first name only (shared modules appear under several)."""
    unique: Dict[str, torch.Tensor] = {}
    seen = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor
    return unique


def _architecture_mismatch(path: PathLike, model: nn.Module, metadata: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, list]) -> SurgeryError:
    saved = metadata["model"]
    here = model_description(model, len(discover(model).blocks))
    message = f"{path} does not fit this model: it was saved from another base architecture"
    if (saved.get("class"), saved.get("timm_name")) != (here["class"], here["timm_name"]):
        message += (
            f" (checkpoint: {saved.get('class')}, timm name {saved.get('timm_name')!r}; "
            f"model: {here['class']}, timm name {here['timm_name']!r})"
        )
    differing = [
        f"{name}: checkpoint {list(tensor.shape)}, model {shapes[name]}"
        for name, tensor in tensors.items()
        if name in shapes and list(tensor.shape) != shapes[name]
    ]
    if differing:
        message += "; tensors of other shapes: " + ", ".join(differing[:5])
    else:
        message += "; the names or shapes of its parameters differ from the model's"
    return SurgeryError(message)


def _plan_recorded(model: nn.Module, path: PathLike, calls: List[Dict[str, Any]]) -> List[List[Insertion]]:
    from ..api import plan

    planned: List[List[Insertion]] = []
    taken = set()
    with torch.random.fork_rng(devices=[]):  # branch inits are overwritten: leave the user's RNG alone
        for call in calls:
            try:
                insertions = plan(model, call["method"], call["blocks"], True, **call["options"])
            except SurgeryError as error:
                raise SurgeryError(f"{path} records surgery this model cannot take: {error}") from None
            for insertion in insertions:
                key = (id(insertion.host), insertion.name)
                if key in taken:
                    raise SurgeryError(f"{path} records method {call['method']!r} twice on block {insertion.block}")
                taken.add(key)
            planned.append(insertions)
    return planned


def load(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a delta checkpoint into ``model`` in place and return it.

    On a model without surgery, the recorded surgery is re-applied (same methods, options and blocks)
    and the tensors loaded; exactly the saved tensors are then trainable. On a model that already
    carries the same surgery, the tensors are only loaded. Anything that does not fit (another
    architecture, other shapes, missing or unexpected tensors, another surgery, a damaged file or an
    unknown format version) raises SurgeryError before the model is changed.
    """
    from ..api import commit

    if not isinstance(model, nn.Module):
        raise SurgeryError(f"expected a torch.nn.Module, got {type(model).__name__}")
    tensors, raw_metadata = read(path)
    metadata = decode(raw_metadata, str(path))
    if tensors_digest(tensors) != metadata["tensors_sha256"]:
        raise SurgeryError(f"{path} is corrupt: its tensors do not match the checksum recorded when it was saved")
    delta_now = delta_names(model)
    shapes = base_shapes(model, delta_now)
    if fingerprint(shapes) != metadata["fingerprint"]:
        raise _architecture_mismatch(path, model, metadata, tensors, shapes)

    current = json.loads(json.dumps(surgery_record(model)))
    planned: List[List[Insertion]] = []
    if current:
        if current != metadata["methods"]:
            raise SurgeryError(
                f"the model already carries surgery {current}, which differs from {path}'s "
                f"{metadata['methods']}; remove it first or load into a fresh model"
            )
        expected = {name: list(t.shape) for name, t in _unique_state(model).items() if name in delta_now}
    else:
        planned = _plan_recorded(model, path, metadata["methods"])
        expected = {
            f"{insertion.path}.{key}": list(tensor.shape)
            for insertions in planned
            for insertion in insertions
            for key, tensor in insertion.module.state_dict().items()
        }
    missing = sorted(name for name in expected if name not in tensors)
    if missing:
        raise SurgeryError(f"{path} lacks tensors the surgery needs: {', '.join(missing[:5])}")
    base_names = [name for name in tensors if name not in expected]
    unexpected = sorted(name for name in base_names if name not in shapes)
    if unexpected:
        raise SurgeryError(f"{path} has tensors this model does not have: {', '.join(unexpected[:5])}")
    wrong = [
        f"{name}: file {list(tensor.shape)}, model {expected.get(name, shapes.get(name))}"
        for name, tensor in tensors.items()
        if list(tensor.shape) != expected.get(name, shapes.get(name))
    ]
    if wrong:
        raise SurgeryError(f"{path} has tensors of the wrong shape: {', '.join(wrong[:5])}")

    for insertions in planned:
        commit(model, insertions)
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
    if planned:
        set_trainable(model, set(base_names))
    return model
