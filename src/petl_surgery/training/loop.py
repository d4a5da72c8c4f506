"""The training loop of a delta (timm's optimizer and schedule over the trainable parameters, cross
entropy; on a device, in mixed precision, compiled, under torchrun, on cached features) and its
evaluation."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SurgeryError
from .progress import Progress


@dataclass
class EpochRecord:
    """One epoch: its number, training loss and accuracy, validation loss and accuracy (None without
    validation data) and wall time in seconds."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: Optional[float] = None
    val_accuracy: Optional[float] = None
    seconds: float = 0.0
    lr: Optional[float] = None
    images_per_second: Optional[float] = None

    def as_dict(self) -> dict:
        entry = {"epoch": self.epoch, "train_loss": self.train_loss, "train_accuracy": self.train_accuracy}
        if self.val_loss is not None:
            entry.update(val_loss=self.val_loss, val_accuracy=self.val_accuracy)
        entry["seconds"] = round(self.seconds, 3)
        if self.lr is not None:
            entry["lr"] = self.lr
        if self.images_per_second is not None:
            entry["images_per_second"] = round(self.images_per_second, 2)
        return entry


DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("none", "bf16", "fp16")


def choose_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA, then MPS, then the CPU; ``"cuda"`` (or ``"cuda:N"``) and ``"mps"`` must be
    available, else a SurgeryError saying so."""
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise SurgeryError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    mps = getattr(torch.backends, "mps", None)
    mps_ready = mps is not None and mps.is_available()
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ready else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SurgeryError(f"device {name!r} is not available: this torch sees no CUDA device")
    if kind == "mps" and not mps_ready:
        raise SurgeryError("device 'mps' is not available on this machine")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str) -> Any:
    """The autocast context of ``precision`` on ``device`` (a no-op context for ``"none"``)."""
    if precision not in PRECISIONS:
        raise SurgeryError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def evaluate(
    model: nn.Module, loader: Any, device: Optional[torch.device] = None, precision: str = "none"
) -> Tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` (in eval mode, no gradients) over ``loader``,
    on ``device`` (default: where the model is) under ``precision``'s autocast."""
    device = device or next(model.parameters()).device
    model.eval()
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with autocast_for(device, precision):
                logits = model(x)
            logits = logits.float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
    return loss / max(count, 1), correct / max(count, 1)


def accuracy_report(
    model: nn.Module, loader: Any, classes: List[str], device: Optional[torch.device] = None, precision: str = "none"
) -> dict:
    """Top-1 and top-k (k = 5, or the number of classes if fewer) accuracy as fractions, and top-1 per
    class, of ``model`` in eval mode over ``loader``: ``{"images", "top1", "top5", "k", "per_class"}``.
    Deterministic: no gradients, no randomness, ties broken by ``torch.topk``'s order."""
    device = device or next(model.parameters()).device
    k = min(5, len(classes))
    model.eval()
    hits1 = hitsk = count = 0
    per_class = {name: [0, 0] for name in classes}  # correct, seen
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with autocast_for(device, precision):
                logits = model(x)
            top = logits.float().topk(k, dim=1).indices
            first = top[:, 0] == y
            hits1 += int(first.sum())
            hitsk += int((top == y[:, None]).any(1).sum())
            count += len(y)
            for label, correct in zip(y.tolist(), first.tolist()):
                per_class[classes[label]][0] += int(correct)
                per_class[classes[label]][1] += 1
    return {
        "images": count,
        "top1": hits1 / max(count, 1),
        "top5": hitsk / max(count, 1),
        "k": k,
        "per_class": {name: (c / n if n else None) for name, (c, n) in per_class.items()},
    }


