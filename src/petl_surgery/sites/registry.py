"""Per-class knowledge of attention, MLP and block layouts, in one registry.

Each entry turns a module of a known class into a site description. Classes are matched exactly, not
by inheritance: a subclass may override ``forward`` and stop calling the projection a method hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Type, Union

from torch import nn

from .descriptors import AttentionSite

AttentionDescriber = Callable[[str, nn.Module], AttentionSite]
MlpDescriber = Callable[[nn.Module], Tuple[int, int, int]]  # in_features, out_features, channel_dim


@dataclass(frozen=True)
class BlockLayout:
    """Paths, relative to the block, of its attention, its MLP, and the two ends of the MLP's residual
    branch (the module whose input is the residual stream before the MLP, and the last module before the
    residual add). Paths may be nested (``"attn_block.attn"``).

    ``mlp_input`` is for blocks that run their MLP inline, with no module of its own
    (``nn.TransformerEncoderLayer``): the path of the Linear whose input is the MLP's input, while ``mlp``
    names the Linear whose output is the MLP's output."""

    attention: str
    mlp: str
    residual_input: Optional[str] = None
    residual_output: Optional[str] = None
    mlp_input: Optional[str] = None


ATTENTION_LAYOUTS: Dict[Type[nn.Module], AttentionDescriber] = {}
MLP_LAYOUTS: Dict[Type[nn.Module], MlpDescriber] = {}
# A layout, or a function of the block giving its layout (a class whose layout depends on the instance,
# as nn.TransformerEncoderLayer's on norm_first) or a sequence of layouts (a block that runs several
# attention/MLP pairs, each then a block of its own: TNT, timm's ParallelThingsBlock).
BlockLayouts = Union[BlockLayout, Sequence[BlockLayout]]
BLOCK_LAYOUTS: Dict[Type[nn.Module], Union[BlockLayout, Callable[[nn.Module], BlockLayouts]]] = {}
# Classes whose name looks like attention but that are not (a grouped convolution named "ConvAttention"):
# discovery does not report them as attention it cannot operate on. Class -> what it is instead.
NOT_ATTENTION: Dict[Type[nn.Module], str] = {}


def register_attention(cls: Type[nn.Module], describer: AttentionDescriber) -> None:
    """Teach site discovery the q/k/v layout of an attention class."""
    ATTENTION_LAYOUTS[cls] = describer


def register_mlp(cls: Type[nn.Module], describer: MlpDescriber) -> None:
    """Teach site discovery the (in_features, out_features, channel_dim) of an MLP class (channel_dim
    -1 for channels last, 1 for 1x1 convolutions on NCHW)."""
    MLP_LAYOUTS[cls] = describer


def register_block(cls: Type[nn.Module], layout: Union[BlockLayout, Callable[[nn.Module], BlockLayouts]]) -> None:
    """Teach site discovery where a block class keeps its attention, MLP and residual branch (``layout``
    may be a function of the block instance, giving one layout or, for a block that runs several
    attention/MLP pairs, one per pair)."""
    BLOCK_LAYOUTS[cls] = layout


def register_not_attention(cls: Type[nn.Module], what: str) -> None:
    """Tell site discovery that a class whose name looks like attention is not attention (``what`` says
    what it is), so that models holding it are not refused for it."""
    NOT_ATTENTION[cls] = what
