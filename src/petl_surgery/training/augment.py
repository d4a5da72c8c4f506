"""timm's data pipeline for the training images (``--aug timm``): ``timm.data.create_transform`` with
``is_training=True`` from the data config ``timm.data.resolve_data_config`` resolves from the model's
pretrained config (mean, std, interpolation) at the run's input size. With timm's defaults that is
RandomResizedCrop (scale 0.08 to 1), a horizontal flip with probability 0.5 and a colour jitter of 0.4,
then normalisation. ``--aug none`` keeps the data's deterministic preprocessing."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import SurgeryError

AUGMENTATIONS = ("none", "timm")


def data_config(model_name: str, size: int) -> Dict[str, Any]:
    """timm's resolved data config of ``model_name`` (its pretrained config, or timm's defaults for a
    name without one) at input size ``size``."""
    import timm
    from timm.data import resolve_data_config

    pretrained = timm.get_pretrained_cfg(model_name)
    return resolve_data_config(args={"input_size": (3, size, size)},
                               pretrained_cfg=pretrained.to_dict() if pretrained is not None else None)


def training_transform(model_name: str, size: int, aug: str) -> Tuple[Optional[Callable[[Any], Any]], Dict[str, Any]]:
    """(the training transform, the data config): timm's augmentation for ``aug="timm"``, None (the
    data's own deterministic preprocessing) for ``"none"``."""
    from timm.data import create_transform

    config = data_config(model_name, size)
    if aug == "none":
        return None, config
    if aug != "timm":
        raise SurgeryError(f"unknown augmentation {aug!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return create_transform(**config, is_training=True), config


def transform_for(size: int, mean: Any, std: Any) -> Callable[[Any], Any]:
    """timm's training pipeline (``create_transform`` with its defaults, see the module) at ``size`` with the
    given normalisation: for models of other zoos, whose statistics come from their own configs."""
    from timm.data import create_transform

    return create_transform(input_size=(3, size, size), mean=tuple(mean), std=tuple(std), is_training=True)