def fit(
    model: nn.Module,
    train_set: Any,
    val_set: Optional[Any] = None,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    workers: int = 0,
    seed: int = 0,
    device: Optional[torch.device] = None,
    precision: str = "none",
    grad_accum: int = 1,
    after_epoch: Optional[Callable[[EpochRecord], None]] = None,
    opt: str = "adamw",
    sched: str = "cosine",
    warmup_epochs: int = 0,
    compile_backend: Optional[str] = None,
    cache_features: bool = False,
) -> List[EpochRecord]:
    """Train ``model``'s trainable parameters (those surgery left trainable) on ``train_set``, in place.

    Defaults (those of ``petl-surgery train``): timm's AdamW (``opt``) with ``lr`` 1e-3 and
    ``weight_decay`` 1e-4 (none on 1-D parameters, timm's grouping), timm's cosine schedule (``sched``)
    to zero stepped after every update, ``warmup_epochs`` 0 (see ``optim``), batches of 32 in an order
    seeded with ``seed`` and the epoch (``distributed.sampler``). The model is moved to ``device``
    (default: where it is). ``precision`` ``"bf16"`` or ``"fp16"`` runs forwards under autocast (fp16
    with a gradient scaler, as mixed precision needs); the trainable weights stay in their dtype.
    ``grad_accum`` sums the gradients of that many batches (each loss divided by it) before one
    optimizer step. ``compile_backend`` (e.g. ``"inductor"``) trains through ``torch.compile`` of the
    model (validation runs eagerly); the trained weights are the model's own, so ``ps.save(model)``
    saves them. ``cache_features`` runs the frozen prefix once per image (``caching``: refused, before
    anything is trained, where it would not give the same training). Under torchrun (a process group
    initialised, ``distributed.start``) each rank trains on its shard through DistributedDataParallel and
    the records hold the numbers over all ranks. After each epoch (validated on ``val_set`` when given)
    ``after_epoch`` receives its record, e.g. to save the delta. Returns the records of every epoch."""
    from .distributed import active, is_main, sum_over_ranks, world_size, wrap
    from .distributed import sampler as shard_sampler
    from .optim import check_choices, make_optimizer, make_schedule

    if type(grad_accum) is not int or grad_accum < 1:
        raise SurgeryError(f"grad_accum must be a positive int; got {grad_accum!r}")
    device = device or next(model.parameters()).device
    autocast_for(device, precision)  # checks the name before anything runs
    check_choices(opt, sched, warmup_epochs)
    model.to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    runner: nn.Module = model
    if cache_features:
        from .caching import build_cache

        cache = build_cache(model, train_set, val_set, device=device, autocast=autocast_for(device, precision),
                            batch_size=batch_size, workers=workers)
        runner, train_set, val_set, workers = cache.runner, cache.train, cache.val, 0
    sampler = shard_sampler(train_set, seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, sampler=sampler, num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )
    val_loader = (
        torch.utils.data.DataLoader(val_set, batch_size=batch_size, num_workers=workers) if val_set is not None else None
    )
    optimizer = make_optimizer(model, opt, lr, weight_decay)
    updates_per_epoch = math.ceil(len(loader) / grad_accum)
    schedule = make_schedule(optimizer, sched, epochs, warmup_epochs, updates_per_epoch)
    ddp = wrap(runner, device) if active() else None
    trainer: nn.Module = ddp or runner
    if compile_backend:
        if not cache_features:
            _first_forward(model, train_set, device, precision)
        trainer = torch.compile(trainer, backend=compile_backend)
    records: List[EpochRecord] = []
    updates = 0
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        runner.train()
        progress = Progress(len(sampler), f"epoch {epoch}/{epochs}", enabled=is_main())
        loss_sum, correct, count = 0.0, 0, 0
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(loader, 1):
            x, y = x.to(device), y.to(device)
            step = i % grad_accum == 0 or i == len(loader)
            with contextlib.nullcontext() if ddp is None or step else ddp.no_sync():
                with autocast_for(device, precision):
                    logits = trainer(x)
                loss = F.cross_entropy(logits.float(), y)
                scaler.scale(loss / grad_accum).backward()
            if step:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                updates += 1
                if schedule is not None:
                    schedule.step_update(num_updates=updates)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
            progress.update(len(y), f"loss {loss_sum / count:.4f} acc {correct / count:.3f}")
        progress.stop()
        if schedule is not None:
            schedule.step(epoch)
        loss_sum, correct, count = sum_over_ranks([loss_sum, correct, count], device)
        record = EpochRecord(epoch, loss_sum / count, correct / count, lr=optimizer.param_groups[0]["lr"])
        text = f"loss {record.train_loss:.4f} acc {record.train_accuracy:.3f}"
        if val_loader is not None:
            record.val_loss, record.val_accuracy = evaluate(runner, val_loader, device, precision)
            text += f" | val loss {record.val_loss:.4f} acc {record.val_accuracy:.3f}"
        record.seconds = time.perf_counter() - started
        record.images_per_second = progress.close(text) * world_size()
        records.append(record)
        if after_epoch is not None:
            after_epoch(record)
    return records


def _first_forward(model: nn.Module, dataset: Any, device: torch.device, precision: str) -> None:
    """One eager forward in eval mode on the first image before torch.compile traces the model: the
    library's first-forward check runs then and leaves no graph break behind (``verification``). The
    random states are kept, so the training that follows draws what it would have drawn."""
    from .caching import kept_random_state

    was_training = model.training
    model.eval()
    with kept_random_state(), torch.no_grad(), autocast_for(device, precision):
        model(torch.as_tensor(dataset[0][0]).unsqueeze(0).to(device))
    model.train(was_training)
