"""A plain-text progress bar on stderr: redrawn in place on a terminal, one line per epoch otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """``label [#####.....] done/total extra Ns``; ``update`` redraws on a terminal, ``close`` ends the line."""

    def __init__(self, total: int, label: str, stream: Any = None) -> None:
        self.total, self.label = max(total, 1), label
        self.stream = stream or sys.stderr
        self.live = getattr(self.stream, "isatty", lambda: False)()
        self.started = time.perf_counter()

    def text(self, done: int, extra: str) -> str:
        width = 24
        filled = int(width * done / self.total)
        elapsed = time.perf_counter() - self.started
        return f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {extra} {elapsed:.0f}s"

    def update(self, done: int, extra: str) -> None:
        if self.live:
            self.stream.write("\r" + self.text(done, extra))
            self.stream.flush()

    def close(self, extra: str) -> None:
        self.stream.write(("\r" if self.live else "") + self.text(self.total, extra) + "\n")
        self.stream.flush()
