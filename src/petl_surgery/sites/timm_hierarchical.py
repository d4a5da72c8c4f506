"""Layouts of timm's hierarchical, pyramid and convolutional-attention transformer families.

Covered (timm 1.0.31): SwinV2, SwinV2-CR, PVTv2, Twins, MaxViT/CoAtNet/MaxxViTv2, LeViT, TinyViT,
EfficientFormer v1 and v2, EfficientViT (MSRA and MIT), GCViT, NextViT, DaViT, CoaT, EdgeNeXt, FastViT,
Visformer, MetaFormer/CaFormer, SwiftFormer and MobileViTv2.

Attention that is not a softmax over tokens (channel, cross-covariance, factorised, linear, additive,
separable attention) and attention whose q/k/v cannot be fed by one branch (cascaded group attention)
is registered with an ``unsupported`` reason: PATT refuses it, while the adapter still operates on the
block's MLP.

Blocks whose class also serves attention-free stages (Visformer ``Block``, MetaFormer's
``MetaFormerBlock``, EfficientFormerV2's block, SwiftFormer's ``Block``, ...) are deliberately not
registered: discovery then finds exactly the instances that hold an attention (any module with a direct
attention child), and PATT over all blocks is not refused for the convolutional stages.
"""

from __future__ import annotations

import importlib
import dataclasses
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

from torch import nn

from ..errors import UnsupportedModelError
from .descriptors import AttentionSite, Projection
from .registry import BlockLayout, register_attention, register_block, register_mlp, register_not_attention

PRE_NORM = BlockLayout("attn", "mlp", residual_input="norm2", residual_output="drop_path2")
# Post-norm (SwinV2): x = x + drop_path2(norm2(mlp(x))): the MLP reads the residual stream itself.
POST_NORM = BlockLayout("attn", "mlp", residual_input="mlp", residual_output="drop_path2")


# ---------------------------------------------------------------- projections and their channels


def _pointwise(module: nn.Module) -> Optional[Tuple[int, int, bool]]:
    """(in, out, has_bias) of a Linear or an ungrouped 1x1 Conv2d, else None."""
    if type(module) is nn.Linear:
        return module.in_features, module.out_features, module.bias is not None
    if type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.groups == 1:
        return module.in_channels, module.out_channels, module.bias is not None
    return None


def projection_shape(module: nn.Module) -> Tuple[int, int, bool]:
    """(in, out, has_bias) of a q/k/v producer: a Linear, a 1x1 Conv2d, or such a layer followed by a
    BatchNorm in one module (LeViT ``LinearNorm``/``ConvNorm``, EfficientFormerV2 and EfficientViT
    ``ConvNorm``, timm ``ConvNormAct``); a BatchNorm after the layer acts as a bias."""
    direct = _pointwise(module)
    if direct is not None:
        return direct
    children = list(module.children())
    first = _pointwise(children[0]) if children else None
    if first is not None:
        has_norm = any(isinstance(c, nn.modules.batchnorm._BatchNorm) for c in children[1:])
        return first[0], first[1], first[2] or has_norm
    raise UnsupportedModelError(
        f"{type(module).__name__} is not a Linear or 1x1 convolution projection (optionally with a norm), "
        "so a branch beside it cannot be sized"
    )


def per_head(heads: int, parts: Sequence[Tuple[str, int]]) -> Dict[str, Tuple[int, ...]]:
    """Channels of each role in an output laid out per head: ``heads`` groups, each the ``parts``
    (role, width) in order, e.g. ``(heads, 3, head_dim)`` or LeViT's ``[q(kd) | k(kd) | v(ratio*kd)]``."""
    stride = sum(width for _, width in parts)
    index: Dict[str, Tuple[int, ...]] = {}
    offset = 0
    for role, width in parts:
        index[role] = tuple(h * stride + offset + j for h in range(heads) for j in range(width))
        offset += width
    return index


def _site(
    path: str,
    attention: nn.Module,
    projections: Mapping[str, Projection],
    channel_dim: int = -1,
    patches: Optional[Mapping[str, object]] = None,
) -> AttentionSite:
    """An AttentionSite whose input width and bias come from its first producer (all producers of one
    attention read tokens of the same width)."""
    producers = {p.module for p in projections.values()}
    shapes = [projection_shape(attention.get_submodule(name)) for name in sorted(producers)]
    widths = {shape[0] for shape in shapes}
    if len(widths) != 1:
        raise UnsupportedModelError(f"attention {path!r} ({type(attention).__name__}) has producers of different input widths")
    return AttentionSite(
        path=path,
        module=attention,
        in_features=widths.pop(),
        projections=dict(projections),
        has_bias=any(shape[2] for shape in shapes),
        channel_dim=channel_dim,
        patches=dict(patches or {}),
    )


