"""Layouts of timm's flat and ViT-like transformer families beyond the core ViT.

BEiT/BEiTv2, EVA/EVA02, RoPE ViT, DINOv3, ViT relpos, SAM ViT, CaiT, XCiT, CrossViT, ConViT, TNT
(inner and outer transformer, each a block), NesT, VOLO, the parallel-scaling ViT (``vit_pwee``), the
parallel ViT (``ParallelThingsBlock``, each branch a block), MViTv2, Hiera and SAM2's Hiera
(``hieradet_sam2``). PiT, NaFlexViT, ViTamin,
hybrid ViT and MobileViT v1 build timm's own ``Block``/``Attention`` (core layouts); ViTamin adds its
``GeGluMlp``. MViTv2's ``MultiScaleAttentionPoolFirst`` is left unregistered (so refused): no timm
model uses it, and its forward fails in timm 1.0.31.

Each describer names the modules whose outputs hold q, k and v, as the attention's forward reads
them. Attention that is not a softmax over tokens (XCiT's cross-covariance, VOLO's outlook attention)
is described with a reason, so that q/k/v methods refuse it while MLP methods still operate on its
block.

Attention-pooling heads (the MAP head ``AttentionPoolLatent`` of SigLIP, SigLIP 2, PE-core and every
ViT with ``global_pool="map"``) are part of the head path: not blocks, never operated on, never a
reason to refuse a model, and frozen like the rest of the base unless unfrozen by name.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from torch import nn

from ..errors import UnsupportedModelError
from .descriptors import AttentionSite, Projection
from .registry import BlockLayout, register_attention, register_block, register_mlp, register_not_attention
from .timm_layouts import fused_qkv_in_thirds

# Pre-norm blocks: x = x + drop_path1(ls1(attn(norm1(x)))); x = x + drop_path2(ls2(mlp(norm2(x)))).
PRE_NORM = BlockLayout("attn", "mlp", residual_input="norm2", residual_output="drop_path2")
# Post-norm blocks read the residual stream directly: x = x + drop_path2(norm2(mlp(x))).
POST_NORM = BlockLayout("attn", "mlp", residual_input="mlp", residual_output="drop_path2")
# Blocks whose MLP residual branch has no module of its own at its end (CaiT and ConViT call one
# drop_path module for both branches; XCiT's class-attention block normalises only the class token):
# the adapter reads and writes at the MLP itself.
NO_RESIDUAL = BlockLayout("attn", "mlp")

CROSS_COVARIANCE = (
    "is cross-covariance attention (XCiT's XCA): its softmax runs over channels, not tokens, so a "
    "branch on q/k/v would not act as PATT does"
)
OUTLOOK = (
    "is outlook attention (VOLO): its weights are predicted from each token by a Linear, with no "
    "query or key, so PATT has no q/k to operate on"
)


def _linear(attention: nn.Module, path: str, name: str) -> nn.Linear:
    """The ``nn.Linear`` child ``name`` of ``attention``, or a SurgeryError naming what was found."""
    module = getattr(attention, name, None)
    if type(module) is not nn.Linear:
        raise UnsupportedModelError(
            f"attention {path!r} ({type(attention).__name__}) has no Linear {name!r} where its layout "
            f"expects one; found {type(module).__name__}"
        )
    return module


def _site(
    path: str,
    attention: nn.Module,
    projections: Dict[str, Projection],
    in_features: int,
    has_bias: bool,
    unsupported: Optional[str] = None,
    patches: Optional[Dict[str, object]] = None,
) -> AttentionSite:
    return AttentionSite(
        path=path,
        module=attention,
        in_features=in_features,
        projections=projections,
        has_bias=has_bias,
        unsupported=unsupported,
        patches=patches or {},
    )


def separate_q_k_v(path: str, attention: nn.Module, names: Tuple[str, str, str] = ("q", "k", "v")) -> AttentionSite:
    """Three Linears producing q, k and v, each read whole.

    Covers CaiT/XCiT ``ClassAttn`` (``q``/``k``/``v``; q reads only the class token, so its branch
    does too), CrossViT ``CrossAttention`` (``wq``/``wk``/``wv``), EVA's unfused
    ``EvaAttention`` and RoPE ViT's unfused ``AttentionRope`` (``q_proj``/``k_proj``/``v_proj``; with
    grouped-query attention k and v are narrower than q; EVA's ``k_proj`` has no bias)."""
    linears = {role: _linear(attention, path, name) for role, name in zip(("q", "k", "v"), names)}
    return _site(
        path,
        attention,
        {role: Projection(name, 0, linears[role].out_features) for role, name in zip(("q", "k", "v"), names)},
        in_features=linears["q"].in_features,
        has_bias=linears["q"].bias is not None,
    )


