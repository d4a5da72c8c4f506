"""PVP in miniature at full size: pre-trained PETL modules against random-init ones, 1 to 16 shots.

The same experiment as ``petl-surgery demo`` (see docs/demo.md for the design and why), scaled up as
``petl-surgery demo --full`` is: VPT, LoRA, adapter, PATT and BAPAT; 1, 2, 4, 8 and 16 shots; 10 seeds;
twice the source images; 60 test images per class. A ViT pre-trained on a broad generated source, modules
pre-trained on stroke glyphs by a study, and per target (scikit-learn's handwritten digits, unseen
glyphs) a study with each method from random and from its source delta; the paired gain of the
pre-trained init with its 95% interval, and the V-PETL trade-off. Nothing is downloaded (pip install
".[demo]" for the digits and the plot).

Run: ``python examples/pvp_fewshot.py [--out DIR] [--seeds N] [--threads T]``; it takes about five
times the reduced demo's CPU time.
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
    demo.run(replace(demo.FULL, seeds=tuple(range(args.seeds))), args.out, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
