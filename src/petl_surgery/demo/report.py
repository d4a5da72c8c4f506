"""The demonstration's outputs: accuracy per cell, gains with 95% intervals, the V-PETL trade-off, a text
report, CSV files and a plot."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..training.tradeoff import pareto_front
from ..training.intervals import METHOD as INTERVAL_METHOD
from ..training.intervals import paired_interval

ALL_TARGETS = "all targets"


def _main_grid(results: Iterable[Any]) -> List[Any]:
    """The runs of the PVP grid (modules in all blocks); the trade-off's other positions are apart."""
    return [r for r in results if r.position == "all"]


def summarize(results: Iterable[Any]) -> List[Dict[str, Any]]:
    """One row per (target, method, init, shots) of the PVP grid: mean, standard deviation, min and max of
    test accuracy over seeds, in percent; ``data`` says whether the target's images are real or generated."""
    groups: Dict[Tuple[str, str, str, str, int], List[float]] = {}
    for r in _main_grid(results):
        groups.setdefault((r.target, r.data, r.method, r.init, r.shots), []).append(100.0 * r.accuracy)
    rows = []
    for (target, data, method, init, shots), values in groups.items():
        rows.append(
            {
                "target": target,
                "data": data,
                "method": method,
                "init": init,
                "shots": shots,
                "seeds": len(values),
                "mean": round(statistics.fmean(values), 2),
                "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
                "min": round(min(values), 2),
                "max": round(max(values), 2),
            }
        )
    return rows


def _gain_row(target: str, data: str, method: str, shots: int, differences: Sequence[float]) -> Dict[str, Any]:
    interval = paired_interval(differences)
    return {
        "target": target,
        "data": data,
        "method": method,
        "shots": shots,
        "pairs": interval.n,
        "gain": round(interval.mean, 2),
        "ci_low": round(interval.low, 2),
        "ci_high": round(interval.high, 2),
        "verdict": interval.verdict,
        "interval": INTERVAL_METHOD,
    }


def gain_rows(results: Iterable[Any]) -> List[Dict[str, Any]]:
    """The gain of the pre-trained init in points (pre-trained minus random-init accuracy of the same seed,
    few-shot draw and head init), with its 95% interval: one row per (target, method, shots), then per
    (method, shots) pooled over the targets (``target`` = ``"all targets"``; pairs from every target and
    seed). ``verdict``: "higher"/"lower" when the whole interval lies above/below zero, else
    "inconclusive"."""
    accuracy: Dict[Tuple[str, str, int, int], Dict[str, float]] = {}
    kinds: Dict[str, str] = {}
    for r in _main_grid(results):
        accuracy.setdefault((r.target, r.method, r.shots, r.seed), {})[r.init] = 100.0 * r.accuracy
        kinds[r.target] = r.data
    pairs: Dict[Tuple[str, str, int], List[float]] = {}
    for (target, method, shots, _), inits in accuracy.items():
        if "random" in inits and "pretrained" in inits:
            difference = inits["pretrained"] - inits["random"]
            pairs.setdefault((target, method, shots), []).append(difference)
            pairs.setdefault((ALL_TARGETS, method, shots), []).append(difference)
    pooled_kind = "+".join(sorted(set(kinds.values())))
    return [
        _gain_row(target, kinds.get(target, pooled_kind), method, shots, values)
        for (target, method, shots), values in sorted(pairs.items(), key=lambda item: (item[0][0] == ALL_TARGETS,))
    ]


