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

Prefix tuning needs the attention's one ``F.scaled_dot_product_attention`` call. Data2VecVision fixes its
class at build time (``attn_implementation=``): the sdpa class makes that call, the eager class computes
softmax inline and is refused. VideoMAE dispatches through transformers' attention interface on every
forward: under ``"sdpa"`` it reaches ``sdpa_attention_forward``, which makes the call (with
``is_causal=False``, which VideoMAE passes); under ``"eager"`` (matmuls) or ``"flex_attention"`` the prefix is
refused. Swinv2's cosine attention and Hiera's mask-unit attention are computed inline in every
implementation the models accept (only "eager": transformers refuses "sdpa" and "flex_attention" for both).

Prompt tokens: Data2VecVision's tokens are [CLS, patches] with a relative-position bias sized to them,
padded for the prompts; VideoMAE's are the patches alone (no class token; mean pooling or token 0).
Swinv2 and Hiera are refused (their tokens are laid out on the image grid).

Registered when transformers' modeling modules are imported (``registry.register_when_imported``): the
library neither needs nor imports transformers.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional, Sequence, Tuple

from torch import nn

from ..errors import SurgeryError
from .descriptors import AttentionSite, Block, Projection
from .registry import BlockLayout, register_attention, register_block, register_mlp, register_when_imported
from .timm_layouts import fused_qkv_in_thirds
from .tokens import REFUSALS, HIERARCHICAL, TokenBias, TokenLayout, refuse, register_token_layout

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
SWINV2_COSINE = (
    "is Swinv2's cosine attention, computed inline (normalised q and k, a learned logit scale, a continuous "
    "position bias), with no F.scaled_dot_product_attention call to put prefix keys and values into"
)
HIERA_MASK_UNIT = (
    "is Hiera's mask-unit attention, computed inline on q/k/v viewed per mask-unit window (queries max-pooled "
    "at a stage's entry), with no F.scaled_dot_product_attention call to put prefix keys and values into"
)
SWINV2_TOKENS = HIERARCHICAL + "; each block re-views its tokens as the (height, width) grid for windowed attention"


def _linear(module: nn.Module, path: str, name: str) -> nn.Linear:
    layer = getattr(module, name, None)
    if type(layer) is not nn.Linear:
        raise SurgeryError(
            f"attention {path!r} ({type(module).__name__}) has no Linear {name!r} where its layout expects one; "
            f"found {type(layer).__name__}"
        )
    return layer


def legacy_attention(
    path: str, attention: nn.Module, inner: str, one_sdpa_call: bool, prefix_refusal: Optional[str]
) -> AttentionSite:
    """The outer attention of a legacy layer: q/k/v from ``{inner}.query``/``key``/``value``, the output
    projection ``output.dense``; the self-attention's input is what all three read."""
    self_attention = getattr(attention, inner, None)
    if self_attention is None:
        raise SurgeryError(f"attention {path!r} ({type(attention).__name__}) has no self-attention {inner!r}")
    linears = {role: _linear(self_attention, f"{path}.{inner}", name) for role, name in zip("qkv", ("query", "key", "value"))}
    output = _linear(getattr(attention, "output", None), f"{path}.output", "dense")
    return AttentionSite(
        path=path,
        module=attention,
        in_features=linears["q"].in_features,
        projections={
            role: Projection(f"{inner}.{name}", 0, linears[role].out_features)
            for role, name in zip("qkv", ("query", "key", "value"))
        },
        has_bias=linears["q"].bias is not None,
        output=Projection("output.dense", 0, output.out_features),
        one_sdpa_call=one_sdpa_call,
        prefix_refusal=prefix_refusal,
    )


def data2vec_attention(path: str, attention: nn.Module, sdpa_class: type) -> AttentionSite:
    """``Data2VecVisionAttention``: its self-attention is the eager class or ``sdpa_class``, fixed at build."""
    sdpa = type(getattr(attention, "attention", None)) is sdpa_class
    return legacy_attention(path, attention, "attention", sdpa, None if sdpa else DATA2VEC_EAGER)


