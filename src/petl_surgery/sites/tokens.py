"""Token layouts of flat-token models, for methods that add tokens to the sequence (prompt tuning).

A flat-token model embeds patches, puts its prefix tokens (class, distillation, registers) in front of
them, runs one sequence of blocks over all tokens without regard to their spatial arrangement, then
normalises, pools and classifies. Only then can extra tokens join the sequence after the prefix and
leave it after the last block unnoticed by everything else. The layout of each such model class is
known here, matched by exact class like the site registry; every other model is refused with the
reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Type

from torch import nn

from ..errors import SurgeryError, UnsupportedModelError
from .descriptors import Block
from .registry import run_deferred

PREFIX_COUNTER = "num_prefix_tokens"

HIERARCHICAL = (
    "it is hierarchical: its stages merge or pool tokens on the image grid, so there is no single flat "
    "token sequence for prompt tokens to join"
)
# Why the models that are known not to fit are refused, by class name (no import of their modules needed).
REFUSALS: Dict[str, str] = {
    **dict.fromkeys(
        (
            "SwinTransformer", "SwinTransformerV2", "SwinTransformerV2Cr", "PyramidVisionTransformerV2",
            "Twins", "MaxxVit", "Levit", "LevitDistilled", "TinyVit", "EfficientFormer", "EfficientFormerV2",
            "GlobalContextVit", "NextViT", "FastVit", "Visformer", "MetaFormer", "DaVit", "MultiScaleVit",
            "PoolingVisionTransformer", "Nest", "EfficientVit", "EfficientVitMsra", "ByobNet",
        ),
        HIERARCHICAL,
    ),
    "Hiera": "it is hierarchical: its mask-unit attention and pooling work on tokens arranged by image position",
    "HieraDet": HIERARCHICAL,
    "Xcit": "its blocks reshape the patch tokens to the image grid (local patch interaction) and its class "
    "token joins only in the class-attention blocks after them",
    "ConVit": "its GPSA attention holds positional attention sized to the patch grid, and its class token "
    "joins only midway",
    "VisionTransformerSAM": "its blocks reshape tokens to the 2-D patch grid (windowed attention, "
    "relative positions)",
    "Cait": "its class token joins only in the class-attention blocks after the patch-token blocks",
    "CoaT": "its blocks reshape the patch tokens to the image grid (convolutional position encoding) and its "
    "stages change the token count",
    "VOLO": "its outlook attention works on the patch tokens arranged as the image grid",
    "CrossVit": "it runs two token sequences of different patch sizes, exchanging only their class tokens",
    "TNT": "each of its blocks also runs pixel-level inner tokens tied one to one to the patch tokens",
}


@dataclass(frozen=True)
class TokenBias:
    """A token-by-token additive attention bias (relative positions) of one block, which tokens added
    after the prefix must be padded into: ``method`` of the module at ``module`` returns it, or its
    forward receives it as keyword argument ``keyword`` (a bias the model computes once and shares
    between blocks). With ``key_mask`` it is a key-padding mask instead (boolean, or additive 0 and a
    large negative), the same for every query: prompts are open to every query, and each prompt's own
    row masks the keys the model's queries mask."""

    module: str
    method: Optional[str] = None
    keyword: Optional[str] = None
    key_mask: bool = False


@dataclass(frozen=True)
class GridSource:
    """Where the patch grid of each forward comes from: ``module`` embeds the image (its first
    positional input, (batch, channels, height, width)) and ``grid_of((height, width))`` gives the
    (rows, columns) of patch tokens it makes. Read at every forward, so the grid follows timm's
    ``set_input_size`` and ``dynamic_img_size``."""

    module: nn.Module
    grid_of: Callable[[Tuple[int, int]], Tuple[int, int]]


@dataclass(frozen=True)
class TokenLayout:
    """Where a flat-token model keeps its tokens.

    Attributes:
        num_prefix_tokens: tokens in front of the patch tokens (class, distillation, registers): timm's
            ``model.num_prefix_tokens`` (1 ViT, 2 DeiT distilled, 5 DINOv2/v3 with registers, 0 without
            class token).
        width: the token width d.
        patch_size: (height, width) in pixels of one patch of the patch embedding.
        last_block: the block whose output is the last the blocks make; after it the model normalises,
            pools and classifies, so tokens added to the sequence must leave it there.
        prefix_counters: per block (in discovery's order), paths of modules that count the prefix tokens
            themselves at forward time in their ``num_prefix_tokens`` (RoPE attention rotates only the
            tokens after them, so tokens inserted after the prefix must be counted there to leave the
            rotary embedding aligned with the patch tokens).
        token_biases: per block (in discovery's order), the relative-position biases its attention
            adds, sized to the model's own tokens (BEiT, relative-position ViT); empty for others.
        grid: (rows, columns) of the patch tokens at the model's current image size, which follow the
            prefix tokens row by row; None when the model does not fix it (an image size chosen per
            forward, timm's ``dynamic_img_size``).
        grid_source: where each forward's grid can be read (methods that lay the patch tokens out on
            their grid read it there, never ``grid``); None when petl_surgery does not know it.
    """

    num_prefix_tokens: int
    width: int
    patch_size: Tuple[int, int]
    last_block: nn.Module
    prefix_counters: Tuple[Tuple[str, ...], ...]
    token_biases: Tuple[Tuple[TokenBias, ...], ...] = ()
    grid: Optional[Tuple[int, int]] = None
    grid_source: Optional[GridSource] = None


