"""The progress of an epoch on stderr: a tqdm bar with images per second on a terminal, and one line
per epoch (loss, accuracy, throughput, time) everywhere, so that logs redirected to a file hold no bar.

tqdm is a declared dependency (timm already pulls it in through huggingface_hub)."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional


class Progress:
    """``update(images, text)`` after each batch, ``stop()`` after the last (the throughput counts the
    training batches only), ``close(text)`` at the end of the epoch. ``enabled`` False (ranks other than
    0) shows nothing."""

    def __init__(self, total_images: int, label: str, stream: Any = None, enabled: bool = True) -> None:
        self.label, self.enabled = label, enabled
        self.stream = stream or sys.stderr
        self.images = 0
        self.started = time.perf_counter()
        self.stopped: Optional[float] = None
        self.bar: Optional[Any] = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total_images, desc=label, unit="img", unit_scale=False, file=self.stream,
                            leave=False, dynamic_ncols=True)

    @property
    def rate(self) -> float:
        """Images per second, up to ``stop()`` once it is called."""
        end = self.stopped if self.stopped is not None else time.perf_counter()
        return self.images / max(end - self.started, 1e-9)

    def stop(self) -> None:
        if self.stopped is None:
            self.stopped = time.perf_counter()

    def update(self, images: int, text: str) -> None:
        self.images += images
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(images)

    def close(self, text: str) -> float:
        """End the epoch: one line ``label text, N img/s, Ts``; returns the images per second."""
        rate, elapsed = self.rate, time.perf_counter() - self.started
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            self.stream.write(f"{self.label} {text} | {rate:.1f} img/s {elapsed:.1f}s\n")
            self.stream.flush()
        return rate
