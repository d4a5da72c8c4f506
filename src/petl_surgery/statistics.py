"""The base model's running statistics while surgery is present: frozen (the default) or adapted.

A train-mode forward of BatchNorm (and of every module that keeps running statistics) normalises with
the batch's statistics and moves its ``running_mean``/``running_var``/``num_batches_tracked``. Those
are buffers of the frozen base, not of the delta: left alone, training would change the base and the
saved delta would no longer reproduce the trained model. So, while surgery is present:

- ``statistics="frozen"`` (default): every base module that keeps running statistics stays in eval
  mode, whatever ``model.train()`` says: it normalises with its stored statistics and never updates
  them, as timm's and torchvision's ``FrozenBatchNorm2d`` do for a frozen backbone. Dropout,
  drop-path, the inserted modules and every other module follow ``train()``/``eval()`` as usual.
- ``statistics="adapt"``: those modules train as usual and their statistics buffers become part of
  the delta (saved, loaded, counted by ``summary``).

Either way, the statistics the model had before the first ``apply`` are kept and given back by the
``remove`` that takes the last method out. A one-shot guard checks the first training forward after
surgery: if it changed any other base buffer (a module that updates state we do not know of), the
buffers are put back and :class:`StatefulBaseError` names them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from .errors import OptionError, SurgeryError, SurgeryRuntimeError
from .hooks import owned_hooks, remove_hooks_of
from .inventory import delta_names, inserted_modules

MODES = ("frozen", "adapt")
DEFAULT_MODE = "frozen"
# On the model while surgery is present: its StatisticsState.
STATE_ATTR = "_petl_surgery_statistics"
# Buffers by which a module shows that it keeps running statistics (torch's BatchNorm*, SyncBatchNorm,
# InstanceNorm with track_running_stats, LazyBatchNorm, timm's BatchNormAct2d and EvoNorm2dB0).
STATISTIC_BUFFERS = ("running_mean", "running_var")


class StatefulBaseError(SurgeryRuntimeError):
    """A training forward after surgery changed base buffers that petl_surgery neither freezes nor saves."""


def check_mode(value: Any) -> str:
    if value not in MODES:
        raise OptionError(f"statistics must be one of {', '.join(map(repr, MODES))}; got {value!r}")
    return value


def statistics_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The base modules (not inserted ones) that keep running statistics, with their paths."""
    inserted = {id(m) for _, module in inserted_modules(model) for m in module.modules()}
    return [
        (path, module)
        for path, module in model.named_modules()
        if id(module) not in inserted and any(module._buffers.get(name) is not None for name in STATISTIC_BUFFERS)
    ]


def statistics_names(model: nn.Module) -> Set[str]:
    """state_dict names of the buffers of the base modules that keep running statistics."""
    modules = {id(module) for _, module in statistics_modules(model)}
    names = set()
    for path, module in model.named_modules(remove_duplicate=False):
        if id(module) in modules:
            names |= {f"{path}.{name}" if path else name for name, _ in module.named_buffers(recurse=False)}
    return names


class HeldInEval:
    """The instance ``train`` of a statistics module while they are frozen: it keeps the module in eval
    mode, passes the requested mode on to its children (timm's BatchNormAct2d holds its dropout and
    activation) and remembers it, so that releasing the module gives it the mode last asked for."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.requested = module.training

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.requested = mode
        self.module.training = False
        for child in self.module.children():
            child.train(mode)
        return self.module


@dataclass
class StatisticsState:
    """What surgery keeps on the model about its statistics: the mode, and the statistics buffers as
    they were before the first apply (by state_dict name)."""

    mode: str
    original: Dict[str, torch.Tensor] = field(default_factory=dict)


def state_of(model: nn.Module) -> Optional[StatisticsState]:
    return model.__dict__.get(STATE_ATTR)


def mode_of(model: nn.Module) -> Optional[str]:
    """The statistics mode of the surgery on ``model``, None without surgery."""
    state = state_of(model)
    return None if state is None else state.mode


def resolve_mode(model: nn.Module, requested: Optional[str]) -> str:
    """The mode an apply or load will use: the requested one (checked), else the present surgery's, else
    the default; a request that differs from the present surgery's raises."""
    present = mode_of(model)
    if requested is None:
        return present or DEFAULT_MODE
    check_mode(requested)
    if present is not None and requested != present:
        raise SurgeryError(
            f"the surgery on this model has statistics={present!r}; an apply with statistics={requested!r} "
            "cannot join it: remove the surgery first, or apply with the same setting"
        )
    return requested