def crossvit_attention(path: str, attention: nn.Module) -> AttentionSite:
    """CrossViT ``CrossAttention``: ``wq`` on the class token, ``wk``/``wv`` on all tokens."""
    return separate_q_k_v(path, attention, ("wq", "wk", "wv"))


def eva_attention(path: str, attention: nn.Module) -> AttentionSite:
    """EVA/EVA02/DINOv3 ``EvaAttention``, fused or not.

    Fused: ``qkv`` laid out ``[q | k | v]``. With q/v bias parameters (EVA02 tiny/small, DINOv3
    ``_qkvb``) timm calls ``F.linear(x, qkv.weight, bias)`` and never the ``qkv`` module; the patch
    ``qkv_bias_separate = True`` makes it call ``qkv(x)`` and add the same bias after. Unfused: separate
    ``q_proj``/``k_proj``/``v_proj``."""
    if getattr(attention, "qkv", None) is None:
        return separate_q_k_v(path, attention, ("q_proj", "k_proj", "v_proj"))
    return fused_with_bias_parameters(path, attention)


def fused_with_bias_parameters(path: str, attention: nn.Module) -> AttentionSite:
    """A bias-free ``qkv`` Linear laid out ``[q | k | v]`` whose bias lives in ``q_bias``/``k_bias``/
    ``v_bias`` (BEiT/BEiTv2 ``Attention``, fused ``EvaAttention``): operated through
    ``qkv_bias_separate = True``, without which timm bypasses the ``qkv`` module."""
    site = fused_qkv_in_thirds(path, attention)
    if not hasattr(attention, "qkv_bias_separate"):
        raise UnsupportedModelError(
            f"attention {path!r} ({type(attention).__name__}) has no 'qkv_bias_separate' switch, so its "
            "qkv projection may be bypassed"
        )
    has_bias = getattr(attention, "q_bias", None) is not None
    patches = {"qkv_bias_separate": True} if has_bias else {}
    return _site(path, attention, dict(site.projections), site.in_features, has_bias, patches=patches)


def rope_attention(path: str, attention: nn.Module) -> AttentionSite:
    """timm's ``AttentionRope`` (RoPE ViT, PE): fused ``qkv`` in thirds, or ``q_proj``/``k_proj``/
    ``v_proj`` (k/v ``num_kv_heads * head_dim`` wide with grouped-query attention)."""
    if getattr(attention, "qkv", None) is None:
        return separate_q_k_v(path, attention, ("q_proj", "k_proj", "v_proj"))
    return fused_qkv_in_thirds(path, attention)


def class_attention_q_kv(path: str, attention: nn.Module) -> AttentionSite:
    """VOLO ``ClassAttention``: ``q`` on the class token, ``kv`` laid out ``[k | v]`` on all tokens."""
    q, kv = _linear(attention, path, "q"), _linear(attention, path, "kv")
    width = kv.out_features // 2
    return _site(
        path,
        attention,
        {"q": Projection("q", 0, q.out_features), "k": Projection("kv", 0, width), "v": Projection("kv", width, width)},
        in_features=q.in_features,
        has_bias=q.bias is not None,
    )


def fused_qk_and_v(path: str, attention: nn.Module) -> AttentionSite:
    """``qk`` laid out ``[q | k]`` and a separate ``v`` (ConViT ``GPSA``, TNT ``Attention``; GPSA mixes
    its softmax with a positional softmax, and both rows sum to one)."""
    qk, v = _linear(attention, path, "qk"), _linear(attention, path, "v")
    width = qk.out_features // 2
    return _site(
        path,
        attention,
        {"q": Projection("qk", 0, width), "k": Projection("qk", width, width), "v": Projection("v", 0, v.out_features)},
        in_features=qk.in_features,
        has_bias=qk.bias is not None,
    )


def cross_covariance(path: str, attention: nn.Module) -> AttentionSite:
    """XCiT ``XCA``: ``qkv`` in thirds, but attention over channels; q/k/v methods refuse it."""
    site = fused_qkv_in_thirds(path, attention)
    return _site(path, attention, dict(site.projections), site.in_features, site.has_bias, CROSS_COVARIANCE)


