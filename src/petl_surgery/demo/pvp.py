"""The PVP experiment: random-init versus pre-trained-init PETL modules on few-shot target tasks.

1. A small timm ViT (random weights, no download) is trained on :data:`~.tasks.BACKBONE_TASK` (the
   object's colour), standing in for ImageNet pre-training, then frozen.
2. PETL modules of each method are trained on :data:`~.tasks.SOURCE_TASK` (16 texture-colour classes) with
   the backbone frozen, and saved as delta checkpoints (``ps.save``); each is reloaded into a fresh model
   and must give identical outputs.
3. For every target task, shots per class and seed: a fresh model with the frozen backbone and a new head
   gets the method's modules either at random (``ps.apply``) or from the source checkpoint
   (``ps.load(..., head=False)``), and modules and head are tuned on the few-shot set with the same
   steps, learning rate and head init; test accuracy is recorded.
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

from .tasks import BACKBONE_TASK, IMAGE_SIZE, SOURCE_TASK, Task, few_shot_split, make_images, tasks_by_name

# Module sizes for a width-96 ViT (the library's defaults are sized for ViT-B, width 768).
METHOD_OPTIONS: Dict[str, Dict[str, Any]] = {
    "vpt": {"num_tokens": 8, "deep": True, "dropout": 0.0},
    "lora": {"rank": 8, "targets": ["q", "v"]},
    "adapter": {"bottleneck": 16},
    "patt": {"mid_dim": 16},
}
INITS = ("random", "pretrained")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one run of the demonstration."""

    name: str = "full"
    methods: Tuple[str, ...] = ("vpt", "lora", "adapter", "patt")
    targets: Tuple[str, ...] = ("texture", "novel", "quadrant")
    shots: Tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: Tuple[int, ...] = (0, 1, 2)
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


FULL = DemoConfig()
REDUCED = replace(
    FULL,
    name="reduced",
    methods=("vpt", "lora", "adapter"),
    targets=("texture", "novel"),
    shots=(1, 4, 16),
    seeds=(0, 1),
    backbone_images=3000,
    backbone_steps=150,
    source_images=2000,
    source_steps=150,
    fewshot_steps=25,
    test_per_class=30,
)
MICRO = replace(
    FULL,
    name="micro",
    methods=("lora", "adapter"),
    targets=("texture",),
    shots=(1, 2),
    seeds=(0,),
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
    target: str
    method: str
    init: str
    shots: int
    seed: int
    accuracy: float


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
    task: Task,
    method: str,
    init: str,
    checkpoint: Path,
    train: Tuple[torch.Tensor, torch.Tensor],
    test: Tuple[torch.Tensor, torch.Tensor],
    seed: int,
) -> float:
    """Tune one model on a few-shot set; both inits get the same head init, data, steps and learning rate."""
    model = model_with_backbone(config, backbone, task.num_classes, seed=1000 + seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2000 + seed)
        if init == "random":
            ps.apply(model, method, **METHOD_OPTIONS[method])
        else:
            ps.load(model, checkpoint, head=False)  # the modules from the source task, our own new head
    _train(model, *train, config.fewshot_steps, config.fewshot_batch, config.fewshot_lr, seed)
    return accuracy(model, *test)


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
    from .report import format_table, summarize, write_csv, write_plot

    previous_threads = torch.get_num_threads()
    used = set_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = DemoReport(config)
    methods = config.method_list()
    report.skipped_methods = [m for m in config.methods if m not in methods]
    if not methods:
        raise ps.SurgeryError(f"none of the demo's methods ({', '.join(config.methods)}) is available")
    targets = tasks_by_name(config.targets)
    started = time.perf_counter()
    try:
        log(f"PVP demonstration ({config.name}): {len(methods)} methods ({', '.join(methods)}), "
            f"{len(targets)} target tasks, shots {list(config.shots)}, seeds {list(config.seeds)}; "
            f"{used} CPU threads")
        if report.skipped_methods:
            log(f"  not available in this petl_surgery, left out: {', '.join(report.skipped_methods)}")

        log(f"[1/3] pre-training the backbone (ViT, {IMAGE_SIZE} px, patch {config.patch_size}, width "
            f"{config.embed_dim}, depth {config.depth}) on '{BACKBONE_TASK.name}' ({BACKBONE_TASK.description}), "
            f"{config.backbone_steps} steps")
        stage = time.perf_counter()
        backbone, report.backbone_accuracy = pretrain_backbone(config)
        report.timings["backbone"] = time.perf_counter() - stage
        log(f"      test accuracy {report.backbone_accuracy:.3f} (chance {1 / BACKBONE_TASK.num_classes:.3f}), "
            f"{report.timings['backbone']:.0f} s; the backbone is frozen from here on")

        log(f"[2/3] pre-training PETL modules on the source task '{SOURCE_TASK.name}' ({SOURCE_TASK.description}), "
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
        log(f"[3/3] few-shot tuning: {total} runs of {config.fewshot_steps} steps "
            f"(random-init modules via ps.apply vs pre-trained via ps.load(..., head=False))")
        stage = time.perf_counter()
        done = 0
        for task in targets.values():
            test = make_images(task, config.test_per_class, seed=config.seed + 303, per_class=True)
            for shots in config.shots:
                for seed in config.seeds:
                    train = few_shot_split(task, shots, seed=10_000 + 100 * shots + seed)
                    for method in methods:
                        for init in INITS:
                            acc = fewshot_run(config, backbone, task, method, init, report.checkpoints[method],
                                              train, test, seed)
                            report.results.append(Result(task.name, method, init, shots, seed, acc))
                            done += 1
                log(f"      {task.name:<9} {shots:>2} shots done ({done}/{total}, "
                    f"{time.perf_counter() - stage:.0f} s)")
        report.timings["fewshot"] = time.perf_counter() - stage

        rows = summarize(report.results)
        log("")
        log(format_table(rows, config, methods, targets))
        report.files["csv"] = write_csv(rows, out / "pvp_fewshot.csv")
        report.files["runs_csv"] = write_csv(
            [asdict(r) for r in report.results], out / "pvp_fewshot_runs.csv"
        )
        report.files["plot"] = None
        if plot:
            report.files["plot"], message = write_plot(rows, config, methods, targets, out / "pvp_fewshot.png")
            log(message)
        report.timings["total"] = time.perf_counter() - started
        log(f"wrote {report.files['csv']} (mean and spread) and {report.files['runs_csv']} (every run)")
        log(f"timings: backbone {report.timings['backbone']:.0f} s, source modules {report.timings['source']:.0f} s, "
            f"few-shot {report.timings['fewshot']:.0f} s, total {report.timings['total']:.0f} s")
    finally:
        torch.set_num_threads(previous_threads)
    return report
