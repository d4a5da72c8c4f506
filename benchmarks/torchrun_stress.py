"""Consecutive 2-process torchrun trainings on the CPU (gloo): how many pass, how many hang, how long each takes.

Each launch is ``torchrun --nproc_per_node 2 -m petl_surgery train`` of a tiny ViT (2 blocks, width 32,
32 px images) with PATT for 2 epochs on a generated ImageFolder (3 classes of 6 images), the run of
tests/test_training_scale.py. A launch that has not ended after ``--timeout`` seconds counts as a hang:
every process of it (the torchrun agent and its workers) first prints the Python stack of each of its
threads to its stderr (faulthandler, registered on SIGUSR1 by a sitecustomize on the launch's PYTHONPATH),
the stacks are printed here, and the launch is killed.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/torchrun_stress.py [--runs 20] [--timeout 120]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SITECUSTOMIZE = "import faulthandler, signal\nfaulthandler.register(signal.SIGUSR1, all_threads=True)\n"
TINY = ["--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "embed_dim=32",
        "--model-arg", "depth=2", "--model-arg", "num_heads=2"]


def image_folder(root: Path) -> Path:
    """3 classes of 6 PNGs of 20x20 pixels, a dominant colour each (the tests' ImageFolder)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for k, name in enumerate(["red", "green", "blue"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            pixels = torch.rand(20, 20, 3, generator=generator) * 80
            pixels[..., k] += 150
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / name / f"{i}.png")
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendants(pid: int) -> list:
    """The process ids below ``pid`` (from /proc), children first."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _signal(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def launch(folder: Path, data: Path, run: int, timeout: float, env: dict) -> tuple:
    """One torchrun launch: ("pass" | "fail" | "hang", seconds, the tail of its output)."""
    out = folder / f"run{run}.safetensors"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--local-addr", "127.0.0.1",
        "-m", "petl_surgery", "train", "vit_small_patch16_224", "--data", str(data), "--method", "patt",
        "--epochs", "2", "--opt", "sgd", "--image-size", "32", "--device", "cpu", "--batch-size", "3",
        "--out", str(out), *TINY,
    ]
    log = (folder / f"run{run}.txt").open("w+")
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = process.wait(timeout=timeout)
        outcome = "pass" if code == 0 and out.is_file() else "fail"
    except subprocess.TimeoutExpired:
        outcome = "hang"
        processes = [process.pid, *descendants(process.pid)]  # the workers run in sessions of their own
        for pid in processes:
            _signal(pid, signal.SIGUSR1)  # faulthandler: every thread's stack to the log
        time.sleep(2)
        for pid in reversed(processes):
            _signal(pid, signal.SIGKILL)
        process.wait()
    seconds = time.perf_counter() - started
    log.seek(0)
    return outcome, seconds, log.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="consecutive launches (default 20)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds after which a launch hangs (default 120)")
    parser.add_argument("--verbose", action="store_true", help="print the output of every launch, not only of hangs")
    args = parser.parse_args()

    src = str(Path(__file__).resolve().parents[1] / "src")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "site").mkdir()
        (folder / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        data = image_folder(folder / "images")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1",
               "PYTHONPATH": os.pathsep.join([str(folder / "site"), src, os.environ.get("PYTHONPATH", "")])}
        print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {args.runs} launches, "
              f"timeout {args.timeout:.0f} s", flush=True)
        results = []
        for run in range(1, args.runs + 1):
            outcome, seconds, output = launch(folder, data, run, args.timeout, env)
            results.append((outcome, seconds))
            print(f"launch {run:>3}: {outcome:<4} {seconds:6.1f} s", flush=True)
            if outcome != "pass" or args.verbose:
                print("    " + output[-6000:].replace("\n", "\n    "), flush=True)
    passed = [s for o, s in results if o == "pass"]
    counts = {kind: sum(o == kind for o, _ in results) for kind in ("pass", "fail", "hang")}
    print(f"passes {counts['pass']}, failures {counts['fail']}, hangs {counts['hang']} of {len(results)}; "
          + (f"passing launches took {min(passed):.1f} to {max(passed):.1f} s (median "
             f"{sorted(passed)[len(passed) // 2]:.1f} s)" if passed else "none passed"))
    sys.exit(0 if counts["pass"] == len(results) else 1)


if __name__ == "__main__":
    main()