def outlook_attention(path: str, attention: nn.Module) -> AttentionSite:
    """VOLO ``OutlookAttention``: only a ``v`` Linear (its Linear named ``attn`` predicts the weights);
    q/k/v methods refuse it."""
    v = _linear(attention, path, "v")
    return _site(
        path, attention, {"v": Projection("v", 0, v.out_features)}, v.in_features, v.bias is not None, OUTLOOK
    )


def parallel_scaling(path: str, block: nn.Module) -> AttentionSite:
    """The parallel ViT block (``ParallelScalingBlock``, ``vit_pwee``) as its own attention: one
    ``in_proj`` laid out ``[mlp hidden | q | k | v]`` (``in_split``). Its MLP has no module of its own
    (the hidden slice of ``in_proj``, an activation and ``mlp_out_proj``): the block layout names it as
    an inline MLP."""
    in_proj = _linear(block, path, "in_proj")
    hidden, *widths = block.in_split
    if len(widths) != 3 or hidden + sum(widths) != in_proj.out_features:
        raise UnsupportedModelError(
            f"block {path!r} (ParallelScalingBlock) splits in_proj as {block.in_split}, not [mlp | q | k | v]"
        )
    starts = (hidden, hidden + widths[0], hidden + widths[0] + widths[1])
    return _site(
        path,
        block,
        {role: Projection("in_proj", start, width) for role, start, width in zip(("q", "k", "v"), starts, widths)},
        in_features=in_proj.in_features,
        has_bias=in_proj.bias is not None,
    )


def parallel_branches(block: nn.Module) -> Tuple[BlockLayout, ...]:
    """timm's ``ParallelThingsBlock`` (``vit_*_18x2``, "Three things everyone should know about ViTs"):
    ``x = x + sum_j attns[j](x)``, then ``x = x + sum_j ffns[j](x)``, each branch an
    ``nn.Sequential(norm, attn | mlp, ls, drop_path)``. Branch j (its attention ``attns.j.attn`` and its
    MLP ``ffns.j.mlp``) is a block of its own: blocks ``num_parallel * i + j``. Each MLP's residual
    branch reads the residual stream at ``ffns.j.norm`` and ends at ``ffns.j.drop_path``, whose output
    the block sums into it."""
    return tuple(
        BlockLayout(f"attns.{j}.attn", f"ffns.{j}.mlp", residual_input=f"ffns.{j}.norm", residual_output=f"ffns.{j}.drop_path")
        for j in range(len(block.attns))
    )


# A TNT block runs two transformers: the inner one over the pixel tokens of each patch (``attn_in``,
# ``mlp_in``), then the outer one over the patch tokens (``attn_out``, ``mlp``); each is a block of its
# own (blocks 2i and 2i + 1). One drop_path serves all four residual branches, so neither has a residual
# layout.
TNT_UNITS = (BlockLayout("attn_in", "mlp_in"), BlockLayout("attn_out", "mlp"))

# Attention that pools the final tokens into the head's features (timm's MAP head of SigLIP, SigLIP 2,
# PE-core and every ViT with global_pool="map"; CLIP ResNets' attention pools): part of the head path,
# not a block. Discovery leaves it alone, so it neither refuses the model nor is operated on; it stays
# frozen unless the user trains it (``unfreeze=["attn_pool"]``, or the pool's own path).
ATTENTION_POOL = "an attention-pooling head (part of the head path after the blocks, not a block)"

# timm's rotary position embeddings (layers/pos_embed_sincos.py) make the sin/cos tables an attention
# applies to its q and k; they hold ``num_heads`` (RotaryEmbeddingMixed: learned per-head frequencies)
# but compute no attention. Class names, looked up in the installed timm (1.0.30 lacks some).
ROTARY_EMBEDDINGS = (
    "RotaryEmbedding", "RotaryEmbeddingCat", "RotaryEmbeddingMixed", "RotaryEmbeddingDinoV3", "RotaryEmbeddingMRope",
)
ROTARY = "a rotary position embedding (sin/cos tables the attention applies to q and k), not attention"


def geglu_mlp_features(mlp: nn.Module) -> tuple[int, int, int]:
    """ViTamin's ``GeGluMlp`` (its own norm, ``w0``/``w1`` gate and value, ``w2`` out), channels last."""
    return mlp.w0.in_features, mlp.w2.out_features, -1


