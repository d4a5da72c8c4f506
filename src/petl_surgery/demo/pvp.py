"""The PVP experiment in miniature, run through the study a user runs: pre-trained PETL modules against
random-init ones on few-shot targets, with the V-PETL trade-off beside it. The design and why it was
chosen: docs/demo.md.

1. Backbone (ImageNet-21k's part): a small timm ViT (32 px, patch 8, width 96, depth 4, random weights)
   is trained whole, with :func:`petl_surgery.training.fit`, on a broad generated source: 36 object
   classes (shape x texture, any colour and position) and 24 stroke-glyph classes (:mod:`.glyphs`). Its
   weights (no head) go to ``backbone.safetensors`` and it is frozen from here on.
2. Modules (PVP's first stage, ImageNet-1k's part): each method is trained on 24 other glyph classes,
   related to the targets as ImageNet is to VTAB, by a study (``petl_surgery.training.run_study``, what
   ``petl-surgery study`` runs) over the ImageFolder ``data/source``, the backbone loaded from the file.
3. Targets (PVP's second stage): per target, one study whose runs are each method from a random init and
   from its source delta (``init``: ``ps.load(model, delta, load_head=False)``), at every shot count and
   seed; and for the V-PETL trade-off a study of each method from random in the upper half of the
   blocks, at the largest shot count. The targets: scikit-learn's handwritten digits (real images, the
   ``demo`` extra) and 10 glyph classes seen by neither source. The studies run side by side in
   ``processes`` processes.
4. The report: accuracy per cell, the paired gain of the pre-trained init with its 95% interval per
   target and pooled over the targets (:mod:`petl_surgery.training.intervals`, as the study's own
   ``gains.csv``), what the intervals support, the trade-off; CSV files and a plot.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch

import petl_surgery as ps

from .digits import DIGITS, digits_available
from .folders import write_image_folder
from .glyphs import glyph_classes, glyph_images
from .tasks import IMAGE_SIZE, Task, make_images

# Module sizes for a width-96 ViT (the library's defaults are sized for ViT-B, width 768).
METHOD_OPTIONS: Dict[str, Dict[str, Any]] = {
    "vpt": {"num_tokens": 8, "deep": True, "dropout": 0.0},
    "lora": {"rank": 8, "targets": ["q", "v"]},
    "adapter": {"bottleneck": 16},
    "patt": {"mid_dim": 16},
    "bapat": {"mid_dim": 16, "bottleneck": 16},
}
INITS = ("random", "pretrained")
POSITIONS = ("all", "upper half")  # the V-PETL trade-off's positions of the trainable parameters
OBJECTS = Task("objects", ("shape", "texture"), (None, None), "6 shapes x 6 textures, any colour and position")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one run of the demonstration (defaults: ``petl-surgery demo``)."""

    name: str = "reduced"
    methods: Tuple[str, ...] = ("lora", "patt", "bapat")
    targets: Tuple[str, ...] = ("digits", "glyphs")
    shots: Tuple[int, ...] = (1, 4, 16)
    seeds: Tuple[int, ...] = tuple(range(8))  # 16 pairs per pooled cell: see docs/demo.md for why 8
    tradeoff_target: Optional[str] = "digits"  # a study of every method, random, in the upper half, largest shots
    # the backbone
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    backbone_glyph_classes: int = 24
    backbone_per_class: int = 80  # images per class of the 36 object and the glyph classes
    backbone_epochs: int = 3
    backbone_lr: float = 1e-3
    backbone_batch: int = 64
    # the modules' source task
    source_classes: int = 24
    source_per_class: int = 80
    source_epochs: int = 2
    source_lr: float = 5e-3
    # the targets
    target_glyph_classes: int = 10
    target_pool_per_class: int = 40  # the glyph target's training pool, shots drawn from it
    test_per_class: int = 30
    epochs: int = 12
    batch_size: int = 32
    lr: float = 1e-2
    # the target studies run side by side in this many processes (one torch thread each); three studies on
    # two cores: the OS shares the cores, so the shortest study does not wait for a long one to finish
    processes: int = 3
    seed: int = 0

    def method_list(self) -> List[str]:
        """The configured methods that this petl_surgery provides."""
        return [m for m in self.methods if m in ps.METHODS]

    def target_list(self) -> List[str]:
        """The configured targets that can run here: the digits need scikit-learn."""
        return [t for t in self.targets if t != "digits" or digits_available()]

    def upper_half(self) -> str:
        """The blocks of the trade-off's "upper half" position, as a study's ``layers``."""
        return f"{self.depth // 2}:"

    def model_args(self) -> Dict[str, Any]:
        return {"img_size": IMAGE_SIZE, "patch_size": self.patch_size, "embed_dim": self.embed_dim,
                "depth": self.depth, "num_heads": self.num_heads}