def _contiguous(module: str, parts: Iterable[Tuple[str, int]], start: int = 0) -> Dict[str, Projection]:
    """Roles laid end to end in one producer's output, e.g. ``[q | k | v]`` or ``[k | v]``."""
    projections = {}
    for role, width in parts:
        projections[role] = Projection(module, start, width)
        start += width
    return projections


def _scattered(module: str, heads: int, parts: Sequence[Tuple[str, int]]) -> Dict[str, Projection]:
    return {role: Projection.scattered(module, index) for role, index in per_head(heads, parts).items()}


def _out(attention: nn.Module, name: str) -> int:
    return projection_shape(attention.get_submodule(name))[1]


def unsupported(reason: str):
    """A describer for attention PATT must refuse, with ``reason`` (completing "its attention ... ")."""

    def describe(path: str, attention: nn.Module) -> AttentionSite:
        return AttentionSite(path, attention, 0, {}, False, unsupported=reason)

    return describe


# ---------------------------------------------------------------- attention describers


def thirds(path: str, attention: nn.Module) -> AttentionSite:
    """A fused ``qkv`` (Linear, or 1x1 Conv2d on NCHW) laid out ``[q | k | v]``.

    Covers SwinV2-CR ``WindowMultiHeadAttention``, Twins ``LocallyGroupedAttn``, DaViT ``WindowAttention``,
    FastViT ``Attention`` (qkv on flattened tokens), MetaFormer ``Attention``, Visformer ``Attention``
    (1x1 conv, reshaped ``(3, heads, head_dim)``)."""
    width = _out(attention, "qkv") // 3
    channel_dim = 1 if type(attention.qkv) is nn.Conv2d else -1
    return _site(path, attention, _contiguous("qkv", [("q", width), ("k", width), ("v", width)]), channel_dim)


def swinv2_window_attention(path: str, attention: nn.Module) -> AttentionSite:
    """SwinV2 ``WindowAttention``: ``[q | k | v]`` thirds of ``qkv``, whose bias (``q_bias``, zero
    ``k_bias``, ``v_bias``) timm applies through ``F.linear(x, qkv.weight, bias)``, bypassing the module;
    ``qkv_bias_separate = True`` makes it call ``self.qkv(x)`` and add the same bias after."""
    site = thirds(path, attention)
    if attention.q_bias is None:
        return site
    return AttentionSite(
        site.path, site.module, site.in_features, site.projections, True, patches={"qkv_bias_separate": True}
    )


def q_and_kv(path: str, attention: nn.Module) -> AttentionSite:
    """Separate ``q`` and fused ``kv`` laid out ``[k | v]``; ``kv`` may read spatially reduced tokens.

    Covers PVTv2 ``Attention`` (also its linear-SRA variant) and Twins ``GlobalSubSampleAttn``."""
    width = _out(attention, "q")
    return _site(path, attention, {"q": Projection("q", 0, width), **_contiguous("kv", [("k", width), ("v", width)])})


def separate_qkv(path: str, attention: nn.Module) -> AttentionSite:
    """Separate ``q``, ``k``, ``v`` Linear projections; NextViT ``EfficientAttention`` (E-MHSA) runs k and
    v on average-pooled, normalised tokens."""
    return _site(path, attention, {role: Projection(role, 0, _out(attention, role)) for role in "qkv"})


def maxxvit_attention(path: str, attention: nn.Module) -> AttentionSite:
    """MaxxViT ``AttentionCl`` (Linear) and ``Attention2d`` (1x1 conv on NCHW): with ``head_first`` (all
    ``*_rw_*`` MaxViT, CoAtNet, MaxxViTv2) ``qkv`` is laid out per head ``(heads, 3, dim_head)``;
    otherwise (``maxvit_*_tf_*``) ``(3, heads, dim_head)``, i.e. thirds."""
    channel_dim = 1 if type(attention.qkv) is nn.Conv2d else -1
    width = _out(attention, "qkv") // 3
    if attention.head_first:
        head = attention.dim_head
        projections = _scattered("qkv", attention.num_heads, [("q", head), ("k", head), ("v", head)])
    else:
        projections = _contiguous("qkv", [("q", width), ("k", width), ("v", width)])
    return _site(path, attention, projections, channel_dim)