def register() -> None:
    """Add this module's classes to the registry (import timm lazily: the registry works without it)."""
    from timm.layers import attention_pool, attention_pool2d
    from timm.layers import AttentionRope, DiffAttention, RelPosMlp
    from timm.models import beit, cait, convit, crossvit, eva, hiera, hieradet_sam2, mvitv2, nest, tnt, vitamin, volo, xcit
    from timm.models import vision_transformer as vit
    from timm.models import vision_transformer_relpos as relpos
    from timm.models import vision_transformer_sam as sam

    for attention in (
        relpos.RelPosAttention, sam.Attention, cait.TalkingHeadAttn, convit.MHSA, nest.Attention,
        volo.Attention, mvitv2.MultiScaleAttention, hiera.MaskUnitAttention, hieradet_sam2.MultiScaleAttention,
    ):
        register_attention(attention, fused_qkv_in_thirds)
    register_attention(beit.Attention, fused_with_bias_parameters)
    register_attention(eva.EvaAttention, eva_attention)
    register_attention(AttentionRope, rope_attention)
    register_attention(cait.ClassAttn, separate_q_k_v)
    register_attention(crossvit.CrossAttention, crossvit_attention)
    register_attention(volo.ClassAttention, class_attention_q_kv)
    register_attention(convit.GPSA, fused_qk_and_v)
    register_attention(tnt.Attention, fused_qk_and_v)
    register_attention(xcit.XCA, cross_covariance)
    register_attention(volo.OutlookAttention, outlook_attention)
    register_attention(vit.ParallelScalingBlock, parallel_scaling)
    # Differential attention (``vit_dwee``, ``vit_dpwee``): q and k in thirds of qkv (or slices of
    # in_proj) split into two half-width heads each, two softmax maps subtracted (A1 - lambda A2) before v.
    # Each map is a softmax over tokens, so a constant on k leaves both unchanged and a branch on q/k/v
    # means what it does elsewhere; its two SDPA calls leave prefix tuning refused.
    register_attention(DiffAttention, fused_qkv_in_thirds)
    register_attention(vit.DiffParallelScalingBlock, parallel_scaling)

    register_mlp(vitamin.GeGluMlp, geglu_mlp_features)
    from timm.layers import pos_embed_sincos

    for name in ROTARY_EMBEDDINGS:
        if hasattr(pos_embed_sincos, name):
            register_not_attention(getattr(pos_embed_sincos, name), ROTARY)
    register_not_attention(RelPosMlp, "the MLP that computes relative-position biases (ViT relpos, shared)")
    for pool in (
        attention_pool.AttentionPoolLatent, attention_pool.AttentionPoolPrr, attention_pool2d.AttentionPool2d,
        attention_pool2d.RotAttentionPool2d,
    ):
        register_not_attention(pool, ATTENTION_POOL)

    for block in (
        beit.Block, eva.EvaBlock, relpos.RelPosBlock, sam.Block, xcit.XCABlock, nest.TransformerLayer,
        volo.Outlooker, volo.Transformer, volo.ClassBlock, mvitv2.MultiScaleBlock, hiera.HieraBlock,
        hieradet_sam2.MultiScaleBlock,
    ):
        register_block(block, PRE_NORM)
    register_block(eva.EvaBlockPostNorm, POST_NORM)
    register_block(relpos.ResPostRelPosBlock, POST_NORM)
    for block in (cait.LayerScaleBlock, cait.LayerScaleBlockClassAttn, convit.Block, xcit.ClassAttentionBlock):
        register_block(block, NO_RESIDUAL)
    register_block(tnt.Block, lambda block: TNT_UNITS)
    register_block(vit.ParallelThingsBlock, parallel_branches)
    # The parallel block is its own attention; its MLP runs inline, from in_proj's input (the hidden
    # slice) to mlp_out_proj's output. With fuse_out_proj there is no mlp_out_proj: MLP methods find none.
    register_block(vit.ParallelScalingBlock, BlockLayout("", "mlp_out_proj", mlp_input="in_proj"))
    # The differential parallel block always fuses its output projection (one out_proj over [attention | MLP
    # hidden]): it has no MLP output of its own, so MLP methods find none.
    register_block(vit.DiffParallelScalingBlock, BlockLayout("", "mlp_out_proj", mlp_input="in_proj"))
