"""Images in memory written as an ImageFolder directory (one sub-directory per class, PNG files), the
layout ``petl-surgery train`` and ``study`` read."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def write_image_folder(root: Path, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> Path:
    """Write ``images`` ((n, 3, H, W), about [-1, 1] as the demo draws them) as 8-bit RGB PNGs under
    ``root/<class name>/<index>.png``; returns ``root``."""
    from PIL import Image

    pixels = ((images.clamp(-1, 1) * 0.5 + 0.5) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for name in classes:
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
    for index, (array, label) in enumerate(zip(pixels, labels.tolist())):
        Image.fromarray(array).save(Path(root) / classes[label] / f"{index:05d}.png")
    return Path(root)
