"""Per-class knowledge of attention, MLP and block layouts, in one registry.

Each entry turns a module of a known class into a site description. Classes are matched exactly, not
by inheritance: a subclass may override ``forward`` and stop calling the projection a method hooks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

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
    names the Linear whose output is the MLP's output. ``inline_fc``: those two Linears are the MLP's
    input and output layers, the targets "fc1" and "fc2" of LoRA and SSF (transformers' ``intermediate.dense``
    and ``output.dense``; not so where ``mlp_input`` also produces q/k/v, as in timm's parallel block).

    ``mlp_layers`` is for an MLP module of no registered class (open_clip's ``Sequential(c_fc, gelu,
    c_proj)``): the paths, relative to the MLP, of its input and output ``nn.Linear``, which are then its
    ``"fc1"`` and ``"fc2"``. ``attention`` is None for a block without attention (ConvNeXt's), whose
    MLP alone is a site."""

    attention: Optional[str]
    mlp: str
    residual_input: Optional[str] = None
    residual_output: Optional[str] = None
    mlp_input: Optional[str] = None
    inline_fc: bool = False
    mlp_layers: Optional[Tuple[str, str]] = None


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
# MLP classes whose input and output layers are not named fc1 and fc2: target name -> the layer's path.
MLP_PROJECTIONS: Dict[Type[nn.Module], Mapping[str, str]] = {}
# Classes of modules outside the blocks that hold attention as part of the model's head path (an
# attention-pooling head): discovery leaves them, and everything inside them, out. Class -> what it is.
OUTSIDE_BLOCKS: Dict[Type[nn.Module], str] = {}
# How prefix tuning reaches an attention class's keys and values, declared by its zoo's layouts: None for
# a forward that makes exactly one F.scaled_dot_product_attention call on (batch, heads, tokens, head_dim)
# q/k/v (whose non-fused path, if any, is the same computation), or why its call cannot take a prefix.
# Sites built by a describer (or patched by a site's replacement forward, or routed through a zoo's
# attention interface) may decide per instance instead (AttentionSite.one_sdpa_call, prefix_route).
PREFIX_CALLS: Dict[Type[nn.Module], Optional[str]] = {}
# Registrations waiting for the module that defines their classes: (module name, register function).
# They run, once, the first time site discovery finds that module imported, so that registering a
# model zoo costs nothing until the user has imported its models.
_DEFERRED: List[Tuple[str, Callable[[], None]]] = []


def register_attention(cls: Type[nn.Module], describer: AttentionDescriber) -> None:
    """Teach site discovery the q/k/v layout of an attention class."""
    ATTENTION_LAYOUTS[cls] = describer


def register_mlp(
    cls: Type[nn.Module], describer: MlpDescriber, projections: Optional[Mapping[str, str]] = None
) -> None:
    """Teach site discovery the (in_features, out_features, channel_dim) of an MLP class (channel_dim
    -1 for channels last, 1 for 1x1 convolutions on NCHW); ``projections`` names its input and output
    layers when they are not ``fc1`` and ``fc2`` (``{"fc1": "up_proj", "fc2": "down_proj"}``; a gated
    MLP whose input is two layers names only ``fc2``)."""
    MLP_LAYOUTS[cls] = describer
    if projections is not None:
        MLP_PROJECTIONS[cls] = dict(projections)


def register_block(cls: Type[nn.Module], layout: Union[BlockLayout, Callable[[nn.Module], BlockLayouts]]) -> None:
    """Teach site discovery where a block class keeps its attention, MLP and residual branch (``layout``
    may be a function of the block instance, giving one layout or, for a block that runs several
    attention/MLP pairs, one per pair)."""
    BLOCK_LAYOUTS[cls] = layout


def register_not_attention(cls: Type[nn.Module], what: str) -> None:
    """Tell site discovery that a class whose name looks like attention is not attention (``what`` says
    what it is), so that models holding it are not refused for it."""
    NOT_ATTENTION[cls] = what


def register_outside_blocks(cls: Type[nn.Module], what: str) -> None:
    """Tell site discovery that modules of ``cls`` hold attention that is part of the model's head path
    (``what`` says what they are), not blocks to operate on: it leaves them and their insides out."""
    OUTSIDE_BLOCKS[cls] = what


def register_prefix_call(cls: Type[nn.Module], refusal: Optional[str] = None) -> None:
    """Tell prefix tuning how instances of the attention class ``cls`` call their attention: with
    ``refusal`` None, one ``F.scaled_dot_product_attention`` on (batch, heads, tokens, head_dim) q/k/v,
    where the prefix keys and values go; otherwise why a prefix cannot be put into its call (a sentence
    completing "its attention ...")."""
    PREFIX_CALLS[cls] = refusal


def register_when_imported(module: str, register: Callable[[], None]) -> None:
    """Run ``register`` (which registers classes of ``module``) once ``module`` has been imported, at the
    next site discovery; at once if it is imported already."""
    _DEFERRED.append((module, register))
    run_deferred()


def run_deferred() -> None:
    """Run the deferred registrations whose module is imported by now (site discovery calls this)."""
    for entry in [entry for entry in _DEFERRED if entry[0] in sys.modules]:
        _DEFERRED.remove(entry)
        entry[1]()