def adapted_names(model: nn.Module) -> Set[str]:
    """Names of the statistics buffers that belong to the delta: all of them with ``"adapt"``, else none."""
    return statistics_names(model) if mode_of(model) == "adapt" else set()


def take_statistics(model: nn.Module, mode: str) -> None:
    """At each commit: arm the first-training-forward guard anew; at the first, also record the
    statistics and the mode, and in ``"frozen"`` hold every statistics module in eval mode. Later
    commits (with the same mode, checked by ``resolve_mode``) change nothing else."""
    remove_hooks_of_guards(model)
    guard = FirstTrainingForwardGuard(model)
    model.register_forward_pre_hook(guard.before)
    model.register_forward_hook(guard.after)
    if state_of(model) is not None:
        return
    names = statistics_names(model)
    original = {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if name in names}
    model.__dict__[STATE_ATTR] = StatisticsState(mode, original)
    if mode == "frozen":
        for _, module in statistics_modules(model):
            hold = HeldInEval(module)
            module.__dict__["train"] = hold
            module.training = False


def give_back_statistics(model: nn.Module, restore: bool = True) -> None:
    """Once the last method is gone: release the held modules (in the mode last asked for) and, with
    ``restore``, put back the statistics the model had before the first apply (``merge`` keeps adapted
    statistics: they are part of the model it folds the delta into)."""
    state = model.__dict__.pop(STATE_ATTR, None)
    remove_hooks_of_guards(model)
    if state is None:
        return
    for module in model.modules():
        hold = module.__dict__.get("train")
        if isinstance(hold, HeldInEval):
            del module.__dict__["train"]
            module.training = hold.requested
    if not restore:
        return
    buffers = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in state.original.items():
            if name in buffers:
                buffers[name].copy_(tensor)


def remove_hooks_of_guards(model: nn.Module) -> None:
    for _, guard in list(owned_hooks(model, FirstTrainingForwardGuard)):
        remove_hooks_of(model, guard)


class FirstTrainingForwardGuard:
    """One-shot check of the first forward in training mode: base buffers outside the delta must come out
    of it as they went in. A change is undone, and raised as StatefulBaseError naming the buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.before_forward: Optional[Dict[str, torch.Tensor]] = None
        self.done = False

    def _watched(self) -> Dict[str, torch.Tensor]:
        """The base buffers outside the delta (inserted modules' buffers and adapted statistics)."""
        skip = delta_names(self.model) | adapted_names(self.model)
        return {name: buffer for name, buffer in self.model.named_buffers() if name not in skip}

    # Not under torch.compile: the check copies and compares buffers in eager mode (compiled code skips it).
    def before(self, model: nn.Module, args: Any) -> None:
        if self.done or not model.training or torch.compiler.is_compiling():
            return
        self.before_forward = {name: buffer.detach().clone() for name, buffer in self._watched().items()}

    def after(self, model: nn.Module, args: Any, output: Any) -> None:
        if self.done or self.before_forward is None or torch.compiler.is_compiling():
            return
        self.done = True
        saved, self.before_forward = self.before_forward, None
        remove_hooks_of(model, self)
        now = self._watched()
        changed = [
            name for name, tensor in saved.items() if name in now and not torch.equal(now[name].detach(), tensor)
        ]
        if not changed:
            return
        with torch.no_grad():
            for name in changed:
                now[name].copy_(saved[name])
        raise StatefulBaseError(
            f"the first training forward after surgery changed {len(changed)} buffer(s) of the frozen base "
            f"that petl_surgery neither freezes nor saves: {', '.join(changed[:8])}. They were put back. "
            "Keep the modules that hold them in eval mode while training, or report the model"
        )
