"""Image data for training: torchvision ImageFolder directories, resized and normalised, with an
optional seeded validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from ..errors import SurgeryError


class DataError(SurgeryError):
    """The data cannot be read as asked: a missing folder, classes that do not match, an empty split."""


def image_folder_splits(
    data: str,
    val: Optional[str],
    val_split: float,
    seed: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train_transform: Optional[Callable[[Any], Any]] = None,
) -> Tuple[Any, Optional[Any], List[str]]:
    """(train, validation or None, class names) from ImageFolder directories: images resized to
    ``size`` x ``size`` and normalised with ``mean``/``std``. Without ``val``, a ``val_split`` fraction of
    ``data`` (drawn with ``seed``) validates. ``train_transform`` (e.g. an augmentation) replaces the
    resize for the training images; validation images keep it."""
    from torchvision import datasets, transforms

    for folder in [data] + ([val] if val else []):
        if not Path(folder).is_dir():
            raise DataError(f"no image folder at {folder}")
    transform = transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )
    try:
        train = datasets.ImageFolder(data, transform=train_transform or transform)
        validation = datasets.ImageFolder(val, transform=transform) if val else None
    except (FileNotFoundError, RuntimeError) as error:
        raise DataError(str(error).splitlines()[0]) from None
    classes = list(train.classes)
    if validation is not None and list(validation.classes) != classes:
        raise DataError(f"the validation folder has classes {validation.classes}, the training folder {classes}")
    if validation is None and val_split > 0:
        train_index, val_index = seeded_split(len(train), val_split, seed)
        held_out = datasets.ImageFolder(data, transform=transform) if train_transform is not None else train
        train, validation = torch.utils.data.Subset(train, train_index), torch.utils.data.Subset(held_out, val_index)
    return train, validation, classes


def seeded_split(count: int, fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """(training indices, validation indices) of ``count`` items: a ``fraction`` of them, rounded,
    drawn with ``seed`` (``torch.randperm``), validates."""
    n_val = int(round(count * fraction))
    if n_val < 1 or n_val >= count:
        raise DataError(f"a validation split of {fraction} leaves no training or no validation images of {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[n_val:], order[:n_val]
