"""Replaying a recorded surgery, the one way ``load`` and every importer do it: the ``apply`` calls a
checkpoint records (ours, or another code's translated to ours), checked by planning before anything
changes, then committed one call after the other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from .api import commit, plan_on_device, remove
from .errors import CheckpointError, SurgeryError
from .methods import Insertion
from .methods.base import OUTSIDE_BLOCKS


@dataclass(frozen=True)
class RecordedCall:
    """One recorded ``apply``: ``method`` with ``options`` on ``blocks`` (the global block indices of the
    model it replays on; ``[OUTSIDE_BLOCKS]`` for layers chosen by name pattern)."""

    method: str
    blocks: Sequence[int]
    options: Mapping[str, Any]


def plan_calls(
    model: nn.Module, calls: Sequence[RecordedCall], source: str, device: Optional[torch.device] = None
) -> List[List[Insertion]]:
    """The insertions of every call, planned on ``model`` as it is now, without changing it; raises
    CheckpointError, naming ``source``, when the model cannot take a call on exactly its recorded blocks
    or when two calls would place a module on the same host.

    ``device`` (default None: beside the layers they extend) is where the planned modules are built;
    :data:`~petl_surgery.methods.planning.SIZES_ONLY` gives their sizes without their memory.
    The plans are for checking (names, shapes, sizes):
    :func:`commit_calls` re-plans each call on the model that the calls before it changed."""
    planned: List[List[Insertion]] = []
    hosts: Set[Tuple[int, str]] = set()
    with torch.random.fork_rng(devices=[]):  # branch inits are overwritten: leave the user's RNG alone
        for call in calls:
            insertions = _plan_one(model, call, source, device)
            for insertion in insertions:
                key = (id(insertion.host), insertion.name)
                if key in hosts:
                    raise CheckpointError(f"{source} records method {call.method!r} twice on block {insertion.block}")
                hosts.add(key)
            planned.append(insertions)
    return planned


def commit_calls(model: nn.Module, calls: Sequence[RecordedCall], statistics: str, source: str) -> List[List[Insertion]]:
    """Plan and commit ``calls`` one after the other, as the user's apply calls were made, and return what
    each committed: a later call finds what an earlier one installed (the hookable stand-in projections of
    nn.MultiheadAttention, which PATT and LoRA share). Call :func:`plan_calls` first: once its checks pass
    nothing should refuse here, and if something does, the surgery committed so far is removed."""
    committed: List[List[Insertion]] = []
    try:
        with torch.random.fork_rng(devices=[]):
            for call in calls:
                insertions = _plan_one(model, call, source)
                commit(model, insertions, statistics)
                committed.append(insertions)
    except BaseException:
        if committed:
            remove(model)
        raise
    return committed


def _plan_one(model: nn.Module, call: RecordedCall, source: str, device: Optional[torch.device] = None) -> List[Insertion]:
    """The insertions of one call, on exactly its blocks (skip_unsupported passes other blocks' attention
    that the model's discovery does not understand, never one of the call's own blocks)."""
    layers: Optional[List[int]] = None if list(call.blocks) == [OUTSIDE_BLOCKS] else list(call.blocks)
    try:
        insertions = plan_on_device(model, call.method, layers, True, call.options, device)
    except SurgeryError as error:
        raise CheckpointError(f"{source} records surgery this model cannot take: {error}") from None
    placed = {insertion.block for insertion in insertions}
    for block in call.blocks:
        if block not in placed:
            try:
                plan_on_device(model, call.method, [block], True, call.options, device)
                reason = "it is not placed there"
            except SurgeryError as error:
                reason = str(error)
            raise CheckpointError(
                f"{source} records method {call.method!r} on block {block}, which this model's block cannot take: {reason}"
            )
    return insertions
