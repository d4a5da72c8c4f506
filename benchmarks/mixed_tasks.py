"""Many tasks on one backbone: mixed-task batches against single-task batches, measured in one process.

    python benchmarks/mixed_tasks.py                       # ViT-S/16 at 96 px, batch 64, CPU
    python benchmarks/mixed_tasks.py --img-size 224        # the model's own size (slow on a CPU)
    python benchmarks/mixed_tasks.py --device cuda

For each method (PATT, adapter, LoRA, VPT) a base carries N = 1, 4 or 16 named tasks of that method (random
deltas, heads of 10 classes). The configurations are timed in interleaved rounds (each round times every
configuration once), and each ratio is the median over rounds of two times taken in the same round:

Each cell is the median over rounds with the lowest and highest round in brackets.

- mixed N: ``forward_tasks`` on a batch of ``--batch`` samples whose tasks cycle through the N tasks (unsorted),
  against the same batch run by one task of the same model (``using_task``): the cost of routing per sample;
- in turn N: the batch split by task and each part run through its task in turn (the baseline without mixed
  batches), against the same single-task batch;
- PEFT (LoRA only): PEFT's ``adapter_names`` mixed batch of N LoRA adapters (rank 8 on the fused ``qkv``, the
  same parameterisation as ours with ``targets=["qkv"]``), against our mixed batch of the same N;
- memory: bytes of the tensors N loaded tasks add to the base, against N times one task's delta file tensors.

Then, for every method as a single-task model (``apply``), its forward time against the plain model's, beside
its FLOP share (``torch.utils.flop_counter``: extra FLOPs over the base's), so a forward slower than
``1 + share`` shows.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

try:
    import petl_surgery as ps
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    import petl_surgery as ps
from petl_surgery.checkpoints.files import read  # noqa: E402

MIXED_METHODS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "patt": ("patt", {}),
    "adapter": ("adapter", {}),
    "lora": ("lora", {"rank": 8, "targets": ["qkv"]}),
    "vpt": ("vpt", {"num_tokens": 10}),
}
SHARE_METHODS = tuple(ps.METHODS)  # every registered method's single-task forward beside its FLOP share
COUNTS = (1, 4, 16)
CLASSES = 10


def base_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=CLASSES).eval()


def perturb(parameters: List[nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter) * 0.02)


def with_tasks(args: argparse.Namespace, method: str, options: Dict[str, Any], count: int) -> nn.Module:
    model = base_model(args)
    for number in range(count):
        ps.apply(model, method, name=f"t{number}", **options)
        perturb([p for m in ps.tasks.task_modules(model, f"t{number}") for p in m.parameters()], number)
    return model.to(args.device).eval()


def tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def timed(fn: Callable[[], Any], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_rounds(
    configs: Dict[str, Callable[[], Any]], rounds: int, warmup: int, device: str, repeat: int = 1
) -> Dict[str, List[float]]:
    """Each configuration's time per round: the fastest of ``repeat`` calls (a call slowed by something
    else on the machine is not the configuration's cost). The configurations run in a new (seeded) order
    each round, so that no configuration always follows the same one."""
    times: Dict[str, List[float]] = {name: [] for name in configs}
    order = random.Random(0)
    for number in range(warmup + rounds):
        names = list(configs)
        order.shuffle(names)
        for name in names:
            fn = configs[name]
            seconds = min(timed(fn, device) for _ in range(repeat))
            if number >= warmup:
                times[name].append(seconds)
    return times


def spread(times: Dict[str, List[float]], slow: str, fast: str) -> str:
    """The median throughput ratio with its lowest and highest round: ``1.02 (0.98-1.05)``."""
    ratios = sorted(f / s for s, f in zip(times[slow], times[fast]))
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def in_turn(model: nn.Module, x: torch.Tensor, tasks: List[str]) -> None:
    for name in dict.fromkeys(tasks):
        rows = torch.tensor([i for i, t in enumerate(tasks) if t == name])
        with ps.using_task(model, name):
            model(x.index_select(0, rows))


def peft_mixed(args: argparse.Namespace, count: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = base_model(args)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name="t0")
    for number in range(1, count):
        peft_model.add_adapter(f"t{number}", config)
    return peft_model.to(args.device).eval()


def mixed_section(args: argparse.Namespace, x: torch.Tensor) -> None:
    """Prints the table, a row as soon as it is measured."""
    print(
        "| method | mixed N=1 | mixed N=4 | mixed N=16 | in turn N=4 | in turn N=16 | ours/PEFT N=1 | ours/PEFT N=4 "
        "| ours/PEFT N=16 | memory 16 tasks / 16 deltas | single-task batch (ms) |"
    )
    print("|" + "---|" * 11, flush=True)
    for label in args.methods:
        method, options = MIXED_METHODS[label]
        models = {count: with_tasks(args, method, options, count) for count in COUNTS}
        configs: Dict[str, Callable[[], Any]] = {}
        single = models[max(COUNTS)]
        configs["single"] = lambda: ps.forward_tasks(single, x, ["t0"] * len(x))
        for count, model in models.items():
            tasks = [f"t{i % count}" for i in range(len(x))]
            configs[f"mixed{count}"] = lambda m=model, t=tasks: ps.forward_tasks(m, x, t)
            if count > 1:
                configs[f"turn{count}"] = lambda m=model, t=tasks: in_turn(m, x, t)
        if label == "lora":
            for count in COUNTS:
                peft = peft_mixed(args, count)
                names = [f"t{i % count}" for i in range(len(x))]
                configs[f"peft{count}"] = lambda m=peft, n=names: m(x, adapter_names=n)
        with torch.inference_mode():
            times = run_rounds(configs, args.rounds, args.warmup, args.device, args.repeat)
        cells = [spread(times, f"mixed{c}", "single") for c in COUNTS]
        cells += [spread(times, f"turn{c}", "single") for c in COUNTS if c > 1]
        cells += [spread(times, f"mixed{c}", f"peft{c}") if label == "lora" else "-" for c in COUNTS]
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "t0.safetensors")
            ps.save(models[1], path, name="t0")
            one = sum(t.numel() * t.element_size() for t in read(path)[0].values())
        added = tensor_bytes(models[16]) - tensor_bytes(base_model(args))
        cells.append(f"{added / (16 * one):.3f}")
        print(f"| {label} | " + " | ".join(cells) + f" | {statistics.median(times['single']) * 1e3:.0f} |", flush=True)


def _addmm_flop(self_shape: Any, a_shape: Any, b_shape: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``out.addmm_(a, b)``: torch's counter counts ``addmm`` but not its in-place form, which the
    no-grad branch paths use (counted like ``addmm``: the multiply-adds of ``a @ b``)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flop})
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def share_section(args: argparse.Namespace, x: torch.Tensor) -> List[str]:
    plain = base_model(args).to(args.device)
    models = {}
    for method in SHARE_METHODS:
        model = base_model(args)
        ps.apply(model, method)
        perturb([p for n, p in model.named_parameters() if "petl_" in n], 0)
        models[method] = model.to(args.device).eval().requires_grad_(False)  # the FLOP counter's module
        # tracker hooks the gradients of tensors that require one, which no-grad forwards do not have
    with torch.no_grad():
        for model in models.values():
            model(x[:1])  # the first forward's branch check
    base_flops = flops(plain, x[:1])
    configs: Dict[str, Callable[[], Any]] = {"base": lambda: plain(x)}
    configs.update({method: (lambda m=model: m(x)) for method, model in models.items()})
    with torch.inference_mode():
        times = run_rounds(configs, args.rounds, args.warmup, args.device, args.repeat)
    lines = ["| method | FLOP share | forward / base (rounds' range) | 1 + share | within 5% |", "|---|---|---|---|---|"]
    for method, model in models.items():
        share = flops(model, x[:1]) / base_flops - 1
        per_round = sorted(m / b for b, m in zip(times["base"], times[method]))  # the method's time over the base's
        measured = statistics.median(per_round)
        lines.append(
            f"| {method} | {share:.3f} | {measured:.2f} ({per_round[0]:.2f}-{per_round[-1]:.2f}) | {1 + share:.2f} | "
            f"{'yes' if measured <= 1.05 * (1 + share) else 'no'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="calls per configuration and round; the fastest counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-share", action="store_true", help="leave out the single-task forward table")
    parser.add_argument("--skip-mixed", action="store_true", help="leave out the mixed-batch table")
    parser.add_argument("--methods", nargs="+", choices=list(MIXED_METHODS), default=list(MIXED_METHODS),
                        help="methods of the mixed-batch table (default: all four)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    x = x.to(args.device)
    import peft

    print(
        f"{args.model} at {args.img_size} px, batch {args.batch}, {args.rounds} rounds after {args.warmup} warm-up "
        f"(each the fastest of {args.repeat} calls), "
        f"{args.threads} threads, {args.device}; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"timm {timm.__version__}, peft {peft.__version__}, petl_surgery {ps.__version__}"
    )
    if not args.skip_mixed:
        print("\nThroughput ratios against the single-task batch (higher is faster; 1.00 = as fast):\n")
        mixed_section(args, x)
    if not args.skip_share:
        print("\nSingle-task forward against the plain model's:\n")
        print("\n".join(share_section(args, x)))


if __name__ == "__main__":
    main()
