"""PVP on generated and real images: pre-trained PETL modules versus random-init ones, 1 to 16 shots.

PVP (Pre-trained Visual Parameter-efficient tuning) found that PETL modules trained from a random init
do badly with few examples per class, and that modules first trained on a large source task do much
better. This reproduces the experiment in miniature, offline on the CPU:

1. a small timm ViT (32 px, patch 8, width 96, depth 4, random weights) is trained on one generated task
   (the object's colour), standing in for ImageNet pre-training, and frozen;
2. deep VPT, LoRA, adapter, PATT and BAPAT modules are trained on a source task (16 texture-colour
   classes) and saved as delta checkpoints (``ps.save``), each reloaded to check identical outputs;
3. on each target task (scikit-learn's real handwritten digits; 6 textures; 4 texture-colour pairs of
   values never seen before; the object's quadrant), for 1, 2, 4, 8 and 16 shots per class and several
   seeds, each method is tuned from a random init (``ps.apply``) and from the source checkpoint
   (``ps.load(model, path, load_head=False)``, a new head), with the same data, head init, steps and
   learning rate;
4. the V-PETL trade-off on the digits: every method in all blocks and in the upper half.

It prints a table of test accuracy (mean ± std over seeds) with the pre-trained init's gain and its 95%
interval, and writes pvp_fewshot.csv, pvp_gains.csv, vpetl_tradeoff.csv, pvp_fewshot_runs.csv and
pvp_fewshot.png (matplotlib and scikit-learn: pip install ".[demo]") to --out. ``petl-surgery demo`` runs
a reduced version of the same experiment.

Run: ``python examples/pvp_fewshot.py [--out DIR] [--seeds N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from petl_surgery import demo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("pvp_fewshot_out"), help="output directory")
    parser.add_argument("--seeds", type=int, default=len(demo.FULL.seeds), help="seeds per setting")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    config = replace(demo.FULL, seeds=tuple(range(args.seeds)))
    report = demo.run(config, args.out, threads=args.threads)
    return 0 if all(report.reload_identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
