"""Layouts of transformers' vision models whose attention keeps the legacy module names or is computed by
hand: Data2VecVision, VideoMAE, Swinv2 and Hiera (checked against transformers 5.24).

- Data2VecVision, VideoMAE, Swinv2: a layer holds ``attention`` (the self-attention ``attention.attention``,
  Swinv2 ``attention.self``, with Linears ``query``, ``key`` (no bias) and ``value``; the output projection
  ``attention.output.dense``), then ``intermediate.dense`` and ``output.dense``, the MLP's two Linears,
  siblings in the layer. The site's attention is the outer ``attention`` module, so that its output
  projection ("proj") is inside it; the MLP is described inline, from ``intermediate.dense``'s input to
  ``output.dense``'s output, so that a parallel adapter adds to the MLP's own branch: before
  Data2VecVision's layer scale ``lambda_2`` (as timm's ``ls2``), before Swinv2's post-norm
  ``layernorm_after``, and before the residual that ``VideoMAEOutput`` adds inside its forward.
- Hiera: ``attn.qkv`` is one Linear laid out ``[q | k | v]`` (its forward views it as (3, heads, head_dim)
  per mask-unit window), ``attn.proj`` the output projection, ``mlp.fc1``/``mlp.fc2``.

None of these layers has a module that ends only the MLP's residual branch (Data2VecVision, Swinv2 and
Hiera call one ``drop_path`` for both branches; VideoMAE adds the residual inside ``output``), so the
adapter's ``input="residual"`` is refused there.

Prefix tuning needs the attention's one ``F.scaled_dot_product_attention`` call, or a route into the
function the attention dispatches to. Data2VecVision fixes its class at build time (``attn_implementation=``):
the sdpa class makes that call, the eager class computes softmax inline and is refused. VideoMAE dispatches
through transformers' attention interface on every forward, as the newer families of transformers_layouts.py
do: the prefix takes their route (its self-attention's ``config`` patched while the prefix is present),
under ``"eager"`` and ``"sdpa"`` alike and across a switch between them; ``"flex_attention"`` is refused. Swinv2's cosine attention and Hiera's mask-unit attention are computed inline in every
implementation the models accept (only "eager": transformers refuses "sdpa" and "flex_attention" for both).

Prompt tokens: Data2VecVision's tokens are [CLS, patches] with a relative-position bias sized to them,
padded for the prompts; VideoMAE's are the patches alone (no class token; mean pooling or token 0).
Swinv2 and Hiera are refused (their tokens are laid out on the image grid).

Registered when transformers' modeling modules are imported (``registry.register_when_imported``): the
library neither needs nor imports transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from torch import nn

from ..errors import UnsupportedModelError
from .descriptors import AttentionSite, Block, KeyValueExtension, Projection
from .registry import (
    AttentionDescriber,
    BlockLayout,
    MlpDescriber,
    register_attention,
    register_block,
    register_mlp,
    register_when_imported,
)
from .timm_layouts import fused_qkv_in_thirds
from .transformers_layouts import _prefix_route as transformers_prefix_route
from .timm_vit_like import _linear  # the Linear child a layout names, or the error naming what was found
from .tokens import (
    HIERARCHICAL,
    REFUSALS,
    TokenBias,
    TokenLayout,
    TokenLayoutDescriber,
    checked_patch_size,
    refuse,
    register_token_layout,
)

MODELS = "transformers.models"
DATA2VEC = f"{MODELS}.data2vec.modeling_data2vec_vision"
VIDEOMAE = f"{MODELS}.videomae.modeling_videomae"
SWINV2 = f"{MODELS}.swinv2.modeling_swinv2"
HIERA = f"{MODELS}.hiera.modeling_hiera"

# The MLP of the legacy layers: intermediate.dense (fc1), its activation, output.dense (fc2).
LEGACY_LAYER = BlockLayout("attention", "output.dense", mlp_input="intermediate.dense", inline_fc=True)

DATA2VEC_EAGER = (
    "is Data2VecVision's eager class (built with attn_implementation='eager'), which computes softmax(q k^T + "
    "bias) v inline, with no F.scaled_dot_product_attention call to put prefix keys and values into; build the "
    "model with attn_implementation='sdpa' (Data2VecVision fixes its attention class at build time)"
)
VIDEOMAE_NO_INTERFACE = (
    "is a VideoMAE attention of a transformers without eager_attention_forward (no attention interface to route "
    "prefix keys and values through)"
)
SWINV2_COSINE = (
    "is Swinv2's cosine attention, computed inline (normalised q and k, a learned logit scale, a continuous "
    "position bias), with no F.scaled_dot_product_attention call to put prefix keys and values into"
)
HIERA_MASK_UNIT = (
    "is Hiera's mask-unit attention, computed inline on q/k/v viewed per mask-unit window (queries max-pooled "
    "at a stage's entry), with no F.scaled_dot_product_attention call to put prefix keys and values into"
)
SWINV2_TOKENS = HIERARCHICAL + "; each block re-views its tokens as the (height, width) grid for windowed attention"


def legacy_attention(
    path: str, attention: nn.Module, inner: str, one_sdpa_call: bool, prefix_refusal: Optional[str]
) -> AttentionSite:
    """The outer attention of a legacy layer: q/k/v from ``{inner}.query``/``key``/``value``, the output
    projection ``output.dense``; the self-attention's input is what all three read."""
    self_attention = getattr(attention, inner, None)
    if self_attention is None:
        raise UnsupportedModelError(f"attention {path!r} ({type(attention).__name__}) has no self-attention {inner!r}")
    names = dict(zip("qkv", ("query", "key", "value")))
    linears = {role: _linear(self_attention, f"{path}.{inner}", name) for role, name in names.items()}
    output = _linear(getattr(attention, "output", None), f"{path}.output", "dense")
    return AttentionSite(
        path=path,
        module=attention,
        in_features=linears["q"].in_features,
        projections={role: Projection(f"{inner}.{name}", 0, linears[role].out_features) for role, name in names.items()},
        has_bias=linears["q"].bias is not None,
        output=Projection("output.dense", 0, output.out_features),
        one_sdpa_call=one_sdpa_call,
        prefix_refusal=prefix_refusal,
    )


