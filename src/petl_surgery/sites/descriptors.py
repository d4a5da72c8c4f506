"""What site discovery finds: plain descriptions of where a method may operate.

Methods are written against these descriptions only, never against a model family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Tuple

from torch import Tensor, nn

from ..patches import installed

ROLES = ("q", "k", "v")
# A site whose ``patches`` replace the attention's forward may also add, under this name, the module that
# forward calls for its attention product: ``call(q, k, v, attn_mask, dropout_p, is_causal)``, computing
# ``F.scaled_dot_product_attention`` on (batch, heads, tokens, head_dim). Prefix tuning puts its keys and
# values into that call (nn.MultiheadAttention's replacement forward has one).
ATTENTION_CALL = "petl_sdpa"

# extend(query, key, value, mask) -> (key, value, mask): keys and values (batch, heads, tokens, head_dim)
# with extra ones put in front, and the mask (None, or over (..., queries, keys)) padded to match.
KeyValueExtension = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tuple[Tensor, Tensor, Optional[Tensor]]]


@dataclass(frozen=True)
class Projection:
    """Where one of q, k, v is produced: output channels ``[start, start + width)`` of a submodule, or
    the scattered channels ``index`` (per-head layouts such as ``(heads, 3, head_dim)``).

    ``module`` is the path of the producing module relative to the attention module (``"qkv"``); the
    channels are counted along the producer's channel dimension. The producer's input is what a branch
    beside it reads, so a k/v producer on spatially reduced tokens gives its branch the reduced tokens.
    """

    module: str
    start: int
    width: int
    index: Optional[Tuple[int, ...]] = None

    @classmethod
    def scattered(cls, module: str, index: Tuple[int, ...]) -> "Projection":
        return cls(module, 0, len(index), tuple(index))


@dataclass(frozen=True)
class AttentionSite:
    """An attention module and the layout of its q/k/v projections.

    Attributes:
        path: module path of the attention inside the model.
        module: the attention module.
        in_features: width of the tokens that the q/k/v projections read.
        projections: where q, k and v are produced (``ROLES`` as keys).
        has_bias: whether the base q/k/v projections carry a bias.
        channel_dim: the channel dimension of the producers' input and output (-1: channels last; 1 for
            1x1 convolutions on NCHW).
        unsupported: why q/k/v methods such as PATT cannot operate here (attention that is not a
            softmax over tokens, say), or None when they can.
        output: the attention's output projection (``proj`` in timm), when the attention calls it as a
            module; None otherwise.
        prefix_route: for attention whose core, softmax(q k^T) v, is a function the model looks up on
            every call (transformers' attention interface): given an ``extend`` (KeyValueExtension),
            the attribute patches of the attention module that make that call pass its keys, values and
            mask through ``extend`` while they are present (prefix tuning's keys and values; a dotted
            name, ``"attention.config"``, patches an attribute of that submodule); it raises
            SurgeryError when the model's attention implementation cannot be routed. None: prefix tuning
            uses the attention's ``F.scaled_dot_product_attention`` call.
        patches: attribute values to set on the attention module while surgery is present (timm's
            ``qkv_bias_separate = True`` makes a module call the ``qkv`` projection it otherwise
            bypasses); the originals come back when the surgery is removed.
        one_sdpa_call: this instance's forward makes exactly one ``F.scaled_dot_product_attention``
            call on (batch, heads, tokens, head_dim) q/k/v, where prefix tuning puts its keys and values:
            set by discovery for the classes a zoo's layouts declare with ``register_prefix_call``, or by a
            describer for the instance (classes whose attention implementation is chosen per instance or
            per config).
        prefix_refusal: why prefix tuning cannot put keys and values into this instance (a sentence
            completing "its attention ..."): declared per class with ``register_prefix_call`` or set by a
            describer; None when ``one_sdpa_call``, ``prefix_route`` or ``ATTENTION_CALL`` decide.
    """

    path: str
    module: nn.Module
    in_features: int
    projections: Mapping[str, Projection]
    has_bias: bool
    channel_dim: int = -1
    unsupported: Optional[str] = None
    patches: Mapping[str, Any] = field(default_factory=dict)
    output: Optional[Projection] = None
    one_sdpa_call: bool = False
    prefix_refusal: Optional[str] = None
    prefix_route: Optional[Callable[[KeyValueExtension], Mapping[str, Any]]] = None

    def producer(self, name: str) -> nn.Module:
        """The module that produces a projection: a submodule of the attention, or a module that
        ``patches`` adds while surgery is present (a hookable stand-in for projection math the attention
        otherwise does inline, such as ``nn.MultiheadAttention``'s ``in_proj_weight``)."""
        added = self.patches.get(name)
        if isinstance(added, nn.Module):
            # a stand-in another method already installed is the one the forward calls
            return installed(self.module, name) or added
        return self.module.get_submodule(name)


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
        projections: the MLP's input and output layers, ``"fc1"`` and ``"fc2"``, relative to the MLP
            module, when it has them as modules (what LoRA targets there); empty otherwise.
        input_module: for an MLP that its block runs inline (``nn.TransformerEncoderLayer``: linear1,
            activation, dropout, linear2), the module whose input is the MLP's input; ``module`` is then
            the module whose output is the MLP's output. None when ``module`` is the whole MLP.
        projections_on_block: ``projections`` are relative to the block, not to ``module`` (an inline MLP
            whose first and last Linears are siblings in the block, transformers' ``intermediate.dense``
            and ``output.dense``): methods that target them hold their modules on the block.
    """

    path: str
    module: nn.Module
    in_features: int
    out_features: int
    channel_dim: int = -1
    residual_input: Optional[nn.Module] = None
    residual_output: Optional[nn.Module] = None
    input_module: Optional[nn.Module] = None
    projections: Mapping[str, Projection] = field(default_factory=dict)
    projections_on_block: bool = False


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
