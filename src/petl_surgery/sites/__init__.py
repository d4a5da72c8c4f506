"""Site discovery: where in a model each method may operate."""

from .descriptors import ROLES, AttentionSite, Block, MlpSite, Projection
from .discovery import Discovery, UnsupportedSite, discover
from .registry import BlockLayout, register_attention, register_block, register_mlp, register_on_import
from . import open_clip_layouts, timm_convnets, timm_hierarchical, timm_vit_like, torch_layouts
from .timm_layouts import register_timm_layouts

register_timm_layouts()
timm_vit_like.register()
timm_hierarchical.register()
torch_layouts.register()
timm_convnets.register()
register_on_import("open_clip.transformer", open_clip_layouts.register)  # once the user imports open_clip

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
