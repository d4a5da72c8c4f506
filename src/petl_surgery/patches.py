"""Attributes that surgery sets on base modules, owned by the inserted modules that need them.

A site may ask for attributes to be set while surgery is present: timm's ``qkv_bias_separate = True``
(the module then calls the ``qkv`` projection it otherwise bypasses), an instance ``forward``, a
hookable stand-in child, a grown prefix-token count. Each patch is owned by one inserted module and
recorded on the patched module as a stack of layers, so methods sharing a module can come and go in any
order: removing an owner undoes exactly its layer, and the original value (or its absence) comes back
with the last one.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from torch import nn

# On a patched module: {attribute: [(owner, value before this layer), ...]}, bottom layer first.
PATCHED_ATTR = "_petl_surgery_patched"


class _Absent:
    """Marks an attribute the instance did not have before a patch; one object, kept across pickling."""

    def __repr__(self) -> str:
        return "<absent from the instance>"

    def __reduce__(self) -> str:
        return "ABSENT"  # pickled and deep-copied as a reference to this module's single instance


ABSENT = _Absent()


@dataclass(frozen=True)
class Patch:
    """Set ``target.name`` while surgery is present.

    Attributes:
        value: the value to set.
        update: instead of ``value``, a function of the current value (VPT grows a count by L).
        shared: a patch that any number of owners may need at once (a switch, a stand-in module, a
            forward that routes the computation through hookable modules): once one owner has set it,
            the others keep the installed value rather than setting theirs.
    """

    target: nn.Module
    name: str
    value: Any = None
    update: Optional[Callable[[Any], Any]] = None
    shared: bool = True


def _instance_value(module: nn.Module, name: str) -> Any:
    if name in module.__dict__:
        return module.__dict__[name]
    return module._modules.get(name, ABSENT)


def _set(module: nn.Module, name: str, value: Any) -> None:
    if value is ABSENT:
        if hasattr(module, name):
            delattr(module, name)
    else:
        setattr(module, name, value)


# lists that ``recording`` hands out: every patch applied meanwhile is appended, with its owner
_recorders: List[List[Tuple[Patch, str]]] = []


@contextlib.contextmanager
def recording() -> Iterator[List[Tuple[Patch, str]]]:
    """The patches applied inside the block, with their owners, in order (named tasks keep the patches
    that are not ``shared`` apart, to set them only while their task runs)."""
    applied: List[Tuple[Patch, str]] = []
    _recorders.append(applied)
    try:
        yield applied
    finally:
        _recorders.remove(applied)


def apply_patch(patch: Patch, owner: str) -> None:
    for applied in _recorders:
        applied.append((patch, owner))
    record: Dict[str, List[Tuple[str, Any]]] = patch.target.__dict__.setdefault(PATCHED_ATTR, {})
    layers = record.setdefault(patch.name, [])
    current = _instance_value(patch.target, patch.name)
    layers.append((owner, current))
    if patch.shared and len(layers) > 1:
        return
    _set(patch.target, patch.name, patch.update(getattr(patch.target, patch.name)) if patch.update else patch.value)


def undo_patches(root: nn.Module, owner: str) -> None:
    """Take ``owner``'s layer out of every patch stack under ``root``."""
    for module in root.modules():
        record = module.__dict__.get(PATCHED_ATTR)
        if not record:
            continue
        for name in list(record):
            layers = record[name]
            for position, (who, previous) in enumerate(layers):
                if who != owner:
                    continue
                if position == len(layers) - 1:
                    _set(module, name, previous)
                else:  # the layer above now stands on what this one replaced
                    layers[position + 1] = (layers[position + 1][0], previous)
                del layers[position]
                break
            if not layers:
                del record[name]
        if not record:
            del module.__dict__[PATCHED_ATTR]


def installed(module: nn.Module, name: str) -> Any:
    """What a shared patch already put at ``module.name``, or None if nothing is patched there."""
    record = module.__dict__.get(PATCHED_ATTR, {})
    return _instance_value(module, name) if record.get(name) else None


def host_patches(target: nn.Module, values: Dict[str, Any]) -> List[Patch]:
    """Shared patches of ``target`` from a site's ``{attribute: value}``."""
    return [Patch(target, name, value) for name, value in values.items()]


@contextlib.contextmanager
def temporarily(target: nn.Module, values: Dict[str, Any]) -> Iterator[None]:
    """A site's shared patches applied for the duration of a ``with`` block (for checks and tests)."""
    owner = "temporarily-" + uuid.uuid4().hex
    for patch in host_patches(target, values):
        apply_patch(patch, owner)
    try:
        yield
    finally:
        undo_patches(target, owner)