def _timm_flat_classes() -> Tuple[Type[nn.Module], ...]:
    """timm's flat-token classes: ViT (DeiT, DeiT3, CLIP, DINOv2 and others build it), DeiT distilled,
    Eva (EVA, EVA02, RoPE ViT, DINOv3), BEiT (BEiT v2) and the relative-position ViT. Imported lazily:
    the library works without timm."""
    try:
        from timm.models.beit import Beit
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer
        from timm.models.vision_transformer_relpos import VisionTransformerRelPos
    except ImportError:
        return ()
    return (VisionTransformer, VisionTransformerDistilled, Eva, Beit, VisionTransformerRelPos)


def _token_biases(model: nn.Module, blocks: Sequence[Block]) -> Tuple[Tuple[TokenBias, ...], ...]:
    """Where BEiT and the relative-position ViT make their relative-position biases, per block: each
    attention's own (BEiT's ``_get_rel_pos_bias``, the relpos ViT's ``rel_pos.get_bias``) and the one the
    model shares between blocks (passed as ``shared_rel_pos_bias`` / ``shared_rel_pos``)."""
    name = type(model).__name__
    if name not in ("Beit", "VisionTransformerRelPos"):
        return ()
    shared_module = getattr(model, "rel_pos_bias" if name == "Beit" else "shared_rel_pos", None)
    keyword = "shared_rel_pos_bias" if name == "Beit" else "shared_rel_pos"
    biases = []
    for block in blocks:
        site = block.attention
        if site is None:
            raise _refuse(model, f"block {block.path!r} has no attention petl_surgery knows")
        own: Tuple[TokenBias, ...] = ()
        if name == "Beit" and getattr(site.module, "relative_position_bias_table", None) is not None:
            own = (TokenBias(site.path, method="_get_rel_pos_bias"),)
        elif name == "VisionTransformerRelPos" and getattr(site.module, "rel_pos", None) is not None:
            if not callable(getattr(site.module.rel_pos, "get_bias", None)):
                raise _refuse(model, f"the relative-position module of {site.path!r} has no get_bias()")
            own = (TokenBias(f"{site.path}.rel_pos", method="get_bias"),)
        shared = (TokenBias(site.path, keyword=keyword),) if shared_module is not None else ()
        biases.append(own + shared)
    return tuple(biases)


def _refuse(model: nn.Module, reason: str) -> SurgeryError:
    return UnsupportedModelError(f"prompt tokens cannot be added to {type(model).__name__}: {reason}")


def _flat_blocks(model: nn.Module, blocks: Sequence[Block]) -> nn.Module:
    """``model.blocks``, checked to be exactly the discovered blocks, in order."""
    modules = [id(block.module) for block in blocks]
    if len(set(modules)) != len(modules):
        raise _refuse(
            model,
            "its blocks run several attention/MLP branches side by side (timm's ParallelThingsBlock), each "
            "a block of its own that shares its input with the others, so a block's prompts have no input of "
            "their own to join",
        )
    container = getattr(model, "blocks", None)
    if not isinstance(container, (nn.Sequential, nn.ModuleList)) or [id(b) for b in container] != [
        id(block.module) for block in blocks
    ]:
        raise _refuse(model, "its discovered blocks are not the sequence 'model.blocks' its forward runs")
    return container


def _patch_size(model: nn.Module) -> Tuple[int, int]:
    return checked_patch_size(model, getattr(getattr(model, "patch_embed", None), "patch_size", None))


def checked_patch_size(model: nn.Module, size: object) -> Tuple[int, int]:
    """The patch size a patch embedding of ``model`` gives (an int, or a (height, width) tuple or list) as
    a pair of positive ints; refuses the model when it is none."""
    if isinstance(size, int):
        size = (size, size)
    if isinstance(size, list):
        size = tuple(size)
    if not (isinstance(size, tuple) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise _refuse(model, f"its patch embedding gives no patch size (found {size!r}), which VPT's init needs")
    return size


def _grid(model: nn.Module) -> Optional[Tuple[int, int]]:
    """timm's fixed patch grid (``patch_embed.grid_size``), or None when the image size may change."""
    if getattr(model, "dynamic_img_size", False):
        return None
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid):
        return (grid[0], grid[1])
    return None