REDUCED = DemoConfig()
FULL = replace(REDUCED, name="full", methods=("vpt", "lora", "adapter", "patt", "bapat"), shots=(1, 2, 4, 8, 16),
               seeds=tuple(range(10)), backbone_per_class=160, backbone_epochs=4, source_per_class=160,
               source_epochs=3, test_per_class=60)
MICRO = replace(REDUCED, name="micro", methods=("lora", "patt"), shots=(1, 2), seeds=(0, 1, 2), embed_dim=32,
                depth=2, num_heads=2, backbone_glyph_classes=4, backbone_per_class=2, backbone_epochs=1,
                source_classes=4, source_per_class=4, source_epochs=1, target_glyph_classes=3,
                target_pool_per_class=3, test_per_class=2, epochs=1, batch_size=16, processes=1)


@dataclass
class Target:
    """A few-shot target as the report names it."""

    name: str
    kind: str  # "real" or "generated"
    num_classes: int
    description: str


@dataclass
class Result:
    """One few-shot run: ``data`` says whether the target's images are ``"real"`` or ``"generated"``;
    ``position`` where the modules sit (``"all"`` blocks, or ``"upper half"`` in the trade-off runs)."""

    target: str
    data: str
    method: str
    init: str
    shots: int
    seed: int
    accuracy: float
    position: str = "all"
    parameters: int = 0  # trainable parameters of the inserted modules (the head not counted)


@dataclass
class DemoReport:
    """What a run produced: per-run results, the sources' numbers, timings (wall and CPU seconds) and files."""

    config: DemoConfig
    results: List[Result] = field(default_factory=list)
    backbone_accuracy: float = 0.0
    source_accuracy: Dict[str, float] = field(default_factory=dict)
    checkpoints: Dict[str, Path] = field(default_factory=dict)
    studies: Dict[str, Path] = field(default_factory=dict)
    timings: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    files: Dict[str, Optional[Path]] = field(default_factory=dict)
    skipped_methods: List[str] = field(default_factory=list)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (the target studies'; on
    systems without the ``resource`` module, Windows, this process's alone)."""
    try:
        import resource
    except ImportError:
        return time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def _timed(report: DemoReport, stage: str) -> Any:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    yield
    report.timings[stage] = (time.perf_counter() - wall, _cpu_seconds() - cpu)


def build_model(config: DemoConfig, num_classes: int) -> torch.nn.Module:
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=num_classes, **config.model_args())


def write_data(config: DemoConfig, root: Path, targets: Sequence[str]) -> Dict[str, Target]:
    """The modules' source and the targets as ImageFolder directories with ``train`` and ``test`` under
    ``root``; returns the targets by name."""
    backbone_set, source_set, target_set = glyph_classes(
        [config.backbone_glyph_classes, config.source_classes, config.target_glyph_classes], seed=config.seed)
    del backbone_set  # drawn first so that the three sets stay disjoint; the backbone's images come from pretrain
    names = [f"g{i:02d}" for i in range(config.source_classes)]
    write_image_folder(root / "source" / "train", *glyph_images(source_set, config.source_per_class, config.seed + 201), names)
    write_image_folder(root / "source" / "test", *glyph_images(source_set, 20, config.seed + 202), names)
    found: Dict[str, Target] = {}
    if "digits" in targets:
        digits = [str(d) for d in range(10)]
        write_image_folder(root / "digits" / "train", *DIGITS.train_pool(), digits)
        write_image_folder(root / "digits" / "test", *DIGITS.test_set(config.test_per_class), digits)
        found["digits"] = Target("digits", "real", 10, DIGITS.description)
    if "glyphs" in targets:
        names = [f"t{i:02d}" for i in range(config.target_glyph_classes)]
        write_image_folder(root / "glyphs" / "train", *glyph_images(target_set, config.target_pool_per_class,
                                                                    config.seed + 301), names)
        write_image_folder(root / "glyphs" / "test", *glyph_images(target_set, config.test_per_class, config.seed + 302),
                           names)
        found["glyphs"] = Target("glyphs", "generated", config.target_glyph_classes,
                                 f"{config.target_glyph_classes} stroke glyphs seen by neither source")
    return found


