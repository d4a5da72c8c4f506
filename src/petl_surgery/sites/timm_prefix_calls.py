"""How timm's attention classes call their attention, for prefix tuning (``register_prefix_call``): the
classes whose forward makes exactly one ``F.scaled_dot_product_attention`` call on (batch, heads, tokens,
head_dim) q/k/v, and whose non-fused path (if any) is the same computation; and the classes that call SDPA
in a form a prefix cannot be put into cleanly, with the reason. Classes are matched exactly."""

from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

from .registry import register_prefix_call

# (timm module, class name) -> None: one SDPA call a prefix goes into; or why not
PREFIX_CALLS: Dict[Tuple[str, str], Optional[str]] = {
    ("timm.layers.attention", "Attention"): None,
    ("timm.layers.attention", "AttentionRope"): None,
    ("timm.models.swin_transformer", "WindowAttention"): None,
    ("timm.models.vision_transformer_relpos", "RelPosAttention"): None,
    ("timm.models.vision_transformer", "ParallelScalingBlock"): None,
    ("timm.models.beit", "Attention"): None,
    ("timm.models.eva", "EvaAttention"): None,
    ("timm.models.cait", "ClassAttn"): None,
    ("timm.models.volo", "Attention"): None,
    ("timm.models.twins", "GlobalSubSampleAttn"): None,
    ("timm.models.pvt_v2", "Attention"): None,
    ("timm.models.davit", "WindowAttention"): None,
    ("timm.models.fastvit", "Attention"): None,
    ("timm.models.metaformer", "Attention"): None,
    ("timm.models.nextvit", "EfficientAttention"): None,
    ("timm.models.maxxvit", "AttentionCl"): None,
    ("timm.models.tiny_vit", "Attention"): None,
    ("timm.models.visformer", "Attention"): None,
    ("timm.models.nest", "Attention"): "calls SDPA on 5-d q/k/v (batch, heads, blocks, tokens, head_dim)",
    ("timm.models.hiera", "MaskUnitAttention"): "calls SDPA on 5-d q/k/v (batch, heads, mask units, tokens, head_dim)",
    ("timm.models.twins", "LocallyGroupedAttn"): "calls SDPA on 5-d q/k/v (batch, windows, heads, tokens, head_dim)",
    ("timm.models.vision_transformer_sam", "Attention"): "folds the heads into the batch before SDPA",
    ("timm.models.maxxvit", "Attention2d"): "keeps q/k/v channels-first (batch, heads, head_dim, tokens)",
    ("timm.layers.diff_attention", "DiffAttention"): "is differential attention: two SDPA calls (two softmax maps, "
    "subtracted), each with half of every head's q and k",
    ("timm.models.vision_transformer", "DiffParallelScalingBlock"): "is differential attention: two SDPA calls "
    "(two softmax maps, subtracted), each with half of every head's q and k",
}


def register() -> None:
    """Declare the prefix calls of the classes the installed timm has (import timm lazily)."""
    for (module, name), refusal in PREFIX_CALLS.items():
        cls = getattr(importlib.import_module(module), name, None)
        if cls is not None:  # a class of another timm version
            register_prefix_call(cls, refusal)