def per_head_qkv(path: str, attention: nn.Module) -> AttentionSite:
    """A fused ``qkv`` laid out per head ``[q(key_dim) | k(key_dim) | v(val_dim)]`` (v wider than k).

    Covers LeViT ``Attention`` (``qkv`` is a ``LinearNorm``/``ConvNorm``: the producer is that module,
    whose output is after its BatchNorm; NCHW with ``use_conv``), TinyViT ``Attention`` (the branch reads
    the tokens after the attention's own LayerNorm, as ``qkv`` does) and EfficientFormer ``Attention``."""
    parts = [("q", attention.key_dim), ("k", attention.key_dim), ("v", attention.val_dim)]
    channel_dim = 1 if getattr(attention, "use_conv", False) else -1
    return _site(path, attention, _scattered("qkv", attention.num_heads, parts), channel_dim)


def levit_attention_downsample(path: str, attention: nn.Module) -> AttentionSite:
    """LeViT ``AttentionDownsample``: q from ``q.ln`` on the subsampled tokens (heads contiguous), k and v
    from ``kv`` laid out per head ``[k(key_dim) | v(val_dim)]``."""
    projections = _scattered("kv", attention.num_heads, [("k", attention.key_dim), ("v", attention.val_dim)])
    projections["q"] = Projection("q.ln", 0, _out(attention, "q.ln"))
    return _site(path, attention, projections, 1 if attention.use_conv else -1)


def efficientformerv2_attention(path: str, attention: nn.Module) -> AttentionSite:
    """EfficientFormerV2 ``Attention2d`` and ``Attention2dDownsample``: separate ``q``, ``k``, ``v``
    ``ConvNorm`` (1x1 conv + BatchNorm, NCHW), heads contiguous; the downsampling variant's q comes from
    ``q.proj`` after its local/pooled query. ``v``'s output also feeds the model's ``v_local`` conv."""
    q = "q.proj" if hasattr(attention.q, "proj") else "q"
    projections = {"q": Projection(q, 0, _out(attention, q))}
    projections.update({role: Projection(role, 0, _out(attention, role)) for role in "kv"})
    return _site(path, attention, projections, 1)


def gcvit_attention(path: str, attention: nn.Module) -> AttentionSite:
    """GCViT ``WindowAttentionGlobal``: local blocks have ``qkv`` in thirds; global blocks
    (``use_global``) have ``qkv`` = Linear(d, 2d) laid out ``[k | v]``, q coming from the stage's global
    query generator, so modes that need q are refused for those blocks."""
    if not attention.use_global:
        return thirds(path, attention)
    width = _out(attention, "qkv") // 2
    return _site(path, attention, _contiguous("qkv", [("k", width), ("v", width)]))


def multi_query_attention_2d(path: str, attention: nn.Module) -> AttentionSite:
    """MobileNetV4/V5's ``MultiQueryAttention2d`` (inside their ``MobileAttention`` block), on NCHW: q from
    ``query.proj`` (``heads * key_dim`` wide, after an optional average pool and norm when the query is
    strided), k and v from ``key.proj`` and ``value.proj`` (one head shared by all queries, after an
    optional depthwise stride-``kv_stride`` conv and norm: their branches read those reduced tokens);
    the output projection is ``output.proj``."""
    projections = {role: Projection(f"{name}.proj", 0, _out(attention, f"{name}.proj")) for role, name in (
        ("q", "query"), ("k", "key"), ("v", "value"))}
    site = _site(path, attention, projections, channel_dim=1)
    return dataclasses.replace(site, output=Projection("output.proj", 0, _out(attention, "output.proj")))


# ---------------------------------------------------------------- MLP describers


def _mlp(first: nn.Module, last: nn.Module, channel_dim: int) -> Tuple[int, int, int]:
    return projection_shape(first)[0], projection_shape(last)[1], channel_dim


