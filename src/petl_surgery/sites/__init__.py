"""Site discovery: where in a model each method may operate."""

from .descriptors import ROLES, AttentionSite, Block, MlpSite, Projection
from .discovery import Discovery, UnsupportedSite, discover
from .registry import (
    BlockLayout,
    register_attention,
    register_block,
    register_mlp,
    register_prefix_call,
    register_when_imported,
)
from . import (
    open_clip_layouts,
    timm_convnets,
    timm_hierarchical,
    timm_prefix_calls,
    timm_vit_like,
    torch_layouts,
    transformers_layouts,
    transformers_legacy,
)
from .timm_layouts import register_timm_layouts

register_timm_layouts()
timm_vit_like.register()
timm_hierarchical.register()
torch_layouts.register()
timm_convnets.register()
timm_prefix_calls.register()
# the optional zoos: each family once its modeling module is imported (transformers and open_clip stay optional)
transformers_layouts.register()
transformers_legacy.register()
register_when_imported("open_clip.transformer", open_clip_layouts.register)

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
    "register_prefix_call",
]
