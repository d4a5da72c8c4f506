"""A target task of real images: scikit-learn's bundled handwritten digits, no download.

``sklearn.datasets.load_digits`` ships 1,797 real 8 x 8 grey-level scans of handwritten digits (0..9,
about 180 per class; from the UCI "Optical Recognition of Handwritten Digits" set) inside the package.
They are upsampled to the demo's image size (bilinear), copied to three channels and normalised to about
[-1, 1] like the generated images. A fixed split (seed 0) holds out :data:`TEST_POOL` images per class
for testing; the rest is the training pool the demo's studies draw few-shot sets from. scikit-learn
comes with the ``demo`` extra; without it :func:`digits_available` is False and the demo leaves this target out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Tuple

import torch
import torch.nn.functional as F

from .tasks import IMAGE_SIZE

TEST_POOL = 60  # held-out test images per class (each class has at least 174)


def digits_available() -> bool:
    """Whether scikit-learn (which ships the digits) can be imported."""
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def _digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """All digits as (1797, 3, IMAGE_SIZE, IMAGE_SIZE) float32 images and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits target needs scikit-learn: pip install 'petl_surgery[demo]' or pip install scikit-learn"
        ) from error
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (n, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    return images, torch.tensor(bunch.target, dtype=torch.long)


@lru_cache(maxsize=1)
def _split() -> Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]:
    """Per class, the indices of its test pool and of its training pool (a fixed shuffle, seed 0)."""
    _, labels = _digits()
    generator = torch.Generator().manual_seed(0)
    test, train = [], []
    for digit in range(10):
        members = torch.nonzero(labels == digit).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test.append(members[:TEST_POOL])
        train.append(members[TEST_POOL:])
    return tuple(test), tuple(train)


@dataclass(frozen=True)
class DigitsTask:
    """The handwritten digits as a few-shot target (10 classes, real images)."""

    name: str = "digits"
    description: str = "scikit-learn's handwritten digits: 10 classes of real 8x8 scans, upsampled"
    kind: str = "real"

    @property
    def classes(self) -> Tuple[str, ...]:
        return tuple(str(d) for d in range(10))

    @property
    def num_classes(self) -> int:
        return 10

    def train_pool(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every image outside the test pools (about 120 per class), in class order: the pool few-shot
        training sets are drawn from."""
        images, labels = _digits()
        _, pools = _split()
        chosen = torch.cat(pools)
        return images[chosen], labels[chosen]

    def test_set(self, per_class: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """The first ``per_class`` (at most :data:`TEST_POOL`) held-out images of every class; the same
        for every seed (the split is fixed)."""
        images, labels = _digits()
        pools, _ = _split()
        chosen = torch.cat([pool[:per_class] for pool in pools])
        return images[chosen], labels[chosen]


DIGITS = DigitsTask()