def data2vec_attention(path: str, attention: nn.Module) -> AttentionSite:
    """``Data2VecVisionAttention``: its self-attention is the eager class or the sdpa class, fixed at build."""
    sdpa_class = getattr(importlib.import_module(DATA2VEC), "Data2VecVisionSdpaSelfAttention", None)
    sdpa = type(getattr(attention, "attention", None)) is sdpa_class
    return legacy_attention(path, attention, "attention", sdpa, None if sdpa else DATA2VEC_EAGER)


def videomae_attention(path: str, attention: nn.Module) -> AttentionSite:
    """``VideoMAEAttention``: its self-attention (``attention.attention``) dispatches on
    ``config._attn_implementation`` at every forward through transformers' attention interface, as the
    newer families do, so prefix tuning takes the same route (transformers_layouts.py): the self-attention's
    ``config`` is patched while the prefix is present, under "eager" and "sdpa" alike; other
    implementations are refused by name."""
    site = legacy_attention(path, attention, "attention", False, None)
    eager = getattr(importlib.import_module(VIDEOMAE), "eager_attention_forward", None)
    if eager is None:  # a transformers whose VideoMAE has no attention interface
        return dataclasses.replace(site, prefix_refusal=VIDEOMAE_NO_INTERFACE)
    return dataclasses.replace(site, prefix_route=functools.partial(_self_attention_route, path, attention.attention, eager))


def _self_attention_route(
    path: str, self_attention: nn.Module, eager: Callable[..., Any], extend: KeyValueExtension
) -> Dict[str, Any]:
    """The prefix route of a legacy layer's self-attention, as patches of the outer attention."""
    routed = transformers_prefix_route(f"{path}.attention", self_attention, eager, extend)
    return {f"attention.{name}": value for name, value in routed.items()}


def swinv2_attention(path: str, attention: nn.Module) -> AttentionSite:
    """``Swinv2Attention``: cosine attention in ``self``, computed inline."""
    return legacy_attention(path, attention, "self", False, SWINV2_COSINE)


def hiera_attention(path: str, attention: nn.Module) -> AttentionSite:
    """``HieraMaskUnitAttention``: ``qkv`` in thirds, computed inline."""
    site = fused_qkv_in_thirds(path, attention)
    return AttentionSite(
        site.path, site.module, site.in_features, site.projections, site.has_bias, prefix_refusal=HIERA_MASK_UNIT
    )


def hiera_mlp_features(mlp: nn.Module) -> Tuple[int, int, int]:
    """``HieraMlp``: ``fc1``, activation, ``fc2``, channels last."""
    return mlp.fc1.in_features, mlp.fc2.out_features, -1


# ---------------------------------------------------------------- token layouts (prompt tuning)


def _backbone(model: nn.Module, attribute: str) -> nn.Module:
    """The bare model: ``model`` itself or, for a task model, its ``attribute`` (``data2vec_vision``)."""
    return getattr(model, attribute, model)


def _encoder_layers(model: nn.Module, backbone: nn.Module, blocks: Sequence[Block]) -> nn.ModuleList:
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or [id(b.module) for b in blocks] != [id(layer) for layer in layers]:
        raise refuse(model, "its discovered blocks are not the encoder layers its forward runs")
    return layers


def _patch_size(model: nn.Module, embeddings: nn.Module) -> Tuple[int, int]:
    return checked_patch_size(model, getattr(getattr(embeddings, "patch_embeddings", None), "patch_size", None))