def videomae_attention(path: str, attention: nn.Module) -> AttentionSite:
    """``VideoMAEAttention``: its self-attention dispatches on ``config._attn_implementation`` at every
    forward; a prefix goes in under "sdpa" only (a later switch away from it makes the prefixed forward raise,
    as it then makes no SDPA call)."""
    config = getattr(getattr(attention, "attention", None), "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == "sdpa":
        return legacy_attention(path, attention, "attention", True, None)
    refusal = (
        f"dispatches to transformers' {implementation!r} attention function, which makes no "
        "F.scaled_dot_product_attention call to put prefix keys and values into; only 'sdpa' does: "
        "model.set_attn_implementation('sdpa') before applying the prefix"
    )
    return legacy_attention(path, attention, "attention", False, refusal)


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
    size = getattr(getattr(embeddings, "patch_embeddings", None), "patch_size", None)
    if isinstance(size, int):
        size = (size, size)
    if not (isinstance(size, tuple) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise refuse(model, f"its patch embedding gives no patch size (found {size!r}), which VPT's init needs")
    return size


def data2vec_tokens(model: nn.Module, blocks: Sequence[Block]) -> TokenLayout:
    """Data2VecVision: [CLS, patches], the encoder's layers in order, then the pooler (LN of the mean of
    tokens 1:, or token 0). Each self-attention with a relative-position bias gets it padded for the prompts
    (its ``relative_position_bias`` module's forward), and so does the bias the encoder shares between layers
    (passed to each layer's attention as ``relative_position_bias``)."""
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
    return TokenLayout(1, backbone.config.hidden_size, _patch_size(model, backbone.embeddings), layers[-1], ((),) * len(blocks), tuple(biases))


def videomae_tokens(model: nn.Module, blocks: Sequence[Block]) -> TokenLayout:
    """VideoMAE: the patch tokens alone (no class token), the encoder's layers in order, then mean pooling
    (``fc_norm``) or token 0. VPT's init bound uses the per-frame patch (VPT defines it for images)."""
    backbone = _backbone(model, "videomae")
    layers = _encoder_layers(model, backbone, blocks)
    return TokenLayout(0, backbone.config.hidden_size, _patch_size(model, backbone.embeddings), layers[-1], ((),) * len(blocks))


def refusing(reason: str) -> Callable[[nn.Module, Sequence[Block]], TokenLayout]:
    """A token-layout describer that refuses every instance with ``reason``."""

    def describe(model: nn.Module, blocks: Sequence[Block]) -> TokenLayout:
        raise refuse(model, reason)

    return describe


# ---------------------------------------------------------------- registration


def _classes(module_name: str, *names: str):
    module = importlib.import_module(module_name)
    return [getattr(module, name) for name in names if hasattr(module, name)]


def _register_data2vec() -> None:
    for attention, sdpa in zip(*(_classes(DATA2VEC, name) for name in ("Data2VecVisionAttention", "Data2VecVisionSdpaSelfAttention"))):
        register_attention(attention, functools.partial(data2vec_attention, sdpa_class=sdpa))
    for layer in _classes(DATA2VEC, "Data2VecVisionLayer"):
        register_block(layer, LEGACY_LAYER)
    for model in _classes(DATA2VEC, "Data2VecVisionModel", "Data2VecVisionForImageClassification"):
        register_token_layout(model, data2vec_tokens)


def _register_videomae() -> None:
    for attention in _classes(VIDEOMAE, "VideoMAEAttention"):
        register_attention(attention, videomae_attention)
    for layer in _classes(VIDEOMAE, "VideoMAELayer"):
        register_block(layer, LEGACY_LAYER)
    for model in _classes(VIDEOMAE, "VideoMAEModel", "VideoMAEForVideoClassification"):
        register_token_layout(model, videomae_tokens)


def _register_swinv2() -> None:
    for attention in _classes(SWINV2, "Swinv2Attention"):
        register_attention(attention, swinv2_attention)
    for layer in _classes(SWINV2, "Swinv2Layer"):
        register_block(layer, LEGACY_LAYER)
    for model in _classes(SWINV2, "Swinv2Model", "Swinv2ForImageClassification", "Swinv2ForMaskedImageModeling"):
        register_token_layout(model, refusing(SWINV2_TOKENS))


def _register_hiera() -> None:
    for attention in _classes(HIERA, "HieraMaskUnitAttention"):
        register_attention(attention, hiera_attention)
    for mlp in _classes(HIERA, "HieraMlp"):
        register_mlp(mlp, hiera_mlp_features)
    for layer in _classes(HIERA, "HieraLayer"):
        register_block(layer, BlockLayout("attn", "mlp"))
    for model in _classes(HIERA, "HieraModel", "HieraForImageClassification", "HieraForPreTraining"):
        register_token_layout(model, refusing(REFUSALS["Hiera"]))


def register() -> None:
    """Register each model's layouts once its modeling module is imported (nothing is imported here)."""
    register_when_imported(DATA2VEC, _register_data2vec)
    register_when_imported(VIDEOMAE, _register_videomae)
    register_when_imported(SWINV2, _register_swinv2)
    register_when_imported(HIERA, _register_hiera)
