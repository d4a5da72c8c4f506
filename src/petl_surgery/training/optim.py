"""The optimizer and learning-rate schedule of a run, from timm's factories
(``timm.optim.create_optimizer_v2``, ``timm.scheduler.create_scheduler_v2``), over the trainable
parameters only.

Defaults (those of ``petl-surgery train``): AdamW, cosine decay to zero stepped after every optimizer
update, no warm-up. timm's conventions apply: no weight decay on one-dimensional parameters (biases, norm
weights, SSF's scales and shifts) nor on the names the model's ``no_weight_decay()`` lists; a warm-up
rises linearly from timm's ``warmup_lr`` 1e-5 to ``lr`` over ``warmup_epochs`` epochs of updates.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..errors import SurgeryError

SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "none")


def check_choices(opt: str, sched: str, warmup_epochs: int) -> None:
    """Refuse an optimizer timm does not know, a schedule not in SCHEDULES, a negative warm-up or a
    warm-up without a schedule."""
    from timm.optim import list_optimizers

    known = set(list_optimizers())
    if not isinstance(opt, str) or opt.lower().split("_")[-1] not in known:
        raise SurgeryError(f"unknown optimizer {opt!r}; timm knows {', '.join(sorted(known)[:12])}, ... "
                           "(timm.optim.list_optimizers())")
    if sched not in SCHEDULES:
        raise SurgeryError(f"unknown schedule {sched!r}; choose one of {', '.join(SCHEDULES)}")
    if type(warmup_epochs) is not int or warmup_epochs < 0:
        raise SurgeryError(f"warmup_epochs must be a non-negative int; got {warmup_epochs!r}")
    if sched == "none" and warmup_epochs:
        raise SurgeryError("a warm-up needs a schedule: give sched other than 'none', or no warm-up")


def make_optimizer(model: nn.Module, opt: str = "adamw", lr: float = 1e-3, weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """timm's optimizer ``opt`` (any name of ``timm.optim.list_optimizers()``) over the trainable
    parameters of ``model``, weight decay grouped as timm groups it."""
    from timm.optim import create_optimizer_v2

    check_choices(opt, "none", 0)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if not trainable:
        raise SurgeryError("the model has no trainable parameters: apply a method (or unfreeze something) first")
    optimizer = create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay)
    given = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if given != trainable:  # timm's grouping skips frozen parameters; a timm that did not would land here
        raise SurgeryError(f"timm's {opt} optimizer holds {len(given)} tensors, the model trains {len(trainable)}")
    return optimizer


def make_schedule(optimizer: torch.optim.Optimizer, sched: str, epochs: int, warmup_epochs: int,
                  updates_per_epoch: int) -> Optional[Any]:
    """timm's scheduler ``sched`` stepped per update (``step_update``) over ``epochs`` epochs of
    ``updates_per_epoch`` updates, with ``warmup_epochs`` of warm-up; None for ``"none"`` (a constant
    learning rate)."""
    from timm.scheduler import create_scheduler_v2

    check_choices("adamw", sched, warmup_epochs)
    if sched == "none":
        return None
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=epochs, warmup_epochs=warmup_epochs, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler
