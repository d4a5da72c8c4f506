"""Layouts of timm's VisionTransformer family and Swin Transformer."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .descriptors import AttentionSite, Projection
from .registry import BlockLayout, register_attention, register_block, register_mlp, register_not_attention

# timm's channel and spatial gates (CNN attention modules in the squeeze-excite sense: a gate computed
# from pooled or convolved features multiplies the feature map; no query, key or value): named "Attn",
# they are not attention over tokens, so a model that holds them is not refused for them.
GATE = "a channel or spatial gate (squeeze-excite style: pooled features scale the feature map), not attention over tokens"
GATES = {
    "cbam": ("ChannelAttn", "SpatialAttn", "LightChannelAttn", "LightSpatialAttn"),
    "selective_kernel": ("SelectiveKernelAttn",),
    "split_attn": ("SplitAttn",),
    "coord_attn": ("CoordAttn", "SimpleCoordAttn", "StripAttn", "EfficientLocalAttn"),
}


def fused_qkv_in_thirds(path: str, attention: nn.Module, qkv_name: str = "qkv") -> AttentionSite:
    """A fused ``Linear(d, 3 * a)`` whose output is laid out ``[q | k | v]``, each ``a`` wide."""
    qkv = getattr(attention, qkv_name, None)
    if type(qkv) is not nn.Linear or qkv.out_features % 3:
        raise UnsupportedModelError(
            f"attention {path!r} ({type(attention).__name__}) has no fused Linear {qkv_name!r} with an "
            f"output of 3 equal parts; found {type(qkv).__name__}"
        )
    width = qkv.out_features // 3
    return AttentionSite(
        path=path,
        module=attention,
        in_features=qkv.in_features,
        projections={
            "q": Projection(qkv_name, 0, width),
            "k": Projection(qkv_name, width, width),
            "v": Projection(qkv_name, 2 * width, width),
        },
        has_bias=qkv.bias is not None,
    )


def _pointwise_conv(layer: nn.Module) -> bool:
    return type(layer) is nn.Conv2d and layer.kernel_size == (1, 1) and layer.groups == 1


def _linear_mlp_features(mlp: nn.Module) -> tuple[int, int, int]:
    """Linear projections (channels last), or 1x1 convolutions on NCHW (``Mlp(use_conv=True)``, as
    ConvNeXt's ``conv_mlp`` blocks build it; channel dim 1)."""
    first = mlp.fc1_x if hasattr(mlp, "fc1_x") else mlp.fc1
    if _pointwise_conv(first) and _pointwise_conv(mlp.fc2):
        return first.in_channels, mlp.fc2.out_channels, 1
    if not isinstance(first, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        raise UnsupportedModelError(
            f"MLP {type(mlp).__name__} uses {type(first).__name__} projections; only Linear (channels last) "
            "and 1x1 Conv2d (channels first) MLPs are supported"
        )
    return first.in_features, mlp.fc2.out_features, -1


def register_timm_layouts() -> None:
    """Add timm's classes to the registry (import timm lazily: the registry works without it)."""
    from timm.layers import Attention, GatedMlp, GlobalResponseNormMlp, GluMlp, Mlp, SwiGLU
    from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
    from timm.models.vision_transformer import Block, ResPostBlock

    import importlib

    for module, names in GATES.items():
        layer = importlib.import_module(f"timm.layers.{module}")
        for name in names:
            register_not_attention(getattr(layer, name), GATE)
    register_attention(Attention, fused_qkv_in_thirds)
    register_attention(WindowAttention, fused_qkv_in_thirds)
    for mlp_class in (Mlp, GluMlp, SwiGLU, GatedMlp, GlobalResponseNormMlp):
        register_mlp(mlp_class, _linear_mlp_features)
    # Pre-norm blocks: x = x + drop_path1(ls1(attn(norm1(x)))); x = x + drop_path2(ls2(mlp(norm2(x)))).
    pre_norm = BlockLayout("attn", "mlp", residual_input="norm2", residual_output="drop_path2")
    register_block(Block, pre_norm)
    register_block(SwinTransformerBlock, pre_norm)
    # Post-norm blocks read the residual stream directly: x = x + drop_path2(norm2(mlp(x))).
    register_block(ResPostBlock, BlockLayout("attn", "mlp", residual_input="mlp", residual_output="drop_path2"))
