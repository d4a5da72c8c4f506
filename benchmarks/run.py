"""Speed and memory of petl_surgery's methods, measured side by side in one process, as ratios.

    python benchmarks/run.py                    # ViT-S/16 and Swin-T, 224 px, batch 8, on the CPU
    python benchmarks/run.py --quick            # fewer repeats, ViT-S/16 only, a smaller "large" model
    python benchmarks/run.py --device cuda      # the same on a GPU

For each model (timm, ``pretrained=False``), every configuration gets its own instance built from the
same seed, and the configurations are timed in interleaved rounds (round r times each configuration once,
in turn), so a slow spell of the machine hits all of them alike. Each number is the median over the
rounds, after warm-up rounds; every ratio is the median over rounds of the ratio of two times taken in the same round.

- forward: ``model(x)`` in eval mode under ``torch.no_grad()``, against the plain model;
- train step: ``zero_grad``, forward, cross-entropy, backward and ``AdamW.step`` on the trainable
  parameters, in train mode; against full fine-tuning (every parameter trains) and against the frozen
  floor (every parameter frozen, the gradient flows to the input only, no optimizer step);
- our LoRA against PEFT's LoRA (r=8 on the fused ``qkv`` Linear: one rank-8 update of the whole
  matrix), both with the head trainable: ours on q, k and v as three targets (three rank-8 updates, three
  times the LoRA matmul work) and on the fused target "qkv" (PEFT's parameterisation);
- merged LoRA and merged RepAdapter (``petl_surgery.merge``) forward against the plain forward;
- peak memory of one train step (see ``peak_step_bytes``);
- checkpoint size (``petl_surgery.save``) against the full model's safetensors file;
- ``apply`` and ``load`` time on a ViT-L/16-sized model.

It prints a plain table and writes everything, raw samples included, to a JSON file
(``benchmarks/results.json`` unless ``--json`` says otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
from torch import nn

try:
    import petl_surgery as ps
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    import petl_surgery as ps

MODELS = {"vit_s16": "vit_small_patch16_224", "swin_t": "swin_tiny_patch4_window7_224"}
LARGE = {"full": "vit_large_patch16_224", "quick": "vit_base_patch16_224"}

# The configurations measured, as name -> (method, options): every registered method at its defaults,
# under its own name, except the methods configured here (their named configurations instead). "full"
# and "floor" are the baselines, "peft_lora" is PEFT's. The defaults: PATT kv, m = 128, every block; the
# adapter parallel, r = 64; prefix L = 16, reparameterised; VPT deep, 10 tokens; SSF on q, k, v, proj,
# fc1, fc2; Houlsby h = 8 after proj and after the MLP; Adapter+ r = 8 after the MLP residual; Convpass
# h = 8 beside attention and MLP (flat-token models only); RepAdapter h = 8, g = 2 on the inputs of qkv
# and fc1.
CONFIGURED: Dict[str, Dict[str, Dict[str, Any]]] = {
    "lora": {
        "lora_qkv": {"rank": 8, "targets": ["q", "k", "v"]},  # three rank-8 updates
        "lora_fused": {"rank": 8, "targets": ["qkv"]},  # one rank-8 update of the fused qkv, as PEFT's
    },
    "fact": {
        "fact_tt": {"variant": "tt"},  # r = 8, q, k, v, proj, fc1, fc2, factors shared across blocks
        "fact_tk": {"variant": "tk", "rank": 32},  # r = 32 (the code's TK configs use 16 or 32)
    },
    "dora": {"dora": {"rank": 8, "targets": ["q", "v"]}},  # rank-8 DoRA on the q and v slices of qkv
}
METHODS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    config: (method, options)
    for method in ps.METHODS
    for config, options in CONFIGURED.get(method, {method: {}}).items()
}
# merged configuration -> the configuration of METHODS it merges (``petl_surgery.merge``): the first
# configuration of every method that declares itself mergeable
MERGED: Dict[str, str] = {}
for _config, (_method, _) in METHODS.items():
    if ps.METHODS[_method].mergeable and _method not in {METHODS[c][0] for c in MERGED.values()}:
        MERGED[f"{_method}_merged"] = _config


# ---------------------------------------------------------------------------------------------- models


def build(name: str, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(MODELS[name], pretrained=False).to(device)


def with_method(name: str, device: torch.device, config: str) -> nn.Module:
    model = build(name, device)
    if config == "base":
        return model
    if config == "full":
        model.requires_grad_(True)
        return model
    if config == "floor":
        model.requires_grad_(False)
        return model
    if config == "peft_lora":
        return with_peft_lora(model)
    if config in MERGED:
        method, options = METHODS[MERGED[config]]
        ps.apply(model, method, **options)
        model.eval()
        with torch.no_grad():  # the run check fires on this forward; then give B non-zero values to fold
            model(torch.zeros(1, 3, 224, 224, device=device))
            for parameter in model.parameters():
                if parameter.requires_grad and parameter.dim() >= 2 and not parameter.any():
                    parameter.normal_(0, 0.02)
        ps.merge(model)
        return model
    method, options = METHODS[config]
    ps.apply(model, method, **options)
    return model


def with_peft_lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["qkv"], bias="none")
    wrapped = get_peft_model(model, config)
    for parameter in model.get_classifier().parameters():  # the head trains, as with apply's default
        parameter.requires_grad_(True)
    return wrapped


def trainable(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------- workloads


class Workload:
    """One configuration's model and the callable that runs one forward or one train step."""

    def __init__(self, label: str, model: nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.label = label
        self.model = model
        self.kind = kind
        self.y = y
        self.optimizer: Optional[torch.optim.Optimizer] = None
        if kind == "forward":
            model.eval()
            self.x = x
            self.run = self.forward
        else:
            model.train()
            params = trainable(model)
            if kind == "floor":
                assert not params
                self.x = x.clone().requires_grad_(True)
            else:
                self.x = x
                self.optimizer = torch.optim.AdamW(params, lr=1e-4)
            self.run = self.step

    def forward(self) -> None:
        with torch.no_grad():
            self.model(self.x)

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.x.grad = None
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()

    def live_bytes(self) -> int:
        """Bytes of the tensors alive between steps: parameters, buffers, gradients, optimizer state,
        the batch (each storage counted once)."""
        tensors: List[torch.Tensor] = [*self.model.parameters(), *self.model.buffers(), self.x, self.y]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.x.grad is not None:
            tensors.append(self.x.grad)
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        seen = {}
        for tensor in tensors:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(workloads: List[Workload], device: torch.device, warmup: int, repeats: int) -> Dict[str, List[float]]:
    """Seconds per call of each workload, over ``repeats`` interleaved rounds after ``warmup`` rounds."""
    samples: Dict[str, List[float]] = {w.label: [] for w in workloads}
    for round_ in range(warmup + repeats):
        for workload in workloads:
            synchronize(device)
            start = time.perf_counter()
            workload.run()
            synchronize(device)
            if round_ >= warmup:
                samples[workload.label].append(time.perf_counter() - start)
    return samples


def peak_step_bytes(workload: Workload, device: torch.device) -> int:
    """Peak bytes of live tensors during one train step (after warm-up).

    On CUDA: ``torch.cuda.max_memory_allocated`` around the step. On the CPU there is no allocator
    statistic, so: the bytes alive before the step (parameters, buffers, gradients, optimizer state, the
    batch; see ``Workload.live_bytes``) plus the highest running sum of the allocations and frees that
    ``torch.profiler`` (``profile_memory=True``) records during the step. tracemalloc cannot see these
    allocations (torch's CPU allocator does not go through Python's), and ``ru_maxrss`` is one
    never-reset high-water mark for the whole process, its interpreter, libraries and every other model
    in it, so it cannot tell configurations apart within one process.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        workload.run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile

    before = workload.live_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        workload.run()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return before + peak


# ------------------------------------------------------------------------------------------ the suites


def median(values: List[float]) -> float:
    return statistics.median(values)


def model_suite(name: str, device: torch.device, warmup: int, repeats: int, peft: bool) -> Dict[str, Any]:
    torch.manual_seed(1)
    x = torch.randn(8, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (8,), device=device)
    ours, refused = applicable(name, device)
    methods = ours + (["peft_lora"] if peft else [])
    merged = [m for m, config in MERGED.items() if config in ours]

    forward = [Workload("base", with_method(name, device, "base"), "forward", x, y)]
    forward += [Workload(m, with_method(name, device, m), "forward", x, y) for m in methods + merged]
    fwd = time_rounds(forward, device, warmup, repeats)
    del forward

    train = [
        Workload("full", with_method(name, device, "full"), "train", x, y),
        Workload("floor", with_method(name, device, "floor"), "floor", x, y),
    ]
    train += [Workload(m, with_method(name, device, m), "train", x, y) for m in methods]
    stp = time_rounds(train, device, warmup, repeats)
    memory = {w.label: peak_step_bytes(w, device) for w in train}
    counts = {w.label: sum(p.numel() for p in trainable(w.model)) for w in train}
    total = sum(p.numel() for p in train[0].model.parameters())
    sizes = checkpoint_sizes(name, device, ours)
    del train

    fwd_med = {k: median(v) for k, v in fwd.items()}
    stp_med = {k: median(v) for k, v in stp.items()}

    def paired(samples: Dict[str, List[float]], label: str, baseline: str) -> float:
        """The median over rounds of label's time over baseline's time in the same round."""
        return median([a / b for a, b in zip(samples[label], samples[baseline])])

    ratios: Dict[str, float] = {}
    for m in methods + merged:
        ratios[f"forward/{m} vs base"] = paired(fwd, m, "base")
    for m in methods:
        ratios[f"train/{m} vs full"] = paired(stp, m, "full")
        ratios[f"train/{m} vs floor"] = paired(stp, m, "floor")
        ratios[f"memory/{m} vs full"] = memory[m] / memory["full"]
    ratios["train/floor vs full"] = paired(stp, "floor", "full")
    ratios["memory/floor vs full"] = memory["floor"] / memory["full"]
    if peft:
        for m in ("lora_qkv", "lora_fused"):
            if m in ours:
                ratios[f"train/{m} vs peft_lora"] = paired(stp, m, "peft_lora")
                ratios[f"forward/{m} vs peft_lora"] = paired(fwd, m, "peft_lora")
    for m in ours:
        ratios[f"checkpoint/{m} vs full model"] = sizes[m] / sizes["full_model"]
    return {
        "model": MODELS[name],
        "parameters": total,
        "trainable": counts,
        "forward_s": fwd_med,
        "train_step_s": stp_med,
        "peak_train_bytes": memory,
        "checkpoint_bytes": sizes,
        "ratios": ratios,
        "refused": refused,
        "samples": {"forward": fwd, "train": stp},
    }


def applicable(name: str, device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """The configurations of ``METHODS`` that apply to the model, and why the others are refused
    (prompt tokens on a hierarchical model, say)."""
    ours, refused = [], {}
    for config in METHODS:
        try:
            with_method(name, device, config)
        except ps.SurgeryError as refusal:
            refused[config] = str(refusal)
        else:
            ours.append(config)
    return ours, refused


def checkpoint_sizes(name: str, device: torch.device, configs: List[str]) -> Dict[str, int]:
    from safetensors.torch import save_file

    sizes = {}
    with tempfile.TemporaryDirectory() as folder:
        model = build(name, device)
        path = os.path.join(folder, "full.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)
        sizes["full_model"] = os.path.getsize(path)
        for m in configs:
            model = with_method(name, device, m)
            path = os.path.join(folder, f"{m}.safetensors")
            ps.save(model, path)
            sizes[m] = os.path.getsize(path)
    return sizes


def large_suite(arch: str, repeats: int) -> Dict[str, Any]:
    """Wall time of apply and of load (which re-applies the surgery) on a large model, on the CPU."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False)
    fresh = timm.create_model(arch, pretrained=False)
    result: Dict[str, Any] = {"model": arch, "parameters": sum(p.numel() for p in model.parameters())}
    with tempfile.TemporaryDirectory() as folder:
        for label, (method, options) in METHODS.items():
            apply_s, load_s = [], []
            path = os.path.join(folder, f"{label}.safetensors")
            for _ in range(repeats + 1):
                start = time.perf_counter()
                ps.apply(model, method, **options)
                apply_s.append(time.perf_counter() - start)
                ps.save(model, path)
                ps.remove(model)
                start = time.perf_counter()
                ps.load(fresh, path)
                load_s.append(time.perf_counter() - start)
                ps.remove(fresh)
            result[label] = {"apply_s": median(apply_s[1:]), "load_s": median(load_s[1:]), "file_bytes": os.path.getsize(path)}
    return result


# ----------------------------------------------------------------------------------------------- output


def machine(device: torch.device) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


def report(results: Dict[str, Any]) -> str:
    lines = [f"machine: {json.dumps(results['machine'])}", f"settings: {json.dumps(results['settings'])}"]
    for name, suite in results["models"].items():
        lines.append("")
        lines.append(f"== {suite['model']} ({suite['parameters'] / 1e6:.1f} M parameters), 224 px, batch 8")
        lines.append(f"{'configuration':<18}{'forward ms':>12}{'train ms':>12}{'peak MiB':>11}{'trainable':>12}{'ckpt KiB':>11}")
        rows = ["base", "full", "floor", *METHODS, "peft_lora", *MERGED]
        for row in rows:
            f = suite["forward_s"].get(row if row not in ("full", "floor") else "-")
            t = suite["train_step_s"].get(row if row != "base" else "-")
            if f is None and t is None:
                continue
            mem = suite["peak_train_bytes"].get(row)
            count = suite["trainable"].get(row)
            size = suite["checkpoint_bytes"].get(row)
            cells = [
                f"{f * 1e3:12.1f}" if f is not None else f"{'':>12}",
                f"{t * 1e3:12.1f}" if t is not None else f"{'':>12}",
                f"{mem / 2**20:11.1f}" if mem is not None else f"{'':>11}",
                f"{count:12,d}" if count is not None else f"{'':>12}",
                f"{size / 2**10:11.1f}" if size is not None else f"{'':>11}",
            ]
            lines.append(f"{row:<18}" + "".join(cells))
        lines.append(f"full model safetensors: {suite['checkpoint_bytes']['full_model'] / 2**20:.1f} MiB")
        for config, reason in suite.get("refused", {}).items():
            lines.append(f"  {config}: refused ({reason[:100]})")
        for key, value in suite["ratios"].items():
            lines.append(f"  {key:<34} {value:6.3f}")
    large = results.get("large")
    if large:
        lines.append("")
        lines.append(f"== apply / load on {large['model']} ({large['parameters'] / 1e6:.0f} M parameters), CPU")
        for label in METHODS:
            r = large[label]
            lines.append(f"  {label:<10} apply {r['apply_s'] * 1e3:8.1f} ms   load {r['load_s'] * 1e3:8.1f} ms   file {r['file_bytes'] / 2**10:8.1f} KiB")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ViT-S/16 only, 1 warm-up and 3 rounds, ViT-B for apply/load")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="which models (default: all; --quick: vit_s16)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 2; --quick 1)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 7; --quick 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: every core)")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's LoRA")
    parser.add_argument("--no-large", action="store_true", help="skip apply/load timing on the large model")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    models = args.models or (["vit_s16"] if args.quick else list(MODELS))
    peft = not args.no_peft
    if peft:
        try:
            import peft as _  # noqa: F401
        except ImportError:
            print("peft is not installed (pip install '.[bench]'): skipping PEFT's LoRA", file=sys.stderr)
            peft = False

    results: Dict[str, Any] = {
        "machine": machine(device),
        "settings": {"batch": 8, "image": 224, "warmup": warmup, "repeats": repeats, "models": models, "quick": args.quick},
        "models": {},
    }
    for name in models:
        print(f"measuring {MODELS[name]} ...", file=sys.stderr, flush=True)
        results["models"][name] = model_suite(name, device, warmup, repeats, peft)
    if not args.no_large:
        arch = LARGE["quick" if args.quick else "full"]
        print(f"measuring apply/load on {arch} ...", file=sys.stderr, flush=True)
        results["large"] = large_suite(arch, 2 if args.quick else 5)
    results["machine"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(report(results))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
