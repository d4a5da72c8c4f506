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

from .registry import BlockLayout, register_block

MLP_ONLY = BlockLayout(None, "mlp")


def register() -> None:
    """Add timm's ConvNeXt block to the registry (its MLP classes are timm_layouts')."""
    from timm.models.convnext import ConvNeXtBlock

    register_block(ConvNeXtBlock, MLP_ONLY)
