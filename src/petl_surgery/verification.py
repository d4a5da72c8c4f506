"""The guarantee that every inserted branch takes part in the forward pass.

A module whose forward bypasses a submodule (``F.linear(x, self.qkv.weight, ...)`` instead of
``self.qkv(x)``) would leave a branch hooked on that submodule silently unused: training would run and
nothing would learn. Site discovery refuses the layouts it knows to be bypassed; this check catches the
rest. After each surgery, one-shot sentinel hooks sit beside the branch hooks, and a hook on the model
checks at the end of the first forward that every sentinel fired, then removes itself and them. Later
forwards pay nothing.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Iterable, List, Tuple

import torch
from torch import nn

from .errors import SurgeryRuntimeError
from .hooks import owned_hooks, remove_hooks_of


class BranchNeverRanError(SurgeryRuntimeError):
    """Raised at the end of the first forward after surgery when an inserted branch never ran."""


NOT_UNDER_COMPILE = (
    "petl_surgery's first-forward check (every inserted branch must run once) has not fired yet: it needs "
    "one forward in eager mode after apply or load. Run the model once before torch.compile(..., "
    "fullgraph=True). Without fullgraph, torch.compile runs the check eagerly at graph breaks, and "
    "since it does not guard on hooks, those graph breaks stay in the compiled code after the check is done"
)


def outside_compile(fn: Any) -> Any:
    """``fn`` never traced by torch.compile: it mutates hooks and Python state, once, in eager mode."""
    try:
        return torch.compiler.disable(fn, reason=NOT_UNDER_COMPILE)
    except TypeError:  # torch < 2.7 takes no ``reason``: its error names the function, so the name says it
        fn.__qualname__ = f"{fn.__qualname__} ({NOT_UNDER_COMPILE})"
        return torch.compiler.disable(fn)


class RunCheck:
    """Sentinels for one surgery: hook key -> (inserted module path, the module it hooks)."""

    def __init__(self) -> None:
        self.pending: Dict[int, Tuple[str, str]] = {}
        self.watched = 0
        self.done = False

    def watch(self, target: nn.Module, kind: str, inserted_path: str, target_path: str) -> None:
        key = self.watched
        self.watched += 1
        self.pending[key] = (inserted_path, target_path)
        if kind == "forward":
            target.register_forward_hook(functools.partial(self.mark, key))
        else:
            target.register_forward_pre_hook(functools.partial(self.mark, key))

    @outside_compile
    def mark(self, key: int, *_: Any) -> None:
        self.pending.pop(key, None)

    @outside_compile
    def verify(self, model: nn.Module, args: Any, output: Any) -> None:
        if self.done:  # compiled code that captured this hook keeps calling it (see NOT_UNDER_COMPILE)
            return
        self.done = True
        missed = sorted(set(self.pending.values()))
        remove_hooks_of(model, self)
        if missed:
            listed = "; ".join(f"{inserted} (its hook on {target!r} never fired)" for inserted, target in missed)
            raise BranchNeverRanError(
                f"{len(missed)} inserted module(s) took no part in the first forward after surgery, because "
                f"{type(model).__name__}'s forward never called the modules they hook: {listed}. Remove the "
                "surgery (petl_surgery.remove) and report the model: its layout needs a registry entry"
            )

    def forget(self, model: nn.Module, inserted_paths: Iterable[str]) -> None:
        removed = set(inserted_paths)
        self.pending = {key: value for key, value in self.pending.items() if value[0] not in removed}
        if not self.pending:
            remove_hooks_of(model, self)


def start_run_check(model: nn.Module, watched: List[Tuple[nn.Module, str, str]]) -> None:
    """Watch ``(target, kind, inserted path)`` hooks until the end of the model's next forward."""
    paths = {id(module): path for path, module in model.named_modules()}
    check = RunCheck()
    for target, kind, inserted_path in watched:
        check.watch(target, kind, inserted_path, paths.get(id(target), type(target).__name__))
    if check.pending:
        model.register_forward_hook(check.verify)


def forget_removed(model: nn.Module, inserted_paths: Iterable[str]) -> None:
    paths = list(inserted_paths)
    for _, check in list(owned_hooks(model, RunCheck)):
        check.forget(model, paths)
