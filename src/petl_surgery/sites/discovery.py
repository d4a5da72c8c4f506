"""Walk a model once and name its transformer blocks, attentions and MLPs in depth order."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

from ..errors import SurgeryError, UnsupportedModelError
from ..inserted import PetlModule
from .descriptors import AttentionSite, Block, MlpSite, Projection
from .registry import (
    ATTENTION_LAYOUTS,
    BLOCK_LAYOUTS,
    MLP_LAYOUTS,
    MLP_PROJECTIONS,
    NOT_ATTENTION,
    OUTSIDE_BLOCKS,
    PREFIX_CALLS,
    BlockLayout,
    run_deferred,
)

_ATTENTION_LIKE_NAME = re.compile(r"(Attention|Attn)", re.IGNORECASE)


@dataclass(frozen=True)
class UnsupportedSite:
    """A module that looks like attention but that no registered layout describes."""

    path: str
    class_name: str
    reason: str


@dataclass
class Discovery:
    """The blocks of a model in depth order, and the attention-like modules that were not understood."""

    blocks: List[Block] = field(default_factory=list)
    unsupported: List[UnsupportedSite] = field(default_factory=list)


def _join(prefix: str, name: str) -> str:
    if not name:
        return prefix
    return f"{prefix}.{name}" if prefix else name


def _is_inserted(module: nn.Module) -> bool:
    return isinstance(module, PetlModule)


def _looks_like_attention(module: nn.Module) -> bool:
    """An attention-like class name, ``nn.MultiheadAttention`` or a ``num_heads`` attribute, on a module
    that holds parameters: one that holds none has no projections for a method to operate on, so it is
    never refused as an attention petl_surgery does not understand (segmentation_models_pytorch's decoder
    ``Attention`` wrapping an ``nn.Identity`` when no attention type is set)."""
    if type(module) in NOT_ATTENTION or next(module.parameters(), None) is None:
        return False
    return isinstance(module, nn.MultiheadAttention) or bool(
        _ATTENTION_LIKE_NAME.search(type(module).__name__)
    ) or hasattr(module, "num_heads")


def _submodule(module: nn.Module, path: Optional[str]) -> Optional[nn.Module]:
    if path is None:
        return None
    if path == "":
        return module  # a block that is its own attention (timm's ParallelScalingBlock)
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _block_units(module: nn.Module) -> Optional[Tuple[BlockLayout, ...]]:
    """The registered layout of ``module``'s class as a tuple of units (one for most blocks; several for
    a block that runs several attention/MLP pairs, such as timm's TNT and parallel blocks), or None."""
    entry = BLOCK_LAYOUTS.get(type(module))
    if entry is None:
        return None
    layout = entry if isinstance(entry, BlockLayout) else entry(module)
    return (layout,) if isinstance(layout, BlockLayout) else tuple(layout)


def _is_own_attention(module: nn.Module) -> bool:
    """A registered block that is its own attention (timm's ParallelScalingBlock, layout attention "") is
    a block, not an attention of its parent."""
    units = _block_units(module)
    return units is not None and any(unit.attention == "" for unit in units)


def _inline_mlp_features(first: nn.Module, last: nn.Module) -> tuple[int, int, int]:
    """(in_features, out_features, channel_dim) of an MLP its block runs inline from ``first`` to ``last``."""
    if type(first) is not nn.Linear or type(last) is not nn.Linear:
        raise UnsupportedModelError(
            f"an inline MLP must start and end with nn.Linear; found {type(first).__name__} and {type(last).__name__}"
        )
    return first.in_features, last.out_features, -1


def _layer_width(module: Optional[nn.Module]) -> Optional[int]:
    """Output width of a Linear or 1x1 Conv2d, the layers a low-rank update can be written for."""
    if type(module) is nn.Linear:
        return module.out_features
    if type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.groups == 1:
        return module.out_channels
    return None


def _with_output(site: AttentionSite) -> AttentionSite:
    """Name ``proj`` as the output projection, unless the site replaces the attention's forward (then
    the replacement decides what it calls) or names one already."""
    width = _layer_width(getattr(site.module, "proj", None))
    if site.output is not None or width is None or "forward" in site.patches:
        return site
    return dataclasses.replace(site, output=Projection("proj", 0, width))


def _with_prefix_call(site: AttentionSite) -> AttentionSite:
    """The site with its class's declared prefix call (``PREFIX_CALLS``), unless the describer decided for
    the instance already (one SDPA call vouched for, a refusal, or a route through the zoo's attention)."""
    if site.one_sdpa_call or site.prefix_refusal is not None or site.prefix_route is not None:
        return site
    if type(site.module) not in PREFIX_CALLS:
        return site
    refusal = PREFIX_CALLS[type(site.module)]
    return dataclasses.replace(site, one_sdpa_call=refusal is None, prefix_refusal=refusal)


def _mlp_projections(module: nn.Module) -> Dict[str, Projection]:
    names = MLP_PROJECTIONS.get(type(module), {"fc1": "fc1", "fc2": "fc2"})
    widths = {target: (path, _layer_width(getattr(module, path, None))) for target, path in names.items()}
    return {target: Projection(path, 0, width) for target, (path, width) in widths.items() if width is not None}