def data2vec_tokens(model: nn.Module, blocks: Sequence[Block]) -> TokenLayout:
    """Data2VecVision: [CLS, patches], the encoder's layers in order, then the pooler (LN of the mean of
    tokens 1:, or token 0). Each self-attention with a relative-position bias gets it padded for the prompts
    (its ``relative_position_bias`` module's forward), and so does the bias the encoder shares between layers
    (passed to each layer's attention as ``relative_position_bias``). Not with ``interpolate_pos_encoding=True``:
    the model then resizes its biases to the token count it sees, prompts included, and the forward fails
    on the mismatched shapes."""
    backbone = _backbone(model, "data2vec_vision")
    layers = _encoder_layers(model, backbone, blocks)
    shared = bool(getattr(backbone.encoder, "has_relative_position_bias", False))
    biases = []
    for block in blocks:
        site = block.attention
        if site is None:
            raise refuse(model, f"block {block.path!r} has no attention petl_surgery knows")
        own = getattr(site.module.attention, "has_relative_position_bias", False)
        biases.append(
            ((TokenBias(f"{site.path}.attention.relative_position_bias", method="forward"),) if own else ())
            + ((TokenBias(site.path, keyword="relative_position_bias"),) if shared else ())
        )
    patch = _patch_size(model, backbone.embeddings)
    return TokenLayout(1, backbone.config.hidden_size, patch, layers[-1], ((),) * len(blocks), tuple(biases))


def videomae_tokens(model: nn.Module, blocks: Sequence[Block]) -> TokenLayout:
    """VideoMAE: the patch tokens alone (no class token), the encoder's layers in order, then mean pooling
    (``fc_norm``) or token 0. VPT's init bound uses the per-frame patch (VPT defines it for images)."""
    backbone = _backbone(model, "videomae")
    layers = _encoder_layers(model, backbone, blocks)
    patch = _patch_size(model, backbone.embeddings)
    return TokenLayout(0, backbone.config.hidden_size, patch, layers[-1], ((),) * len(blocks))


def refusing(reason: str) -> Callable[[nn.Module, Sequence[Block]], TokenLayout]:
    """A token-layout describer that refuses every instance with ``reason``."""

    def describe(model: nn.Module, blocks: Sequence[Block]) -> TokenLayout:
        raise refuse(model, reason)

    return describe


# ---------------------------------------------------------------- registration


@dataclass(frozen=True)
class ZooModule:
    """The classes of one of transformers' modeling modules that petl_surgery knows, by name (a name the
    installed module lacks is skipped: no model of it can exist)."""

    module: str
    attentions: Mapping[str, AttentionDescriber]
    blocks: Mapping[str, BlockLayout]
    token_layouts: Mapping[str, TokenLayoutDescriber]
    mlps: Mapping[str, MlpDescriber] = field(default_factory=dict)

    def register(self) -> None:
        module = importlib.import_module(self.module)
        for table, register in (
            (self.attentions, register_attention),
            (self.mlps, register_mlp),
            (self.blocks, register_block),
            (self.token_layouts, register_token_layout),
        ):
            for name, entry in table.items():
                if hasattr(module, name):
                    register(getattr(module, name), entry)


ZOO = (
    ZooModule(
        DATA2VEC,
        {"Data2VecVisionAttention": data2vec_attention},
        {"Data2VecVisionLayer": LEGACY_LAYER},
        dict.fromkeys(("Data2VecVisionModel", "Data2VecVisionForImageClassification"), data2vec_tokens),
    ),
    ZooModule(
        VIDEOMAE,
        {"VideoMAEAttention": videomae_attention},
        {"VideoMAELayer": LEGACY_LAYER},
        dict.fromkeys(("VideoMAEModel", "VideoMAEForVideoClassification"), videomae_tokens),
    ),
    ZooModule(
        SWINV2,
        {"Swinv2Attention": swinv2_attention},
        {"Swinv2Layer": LEGACY_LAYER},
        dict.fromkeys(
            ("Swinv2Model", "Swinv2ForImageClassification", "Swinv2ForMaskedImageModeling"), refusing(SWINV2_TOKENS)
        ),
    ),
    ZooModule(
        HIERA,
        {"HieraMaskUnitAttention": hiera_attention},
        {"HieraLayer": BlockLayout("attn", "mlp")},
        dict.fromkeys(("HieraModel", "HieraForImageClassification", "HieraForPreTraining"), refusing(REFUSALS["Hiera"])),
        {"HieraMlp": hiera_mlp_features},
    ),
)


def register() -> None:
    """Register each modeling module's layouts once it is imported (nothing is imported here)."""
    for zoo in ZOO:
        register_when_imported(zoo.module, zoo.register)