def _grid_source(model: nn.Module) -> Optional[GridSource]:
    """timm's patch embedding and its ``dynamic_feat_size`` (PatchEmbed, HybridEmbed), or None."""
    embed = getattr(model, "patch_embed", None)
    grid_of = getattr(embed, "dynamic_feat_size", None)
    if isinstance(embed, nn.Module) and callable(grid_of):
        return GridSource(embed, grid_of)
    return None


def _prefix_counters(blocks: Sequence[Block], prefix: int, model: nn.Module) -> Tuple[Tuple[str, ...], ...]:
    counters = []
    for block in blocks:
        attention = block.attention
        if attention is not None and hasattr(attention.module, PREFIX_COUNTER):
            count = getattr(attention.module, PREFIX_COUNTER)
            if count != prefix:
                raise _refuse(
                    model,
                    f"attention {attention.path!r} counts {count} prefix tokens where the model has {prefix}",
                )
            counters.append((attention.path,))
        else:
            counters.append(())
    return tuple(counters)


def timm_flat_layout(model: nn.Module, blocks: Sequence[Block]) -> TokenLayout:
    """The layout of timm's flat-token classes (``_timm_flat_classes``): patch embed,
    prefix tokens in front (``_pos_embed``), ``model.blocks`` in order, then ``norm``, pooling, head."""
    container = _flat_blocks(model, blocks)
    prefix = getattr(model, "num_prefix_tokens", None)
    width = getattr(model, "embed_dim", None)
    if not isinstance(prefix, int) or not isinstance(width, int):
        raise _refuse(model, "it has no integer num_prefix_tokens and embed_dim")
    return TokenLayout(
        prefix,
        width,
        _patch_size(model),
        container[-1],
        _prefix_counters(blocks, prefix, model),
        _token_biases(model, blocks),
        _grid(model),
        _grid_source(model),
    )


TokenLayoutDescriber = Callable[[nn.Module, Sequence[Block]], TokenLayout]
# Model classes (matched exactly, like the site registry) whose token layout a describer outside this
# file knows: the site layouts of other model zoos register theirs here when their package imports.
TOKEN_LAYOUTS: Dict[Type[nn.Module], TokenLayoutDescriber] = {}


def register_token_layout(cls: Type[nn.Module], describer: TokenLayoutDescriber) -> None:
    """Teach prompt tuning the flat token layout of a model class: ``describer(model, blocks)`` returns
    its TokenLayout or raises SurgeryError (use ``refuse``) naming why an instance does not fit."""
    TOKEN_LAYOUTS[cls] = describer


def refuse(model: nn.Module, reason: str) -> SurgeryError:
    """The error a token-layout describer raises for a model whose tokens do not fit, naming it."""
    return _refuse(model, reason)


def _timm_flat_holder(model: nn.Module, blocks: Sequence[Block]) -> Optional[nn.Module]:
    """The timm flat-token model inside ``model`` that holds every block of ``blocks``: a backbone the
    user's model wraps (timm's ``features_only`` wrapper ``FeatureGetterNet``, a segmentation model's
    encoder); None when there is none or ``model`` itself is one. Block paths stay relative to
    ``model``, as the layout's paths must be."""
    classes = _timm_flat_classes()
    if not blocks or type(model) in classes:
        return None
    for module in model.modules():
        if type(module) in classes:  # matched exactly, as the registry matches classes
            inside = {id(m) for m in module.modules()}
            if all(id(block.module) in inside for block in blocks):
                return module
    return None


def token_layout(model: nn.Module, blocks: Sequence[Block]) -> TokenLayout:
    """The token layout of ``model`` given its discovered ``blocks``; raises SurgeryError naming the
    reason for a model whose tokens are not one flat sequence petl_surgery knows."""
    run_deferred()
    if type(model) in _timm_flat_classes():
        return timm_flat_layout(model, blocks)
    holder = _timm_flat_holder(model, blocks)
    if holder is not None:
        return timm_flat_layout(holder, blocks)
    describer = TOKEN_LAYOUTS.get(type(model))
    if describer is not None:
        return describer(model, blocks)
    reason = REFUSALS.get(type(model).__name__)
    if reason is None:
        reason = (
            "petl_surgery does not know its token layout (where the prefix tokens end, which blocks the "
            "tokens run through, where they leave them); prompt tokens work on timm's VisionTransformer "
            "(ViT, DeiT, DeiT3, CLIP, DINOv2), VisionTransformerDistilled, Eva (EVA02, RoPE ViT, DINOv3), "
            "Beit and VisionTransformerRelPos"
        )
    raise _refuse(model, reason)
