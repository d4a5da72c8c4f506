"""Regenerate docs/study.png: a small, real V-PETL study on scikit-learn's digits (a few minutes on a CPU).

    python docs/make_study_plot.py [--work DIR]

A tiny ViT (32 px input, patch 8, width 64, depth 4) is first trained in full on the digits 0-4 and
saved as the "pretrained" base. The digits 5-9 are then written as a VTAB-1k layout (train800.txt with
300 images, val200.txt with 100, train800val200.txt, test.txt with the rest: the file names of the
protocol, smaller counts) and `petl_surgery.training.run_study` trains five methods on the base, with
every image and with 5 per class, over three seeds. Needs scikit-learn and matplotlib
(`pip install 'petl_surgery[demo]'`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

MODEL = "vit_small_patch16_224"
MODEL_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}
HERE = Path(__file__).resolve().parent


def write_digits(root: Path) -> None:
    """The digits as 8x8 PNGs: 0-4 under root/base (an ImageFolder), 5-9 as a VTAB-1k layout under root/task."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    task_lines = []
    for i in order:
        label, pixels = int(digits.target[i]), (digits.images[i] * 255 / 16).astype("uint8")
        if label < 5:
            folder = root / "base" / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i}.png")
        else:
            (root / "task" / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / "task" / "images" / f"{i}.png")
            task_lines.append(f"images/{i}.png {label - 5}")
    lists = {"train800": task_lines[:300], "val200": task_lines[300:400], "train800val200": task_lines[:400],
             "test": task_lines[400:]}
    for name, lines in lists.items():
        (root / "task" / f"{name}.txt").write_text("\n".join(lines) + "\n")


def pretrain_base(root: Path) -> Path:
    """Full training of the tiny ViT on the digits 0-4; its state_dict is the study's pretrained base."""
    import timm

    from petl_surgery.training import fit, training_data

    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=5, **MODEL_ARGS)
    data = training_data(str(root / "base"), size=32, mean=(0.5,) * 3, std=(0.5,) * 3, format="imagefolder")
    fit(model, data.train, epochs=30, lr=2e-3, weight_decay=0.05, batch_size=64, seed=0)
    path = root / "base.pth"
    torch.save(model.state_dict(), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="working directory (default: a temporary one, removed afterwards)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # more threads than free cores slows a tiny model down
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="petl-study-"))
    from petl_surgery.training import run_study

    try:
        if not (work / "task").is_dir():
            write_digits(work)
        base = work / "base.pth" if (work / "base.pth").is_file() else pretrain_base(work)
        grid = {
            "model": MODEL, "image_size": 32, "pretrained": True,
            "model_args": {**MODEL_ARGS, "pretrained_cfg_overlay": {"file": str(base)}},  # timm loads the local file
            "data": str(work / "task"), "format": "vtab", "epochs": 20, "batch_size": 32, "lr": 5e-3,
            "runs": [
                {"method": "patt", "options": {"mid_dim": 8}, "layers": "2:"},
                {"method": "patt", "options": {"mid_dim": 16}},
                {"method": "lora", "options": {"rank": 4}},
                {"method": "adapter", "options": {"bottleneck": 8}},
                {"method": "ssf"},
            ],
            "shots": [5, None], "seeds": [0, 1, 2],
        }
        (work / "grid.json").write_text(json.dumps(grid, indent=2) + "\n")
        result = run_study(grid, work / "study", device="cpu")
        if result.plot is None:
            raise SystemExit("no plot: " + "; ".join(result.messages))
        shutil.copy(result.plot, HERE / "study.png")
        shutil.copy(result.csv, HERE / "study.csv")
        print(f"wrote {HERE / 'study.png'} and {HERE / 'study.csv'}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
