"""V-PETL's video experiment in miniature, on the CPU: a small Video Swin pre-trained on one motion task, then
BAPAT, PATT, AdaptFormer (the adapter) and full fine-tuning on a related target task, with the trainable
parameters and the test accuracy (mean and spread over seeds) in one table.

The tasks are scikit-learn's digits moving across a 32 px canvas (``petl_surgery.demo.motion``): the source
task's classes are the four diagonal directions, the target's the four axis directions, so no single frame
tells a class. The videos are written as mp4 files and read back through ``petl_surgery.training.video``
(8-frame clips every 2 frames, V-PETL's multi-scale crop for training, 2 clips x 3 crops at test).

    PYTHONPATH=src python examples/video_bapat.py            # about the size quoted in docs/video.md
    PYTHONPATH=src python examples/video_bapat.py --quick    # a smoke run

Needs the ``video`` and ``demo`` extras (PyAV, scikit-learn).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torchvision.models.video.swin_transformer import SwinTransformer3d

import petl_surgery as ps
from petl_surgery.demo.motion import AXES, DIAGONALS, write_motion_dataset
from petl_surgery.training import accuracy_report, fit
from petl_surgery.training.video import ClipSpec, ViewAverage, video_evaluation_data, video_training_data

METHODS = {  # method -> options (V-PETL's adapter bottleneck and PATT's mid dim, scaled to the 32-wide model)
    "bapat": {"mid_dim": 16},
    "patt": {"mid_dim": 16},
    "adapter": {"bottleneck": 8},
    "full fine-tuning": None,
}


def video_swin(classes: int = 4) -> torch.nn.Module:
    """A small Video Swin: patches (2, 4, 4), width 32, two stages of 2 blocks, windows (2, 4, 4)."""
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                             window_size=[2, 4, 4], stochastic_depth_prob=0.0, num_classes=classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer videos, epochs and seeds")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1; more threads ran slower on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = 1 if args.quick else args.seeds
    source_epochs, target_epochs = (2, 2) if args.quick else (25, 15)
    per_source = {"train": 8 if args.quick else 48}
    per_target = {"train": 4 if args.quick else 8, "test": 4 if args.quick else 16}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        source_dir = write_motion_dataset(Path(tmp) / "source", per_class=per_source, directions=DIAGONALS, seed=1,
                                          frames=16, canvas=32, scale=2)
        target_dir = write_motion_dataset(Path(tmp) / "target", per_class=per_target, directions=AXES, seed=2,
                                          frames=16, canvas=32, scale=2)
        clips = ClipSpec(frames=8, stride=2, size=32, mean=(0.5,) * 3, std=(0.5,) * 3, clips=2, crops=3)
        source = video_training_data(str(source_dir), clips)
        target = video_training_data(str(target_dir), clips)
        test, layout, _ = video_evaluation_data(str(target_dir), clips)
        test_loader = torch.utils.data.DataLoader(test, batch_size=8)
        print(f"data written and checked in {time.perf_counter() - started:.0f} s")

        torch.manual_seed(0)
        backbone = video_swin()
        fit(backbone, source.train, epochs=source_epochs, lr=3e-3, batch_size=8, seed=0)
        pretrained = {k: v for k, v in backbone.state_dict().items() if not k.startswith("head.")}
        source_test = accuracy_report(backbone, torch.utils.data.DataLoader(source.train, batch_size=8), source.classes)
        print(f"pre-trained on the diagonal directions: training accuracy {source_test['top1']:.3f} "
              f"({time.perf_counter() - started:.0f} s)")

        rows = []
        for method, options in METHODS.items():
            accuracies, trainable = [], 0
            for seed in range(seeds):
                torch.manual_seed(seed)
                model = video_swin()
                missing = model.load_state_dict(pretrained, strict=False).missing_keys
                assert sorted(missing) == ["head.bias", "head.weight"], missing  # only the head is fresh
                if options is not None:
                    ps.apply(model, method, **options)
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                fit(model, target.train, epochs=target_epochs, lr=1e-3 if options is None else 5e-3, batch_size=8,
                    seed=seed)
                accuracies.append(accuracy_report(ViewAverage(model), test_loader, layout.classes)["top1"])
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            rows.append((method, trainable, statistics.mean(accuracies), spread))
            print(f"{method}: {accuracies} ({time.perf_counter() - started:.0f} s)")
    print()
    print(f"| method | trainable parameters | test accuracy, mean ± sd over {seeds} seeds |")
    print("|---|---:|---:|")
    for method, trainable, mean, spread in rows:
        print(f"| {method} | {trainable:,} | {100 * mean:.1f} ± {100 * spread:.1f} % |")
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
