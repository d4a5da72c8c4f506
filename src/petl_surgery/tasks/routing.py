"""Where named tasks live in a model and how their hooks are routed.

A model carrying named tasks has one :class:`TaskBank` child (``petl_tasks``) at its root. It holds each
task's inserted modules (under their original paths, dots written as ``|``) and the task's head, and it
decides which task's hooks run. The hooks themselves are not registered on the base modules one by one:
each base module a task hooks carries one :class:`Dispatch` hook per hook kind, which runs

- nothing when no task is selected (the base model's own forward),
- the selected task's hooks, in the order they were registered (one task at a time), or
- in a mixed batch, each task's hooks on that task's rows only: the batch is sorted by task, so each task
  owns one contiguous segment of it, and the dispatch concatenates the segments once per hooked module
  (sorted segments; one pass over the tasks present per hooked module, no copy per task). Hooks that
  write their segment in place (the no-grad paths of LoRA and the tanh bottlenecks) leave nothing to
  concatenate: the output is returned as it lies.

The rows of one sample are contiguous along the batch dimension at every hooked module of the families
supported (timm's window partition keeps a sample's windows together); the batch dimension is 0 except at
``nn.MultiheadAttention``'s in-projection stand-in, which sees tokens first (``(L, B, E)``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import SurgeryError
from ..patches import Patch, apply_patch, undo_patches

BANK_NAME = "petl_tasks"
PATH_SEPARATOR = "|"  # nn.ModuleDict keys cannot hold dots

HookFn = Callable[..., Any]
Segment = Tuple[str, int, int]  # task, first sample, one past the last sample


class TaskError(SurgeryError):
    """A request about named tasks that cannot be carried out: an unknown or taken name, a task that does
    not fit the base, or a mix of tasks that cannot run in one batch."""


class TaskBank(nn.Module):
    """The named tasks of one model: ``deltas[name]`` (a ModuleDict of the task's inserted modules by
    encoded path) and ``heads[name]`` (the task's classifier head, absent for a task without one).

    Plain attributes hold the routing state: ``active`` (the selected task, None: the base alone),
    ``segments`` (during a mixed forward: the task of each contiguous run of samples), ``batch`` (the
    mixed batch's size), and the dispatch hooks installed on base modules."""

    def __init__(self) -> None:
        super().__init__()
        self.deltas = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.active: Optional[str] = None
        self.segments: Optional[List[Segment]] = None
        self.batch = 0
        self.classes: Dict[str, Optional[int]] = {}  # output width of each task's head (None: the base head)
        self.dispatches: List["Dispatch"] = []
        # each task's own attribute patches (VPT's grown prefix-token count, prefix tuning's forward), set
        # only while that task runs: (owner uid, patch) per task
        self.token_patches: Dict[str, List[Tuple[str, Patch]]] = {}
        self.engaged: Optional[str] = None  # the task whose token patches are set now

    def engage(self, name: Optional[str]) -> None:
        """Set task ``name``'s token patches (and take off those of the task engaged before)."""
        if self.engaged == name:
            return
        for uid, patch in self.token_patches.get(self.engaged, ()) if self.engaged is not None else ():
            undo_patches(patch.target, uid + ENGAGED)
        self.engaged = None
        for uid, patch in self.token_patches.get(name, ()) if name is not None else ():
            apply_patch(patch, uid + ENGAGED)
        self.engaged = name

    def select(self, name: Optional[str]) -> None:
        self.active = name
        self.engage(name)

    def names(self) -> List[str]:
        return list(self.deltas)

    def dispatch_for(self, target: nn.Module, kind: str, batch_dim: int) -> "Dispatch":
        """The dispatch of ``kind`` on ``target``, registered on first use."""
        for dispatch in self.dispatches:
            if dispatch.target is target and dispatch.kind == kind:
                return dispatch
        dispatch = Dispatch(self, target, kind, batch_dim)
        if kind == "forward":
            target.register_forward_hook(dispatch.forward)
        else:
            target.register_forward_pre_hook(dispatch.pre, with_kwargs=kind == "forward_pre_kwargs")
        self.dispatches.append(dispatch)
        return dispatch


ENGAGED = "#engaged"  # owner suffix of a task's own patches while the task runs


def take_patches(applied: Sequence[Tuple[Patch, str]]) -> List[Tuple[str, Patch]]:
    """Of the patches ``applied`` (with owners) while a task was committed, those that are not shared
    (VPT's grown prefix-token count, prefix tuning's forward): taken off the model and returned as
    ``(owner, patch)``, for :meth:`TaskBank.engage` to set while the task runs. The shared ones (switches,
    stand-in modules) stay."""
    own = [(owner, patch) for patch, owner in applied if not patch.shared]
    touched = {(id(patch.target), owner) for owner, patch in own}
    for owner, patch in own:
        undo_patches(patch.target, owner)
    for patch, owner in applied:  # undo took every layer of the owner off those modules: shared ones go back
        if patch.shared and (id(patch.target), owner) in touched:
            apply_patch(patch, owner)
    return own


def encode_path(path: str) -> str:
    return path.replace(".", PATH_SEPARATOR)


def decode_path(key: str) -> str:
    return key.replace(PATH_SEPARATOR, ".")


def _rows_of(value: Any, dim: int) -> Optional[int]:
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.dim() > dim:
        return value.shape[dim]
    if isinstance(value, (tuple, list)) and value:
        return _rows_of(value[0], dim)
    return None


def _narrow(value: Any, dim: int, rows: int, start: int, length: int) -> Any:
    """``value``'s rows ``[start, start + length)`` along ``dim`` for every tensor of ``rows`` rows in it
    (tuples, lists and dict values searched); anything else unchanged."""
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        if value.dim() > dim and value.shape[dim] == rows:
            return value.narrow(dim, start, length)
        return value
    if isinstance(value, tuple):
        return tuple(_narrow(item, dim, rows, start, length) for item in value)
    if isinstance(value, list):
        return [_narrow(item, dim, rows, start, length) for item in value]
    if isinstance(value, dict):
        return {key: _narrow(item, dim, rows, start, length) for key, item in value.items()}
    return value


def _cat(pieces: Sequence[Any], dim: int) -> Any:
    """The segments ``pieces`` put back together along ``dim`` (each tensor that was split; the first
    piece's value for anything that was not)."""
    first = pieces[0]
    if isinstance(first, torch.Tensor) and not isinstance(first, nn.Parameter):
        if all(p is first for p in pieces[1:]):  # not split: the same tensor in every segment
            return first
        return torch.cat(list(pieces), dim)
    if isinstance(first, tuple):
        return tuple(_cat([p[i] for p in pieces], dim) for i in range(len(first)))
    if isinstance(first, list):
        return [_cat([p[i] for p in pieces], dim) for i in range(len(first))]
    if isinstance(first, dict):
        return {key: _cat([p[key] for p in pieces], dim) for key in first}
    return first


class Dispatch:
    """One hook of one kind on one base module, running the hooks the tasks registered there."""

    def __init__(self, bank: TaskBank, target: nn.Module, kind: str, batch_dim: int) -> None:
        self.bank = bank
        self.target = target
        self.kind = kind
        self.batch_dim = batch_dim
        self.hooks: Dict[str, List[HookFn]] = {}

    def _run(self, name: str, args: Any, kwargs: Any, output: Any) -> Tuple[Any, Any, Any]:
        """The hooks of task ``name`` chained on (args, kwargs, output)."""
        for fn in self.hooks.get(name, ()):
            if self.kind == "forward":
                result = fn(self.target, args, output)
                if result is not None:
                    output = result
            elif self.kind == "forward_pre":
                result = fn(self.target, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
            else:
                result = fn(self.target, args, kwargs)
                if result is not None:
                    args, kwargs = result
        return args, kwargs, output

    def _segments(self, reference: Any) -> Optional[List[Tuple[str, int, int]]]:
        """The mixed batch's segments in rows of this module's input (None when no task present hooks
        here), refusing a batch dimension that does not hold whole samples."""
        bank = self.bank
        assert bank.segments is not None
        if not any(name in self.hooks for name, _, _ in bank.segments):
            return None
        rows = _rows_of(reference, self.batch_dim)
        if rows is None or rows % bank.batch:
            raise TaskError(
                f"a mixed-task batch of {bank.batch} samples reaches {type(self.target).__name__} with "
                f"{rows} rows along dimension {self.batch_dim}: its rows are not whole samples, so tasks cannot "
                "be routed per sample there"
            )
        per_sample = rows // bank.batch
        return [(name, start * per_sample, (stop - start) * per_sample) for name, start, stop in bank.segments]

    def forward(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
        bank = self.bank
        if bank.segments is None:
            if bank.active not in self.hooks:
                return None
            return self._run(bank.active, args, None, output)[2]
        segments = self._segments(output)
        if segments is None:
            return None
        rows = _rows_of(output, self.batch_dim)
        pieces = []
        in_place = True  # every hook gave back the very view it was handed (written in place, or untouched)
        for name, start, length in segments:
            part = _narrow(output, self.batch_dim, rows, start, length)
            if name in self.hooks:
                result = self._run(name, _narrow(args, self.batch_dim, rows, start, length), None, part)[2]
                in_place = in_place and result is part
                part = result
            pieces.append(part)
        if in_place and isinstance(output, torch.Tensor):
            return output  # the segments are views of it: nothing to put back together
        return _cat(pieces, self.batch_dim)

    def pre(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]] = None) -> Any:
        bank = self.bank
        with_kwargs = self.kind == "forward_pre_kwargs"
        if bank.segments is None:
            if bank.active not in self.hooks:
                return None
            args, kwargs, _ = self._run(bank.active, args, kwargs, None)
            return (args, kwargs) if with_kwargs else args
        segments = self._segments(args)
        if segments is None:
            return None
        rows = _rows_of(args, self.batch_dim)
        pieces = []
        for name, start, length in segments:
            part = _narrow((args, kwargs), self.batch_dim, rows, start, length)
            if name in self.hooks:
                part = self._run(name, part[0], part[1], None)[:2]
            pieces.append(part)
        args, kwargs = _cat(pieces, self.batch_dim)
        return (args, kwargs) if with_kwargs else args


class HeadDispatch:
    """The forward hook on a base classifier head: the selected task's head computes the logits instead;
    in a mixed batch each task's head computes its segment's, padded with ``-inf`` to the widest task."""

    def __init__(self, bank: TaskBank) -> None:
        self.bank = bank

    def forward(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> Optional[torch.Tensor]:
        bank = self.bank
        if bank.segments is None:
            if bank.active is None or bank.active not in bank.heads:
                return None
            return bank.heads[bank.active](*args)
        pieces = []
        for name, start, stop in bank.segments:
            if name in bank.heads:
                pieces.append(bank.heads[name](*_narrow(args, 0, bank.batch, start, stop - start)))
            else:
                pieces.append(output.narrow(0, start, stop - start))
        width = max(piece.shape[-1] for piece in pieces)
        padded = [
            piece
            if piece.shape[-1] == width
            else torch.cat([piece, piece.new_full((*piece.shape[:-1], width - piece.shape[-1]), float("-inf"))], -1)
            for piece in pieces
        ]
        return torch.cat(padded, 0)
