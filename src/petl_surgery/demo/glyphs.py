"""Stroke glyphs: generated handwriting-like characters, drawn with torch from a seed, no downloads.

A glyph class is a fixed set of 3 to 5 strokes between the points of a 3 x 3 lattice (the 20 edges
between horizontally, vertically or diagonally neighbouring points), connected, as a digit or a letter is
a few strokes. Every image of a class draws its strokes again with the lattice points jittered, the whole
glyph rotated, scaled and shifted at random and strokes of random width: a new "handwriting" each time.
Glyphs are drawn on an 8 x 8 grid, as the scans of scikit-learn's digits are, and upsampled the same way
(bilinear, grey on three channels, about [-1, 1]), so that they are to the digits what ImageNet's photos
are to VTAB's natural tasks: the same kind of image, other classes.

:func:`glyph_classes` draws disjoint class sets (one pattern never in two sets), so the backbone's
source, the modules' source and the generated target never share a class.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .tasks import IMAGE_SIZE

GRID = 8  # the glyphs' drawing resolution, that of the digits' scans
_POINTS = [(x, y) for y in (-0.75, 0.0, 0.75) for x in (-0.5, 0.0, 0.5)]  # upright, as digits are
EDGES: Tuple[Tuple[int, int], ...] = tuple(
    (a, b) for a in range(9) for b in range(a + 1, 9)
    if max(abs(a % 3 - b % 3), abs(a // 3 - b // 3)) == 1  # lattice neighbours, diagonals included
)
Glyph = Tuple[int, ...]  # indices into EDGES


def _connected(edges: Sequence[int]) -> bool:
    points = {p for e in edges for p in EDGES[e]}
    reached, frontier = set(), [next(iter(points))]
    while frontier:
        point = frontier.pop()
        if point in reached:
            continue
        reached.add(point)
        frontier.extend(q for e in edges for q in EDGES[e] if point in EDGES[e])
    return reached == points


def glyph_classes(sizes: Sequence[int], seed: int = 0) -> List[List[Glyph]]:
    """``len(sizes)`` disjoint lists of glyph classes, ``sizes[i]`` in the i-th, drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    seen, drawn = set(), []
    while len(drawn) < sum(sizes):
        count = int(torch.randint(3, 6, (1,), generator=generator))
        edges = tuple(sorted(torch.randperm(len(EDGES), generator=generator)[:count].tolist()))
        if edges not in seen and _connected(edges):
            seen.add(edges)
            drawn.append(edges)
    out, start = [], 0
    for size in sizes:
        out.append(drawn[start : start + size])
        start += size
    return out


def draw_glyphs(classes: Sequence[Glyph], labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images (n, 3, IMAGE_SIZE, IMAGE_SIZE) of the glyphs ``classes[labels[i]]``, each drawn anew."""
    n = len(labels)
    points = torch.tensor(_POINTS).expand(n, -1, -1) + 0.07 * torch.randn(n, 9, 2, generator=generator)
    angle = (torch.rand(n, generator=generator) - 0.5) * math.radians(30)
    scale = 0.85 + 0.3 * torch.rand(n, generator=generator)
    rotation = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], 1).view(n, 2, 2)
    points = scale.view(n, 1, 1) * points @ rotation.transpose(1, 2) + 0.12 * (torch.rand(n, 1, 2, generator=generator) - 0.5)
    width = 0.11 + 0.08 * torch.rand(n, 1, 1, generator=generator)
    # the ink at 4x the drawing grid, averaged down to it: anti-aliased strokes as a scanner sees them
    fine = GRID * 4
    axis = (torch.arange(fine, dtype=torch.float32) + 0.5) / fine * 2 - 1
    py, px = axis.view(1, -1, 1).expand(n, fine, fine), axis.view(1, 1, -1).expand(n, fine, fine)
    ink = torch.zeros(n, fine, fine)
    for i, label in enumerate(labels.tolist()):
        for edge in classes[label]:
            a, b = points[i, EDGES[edge][0]], points[i, EDGES[edge][1]]
            direction = b - a
            t = (((px[i] - a[0]) * direction[0] + (py[i] - a[1]) * direction[1]) / direction.dot(direction)).clamp(0, 1)
            distance = torch.sqrt((px[i] - a[0] - t * direction[0]) ** 2 + (py[i] - a[1] - t * direction[1]) ** 2)
            ink[i] = torch.maximum(ink[i], (distance <= width[i]).float())
    ink = F.avg_pool2d(ink.unsqueeze(1), 4)  # (n, 1, GRID, GRID) in [0, 1]
    ink = (ink + 0.05 * torch.randn(ink.shape, generator=generator)).clamp(0, 1)
    images = F.interpolate(ink, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def glyph_images(classes: Sequence[Glyph], per_class: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images of every class (class order) and their labels, determined by ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    return draw_glyphs(classes, labels, generator), labels