def pretrain_backbone(config: DemoConfig, path: Path) -> float:
    """Train the whole ViT on the broad source (36 object classes and the backbone's glyph classes)
    with :func:`petl_surgery.training.fit`; save its weights without the head to ``path``. Returns its
    accuracy on held-out images of the same source."""
    from safetensors.torch import save_file

    from ..training import evaluate, fit

    backbone_set = glyph_classes([config.backbone_glyph_classes], seed=config.seed)[0]

    def images(per_class: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        objects, object_labels = make_images(OBJECTS, per_class, seed, per_class=True)
        glyphs, glyph_labels = glyph_images(backbone_set, per_class, seed + 1)
        return torch.cat([objects, glyphs]), torch.cat([object_labels, glyph_labels + OBJECTS.num_classes])

    classes = OBJECTS.num_classes + config.backbone_glyph_classes
    train = torch.utils.data.TensorDataset(*images(config.backbone_per_class, config.seed + 101))
    test = torch.utils.data.TensorDataset(*images(max(2, config.backbone_per_class // 8), config.seed + 103))
    torch.manual_seed(config.seed)
    model = build_model(config, classes)  # every parameter trainable: the backbone itself is trained here
    fit(model, train, epochs=config.backbone_epochs, lr=config.backbone_lr, batch_size=config.backbone_batch,
        seed=config.seed, weight_decay=0.05)
    _, accuracy = evaluate(model, torch.utils.data.DataLoader(test, batch_size=256))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}, str(path))
    return accuracy


def _grid(config: DemoConfig, weights: Path, data: Path, runs: List[Dict[str, Any]], **changes: Any) -> Dict[str, Any]:
    grid = {
        "model": "vit_small_patch16_224", "model_args": config.model_args(), "image_size": IMAGE_SIZE,
        "weights": str(weights), "data": str(data), "format": "imagefolder", "train_split": "train",
        "eval_split": "test", "epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr,
        "runs": runs, "shots": list(config.shots), "seeds": list(config.seeds), "cache_images": True,
    }
    grid.update(changes)
    return grid


def _target_studies(
    config: DemoConfig, methods: Sequence[str], targets: Mapping[str, Target], sources: Mapping[str, Path], weights: Path,
    out: Path,
) -> List[Tuple[str, Path, Dict[str, Any]]]:
    """(name, folder, grid) of every target study: per target each method from random and from its source
    delta; for the trade-off target a study of each method, random, in the upper half at the largest
    shot count (the all-block runs it is compared with are the target study's)."""
    from ..training.initialization import RANDOM

    studies = []
    for name in targets:
        runs = [{"method": m, "options": METHOD_OPTIONS[m], "init": init} for m in methods
                for init in (RANDOM, str(sources[m]))]
        studies.append((name, out / "studies" / name, _grid(config, weights, out / "data" / name, runs)))
    if config.tradeoff_target in targets:
        runs = [{"method": m, "options": METHOD_OPTIONS[m], "layers": config.upper_half()} for m in methods]
        name = config.tradeoff_target
        studies.append((f"{name}-upper-half", out / "studies" / f"{name}-upper-half",
                        _grid(config, weights, out / "data" / name, runs, shots=[max(config.shots)])))
    return studies


def _run_studies(
    studies: Sequence[Tuple[str, Path, Dict[str, Any]]], processes: int, training_log: Path, plot: bool
) -> List[List[Dict[str, Any]]]:
    """The studies' rows, in order. With one process, each study runs here (:func:`run_study`); with
    more, each is ``python -m petl_surgery study GRID --out FOLDER --threads 1``, the command a user
    runs, up to ``processes`` of them at a time; their output goes to ``training_log``."""
    from ..training import run_study

    processes = max(1, min(processes, len(studies)))
    if processes == 1:
        rows = []
        with open(training_log, "a") as stream, contextlib.redirect_stderr(stream):
            for _, folder, grid in studies:
                rows.append(run_study(grid, folder, device="cpu", plot=plot, log=lambda line: None).rows)
        return rows
    package_root = str(Path(__file__).resolve().parents[2])  # where petl_surgery imports from, for the children
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    waiting = list(studies)
    running: List[Tuple[str, subprocess.Popen]] = []
    with open(training_log, "a") as stream:
        while waiting or running:
            while waiting and len(running) < processes:
                name, folder, grid = waiting.pop(0)
                folder.mkdir(parents=True, exist_ok=True)
                grid_file = folder.parent / f"{name}.json"
                grid_file.write_text(json.dumps(grid, indent=2) + "\n")
                command = [sys.executable, "-m", "petl_surgery", "study", str(grid_file), "--out", str(folder),
                           "--device", "cpu", "--threads", "1"] + ([] if plot else ["--no-plot"])
                running.append((name, subprocess.Popen(command, stdout=stream, stderr=stream, env=environment)))
            name, process = running[0]
            if process.wait() != 0:
                for _, other in running[1:]:
                    other.kill()
                raise ps.SurgeryError(f"the study {name} failed (exit status {process.returncode}); its output is in "
                                      f"{training_log}")
            running.pop(0)
    return [_read_rows(folder / "results.csv") for _, folder, _ in studies]


def _read_rows(path: Path) -> List[Dict[str, Any]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _head_parameters(config: DemoConfig, classes: int) -> int:
    return (config.embed_dim + 1) * classes


def run(
    config: DemoConfig,
    out: Path,
    *,
    log: Callable[[str], None] = print,
    plot: bool = True,
    threads: Optional[int] = None,
) -> DemoReport:
    """Run the demonstration of size ``config``: data, backbone, studies, CSV files and the plot under
    ``out``. The per-epoch lines of every training go to ``out/training.log``."""
    from ..training import run_study
    from ..training.initialization import RANDOM
    from .report import format_report, gain_rows, summarize, tradeoff_rows, write_csv, write_plot

    previous_threads = torch.get_num_threads()
    used = set_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = DemoReport(config)
    methods = config.method_list()
    report.skipped_methods = [m for m in config.methods if m not in methods]
    if not methods:
        raise ps.SurgeryError(f"none of the demo's methods ({', '.join(config.methods)}) is available")
    names = config.target_list()
    left_out = [t for t in config.targets if t not in names]
    quiet = lambda line: None  # noqa: E731  (a study's line per run: the demo prints its own)
    started_wall, started_cpu = time.perf_counter(), _cpu_seconds()
    try:
        with open(out / "training.log", "w") as training_log, contextlib.redirect_stderr(training_log):
            log(f"PVP demonstration ({config.name}): {len(methods)} methods ({', '.join(methods)}), targets "
                f"{', '.join(names)}, shots {list(config.shots)}, seeds {list(config.seeds)}; {used} CPU thread"
                f"{'s' if used > 1 else ''}")
            if report.skipped_methods:
                log(f"  not available in this petl_surgery, left out: {', '.join(report.skipped_methods)}")
            if left_out:
                log(f"  scikit-learn is not installed, so the real-image target is left out: {', '.join(left_out)} "
                    f"(pip install 'petl_surgery[demo]')")
            with _timed(report, "data"):
                targets = write_data(config, out / "data", names)

            weights = out / "backbone.safetensors"
            log(f"[1/3] backbone: a ViT ({IMAGE_SIZE} px, patch {config.patch_size}, width {config.embed_dim}, depth "
                f"{config.depth}) trained whole on a broad source: {OBJECTS.num_classes} object classes "
                f"({OBJECTS.description}) and {config.backbone_glyph_classes} stroke-glyph classes, "
                f"{config.backbone_epochs} epochs; frozen from here on")
            with _timed(report, "backbone"):
                report.backbone_accuracy = pretrain_backbone(config, weights)
            classes = OBJECTS.num_classes + config.backbone_glyph_classes
            log(f"      held-out accuracy {report.backbone_accuracy:.3f} (chance {1 / classes:.3f}), "
                f"{_seconds(report.timings['backbone'])}")

            log(f"[2/3] PETL modules on the source task: {config.source_classes} other glyph classes "
                f"({config.source_per_class} images each), {config.source_epochs} epochs, backbone frozen: "
                f"petl-surgery study over {out / 'data' / 'source'}")
            source_runs = [{"method": m, "options": METHOD_OPTIONS[m]} for m in methods]
            with _timed(report, "source"):
                study = run_study(_grid(config, weights, out / "data" / "source", source_runs, shots=[None], seeds=[0],
                                        epochs=config.source_epochs, lr=config.source_lr),
                                  out / "studies" / "source", device="cpu", plot=False, log=quiet)
            report.studies["source"] = out / "studies" / "source"
            for row in study.rows:
                report.checkpoints[row["method"]] = out / "studies" / "source" / "runs" / row["run"] / "delta.safetensors"
                report.source_accuracy[row["method"]] = float(row["accuracy"])
                log(f"      {row['method']:<8} test accuracy {float(row['accuracy']):.3f} (chance "
                    f"{1 / config.source_classes:.3f}); its delta {report.checkpoints[row['method']]}")
            log(f"      {_seconds(report.timings['source'])}")

            per_target = len(methods) * len(INITS) * len(config.shots) * len(config.seeds)
            log(f"[3/3] few-shot targets: per target one study of {per_target} runs (each method from random and "
                f"from its source delta, ps.load(..., load_head=False)), {config.epochs} epochs, lr {config.lr}"
                + (f"; on '{config.tradeoff_target}' at {max(config.shots)} shots also every method, random, in the "
                   f"upper half (blocks {config.upper_half()}) for the V-PETL trade-off"
                   if config.tradeoff_target in targets else ""))
            studies = _target_studies(config, methods, targets, report.checkpoints, weights, out)
            with _timed(report, "targets"):
                finished = _run_studies(studies, config.processes, out / "training.log", plot)
            for (name, folder, _), rows in zip(studies, finished):
                report.studies[name] = folder
                target = targets[name.split("-")[0]]
                head = _head_parameters(config, target.num_classes)
                for row in rows:
                    report.results.append(Result(
                        target.name, target.kind, row["method"], "random" if row["init"] == RANDOM else "pretrained",
                        int(row["shots"]), int(row["seed"]), float(row["accuracy"]),
                        "all" if row["layers"] == "all" else POSITIONS[1],
                        int(row["trainable_parameters"]) - head,
                    ))
                log(f"      {name:<17} {len(rows)} runs; {folder}")
            log(f"      {_seconds(report.timings['targets'])} in {min(config.processes, len(studies))} process"
                f"{'es' if min(config.processes, len(studies)) > 1 else ''}")

        rows = summarize(report.results)
        gains = gain_rows(report.results)
        largest = max(config.shots)
        tradeoff = config.tradeoff_target if config.tradeoff_target in targets else None
        points = tradeoff_rows(report.results, tradeoff, largest) if tradeoff else []
        log("")
        log(format_report(rows, gains, points, config, methods, targets))
        report.files["csv"] = write_csv(rows, out / "pvp_fewshot.csv")
        report.files["gains_csv"] = write_csv(gains, out / "pvp_gains.csv")
        report.files["tradeoff_csv"] = write_csv(points, out / "vpetl_tradeoff.csv") if points else None
        report.files["runs_csv"] = write_csv([vars(r) for r in report.results], out / "pvp_fewshot_runs.csv")
        report.files["plot"] = None
        if plot:
            report.files["plot"], message = write_plot(rows, gains, points, config, methods, targets,
                                                       out / "pvp_fewshot.png")
            log(message)
        report.timings["total"] = (time.perf_counter() - started_wall, _cpu_seconds() - started_cpu)
        written = [p.name for key, p in report.files.items() if key != "plot" and p is not None]
        log(f"wrote {', '.join(written)} to {out}; the studies (results.csv, gains.csv, plots, deltas, logs) in "
            f"{out / 'studies'}")
        log("timings (wall / CPU): " + ", ".join(f"{stage} {_seconds(t)}" for stage, t in report.timings.items()))
    finally:
        torch.set_num_threads(previous_threads)
    return report


def _seconds(timing: Tuple[float, float]) -> str:
    return f"{timing[0]:.0f} s / {timing[1]:.0f} s"


def set_threads(threads: Optional[int] = None) -> int:
    """Set torch's CPU threads for the run: by default 1. The demo's matrices are tiny (17 tokens of width
    96), so intra-op threads buy little, and on a busy machine their synchronisation slows training down
    many times over (measured: 30x with 2 threads on 2 shared cores)."""
    threads = 1 if threads is None else max(1, int(threads))
    torch.set_num_threads(threads)
    return threads
