"""Does decoding keep up with training? Decoded training clips per second through a DataLoader with 0, 1 and 2
workers, against the clips per second of one training step of a Video Swin (BAPAT, batches of ``--batch``),
all measured in this process on the generated moving-digits videos (mp4, ``mpeg4``) or their frame folders.

    PYTHONPATH=src python benchmarks/video_decoding.py [--kind video|frames] [--canvas 64] [--videos 32]

A ratio (decoding / training) above 1 means the loader keeps the model busy; below 1, the model waits for
data: add workers, or pre-extract frame folders.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torchvision.models.video.swin_transformer import SwinTransformer3d

import petl_surgery as ps
from petl_surgery.demo.motion import write_motion_dataset
from petl_surgery.training.video import ClipSpec, video_training_data


def clips_per_second(dataset, workers: int, batch: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    count = sum(len(y) for _, y in loader)
    return count / (time.perf_counter() - started)


def training_clips_per_second(dataset, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = ps.apply(SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=48, depths=[2, 2, 2], num_heads=[3, 6, 12],
                                       window_size=[4, 7, 7], num_classes=4), "bapat")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.stack([dataset[i % len(dataset)][0] for i in range(batch)])
    y = torch.arange(batch) % 4
    model.train()
    for step in range(steps + 1):
        if step == 1:  # the first step warms up
            started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("video", "frames"), default="video")
    parser.add_argument("--canvas", type=int, default=112, help="video side in px (default 112)")
    parser.add_argument("--videos", type=int, default=16, help="videos per class (4 classes; default 16)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training step (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_motion_dataset(Path(tmp) / "data", per_class={"train": args.videos}, kind=args.kind, frames=32,
                                    canvas=args.canvas, scale=args.canvas // 16, speed=args.canvas // 64 or 1)
        spec = ClipSpec(frames=8, stride=2, size=args.canvas)
        dataset = video_training_data(str(root), spec).train
        train = training_clips_per_second(dataset, args.batch, args.steps)
        print(f"{len(dataset)} {args.kind} clips of 8 frames (stride 2) at {args.canvas} px; "
              f"torch threads {args.threads}")
        print(f"training step (Video Swin, BAPAT, batch {args.batch}): {train:8.1f} clips/s")
        for workers in (0, 1, 2):
            decoded = clips_per_second(dataset, workers, args.batch)
            print(f"decoding, {workers} workers: {decoded:8.1f} clips/s  ratio to training {decoded / train:6.2f}")


if __name__ == "__main__":
    main()
