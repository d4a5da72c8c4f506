"""The PVP experiment: random-init versus pre-trained-init PETL modules on few-shot target tasks.

1. A small timm ViT (random weights, no download) is trained on :data:`~.tasks.BACKBONE_TASK` (the
   object's colour), standing in for ImageNet pre-training, then frozen.
2. PETL modules of each method are trained on :data:`~.tasks.SOURCE_TASK` (16 texture-colour classes) with
   the backbone frozen, and saved as delta checkpoints (``ps.save``); each is reloaded into a fresh model
   and must give identical outputs.
3. For every target task, shots per class and seed: a fresh model with the frozen backbone and a new head
   gets the method's modules either at random (``ps.apply``) or from the source checkpoint
   (``ps.load(..., load_head=False)``), and modules and head are tuned on the few-shot set with the same
   steps, learning rate and head init; test accuracy is recorded. The targets are generated images and
   one task of real images, scikit-learn's handwritten digits (:mod:`.digits`).
4. The V-PETL view: on the trade-off target, random-init modules of every method in all blocks and in the
   upper half of the blocks, accuracy against trainable parameters.

The gain of the pre-trained init is reported with a 95% interval over seeds (:mod:`.stats`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

import petl_surgery as ps

from .digits import digits_available
from .targets import targets_by_name
from .tasks import BACKBONE_TASK, IMAGE_SIZE, SOURCE_TASK, make_images

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


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one run of the demonstration."""

    name: str = "full"
    methods: Tuple[str, ...] = ("vpt", "lora", "adapter", "patt", "bapat")
    targets: Tuple[str, ...] = ("digits", "texture", "novel", "quadrant")
    shots: Tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: Tuple[int, ...] = (0, 1, 2)
    # the V-PETL trade-off: random-init modules at POSITIONS on this target, at the largest shot count
    tradeoff_target: Optional[str] = "digits"
    # the backbone
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    backbone_images: int = 6000
    backbone_steps: int = 300
    backbone_lr: float = 1e-3
    # the source task
    source_images: int = 4000
    source_steps: int = 400
    source_lr: float = 1e-2
    batch_size: int = 64
    # few-shot tuning
    fewshot_steps: int = 30
    fewshot_batch: int = 32
    fewshot_lr: float = 5e-3
    test_per_class: int = 40
    seed: int = 0

    def method_list(self) -> List[str]:
        """The configured methods that this petl_surgery provides (VPT may be absent)."""
        return [m for m in self.methods if m in ps.METHODS]

    def target_list(self) -> List[str]:
        """The configured targets that can run here: the digits need scikit-learn."""
        return [t for t in self.targets if t != "digits" or digits_available()]

    def upper_half(self) -> List[int]:
        """The blocks of the trade-off's "upper half" position."""
        return list(range(self.depth // 2, self.depth))


FULL = DemoConfig()
REDUCED = replace(
    FULL,
    name="reduced",
    targets=("digits", "novel"),
    shots=(1, 4, 16),
    seeds=(0, 1, 2),
    backbone_images=3000,
    backbone_steps=150,
    source_images=2000,
    source_steps=100,
    fewshot_steps=20,
    test_per_class=30,
)
MICRO = replace(
    FULL,
    name="micro",
    methods=("lora", "patt"),
    targets=("digits", "texture"),
    shots=(1, 2),
    seeds=(0, 1),
    patch_size=8,
    embed_dim=32,
    depth=2,
    num_heads=2,
    backbone_images=128,
    backbone_steps=4,
    source_images=128,
    source_steps=4,
    batch_size=32,
    fewshot_steps=3,
    test_per_class=4,
)


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
    """What a run produced: per-run results, the source stage's numbers, timings and files."""

    config: DemoConfig
    results: List[Result] = field(default_factory=list)
    backbone_accuracy: float = 0.0
    source_accuracy: Dict[str, float] = field(default_factory=dict)
    reload_identical: Dict[str, bool] = field(default_factory=dict)
    checkpoints: Dict[str, Path] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    files: Dict[str, Optional[Path]] = field(default_factory=dict)
    skipped_methods: List[str] = field(default_factory=list)


def build_model(config: DemoConfig, num_classes: int) -> nn.Module:
    return timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=IMAGE_SIZE,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        num_classes=num_classes,
    )


def model_with_backbone(config: DemoConfig, backbone: Mapping[str, torch.Tensor], num_classes: int, seed: int) -> nn.Module:
    """A fresh model: the frozen-to-be backbone weights and a new head initialised from ``seed``."""
    torch.manual_seed(seed)
    model = build_model(config, num_classes)
    missing, unexpected = model.load_state_dict(dict(backbone), strict=False)
    assert not unexpected and all(name.startswith("head.") for name in missing), (missing, unexpected)
    return model


def _train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, lr: float,
           seed: int, parameters: Optional[Sequence[nn.Parameter]] = None) -> None:
    params = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        if len(images) <= batch:
            x, y = images, labels
        else:
            index = torch.randperm(len(images), generator=generator)[:batch]
            x, y = images[index], labels[index]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        correct += (model(images[start : start + batch]).argmax(1) == labels[start : start + batch]).sum().item()
    return correct / len(images)