def tradeoff_rows(results: Iterable[Any], target: str, shots: int) -> List[Dict[str, Any]]:
    """The V-PETL view: one row per (method, position) of the random-init runs on ``target`` at ``shots``:
    the inserted modules' trainable parameters (the head, the same for all, not counted), mean and standard
    deviation of test accuracy over seeds (percent), and whether the point is on the Pareto front."""
    groups: Dict[Tuple[str, str], List[Any]] = {}
    for r in results:
        if r.target == target and r.shots == shots and r.init == "random":
            groups.setdefault((r.method, r.position), []).append(r)
    rows = []
    for (method, position), runs in groups.items():
        values = [100.0 * r.accuracy for r in runs]
        rows.append(
            {
                "target": target,
                "shots": shots,
                "method": method,
                "position": position,
                "parameters": runs[0].parameters,
                "seeds": len(values),
                "mean": round(statistics.fmean(values), 2),
                "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            }
        )
    front = set(pareto_front([(r["parameters"], r["mean"]) for r in rows]))
    for i, row in enumerate(rows):
        row["pareto"] = i in front
    return rows


def _lookup(rows: Sequence[Mapping[str, Any]], *keys: str) -> Dict[Tuple[Any, ...], Mapping[str, Any]]:
    return {tuple(r[k] for k in keys): r for r in rows}


def _interval_text(row: Mapping[str, Any]) -> str:
    if math.isnan(row["ci_low"]):
        return f"{row['gain']:+.1f}"
    return f"{row['gain']:+.1f} [{row['ci_low']:+.1f},{row['ci_high']:+.1f}]"


def conclusions(gains: Sequence[Mapping[str, Any]]) -> List[str]:
    """What the intervals support, in words: pooled over the targets, where the pre-trained init is higher
    or lower with the whole 95% interval on one side of zero, and how many cells are inconclusive; then the
    same per target (one target's cells are fewer pairs, but its effect is not averaged with others')."""
    pooled = [g for g in gains if g["target"] == ALL_TARGETS]
    if not pooled:
        return []
    total = len(gains)
    lines = [
        f"what the intervals support ({INTERVAL_METHOD}; each interval is 95% on its own, so of these {total} "
        f"cells about {total / 20:.1f} would exclude 0 by chance even with no effect anywhere):"
    ]
    for scope, cells in [("pooled over the targets", pooled)] + [
        (f"on '{target}' alone", [g for g in gains if g["target"] == target])
        for target in dict.fromkeys(g["target"] for g in gains if g["target"] != ALL_TARGETS)
    ]:
        higher = [f"{g['method']} {g['shots']}-shot ({_interval_text(g)})" for g in cells if g["verdict"] == "higher"]
        lower = [f"{g['method']} {g['shots']}-shot ({_interval_text(g)})" for g in cells if g["verdict"] == "lower"]
        found = "; ".join(
            part for part in (
                f"pre-trained init higher in {', '.join(higher)}" if higher else "",
                f"lower in {', '.join(lower)}" if lower else "",
            ) if part
        )
        rest = len(cells) - len(higher) - len(lower)
        lines.append(f"  {scope}: {found + '; ' if found else ''}{rest} of {len(cells)} method and shot cells "
                     f"inconclusive (interval contains 0, no claim either way)")
    return lines


def format_report(
    rows: Sequence[Mapping[str, Any]],
    gains: Sequence[Mapping[str, Any]],
    points: Sequence[Mapping[str, Any]],
    config: Any,
    methods: Sequence[str],
    targets: Mapping[str, Any],
) -> str:
    """Test accuracy (%), mean ± standard deviation over seeds, random-init vs pre-trained-init; the gain
    of the pre-trained init with its 95% interval per target and pooled; what the intervals support; the
    V-PETL trade-off."""
    table = _lookup(rows, "target", "method", "init", "shots")
    gain = _lookup(gains, "target", "method", "shots")
    shots = list(config.shots)
    cell = 20
    header = f"{'target':<12} {'method':<8} {'init':<11}" + "".join(f"{f'{k}-shot':>{cell}}" for k in shots)
    lines = [
        f"test accuracy (%), mean ± std over {len(config.seeds)} seeds; gain = pre-trained minus random init "
        f"(points) with its 95% interval",
        header,
        "-" * len(header),
    ]
    for target, task in targets.items():
        lines.append(f"{target:<12} ({task.kind} images, {task.num_classes} classes, chance "
                     f"{100 / task.num_classes:.1f}%)")
        for method in methods:
            for init in ("random", "pretrained"):
                cells = []
                for k in shots:
                    r = table.get((target, method, init, k))
                    cells.append(f"{r['mean']:.1f}±{r['std']:.1f}" if r else "-")
                lines.append(f"{'':<12} {method:<8} {init:<11}" + "".join(f"{c:>{cell}}" for c in cells))
            cells = [_interval_text(gain[(target, method, k)]) if (target, method, k) in gain else "-" for k in shots]
            lines.append(f"{'':<12} {method:<8} {'gain':<11}" + "".join(f"{c:>{cell}}" for c in cells))
        lines.append("")
    lines.append(f"gain pooled over the {len(targets)} targets (points, 95% interval over targets x seeds)")
    for method in methods:
        cells = [_interval_text(gain[(ALL_TARGETS, method, k)]) if (ALL_TARGETS, method, k) in gain else "-"
                 for k in shots]
        lines.append(f"{'':<12} {method:<8} {'gain':<11}" + "".join(f"{c:>{cell}}" for c in cells))
    lines.append("")
    lines.extend(conclusions(gains))
    if points:
        lines.append("")
        lines.append(f"V-PETL trade-off on '{points[0]['target']}' at {points[0]['shots']} shots, random init: "
                     f"accuracy against the modules' trainable parameters (* on the Pareto front)")
        for p in sorted(points, key=lambda p: p["parameters"]):
            lines.append(f"{'':<12} {p['method']:<8} {p['position']:<11} {p['parameters']:>9,d} parameters "
                         f"{p['mean']:6.1f}±{p['std']:.1f}%{' *' if p['pareto'] else ''}")
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_plot(
    rows: Sequence[Mapping[str, Any]],
    gains: Sequence[Mapping[str, Any]],
    points: Sequence[Mapping[str, Any]],
    config: Any,
    methods: Sequence[str],
    targets: Mapping[str, Any],
    path: Path,
) -> Tuple[Optional[Path], str]:
    """One figure: accuracy against shots per target (solid pre-trained init, dashed random init, bands one
    standard deviation), the pooled gain with its 95% interval, and the V-PETL trade-off (accuracy against
    trainable parameters, log axis, Pareto front). Without matplotlib: no plot, and a message saying so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None, (
            "matplotlib is not installed: no plot written (pip install 'petl_surgery[demo]' or "
            "pip install matplotlib); the table and CSV are complete"
        )
    table = _lookup(rows, "target", "method", "init", "shots")
    gain = _lookup(gains, "target", "method", "shots")
    shots = list(config.shots)
    panels = len(targets) + 1 + (1 if points else 0)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8), squeeze=False)
    axes = list(axes[0])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {method: colours[i % len(colours)] for i, method in enumerate(methods)}
    for axis, (target, task) in zip(axes, targets.items()):
        for method in methods:
            for init, style in (("pretrained", "-"), ("random", "--")):
                found = [table.get((target, method, init, k)) for k in shots]
                if not all(found):
                    continue
                means = [r["mean"] for r in found]
                stds = [r["std"] for r in found]
                axis.plot(shots, means, style, color=colour[method], marker="o", markersize=3,
                          label=f"{method} {init}")
                axis.fill_between(shots, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                  color=colour[method], alpha=0.12 if init == "pretrained" else 0.06)
        axis.axhline(100 / task.num_classes, color="grey", linewidth=0.8, linestyle=":", label="chance")
        axis.set_xscale("log", base=2)
        axis.set_xticks(shots)
        axis.set_xticklabels([str(k) for k in shots])
        axis.set_title(f"{target} ({task.kind}, {task.num_classes} classes)")
        axis.set_xlabel("shots per class")
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="upper left")
    axis = axes[len(targets)]
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        found = [gain.get((ALL_TARGETS, method, k)) for k in shots]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j, g in enumerate(found) if g]
        found = [g for g in found if g]
        means = [g["gain"] for g in found]
        low = [g["gain"] - g["ci_low"] if not math.isnan(g["ci_low"]) else 0.0 for g in found]
        high = [g["ci_high"] - g["gain"] if not math.isnan(g["ci_high"]) else 0.0 for g in found]
        axis.errorbar(xs, means, yerr=[low, high], fmt="o", color=colour[method], capsize=2, markersize=4,
                      label=method)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(shots)))
    axis.set_xticklabels([f"{k}-shot" for k in shots])
    axis.set_title("gain of pre-trained init, 95% interval\n(pooled over targets)", fontsize=9)
    axis.set_ylabel("points")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=6)
    if points:
        axis = axes[-1]
        for marker, position in zip(("o", "s", "^"), sorted({p["position"] for p in points})):
            for p in points:
                if p["position"] == position:
                    axis.errorbar([p["parameters"]], [p["mean"]], yerr=[[p["std"]], [p["std"]]], fmt=marker,
                                  color=colour.get(p["method"], "grey"), capsize=2, markersize=5)
            axis.plot([], [], marker, color="grey", label=f"{position}")
        front = sorted((p["parameters"], p["mean"]) for p in points if p["pareto"])
        axis.plot([f[0] for f in front], [f[1] for f in front], "-", color="black", linewidth=0.8,
                  label="Pareto front")
        for p in points:
            axis.annotate(p["method"], (p["parameters"], p["mean"]), fontsize=6, xytext=(3, 3),
                          textcoords="offset points")
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a short axis
        axis.set_xlabel("trainable parameters of the modules (log)")
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(f"V-PETL trade-off: {points[0]['target']}, {points[0]['shots']} shots, random init",
                       fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6, loc="lower right")
    figure.suptitle(f"PVP demonstration ({config.name}): pre-trained (solid) vs random-init (dashed) modules")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path, f"wrote the plot {path}"