def _describe_mlp(path: str, module: nn.Module, layout: Optional[BlockLayout], block: nn.Module) -> MlpSite:
    input_module = None
    projections = None
    if layout is not None and layout.mlp_layers:
        first, last = (module.get_submodule(name) for name in layout.mlp_layers)
        in_features, out_features, channel_dim = _inline_mlp_features(first, last)
        projections = {
            role: Projection(name, 0, layer.out_features)
            for role, name, layer in zip(("fc1", "fc2"), layout.mlp_layers, (first, last))
        }
    elif layout is not None and layout.mlp_input:
        input_module = block.get_submodule(layout.mlp_input)
        in_features, out_features, channel_dim = _inline_mlp_features(input_module, module)
        projections = {}
        if layout.inline_fc:  # relative to the block, where both Linears are
            projections = {"fc1": Projection(layout.mlp_input, 0, input_module.out_features)}
            projections["fc2"] = Projection(layout.mlp, 0, out_features)
    else:
        in_features, out_features, channel_dim = MLP_LAYOUTS[type(module)](module)
    residual_input = residual_output = None
    if layout is not None and layout.residual_input and layout.residual_output:
        residual_input = block.get_submodule(layout.residual_input)
        residual_output = block.get_submodule(layout.residual_output)
    return MlpSite(
        path=path,
        module=module,
        in_features=in_features,
        out_features=out_features,
        channel_dim=channel_dim,
        residual_input=residual_input,
        residual_output=residual_output,
        input_module=input_module,
        projections=projections if projections is not None else _mlp_projections(module),
        projections_on_block=bool(layout is not None and layout.inline_fc and input_module is not None),
    )


def _describe_unit(
    path: str,
    module: nn.Module,
    layout: Optional[BlockLayout],
    attention_name: Optional[str],
    mlp_name: Optional[str],
    claimed: set,
    found: Discovery,
) -> Optional[Block]:
    """The block made by one attention/MLP pair of ``module`` (its ``layout``, or None for a module
    found by its attention child), or None when neither is understood; failures to describe a site are
    recorded in ``found.unsupported``. The index is set by the caller."""
    attention_module = _submodule(module, attention_name)
    mlp_module = _submodule(module, mlp_name)
    attention: Optional[AttentionSite] = None
    if attention_module is not None and type(attention_module) in ATTENTION_LAYOUTS:
        attention_path = _join(path, attention_name)
        try:
            attention = _with_prefix_call(_with_output(ATTENTION_LAYOUTS[type(attention_module)](attention_path, attention_module)))
        except SurgeryError as error:
            found.unsupported.append(UnsupportedSite(attention_path, type(attention_module).__name__, str(error)))
        claimed.add(id(attention_module))
    mlp: Optional[MlpSite] = None
    if mlp_module is not None and (
        type(mlp_module) in MLP_LAYOUTS or (layout is not None and (layout.mlp_input or layout.mlp_layers))
    ):
        try:
            mlp = _describe_mlp(_join(path, mlp_name), mlp_module, layout, module)
        except SurgeryError as error:
            found.unsupported.append(UnsupportedSite(_join(path, mlp_name), type(mlp_module).__name__, str(error)))
    if attention is None and mlp is None:
        return None
    return Block(-1, path, module, attention, mlp)


def discover(model: nn.Module) -> Discovery:
    """Find the transformer blocks of ``model``.

    A block is a module of a registered block class (whose layout may name nested paths such as
    ``"attn_block.attn"``), or any module with a direct child of a registered attention class (its MLP is then the one direct child of a registered MLP class, if there is one).
    A registered class whose layout function returns several layouts runs several attention/MLP pairs
    (TNT's inner and outer transformer, the branches of a parallel block): each pair is a block of its
    own, in the order the layouts are given, all with the registered module's path.
    Blocks are numbered in the order ``model.named_modules()`` visits them, which is depth order for
    the sequential and staged models of timm (Swin-T: blocks 0..11 across its four stages).
    """
    run_deferred()
    found = Discovery()
    modules: Dict[str, nn.Module] = dict(model.named_modules(remove_duplicate=True))
    claimed: set[int] = set()
    skipped_prefixes: list[str] = []

    for path, module in modules.items():
        if any(path == p or path.startswith(p + ".") for p in skipped_prefixes):
            continue
        if _is_inserted(module) or type(module) in OUTSIDE_BLOCKS:
            skipped_prefixes.append(path)
            continue
        units = _block_units(module)
        if units is None:
            # an attention already claimed by an enclosing registered block belongs to that block
            attention_names = [
                n
                for n, c in module.named_children()
                if type(c) in ATTENTION_LAYOUTS and id(c) not in claimed and not _is_own_attention(c)
            ]
            if not attention_names:
                continue
            mlp_names = [n for n, c in module.named_children() if type(c) in MLP_LAYOUTS]
            # (no layout: the block's attention, and its MLP when it has exactly one)
            units = (None,)
            unit_names = [(attention_names[0], mlp_names[0] if len(mlp_names) == 1 else None)]
        else:
            unit_names = [(unit.attention, unit.mlp) for unit in units]
        understood = False
        for layout, (attention_name, mlp_name) in zip(units, unit_names):
            block = _describe_unit(path, module, layout, attention_name, mlp_name, claimed, found)
            if block is not None:
                found.blocks.append(dataclasses.replace(block, index=len(found.blocks)))
                understood = True
        if understood:
            claimed.add(id(module))  # a block is understood, whatever its class name says

    for path, module in modules.items():
        if id(module) in claimed or not path or not _looks_like_attention(module):
            continue
        if any(path.startswith(p + ".") or path == p for p in skipped_prefixes):
            continue
        inside_known = any(
            path.startswith(site.path + ".")
            for block in found.blocks
            for site in (block.attention,)
            if site is not None
        )
        inside_unsupported = any(path.startswith(u.path + ".") or path == u.path for u in found.unsupported)
        if inside_known or inside_unsupported:
            continue
        found.unsupported.append(
            UnsupportedSite(
                path,
                type(module).__name__,
                "its class is not in the attention registry, so the layout of its projections is unknown"
                if type(module) not in ATTENTION_LAYOUTS
                else "it is not the attention of any block layout petl_surgery knows (a second attention "
                "inside a registered block, say)",
            )
        )
    return found
