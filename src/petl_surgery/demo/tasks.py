"""Procedural image tasks: one object per image, drawn with torch from a seed, no downloads.

Every image shows one object on a noisy background. The object has four attributes:

- a shape (circle, square, triangle, diamond, cross, ring),
- a texture filling it (solid, horizontal stripes, vertical stripes, checkerboard, dots, diagonal stripes),
- a colour (red, green, blue, yellow, magenta, cyan),
- a position (the image quadrant its centre lies in), plus a random size and jitter.

A :class:`Task` labels images by one attribute (``"shape"``, ``"texture"``, ``"colour"``, ``"quadrant"``) or by
a pair of attributes (``"texture+colour"``), over a chosen subset of the attribute's values; the other
attributes vary at random. The same seed always gives the same images (:func:`make_images`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

IMAGE_SIZE = 32
RADIUS = (6.0, 9.0)  # object size range, pixels

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
TEXTURES = ("solid", "h-stripes", "v-stripes", "checker", "dots", "diagonal")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
ATTRIBUTES: Dict[str, Tuple[str, ...]] = {
    "shape": SHAPES,
    "texture": TEXTURES,
    "colour": COLOURS,
    "quadrant": QUADRANTS,
}

_RGB = torch.tensor(
    [
        [0.90, 0.15, 0.15],
        [0.15, 0.80, 0.20],
        [0.20, 0.30, 0.95],
        [0.95, 0.85, 0.15],
        [0.85, 0.20, 0.85],
        [0.15, 0.85, 0.90],
    ]
)


@dataclass(frozen=True)
class Task:
    """A classification task over generated images.

    Attributes:
        name: short name (``"texture"``).
        attributes: the attribute(s) that make the label; with two, every pair of their chosen values is
            a class (``("texture", "colour")`` with 4 and 4 values: 16 classes).
        values: per attribute, the indices of the values used (None: all of them).
        description: one line for reports.
    """

    name: str
    attributes: Tuple[str, ...]
    values: Tuple[Optional[Tuple[int, ...]], ...]
    description: str = ""
    kind: str = "generated"

    def value_lists(self) -> Tuple[Tuple[int, ...], ...]:
        return tuple(
            tuple(range(len(ATTRIBUTES[a]))) if v is None else tuple(v) for a, v in zip(self.attributes, self.values)
        )

    @property
    def classes(self) -> Tuple[str, ...]:
        names = [[ATTRIBUTES[a][i] for i in v] for a, v in zip(self.attributes, self.value_lists())]
        if len(names) == 1:
            return tuple(names[0])
        return tuple(f"{x} {y}" for x in names[0] for y in names[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _shape_masks(shape: torch.Tensor, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """(n, H, W) masks: x, y are coordinates relative to each object's centre."""
    ax, ay = x.abs(), y.abs()
    dist = torch.sqrt(x**2 + y**2)
    masks = torch.stack(
        [
            dist <= radius,
            torch.maximum(ax, ay) <= 0.85 * radius,
            (y <= 0.75 * radius) & (y >= -radius) & (ax <= (y + radius) * 0.6),
            ax + ay <= 1.15 * radius,
            ((ax <= 0.33 * radius) & (ay <= radius)) | ((ay <= 0.33 * radius) & (ax <= radius)),
            (dist <= radius) & (dist >= 0.55 * radius),
        ],
        dim=1,
    )
    return masks[torch.arange(len(shape)), shape]


def _textures(texture: torch.Tensor, x: torch.Tensor, y: torch.Tensor, period: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """(n, H, W) in {0.35, 1}: the texture's dark and bright parts."""
    w = 2 * math.pi / period
    sx, sy = torch.sin(w * x + phase), torch.sin(w * y + phase)
    patterns = torch.stack(
        [
            torch.ones_like(x),
            (sy > 0).float(),
            (sx > 0).float(),
            ((sx > 0) ^ (sy > 0)).float(),
            ((sx > 0.3) & (sy > 0.3)).float(),
            (torch.sin(w * (x + y) / math.sqrt(2) + phase) > 0).float(),
        ],
        dim=1,
    )
    chosen = patterns[torch.arange(len(texture)), texture]
    return 0.35 + 0.65 * chosen


def render(
    shape: torch.Tensor, texture: torch.Tensor, colour: torch.Tensor, quadrant: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Draw images of the given attributes (each a long tensor of length n); (n, 3, 32, 32), normalised
    to about [-1, 1]."""
    n = len(shape)
    grid = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    gy, gx = grid.view(1, -1, 1), grid.view(1, 1, -1)
    radius = RADIUS[0] + (RADIUS[1] - RADIUS[0]) * torch.rand(n, 1, 1, generator=generator)
    half = IMAGE_SIZE / 2
    cx = half / 2 + (quadrant % 2).float().view(n, 1, 1) * half + (torch.rand(n, 1, 1, generator=generator) - 0.5) * 4
    cy = half / 2 + (quadrant // 2).float().view(n, 1, 1) * half + (torch.rand(n, 1, 1, generator=generator) - 0.5) * 4
    x = (gx - cx).expand(n, IMAGE_SIZE, IMAGE_SIZE)
    y = (gy - cy).expand(n, IMAGE_SIZE, IMAGE_SIZE)
    mask = _shape_masks(shape, x, y, radius).float()
    period = torch.randint(4, 8, (n, 1, 1), generator=generator).float()
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=generator)
    shade = _textures(texture, x, y, period, phase)
    rgb = _RGB[colour].view(n, 3, 1, 1) * (0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=generator))
    background = 0.15 + 0.35 * torch.rand(n, 1, 1, 1, generator=generator)  # a grey level
    background = background + 0.08 * torch.rand(n, 3, 1, 1, generator=generator)  # slightly tinted
    obj = (rgb * shade.unsqueeze(1)).clamp(0, 1)
    images = background + mask.unsqueeze(1) * (obj - background)
    images = images + 0.08 * torch.randn(images.shape, generator=generator)
    return (images - 0.5) / 0.5


def make_images(
    task: Task, count: int, seed: int, *, per_class: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count`` images of ``task`` and their labels, determined by ``seed``.

    With ``per_class=True``, ``count`` images of every class (class-balanced, in class order), as few-shot
    training sets are drawn; otherwise labels are uniform at random.
    """
    generator = torch.Generator().manual_seed(int(seed))
    k = task.num_classes
    if per_class:
        labels = torch.arange(k).repeat_interleave(count)
    else:
        labels = torch.randint(k, (count,), generator=generator)
    n = len(labels)
    values = {name: torch.randint(len(options), (n,), generator=generator) for name, options in ATTRIBUTES.items()}
    lists = task.value_lists()
    if len(task.attributes) == 1:
        values[task.attributes[0]] = torch.tensor(lists[0])[labels]
    else:
        first, second = task.attributes
        values[first] = torch.tensor(lists[0])[labels // len(lists[1])]
        values[second] = torch.tensor(lists[1])[labels % len(lists[1])]
    images = render(values["shape"], values["texture"], values["colour"], values["quadrant"], generator)
    return images, labels
