"""Blocks of timm's convolutional networks whose MLP is a site of its own, with no attention beside it.

- ``ConvNeXtBlock`` (ConvNeXt, ConvNeXt V2)::

      x = shortcut(x) + drop_path(gamma * mlp(norm(conv_dw(x))))

  ``mlp`` is timm's ``Mlp`` on NHWC tokens (channels last, the default), or with ``conv_mlp=True`` the same
  ``Mlp`` of 1x1 convolutions on NCHW (channel dim 1); ConvNeXt V2's ``GlobalResponseNormMlp`` (a global
  response norm between the two) likewise. An adapter added to the MLP's output (input "mlp") is scaled
  by the layer scale ``gamma`` with it. The residual stream is NCHW while a channels-last MLP reads NHWC,
  so the block names no residual branch: an adapter with input "residual" is refused.
"""

from __future__ import annotations

from typing import Tuple

from torch import nn

from ..errors import SurgeryError
from .registry import BlockLayout, register_block, register_mlp

MLP_ONLY = BlockLayout(None, "mlp")


def response_norm_mlp_features(mlp: nn.Module) -> Tuple[int, int, int]:
    """``GlobalResponseNormMlp``: ``fc1``, act, drop, grn, ``fc2``, Linear (channels last) or 1x1 Conv2d
    (channels first)."""
    first, last = mlp.fc1, mlp.fc2
    if type(first) is nn.Linear and type(last) is nn.Linear:
        return first.in_features, last.out_features, -1
    if all(type(layer) is nn.Conv2d and layer.kernel_size == (1, 1) and layer.groups == 1 for layer in (first, last)):
        return first.in_channels, last.out_channels, 1
    raise SurgeryError(f"MLP {type(mlp).__name__} uses {type(first).__name__} projections, not Linear or 1x1 Conv2d")


def register() -> None:
    """Add timm's ConvNeXt block (and ConvNeXt V2's MLP) to the registry."""
    from timm.layers import GlobalResponseNormMlp
    from timm.models.convnext import ConvNeXtBlock

    register_mlp(GlobalResponseNormMlp, response_norm_mlp_features)
    register_block(ConvNeXtBlock, MLP_ONLY)
