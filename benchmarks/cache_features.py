"""Epoch time with frozen-prefix feature caching against without (``fit(..., cache_features=True)``).

A ViT of width 192 and 12 blocks (ViT-Ti/16 at 224 px, random weights), 64 random images, PATT on the last
2, 4 and 6 blocks. For each placement the uncached run and the cached run train in this process from the
same seed; the script prints the shortest epoch time of each (the first epoch left out as warm-up; the
shortest, as the machine may be shared and other work only ever adds time), their ratio, the one-time cost
of building the cache and the largest difference between the two deltas.

    PYTHONPATH=src python benchmarks/cache_features.py [--epochs 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import petl_surgery as ps
from petl_surgery.training import fit

DEPTH = 12


def build(last: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10)  # width 192, 12 blocks, 3 heads
    return ps.apply(model, "patt", layers=slice(DEPTH - last, DEPTH))


def run(last: int, data: torch.utils.data.Dataset, epochs: int, batch_size: int, cache: bool):
    model = build(last)
    started = time.perf_counter()
    records = fit(model, data, epochs=epochs, batch_size=batch_size, cache_features=cache)
    total = time.perf_counter() - started
    epoch_times = [r.seconds for r in records]
    delta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return min(epoch_times[1:] or epoch_times), total - sum(epoch_times), delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(args.images, 3, 224, 224, generator=generator), torch.randint(0, 10, (args.images,), generator=generator)
    )
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} thread(s), {args.images} images, "
          f"batch {args.batch_size}, {args.epochs} epochs (shortest of epochs 2..)")
    print(f"{'PATT on':<16}{'uncached s/epoch':>18}{'cached s/epoch':>16}{'ratio':>8}{'cache build s':>15}{'max |delta diff|':>18}")
    for last in (2, 4, 6):
        plain, _, expected = run(last, data, args.epochs, args.batch_size, cache=False)
        cached, build_seconds, got = run(last, data, args.epochs, args.batch_size, cache=True)
        diff = max((expected[n] - got[n]).abs().max().item() for n in expected)
        print(f"{f'last {last} of {DEPTH}':<16}{plain:>18.3f}{cached:>16.3f}{cached / plain:>8.2f}{build_seconds:>15.3f}{diff:>18.2e}")


if __name__ == "__main__":
    main()
