"""Site discovery: where in a model each method may operate."""

from .descriptors import ROLES, AttentionSite, Block, MlpSite, Projection
from .discovery import Discovery, UnsupportedSite, discover
from .registry import BlockLayout, register_attention, register_block, register_mlp
from . import timm_hierarchical, timm_vit_like, torch_layouts, transformers_layouts, transformers_legacy
from .timm_layouts import register_timm_layouts

register_timm_layouts()
timm_vit_like.register()
timm_hierarchical.register()
torch_layouts.register()
# transformers' models: each family once its modeling module is imported (transformers stays optional)
transformers_layouts.register()
transformers_legacy.register()

__all__ = [
    "ROLES",
    "AttentionSite",
    "Block",
    "BlockLayout",
    "Discovery",
    "MlpSite",
    "Projection",
    "UnsupportedSite",
    "discover",
    "register_attention",
    "register_block",
    "register_mlp",
]
