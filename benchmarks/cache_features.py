"""Epoch time with frozen-prefix feature caching against without (``fit(..., cache_features=True)``).

A ViT of width 192 and 12 blocks (ViT-Ti/16 at 224 px, random weights), 64 random images, PATT on the last
2, 4 and 6 blocks. For each placement two copies of the model train in this process from the same seed,
one on the images and one on the cached tokens (``caching.build_cache``, then ``fit`` on its runner, as
``fit(..., cache_features=True)`` does), one epoch each in turn, so that a busy machine slows both alike.
The script prints the shortest epoch time of each (the first round left out as warm-up; the shortest,
as other work on a shared machine only ever adds time), their ratio, the one-time cost of building the
cache, and the largest difference between the two deltas at the end (the same training: 0 up to rounding).

    PYTHONPATH=src python benchmarks/cache_features.py [--rounds 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import petl_surgery as ps
from petl_surgery.training import fit
from petl_surgery.training.caching import build_cache

DEPTH = 12


def build(last: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10)  # width 192, 12 blocks, 3 heads
    return ps.apply(model, "patt", layers=slice(DEPTH - last, DEPTH))


def compare(last: int, data: torch.utils.data.Dataset, rounds: int, batch_size: int):
    plain, cached = build(last), build(last)
    started = time.perf_counter()
    cache = build_cache(cached, data, device=torch.device("cpu"), batch_size=batch_size)
    build_seconds = time.perf_counter() - started
    plain_times, cached_times = [], []
    for _ in range(rounds):
        plain_times.append(fit(plain, data, epochs=1, batch_size=batch_size)[0].seconds)
        cached_times.append(fit(cache.runner, cache.train, epochs=1, batch_size=batch_size)[0].seconds)
    expected = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    diff = max((cached.get_parameter(n) - p).abs().max().item() for n, p in expected.items())
    return min(plain_times[1:] or plain_times), min(cached_times[1:] or cached_times), build_seconds, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
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
          f"batch {args.batch_size}, {args.rounds} rounds of one epoch each (shortest of rounds 2..)")
    print(f"{'PATT on':<16}{'uncached s/epoch':>18}{'cached s/epoch':>16}{'ratio':>8}{'cache build s':>15}{'max |delta diff|':>18}")
    for last in (2, 4, 6):
        plain, cached, build_seconds, diff = compare(last, data, args.rounds, args.batch_size)
        print(f"{f'last {last} of {DEPTH}':<16}{plain:>18.3f}{cached:>16.3f}{cached / plain:>8.2f}{build_seconds:>15.3f}{diff:>18.2e}")


if __name__ == "__main__":
    main()
