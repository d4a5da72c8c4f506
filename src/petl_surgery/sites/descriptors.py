"""What site discovery finds: plain descriptions of where a method may operate.

Methods are written against these descriptions only, never against a model family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from torch import nn

ROLES = ("q", "k", "v")


@dataclass(frozen=True)
class Projection:
    """Where one of q, k, v is produced: output channels ``[start, start + width)`` of a submodule.

    ``module`` is the path of the producing module relative to the attention module (``"qkv"``); the
    channels are counted along the producer's channel dimension.
    """

    module: str
    start: int
    width: int

    @property
    def stop(self) -> int:
        return self.start + self.width


@dataclass(frozen=True)
class AttentionSite:
    """An attention module and the layout of its q/k/v projections.

    Attributes:
        path: module path of the attention inside the model.
        module: the attention module.
        in_features: width of the tokens that the q/k/v projections read.
        projections: where q, k and v are produced (``ROLES`` as keys).
        has_bias: whether the base q/k/v projections carry a bias.
        channel_dim: the channel dimension of the producers' input and output (-1: channels last).
        softmax_over_tokens: whether the attention is a softmax over tokens, which key/value methods
            such as PATT assume.
    """

    path: str
    module: nn.Module
    in_features: int
    projections: Mapping[str, Projection]
    has_bias: bool
    channel_dim: int = -1
    softmax_over_tokens: bool = True


@dataclass(frozen=True)
class MlpSite:
    """An MLP module, and (when the block is known) where its residual branch starts and ends.

    Attributes:
        path: module path of the MLP inside the model.
        module: the MLP module.
        in_features, out_features: token widths it reads and writes.
        channel_dim: channel dimension of its input and output (-1: channels last).
        residual_input: the module whose input is the block's residual stream before the MLP (the norm
            ``norm2`` in timm's pre-norm blocks), or None when the block layout is not known.
        residual_output: the last module on the MLP's residual branch (``drop_path2`` in timm), whose
            output is added to the residual stream; None when not known.
    """

    path: str
    module: nn.Module
    in_features: int
    out_features: int
    channel_dim: int = -1
    residual_input: Optional[nn.Module] = None
    residual_output: Optional[nn.Module] = None


@dataclass(frozen=True)
class Block:
    """A transformer block, with one global index in depth order across stages."""

    index: int
    path: str
    module: nn.Module
    attention: Optional[AttentionSite]
    mlp: Optional[MlpSite]

    def __repr__(self) -> str:
        attention = self.attention.path if self.attention else None
        mlp = self.mlp.path if self.mlp else None
        return (
            f"Block(index={self.index}, path={self.path!r}, class={type(self.module).__name__}, "
            f"attention={attention!r}, mlp={mlp!r})"
        )
