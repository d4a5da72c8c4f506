"""The training loop of a delta (AdamW over the trainable parameters, cosine schedule per step, cross
entropy) and its evaluation."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

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

    def as_dict(self) -> dict:
        entry = {"epoch": self.epoch, "train_loss": self.train_loss, "train_accuracy": self.train_accuracy}
        if self.val_loss is not None:
            entry.update(val_loss=self.val_loss, val_accuracy=self.val_accuracy)
        entry["seconds"] = round(self.seconds, 3)
        return entry


def evaluate(model: nn.Module, loader: Any) -> Tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` (in eval mode, no gradients) over ``loader``."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
    return loss / max(count, 1), correct / max(count, 1)


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
    after_epoch: Optional[Callable[[EpochRecord], None]] = None,
) -> List[EpochRecord]:
    """Train ``model``'s trainable parameters (those surgery left trainable) on ``train_set``, in place.

    Defaults (those of ``petl-surgery train``): AdamW with ``lr`` 1e-3 and ``weight_decay`` 1e-4, a
    cosine decay of the learning rate to zero over all steps, batches of 32 shuffled with ``seed``.
    After each epoch (validated on ``val_set`` when given) ``after_epoch`` receives its record, e.g. to
    save the delta. Returns the records of every epoch."""
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )
    val_loader = (
        torch.utils.data.DataLoader(val_set, batch_size=batch_size, num_workers=workers) if val_set is not None else None
    )
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    records: List[EpochRecord] = []
    for epoch in range(1, epochs + 1):
        model.train()
        progress = Progress(len(loader), f"epoch {epoch}/{epochs}")
        loss_sum, correct, count = 0.0, 0, 0
        started = time.perf_counter()
        for i, (x, y) in enumerate(loader, 1):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
            progress.update(i, f"loss {loss_sum / count:.4f} acc {correct / count:.3f}")
        record = EpochRecord(epoch, loss_sum / count, correct / count)
        text = f"loss {record.train_loss:.4f} acc {record.train_accuracy:.3f}"
        if val_loader is not None:
            record.val_loss, record.val_accuracy = evaluate(model, val_loader)
            text += f" | val loss {record.val_loss:.4f} acc {record.val_accuracy:.3f}"
        record.seconds = time.perf_counter() - started
        progress.close(text)
        records.append(record)
        if after_epoch is not None:
            after_epoch(record)
    return records
