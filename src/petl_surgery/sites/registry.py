"""Per-class knowledge of attention, MLP and block layouts, in one registry.

Each entry turns a module of a known class into a site description. Classes are matched exactly, not
by inheritance: a subclass may override ``forward`` and stop calling the projection a method hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Type

from torch import nn

from .descriptors import AttentionSite

AttentionDescriber = Callable[[str, nn.Module], AttentionSite]
MlpDescriber = Callable[[nn.Module], Tuple[int, int, int]]  # in_features, out_features, channel_dim


@dataclass(frozen=True)
class BlockLayout:
    """Paths, relative to the block, of its attention, its MLP, and the two ends of the MLP's residual
    branch (the module whose input is the residual stream before the MLP, and the last module before the
    residual add). Paths may be nested (``"attn_block.attn"``)."""

    attention: str
    mlp: str
    residual_input: Optional[str] = None
    residual_output: Optional[str] = None


ATTENTION_LAYOUTS: Dict[Type[nn.Module], AttentionDescriber] = {}
MLP_LAYOUTS: Dict[Type[nn.Module], MlpDescriber] = {}
BLOCK_LAYOUTS: Dict[Type[nn.Module], BlockLayout] = {}


def register_attention(cls: Type[nn.Module], describer: AttentionDescriber) -> None:
    """Teach site discovery the q/k/v layout of an attention class."""
    ATTENTION_LAYOUTS[cls] = describer


def register_mlp(cls: Type[nn.Module], describer: MlpDescriber) -> None:
    """Teach site discovery the (in_features, out_features, channel_dim) of an MLP class (channel_dim
    -1 for channels last, 1 for 1x1 convolutions on NCHW)."""
    MLP_LAYOUTS[cls] = describer


def register_block(cls: Type[nn.Module], layout: BlockLayout) -> None:
    """Teach site discovery where a block class keeps its attention, MLP and residual branch."""
    BLOCK_LAYOUTS[cls] = layout