def fc_mlp(mlp: nn.Module) -> Tuple[int, int, int]:
    """``fc1`` ... ``fc2``, Linear (channels last) or 1x1 conv (NCHW, channel dim 1), possibly with
    norms: PVTv2 ``MlpWithDepthwiseConv`` (forward takes ``(x, feat_size)``), TinyViT ``NormMlp``, timm
    ``ConvMlp``, FastViT ``ConvMlp`` (after a depthwise conv), SwiftFormer ``Mlp``, EfficientFormer v1/v2
    ``ConvMlpWithNorm``."""
    channel_dim = 1 if type(projection_shape_module(mlp.fc1)) is nn.Conv2d else -1
    return _mlp(mlp.fc1, mlp.fc2, channel_dim)


def projection_shape_module(module: nn.Module) -> nn.Module:
    """The Linear/Conv2d inside a producer (the module itself, or its first child)."""
    return module if _pointwise(module) is not None else next(module.children())


def levit_mlp(mlp: nn.Module) -> Tuple[int, int, int]:
    """LeViT ``LevitMlp``: ``ln1``/``ln2`` are ``LinearNorm`` (channels last) or ``ConvNorm`` (NCHW)."""
    return _mlp(mlp.ln1, mlp.ln2, 1 if type(mlp.ln1.linear) is nn.Conv2d else -1)


def spatial_mlp(mlp: nn.Module) -> Tuple[int, int, int]:
    """Visformer ``SpatialMlp``: 1x1 convs ``conv1`` ... ``conv3`` on NCHW."""
    return _mlp(mlp.conv1, mlp.conv3, 1)


def pointwise_pair_mlp(mlp: nn.Module) -> Tuple[int, int, int]:
    """EfficientViT (MSRA) ``ConvMlp``: ``pw1``/``pw2`` ConvNorm on NCHW."""
    return _mlp(mlp.pw1, mlp.pw2, 1)


def mbconv_mlp(mlp: nn.Module) -> Tuple[int, int, int]:
    """EfficientViT (MIT) ``MBConv``, the local (feed-forward) module of its blocks, on NCHW."""
    return _mlp(mlp.inverted_conv.conv, mlp.point_conv.conv, 1)


# ---------------------------------------------------------------- registration


def _register_attention() -> None:
    from timm.models import (
        coat, davit, edgenext, efficientformer, efficientformer_v2, efficientvit_mit, efficientvit_msra,
        fastvit, gcvit, levit, maxxvit, metaformer, mobilevit, nextvit, pvt_v2, swiftformer,
        swin_transformer_v2, swin_transformer_v2_cr, tiny_vit, twins, visformer,
    )

    for cls in (
        swin_transformer_v2_cr.WindowMultiHeadAttention, twins.LocallyGroupedAttn, davit.WindowAttention,
        fastvit.Attention, metaformer.Attention, visformer.Attention,
    ):
        register_attention(cls, thirds)
    register_attention(swin_transformer_v2.WindowAttention, swinv2_window_attention)
    register_attention(pvt_v2.Attention, q_and_kv)
    register_attention(twins.GlobalSubSampleAttn, q_and_kv)
    register_attention(nextvit.EfficientAttention, separate_qkv)
    register_attention(maxxvit.AttentionCl, maxxvit_attention)
    register_attention(maxxvit.Attention2d, maxxvit_attention)
    for cls in (levit.Attention, tiny_vit.Attention, efficientformer.Attention):
        register_attention(cls, per_head_qkv)
    register_attention(levit.AttentionDownsample, levit_attention_downsample)
    register_attention(efficientformer_v2.Attention2d, efficientformerv2_attention)
    register_attention(efficientformer_v2.Attention2dDownsample, efficientformerv2_attention)
    register_attention(gcvit.WindowAttentionGlobal, gcvit_attention)
    from timm.layers import attention2d

    # MobileNetV4-hybrid / V5 ``MobileAttention``: multi-query attention, or (use_multi_query=False) the
    # NCHW multi-head ``Attention2d``, whose qkv layout is MaxxViT's (per head with head_first, else thirds)
    register_attention(attention2d.MultiQueryAttention2d, multi_query_attention_2d)
    register_attention(attention2d.Attention2d, maxxvit_attention)

    channel = "attends over channels, not tokens (a softmax over a C x C map)"
    register_attention(davit.ChannelAttention, unsupported(channel))
    register_attention(davit.ChannelAttentionV2, unsupported(channel))
    register_attention(edgenext.CrossCovarianceAttn, unsupported("is cross-covariance attention over channels (XCA), not over tokens"))
    register_attention(coat.FactorAttnConvRelPosEnc, unsupported("is factorised attention (softmax over k along tokens, then k^T v), not a softmax over tokens"))
    register_attention(efficientvit_mit.LiteMLA, unsupported("is ReLU linear attention (no softmax over tokens)"))
    register_attention(swiftformer.EfficientAdditiveAttention, unsupported("is additive attention with no value projection"))
    register_attention(mobilevit.LinearSelfAttention, unsupported("is separable linear attention (one context vector, no softmax over token pairs)"))
    register_attention(
        efficientvit_msra.LocalWindowAttention,
        unsupported(
            "is cascaded group attention: each head has its own q/k/v projection reading a different input "
            "(the previous head's output added to its channel group), so no single branch can feed them"
        ),
    )
    register_not_attention(nextvit.ConvAttention, "NextViT's multi-head convolutional attention is a grouped 3x3 convolution")
    csatv2 = importlib.import_module("timm.models.csatv2")  # `from timm.models` gives its entrypoint
    register_not_attention(
        csatv2.SpatialAttention,
        "CSATv2's spatial gate: a 1-channel 7x7 map of channel statistics (refined by a 1-wide transformer) "
        "that scales the feature map",
    )


