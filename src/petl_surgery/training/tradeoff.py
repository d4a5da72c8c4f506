"""The parameter-accuracy trade-off of a study: runs grouped over seeds, their Pareto front, a plot."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

NO_MATPLOTLIB = ("matplotlib is not installed: no tradeoff.png written (pip install 'petl_surgery[demo]' or "
                 "pip install matplotlib); results.csv is complete")


def summarize(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per (method, options, layers, init, shots) over its seeds: ``label``, ``shots``,
    ``parameters`` (trainable), ``mean``, ``low`` and ``high`` (the seeds' extremes) of accuracy,
    ``seeds``; in the rows' order. A label names an init other than random by its file name."""
    groups: Dict[Tuple[Any, ...], List[Mapping[str, Any]]] = {}
    for row in rows:
        init = row.get("init") or "random"
        groups.setdefault((row["method"], row["options"], row["layers"], init, row["shots"]), []).append(row)
    entries = []
    for (method, options, layers, init, shots), members in groups.items():
        accuracies = [float(m["accuracy"]) for m in members]
        settings = json.loads(options) if options else {}
        label = " ".join([method, *(f"{k}={v}" for k, v in settings.items())] + ([] if layers in ("all", "") else [f"@{layers}"])
                         + ([] if init == "random" else [f"from {Path(init).name}"]))
        entries.append({
            "label": label, "shots": shots, "parameters": int(members[0]["trainable_parameters"]),
            "mean": mean(accuracies), "low": min(accuracies), "high": max(accuracies), "seeds": len(members),
        })
    return entries


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points (parameters, accuracy) that no other point dominates (as few or fewer
    parameters and as high or higher accuracy, one of them strictly), by increasing parameters."""
    front = []
    for i, (p, a) in enumerate(points):
        dominated = any((q <= p and b >= a) and (q < p or b > a) for j, (q, b) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Tuple[Optional[Path], Optional[str]]:
    """Write ``path``: top-1 accuracy (percent) against trainable parameters on a log axis, one marker
    per run and data scale at the mean over seeds with a bar from the lowest to the highest seed, the
    Pareto front of each data scale drawn as a dashed line through ringed markers. Returns (the path,
    None), or (None, the reason) without matplotlib. Uses matplotlib's Agg canvas, not pyplot, so the
    caller's backend is left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None, NO_MATPLOTLIB
    entries = summarize(rows)
    figure = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    scales = list(dict.fromkeys(entry["shots"] for entry in entries))
    colours = [f"C{i % 10}" for i in range(len(scales))]
    for scale, colour in zip(scales, colours):
        group = [e for e in entries if e["shots"] == scale]
        x = [e["parameters"] for e in group]
        y = [100 * e["mean"] for e in group]
        spread = [[100 * (e["mean"] - e["low"]) for e in group], [100 * (e["high"] - e["mean"]) for e in group]]
        name = "all images" if scale == "all" else f"{scale} shots"
        axis.errorbar(x, y, yerr=spread, fmt="o", color=colour, capsize=3, label=name)
        front = pareto_front(list(zip(x, y)))
        axis.plot([x[i] for i in front], [y[i] for i in front], "--", color=colour, linewidth=1)
        axis.scatter([x[i] for i in front], [y[i] for i in front], s=140, facecolors="none", edgecolors=colour)
    for label in dict.fromkeys(e["label"] for e in entries):  # once per run, beside its best data scale
        best = max((e for e in entries if e["label"] == label), key=lambda e: e["mean"])
        axis.annotate(label, (best["parameters"], 100 * best["mean"]), textcoords="offset points", xytext=(5, 5),
                      fontsize=7)
    axis.set_xscale("log")
    axis.margins(x=0.2, y=0.1)
    axis.set_xlabel("trainable parameters (log scale)")
    axis.set_ylabel("top-1 accuracy (%)")
    seeds = max(e["seeds"] for e in entries)
    axis.set_title(title + (f"\nmean over {seeds} seeds, bars: lowest to highest; rings: Pareto front" if title else ""),
                   fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path), None
