"""Pretrained weights from a local file, through timm's own loading (for machines without hub access):
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``. timm reads the
file (safetensors, or a torch checkpoint, nested ``state_dict``/``model`` keys included), adapts it with
the model's ``checkpoint_filter_fn`` (position embeddings resampled to another image size, ...) and drops
the classifier when the number of classes differs from the pretrained config's, as with hub weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from torch import nn

from ..errors import SurgeryError


def create_with_weights(name: str, file: Union[str, Path], **kwargs: Any) -> nn.Module:
    """timm model ``name`` (``kwargs`` for ``timm.create_model``) with the pretrained weights in ``file``.
    A missing file, or one timm cannot read or load into the model, is a SurgeryError naming it."""
    import timm

    if not timm.is_model(name):
        raise SurgeryError(f"unknown timm model {name!r}")
    path = Path(file)
    if not path.is_file():
        raise SurgeryError(f"no weights file at {path}")
    try:
        # custom_load False: the file goes through timm's state-dict loader; timm 1.0.30 kept the registry's
        # flag, which for the augreg ViTs would hand a safetensors file to the reader of Google's .npz files
        overlay = dict(file=str(path), custom_load=False)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as error:  # timm and torch raise many kinds: a pickle, safetensors or size-mismatch error
        detail = " ".join(str(error).split())[:300] or type(error).__name__
        raise SurgeryError(f"cannot load the weights {path} into {name}: {type(error).__name__}: {detail}") from None