def _register_mlps() -> None:
    from timm.layers import ConvMlp
    from timm.models import (
        efficientformer_v2, efficientvit_mit, efficientvit_msra, fastvit, levit, pvt_v2,
        swiftformer, tiny_vit, visformer,
    )

    for cls in (
        pvt_v2.MlpWithDepthwiseConv, tiny_vit.NormMlp, ConvMlp, fastvit.ConvMlp, swiftformer.Mlp,
        efficientformer_v2.ConvMlpWithNorm,
    ):
        register_mlp(cls, fc_mlp)
    register_mlp(levit.LevitMlp, levit_mlp)
    register_mlp(visformer.SpatialMlp, spatial_mlp)
    register_mlp(efficientvit_msra.ConvMlp, pointwise_pair_mlp)
    register_mlp(efficientvit_mit.MBConv, mbconv_mlp)


def _register_blocks() -> None:
    from timm.models import (
        davit, efficientformer, efficientvit_mit, efficientvit_msra, fastvit, gcvit, levit, maxxvit, mobilevit,
        nextvit, pvt_v2, swin_transformer_v2, swin_transformer_v2_cr, tiny_vit, twins,
    )

    for cls in (
        pvt_v2.Block, twins.Block, maxxvit.PartitionAttentionCl, maxxvit.PartitionAttention2d,
        maxxvit.TransformerBlock2d, gcvit.GlobalContextVitBlock, davit.SpatialBlock, davit.ChannelBlock,
        mobilevit.LinearTransformerBlock,
    ):
        register_block(cls, PRE_NORM)
    register_block(swin_transformer_v2.SwinTransformerV2Block, POST_NORM)
    register_block(swin_transformer_v2_cr.SwinTransformerV2CrBlock, POST_NORM)
    # No norm before the MLP: the MLP's input is the residual stream.
    register_block(levit.LevitBlock, BlockLayout("attn", "mlp", "mlp", "drop_path2"))
    register_block(levit.LevitDownsample, BlockLayout("attn_downsample", "mlp", "mlp", "drop_path"))
    register_block(tiny_vit.TinyVitBlock, BlockLayout("attn", "mlp", "mlp", "drop_path2"))
    register_block(fastvit.AttentionBlock, BlockLayout("token_mixer", "mlp", "mlp", "drop_path2"))
    register_block(efficientformer.MetaBlock1d, BlockLayout("token_mixer", "mlp", "norm2", "drop_path2"))
    register_block(nextvit.NextTransformerBlock, BlockLayout("e_mhsa", "mlp", "norm2", "mlp_drop_path"))
    # The feed-forward after the attention; ResidualDrop/ResidualBlock wrappers hide the residual ends.
    register_block(efficientvit_msra.EfficientVitBlock, BlockLayout("mixer.m", "ffn1.m"))
    register_block(efficientvit_mit.EfficientVitBlock, BlockLayout("context_module.main", "local_module.main"))


def register() -> None:
    """Add this module's classes to the registry (timm is imported lazily)."""
    _register_attention()
    _register_mlps()
    _register_blocks()
