"""The demonstration's outputs: mean and spread over seeds, a text table, CSV files and a plot."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .tasks import Task


def summarize(results: Iterable[Any]) -> List[Dict[str, Any]]:
    """One row per (target, method, init, shots): mean, standard deviation, min and max of test accuracy
    over seeds, in percent."""
    groups: Dict[Tuple[str, str, str, int], List[float]] = {}
    for r in results:
        groups.setdefault((r.target, r.method, r.init, r.shots), []).append(100.0 * r.accuracy)
    rows = []
    for (target, method, init, shots), values in groups.items():
        rows.append(
            {
                "target": target,
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


def _lookup(rows: Sequence[Mapping[str, Any]]) -> Dict[Tuple[str, str, str, int], Mapping[str, Any]]:
    return {(r["target"], r["method"], r["init"], r["shots"]): r for r in rows}


def format_table(rows: Sequence[Mapping[str, Any]], config: Any, methods: Sequence[str], targets: Mapping[str, Task]) -> str:
    """Test accuracy (%), mean ± standard deviation over seeds, random-init vs pre-trained-init, and the
    gain of the pre-trained init; then the gain averaged over target tasks."""
    table = _lookup(rows)
    shots = list(config.shots)
    cell = 13
    header = f"{'target':<10} {'method':<8} {'init':<11}" + "".join(f"{f'{k}-shot':>{cell}}" for k in shots)
    lines = [
        f"test accuracy (%), mean ± std over {len(config.seeds)} seed(s); gain = pre-trained minus random init",
        header,
        "-" * len(header),
    ]
    for target, task in targets.items():
        lines.append(f"{target:<10} ({task.num_classes} classes, chance {100 / task.num_classes:.1f}%)")
        for method in methods:
            for init in ("random", "pretrained"):
                cells = []
                for k in shots:
                    r = table.get((target, method, init, k))
                    cells.append(f"{r['mean']:.1f}±{r['std']:.1f}" if r else "-")
                lines.append(f"{'':<10} {method:<8} {init:<11}" + "".join(f"{c:>{cell}}" for c in cells))
            gains = []
            for k in shots:
                a, b = table.get((target, method, "random", k)), table.get((target, method, "pretrained", k))
                gains.append(f"{b['mean'] - a['mean']:+.1f}" if a and b else "-")
            lines.append(f"{'':<10} {method:<8} {'gain':<11}" + "".join(f"{g:>{cell}}" for g in gains))
        lines.append("")
    lines.append("gain averaged over the target tasks (points)")
    for method in methods + ["all"]:
        chosen = methods if method == "all" else [method]
        gains = []
        for k in shots:
            values = [
                table[(t, m, "pretrained", k)]["mean"] - table[(t, m, "random", k)]["mean"]
                for t in targets
                for m in chosen
                if (t, m, "random", k) in table and (t, m, "pretrained", k) in table
            ]
            gains.append(f"{sum(values) / len(values):+.1f}" if values else "-")
        lines.append(f"{'':<10} {method:<8} {'gain':<11}" + "".join(f"{g:>{cell}}" for g in gains))
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_plot(
    rows: Sequence[Mapping[str, Any]], config: Any, methods: Sequence[str], targets: Mapping[str, Task], path: Path
) -> Tuple[Optional[Path], str]:
    """Accuracy against shots per class, one panel per target task; solid lines pre-trained init, dashed
    random init, bands one standard deviation. Without matplotlib: no plot, and a message saying so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, (
            "matplotlib is not installed: no plot written (pip install 'petl_surgery[demo]' or "
            "pip install matplotlib); the table and CSV are complete"
        )
    table = _lookup(rows)
    shots = list(config.shots)
    figure, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (target, task) in zip(axes[0], targets.items()):
        for i, method in enumerate(methods):
            for init, style in (("pretrained", "-"), ("random", "--")):
                found = [table.get((target, method, init, k)) for k in shots]
                if not all(found):
                    continue
                means = [r["mean"] for r in found]
                stds = [r["std"] for r in found]
                colour = colours[i % len(colours)]
                axis.plot(shots, means, style, color=colour, marker="o", markersize=3, label=f"{method} {init}")
                axis.fill_between(shots, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                  color=colour, alpha=0.12 if init == "pretrained" else 0.06)
        axis.axhline(100 / task.num_classes, color="grey", linewidth=0.8, linestyle=":", label="chance")
        axis.set_xscale("log", base=2)
        axis.set_xticks(shots)
        axis.set_xticklabels([str(k) for k in shots])
        axis.set_title(f"{target} ({task.num_classes} classes)")
        axis.set_xlabel("shots per class")
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.suptitle(f"PVP demonstration ({config.name}): pre-trained (solid) vs random-init (dashed) modules")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path, f"wrote the plot {path}"
