"""The gain of a pre-trained init over a random one in a study: paired by seed, with a 95% interval.

Two runs of a study that differ only in their init (same method, options, layers, shots and seed: the
same few-shot draw, head init and batches) form a pair; the gain of the pair is the init's accuracy
minus the random init's, in points. Per (method, options, layers, init, shots) the mean gain and its
two-sided 95% Student t interval over the seeds come from :mod:`.intervals`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .initialization import RANDOM
from .intervals import METHOD as INTERVAL_METHOD
from .intervals import paired_interval

GAIN_COLUMNS = ("method", "options", "layers", "init", "shots", "pairs", "gain", "ci_low", "ci_high", "verdict")


def paired_gains(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per (method, options, layers, init other than random, shots) that has at least one
    seed run with both that init and the random one: ``pairs``, ``gain`` (mean, in points), ``ci_low`` and
    ``ci_high`` (its 95% interval; NaN from a single pair) and ``verdict`` (:attr:`Interval.verdict`).
    ``rows`` are a study's (``results.csv``'s) rows; accuracy is a fraction. In the rows' order."""
    accuracy: Dict[Tuple[str, str, str, str, str], Dict[str, float]] = {}
    for row in rows:
        cell = (row["method"], row["options"], row["layers"], str(row["shots"]), str(row["seed"]))
        accuracy.setdefault(cell, {})[row.get("init") or RANDOM] = 100.0 * float(row["accuracy"])
    differences: Dict[Tuple[str, str, str, str, str], List[float]] = {}
    for (method, options, layers, shots, _), by_init in accuracy.items():
        if RANDOM not in by_init:
            continue
        for init, value in by_init.items():
            if init != RANDOM:
                differences.setdefault((method, options, layers, init, shots), []).append(value - by_init[RANDOM])
    entries = []
    for (method, options, layers, init, shots), values in differences.items():
        interval = paired_interval(values)
        entries.append({
            "method": method, "options": options, "layers": layers, "init": init, "shots": shots,
            "pairs": interval.n, "gain": interval.mean, "ci_low": interval.low, "ci_high": interval.high,
            "verdict": interval.verdict,
        })
    return entries


def write_gains(entries: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``path`` as CSV with :data:`GAIN_COLUMNS` (gain and its interval in points)."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=GAIN_COLUMNS)
        writer.writeheader()
        writer.writerows(entries)
    return Path(path)


def _label(entry: Mapping[str, Any]) -> str:
    settings = json.loads(entry["options"]) if entry["options"] else {}
    parts = [entry["method"], *(f"{k}={v}" for k, v in settings.items())]
    if entry["layers"] not in ("all", ""):
        parts.append(f"@{entry['layers']}")
    return " ".join(parts)


def _init_name(init: str) -> str:
    return Path(init).name


def format_gains(entries: Sequence[Mapping[str, Any]]) -> str:
    """The gains as a text table: one line per run and init, one column per data scale (``+2.1
    [-0.4,+4.6] (n)``), and the interval's method."""
    scales = list(dict.fromkeys(str(e["shots"]) for e in entries))
    lines: Dict[Tuple[str, str], Dict[str, str]] = {}
    for e in entries:
        interval = "" if e["pairs"] < 2 else f" [{e['ci_low']:+.1f},{e['ci_high']:+.1f}]"
        lines.setdefault((_label(e), _init_name(e["init"])), {})[str(e["shots"])] = f"{e['gain']:+.1f}{interval} ({e['pairs']})"
    headers = [("all images" if s == "all" else f"{s} shots") for s in scales]
    first = max([len("run")] + [len(label) for label, _ in lines])
    second = max([len("init")] + [len(init) for _, init in lines])
    widths = [max([len(h)] + [len(cells.get(s, "")) for cells in lines.values()]) for h, s in zip(headers, scales)]
    text = [f"gain over the random init (points; mean over seeds, 95% interval, pairs): {INTERVAL_METHOD}",
            "  ".join(["run".ljust(first), "init".ljust(second)] + [h.rjust(w) for h, w in zip(headers, widths)])]
    text.append("-" * len(text[-1]))
    for (label, init), cells in lines.items():
        text.append("  ".join([label.ljust(first), init.ljust(second)]
                              + [cells.get(s, "-").rjust(w) for s, w in zip(scales, widths)]))
    return "\n".join(text)


def plot_gains(entries: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Tuple[Optional[Path], Optional[str]]:
    """Write ``path``: per run and init, the gain (points) against the data scale with its 95% interval
    as a bar, zero marked. Returns (the path, None), or (None, the reason) without matplotlib."""
    from .tradeoff import NO_MATPLOTLIB

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None, NO_MATPLOTLIB.replace("tradeoff.png", Path(path).name)
    scales = list(dict.fromkeys(str(e["shots"]) for e in entries))
    series: Dict[Tuple[str, str], List[Mapping[str, Any]]] = {}
    for e in entries:
        series.setdefault((_label(e), _init_name(e["init"])), []).append(e)
    figure = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    width = 0.6 / max(len(series), 1)
    for i, ((label, init), members) in enumerate(series.items()):
        x = [scales.index(str(m["shots"])) + (i - (len(series) - 1) / 2) * width for m in members]
        y = [m["gain"] for m in members]
        low = [0.0 if m["pairs"] < 2 else m["gain"] - m["ci_low"] for m in members]
        high = [0.0 if m["pairs"] < 2 else m["ci_high"] - m["gain"] for m in members]
        axis.errorbar(x, y, yerr=[low, high], fmt="o", capsize=3, color=f"C{i % 10}", label=f"{label} from {init}")
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(scales)), [("all" if s == "all" else s) for s in scales])
    axis.set_xlabel("shots per class")
    axis.set_ylabel("gain over random init (points)")
    axis.set_title((title + "\n" if title else "") + "paired by seed; bars: 95% Student t interval", fontsize=9)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path), None