def pretrain_backbone(config: DemoConfig) -> Tuple[Dict[str, torch.Tensor], float]:
    """Train the whole ViT on the backbone task; return its weights without the head, and test accuracy."""
    torch.manual_seed(config.seed)
    model = build_model(config, BACKBONE_TASK.num_classes)
    images, labels = make_images(BACKBONE_TASK, config.backbone_images, seed=config.seed + 101)
    test_x, test_y = make_images(BACKBONE_TASK, 50 * BACKBONE_TASK.num_classes, seed=config.seed + 102)
    _train(model, images, labels, config.backbone_steps, config.batch_size, config.backbone_lr, config.seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    return state, accuracy(model, test_x, test_y)


def pretrain_modules(
    config: DemoConfig, backbone: Mapping[str, torch.Tensor], method: str, out: Path
) -> Tuple[Path, float, bool]:
    """Train ``method``'s modules (and a head) on the source task with the backbone frozen; save the delta,
    reload it into a fresh model and compare outputs. Returns the checkpoint, test accuracy, identical."""
    model = model_with_backbone(config, backbone, SOURCE_TASK.num_classes, config.seed + 7)
    ps.apply(model, method, **METHOD_OPTIONS[method])
    images, labels = make_images(SOURCE_TASK, config.source_images, seed=config.seed + 201)
    test_x, test_y = make_images(SOURCE_TASK, 20 * SOURCE_TASK.num_classes, seed=config.seed + 202)
    _train(model, images, labels, config.source_steps, config.batch_size, config.source_lr, config.seed)
    path = out / f"pvp_{method}.safetensors"
    ps.save(model, path)
    fresh = model_with_backbone(config, backbone, SOURCE_TASK.num_classes, config.seed + 999)  # another head
    ps.load(fresh, path)  # re-applies the surgery, loads modules and the source head
    fresh.eval()
    with torch.no_grad():
        identical = torch.equal(model(test_x[:64]), fresh(test_x[:64]))
    return path, accuracy(model, test_x, test_y), identical


def fewshot_run(
    config: DemoConfig,
    backbone: Mapping[str, torch.Tensor],
    task: Any,
    method: str,
    init: str,
    checkpoint: Path,
    train: Tuple[torch.Tensor, torch.Tensor],
    test: Tuple[torch.Tensor, torch.Tensor],
    seed: int,
    layers: Optional[Sequence[int]] = None,
) -> Tuple[float, int]:
    """Tune one model on a few-shot set; both inits get the same head init, data, steps and learning rate.
    Returns the test accuracy and the inserted modules' parameter count. ``layers`` (random init only):
    the blocks that get modules (default all)."""
    model = model_with_backbone(config, backbone, task.num_classes, seed=1000 + seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2000 + seed)
        if init == "random":
            ps.apply(model, method, layers=layers, **METHOD_OPTIONS[method])
        else:
            ps.load(model, checkpoint, load_head=False)  # the modules from the source task, our own new head
    parameters = ps.summary(model).per_method.get(method, 0)
    _train(model, *train, config.fewshot_steps, config.fewshot_batch, config.fewshot_lr, seed)
    return accuracy(model, *test), parameters


def set_threads(threads: Optional[int] = None) -> int:
    """Set torch's CPU threads for the run: by default 1. The demo's matrices are tiny (17 tokens of width
    96), so intra-op threads buy little, and on a busy machine their synchronisation slows training down
    many times over (measured: 30x with 2 threads on 2 shared cores)."""
    threads = 1 if threads is None else max(1, int(threads))
    torch.set_num_threads(threads)
    return threads


def run(
    config: DemoConfig,
    out: Path,
    *,
    log: Callable[[str], None] = print,
    plot: bool = True,
    threads: Optional[int] = None,
) -> DemoReport:
    """Run the demonstration of size ``config``; write checkpoints, the CSV files and the plot to ``out``."""
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
    targets = targets_by_name(config.target_list())
    left_out = [t for t in config.targets if t not in targets]
    tradeoff = config.tradeoff_target if config.tradeoff_target in targets else None
    started = time.perf_counter()
    try:
        log(f"PVP demonstration ({config.name}): {len(methods)} methods ({', '.join(methods)}), "
            f"{len(targets)} target tasks ({', '.join(f'{name} ({task.kind})' for name, task in targets.items())}), "
            f"shots {list(config.shots)}, seeds {list(config.seeds)}; {used} CPU threads")
        if report.skipped_methods:
            log(f"  not available in this petl_surgery, left out: {', '.join(report.skipped_methods)}")
        if left_out:
            log(f"  scikit-learn is not installed, so the real-image target is left out: {', '.join(left_out)} "
                f"(pip install 'petl_surgery[demo]')")

        log(f"[1/4] pre-training the backbone (ViT, {IMAGE_SIZE} px, patch {config.patch_size}, width "
            f"{config.embed_dim}, depth {config.depth}) on '{BACKBONE_TASK.name}' ({BACKBONE_TASK.description}), "
            f"{config.backbone_steps} steps")
        stage = time.perf_counter()
        backbone, report.backbone_accuracy = pretrain_backbone(config)
        report.timings["backbone"] = time.perf_counter() - stage
        log(f"      test accuracy {report.backbone_accuracy:.3f} (chance {1 / BACKBONE_TASK.num_classes:.3f}), "
            f"{report.timings['backbone']:.0f} s; the backbone is frozen from here on")

        log(f"[2/4] pre-training PETL modules on the source task '{SOURCE_TASK.name}' ({SOURCE_TASK.description}), "
            f"{config.source_steps} steps each, backbone frozen")
        stage = time.perf_counter()
        for method in methods:
            path, acc, identical = pretrain_modules(config, backbone, method, out)
            report.checkpoints[method] = path
            report.source_accuracy[method] = acc
            report.reload_identical[method] = identical
            log(f"      {method:<8} test accuracy {acc:.3f} (chance {1 / SOURCE_TASK.num_classes:.3f}); saved "
                f"{path.name} ({path.stat().st_size / 1024:.1f} KiB), reloaded into a fresh model: outputs "
                f"{'identical' if identical else 'DIFFERENT'}")
        report.timings["source"] = time.perf_counter() - stage

        total = len(targets) * len(config.shots) * len(config.seeds) * len(methods) * len(INITS)
        log(f"[3/4] few-shot tuning: {total} runs of {config.fewshot_steps} steps "
            f"(random-init modules via ps.apply vs pre-trained via ps.load(..., load_head=False))")
        stage = time.perf_counter()
        done = 0
        for task in targets.values():
            test = task.test_set(config.test_per_class, seed=config.seed + 303)
            for shots in config.shots:
                for seed in config.seeds:
                    train = task.few_shot(shots, seed=10_000 + 100 * shots + seed)
                    for method in methods:
                        for init in INITS:
                            acc, parameters = fewshot_run(
                                config, backbone, task, method, init, report.checkpoints[method], train, test, seed
                            )
                            report.results.append(
                                Result(task.name, task.kind, method, init, shots, seed, acc, "all", parameters)
                            )
                            done += 1
                log(f"      {task.name:<9} {shots:>2} shots done ({done}/{total}, "
                    f"{time.perf_counter() - stage:.0f} s)")
        report.timings["fewshot"] = time.perf_counter() - stage

        stage = time.perf_counter()
        if tradeoff is not None:
            task, shots, upper = targets[tradeoff], max(config.shots), config.upper_half()
            log(f"[4/4] the V-PETL trade-off on '{tradeoff}', {shots} shots: random-init modules in all blocks "
                f"(the runs above) and in the upper half (blocks {upper[0]}..{upper[-1]}), "
                f"{len(methods) * len(config.seeds)} more runs")
            test = task.test_set(config.test_per_class, seed=config.seed + 303)
            for seed in config.seeds:
                train = task.few_shot(shots, seed=10_000 + 100 * shots + seed)
                for method in methods:
                    acc, parameters = fewshot_run(
                        config, backbone, task, method, "random", report.checkpoints[method], train, test, seed,
                        layers=upper,
                    )
                    report.results.append(
                        Result(task.name, task.kind, method, "random", shots, seed, acc, POSITIONS[1], parameters)
                    )
        else:
            log("[4/4] no trade-off target configured or available: the V-PETL trade-off is left out")
        report.timings["tradeoff"] = time.perf_counter() - stage

        rows = summarize(report.results)
        gains = gain_rows(report.results)
        points = tradeoff_rows(report.results, tradeoff, max(config.shots)) if tradeoff else []
        log("")
        log(format_report(rows, gains, points, config, methods, targets))
        report.files["csv"] = write_csv(rows, out / "pvp_fewshot.csv")
        report.files["gains_csv"] = write_csv(gains, out / "pvp_gains.csv")
        report.files["tradeoff_csv"] = write_csv(points, out / "vpetl_tradeoff.csv") if points else None
        report.files["runs_csv"] = write_csv([asdict(r) for r in report.results], out / "pvp_fewshot_runs.csv")
        report.files["plot"] = None
        if plot:
            report.files["plot"], message = write_plot(rows, gains, points, config, methods, targets,
                                                       out / "pvp_fewshot.png")
            log(message)
        report.timings["total"] = time.perf_counter() - started
        written = [p.name for key, p in report.files.items() if key != "plot" and p is not None]
        log(f"wrote {', '.join(written)} to {out}")
        log(f"timings: backbone {report.timings['backbone']:.0f} s, source modules {report.timings['source']:.0f} s, "
            f"few-shot {report.timings['fewshot']:.0f} s, trade-off {report.timings['tradeoff']:.0f} s, "
            f"total {report.timings['total']:.0f} s")
    finally:
        torch.set_num_threads(previous_threads)
    return report
