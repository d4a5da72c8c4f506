"""Layouts of transformers' vision models whose attention goes through transformers' attention interface
(transformers 5): ViT, DeiT, BEiT, DINOv2 (with and without registers), DINOv3, CLIP vision, SigLIP and
SigLIP 2 vision, Swin and ViTMAE; their bare ``*Model`` and their ``*ForImageClassification`` classes
(head: ``classifier``, found by that name).

Sites. Each attention projects q, k and v with three Linears it calls as modules (``q_proj``, ``k_proj``,
``v_proj``; BEiT's and DINOv3's ``k_proj`` without bias) and its output with ``o_proj`` (CLIP and SigLIP:
``out_proj``). What lies between (head split, DINOv3's RoPE, BEiT's relative-position bias, Swin's window
masks, the softmax) stays the model's own, whatever attention implementation runs it.

Attention implementations. PATT, the adapter, BAPAT, LoRA and SSF hook Linears, so they work the same
under every implementation. Prefix tuning goes through the function the attention dispatches to,
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)``:
while a prefix is present, the attention's ``config`` is a :class:`PrefixRoutedConfig`, the model's own
config in every attribute but ``_attn_implementation``, which names :data:`ROUTE`, a function registered
in transformers' ``AttentionInterface``. That function puts the prefix in front of the keys and values,
pads the mask, and calls the function the model's config names at that moment ("eager": the model
file's ``eager_attention_forward``; "sdpa": transformers' ``sdpa_attention_forward``). Other
implementations (flex attention, whose block masks cannot be padded; the flash kernels) are refused by
name, when the prefix is applied and when the model is switched to one later. A causal call is refused
too: ``sdpa_attention_forward`` cuts keys longer than the queries when ``is_causal`` holds, which would
drop the prefix silently.

Prompt tokens (VPT) use each model's own embeddings and pooling: the prompts join after the class,
distillation and register tokens and leave after the last layer, so the class-token poolers (ViT, DeiT,
CLIP), the mean pools (BEiT, CLIP's and SigLIP's classifiers), DINOv2's class-and-mean concatenation and
SigLIP's attention-pooling head all read the model's own tokens. BEiT's relative-position bias reaches
each attention as its ``attention_mask`` and gets zero rows and columns for the prompts; SigLIP 2's
padding mask gets open keys for them. DINOv3 rotates only its last ``num_patches`` tokens, so prompts are
not rotated. ViTMAE masks patches at random on every forward (its ``noise`` argument fixes the choice):
prompts join after its class token, whichever patches are kept. Swin re-views its tokens as the image
grid in every block: refused.

SigLIP's attention-pooling ``head`` (a learned probe attending over the tokens through
``nn.MultiheadAttention``) is part of the head path, not a block: methods on blocks leave it alone. On
``SiglipVisionModel`` it is also the module named ``head``, so it trains with the delta unless
``apply(..., train_head=False)``; the ``*ForImageClassification`` classes train their ``classifier``.

Registration is deferred (``register_when_imported``): a family's classes are registered the first time
site discovery finds its modeling module imported, so importing petl_surgery imports no transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import SurgeryRuntimeError, UnsupportedModelError
from .descriptors import AttentionSite, Block, KeyValueExtension, Projection
from .registry import (
    BlockLayout,
    register_attention,
    register_block,
    register_mlp,
    register_outside_blocks,
    register_when_imported,
)
from .timm_vit_like import separate_q_k_v
from .tokens import HIERARCHICAL, TokenBias, TokenLayout, refuse, register_token_layout
from .torch_layouts import torchvision_mlp_features

# The name under which the prefix's attention function is registered in transformers' AttentionInterface.
ROUTE = "petl_surgery_prefix"
# The implementations whose calls a prefix (keys, values and mask) and prompts (masks) are put into.
IMPLEMENTATIONS = ("eager", "sdpa")


def _implementation(config: Any) -> str:
    """The attention implementation a config names ("eager" when it names none: transformers' default
    for a module used on its own)."""
    return getattr(config, "_attn_implementation", None) or "eager"


def _unroutable(implementation: str) -> str:
    return (
        f"its attn_implementation is {implementation!r}; petl_surgery puts prefix keys and values and prompt "
        f"masks into {' and '.join(IMPLEMENTATIONS)} only (flex attention's block masks cannot be padded, the "
        "flash kernels are not checked); build the model with attn_implementation='eager' or 'sdpa', or call "
        "model.set_attn_implementation('sdpa')"
    )


class PrefixRoutedConfig:
    """The config of an attention with a prefix: the model's own config (``petl_config``) in every
    attribute but ``_attn_implementation``, which names :data:`ROUTE`. The attention then calls
    :func:`prefixed_attention`, which calls :meth:`attend`."""

    _attn_implementation = ROUTE
    _OWN = ("petl_config", "petl_extend", "petl_eager", "petl_where")

    def __init__(self, config: Any, extend: KeyValueExtension, eager: Callable[..., Any], where: str) -> None:
        self.petl_config = config
        self.petl_extend = extend
        self.petl_eager = eager
        self.petl_where = where

    def __getattr__(self, name: str) -> Any:
        # only for names not found on the instance or class; dunders and our own names not forwarded,
        # so that copying and unpickling (which look them up before __dict__ is filled) work
        if name.startswith("__") or name in PrefixRoutedConfig._OWN:
            raise AttributeError(name)
        return getattr(self.petl_config, name)

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        **kwargs: Any,
    ) -> Any:
        """The model's own attention function on the keys and values with the prefix in front."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        implementation = _implementation(self.petl_config)
        if implementation not in IMPLEMENTATIONS:
            raise SurgeryRuntimeError(f"the prefix of {self.petl_where} cannot be used: {_unroutable(implementation)}")
        causal = kwargs.get("is_causal")
        if getattr(module, "is_causal", True) if causal is None else causal:
            raise SurgeryRuntimeError(
                f"the attention of {self.petl_where} is causal; a prefix for causal attention is not defined"
            )
        key, value, attention_mask = self.petl_extend(query, key, value, attention_mask)
        function = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, self.petl_eager)
        return function(module, query, key, value, attention_mask, **kwargs)


def prefixed_attention(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The attention function registered as :data:`ROUTE` (called as transformers calls attention
    functions: module, query, key, value, attention_mask, keywords): the attention's prefix, then its own
    function (:meth:`PrefixRoutedConfig.attend`)."""
    config = getattr(module, "config", None)
    if not isinstance(config, PrefixRoutedConfig):
        raise SurgeryRuntimeError(
            f"{type(module).__name__} dispatched to petl_surgery's prefix attention ({ROUTE!r}) but carries no "
            "prefix; set the model's attn_implementation to 'eager' or 'sdpa'"
        )
    return config.attend(module, *args, **kwargs)


def _register_route() -> None:
    """Register :func:`prefixed_attention` as :data:`ROUTE` in transformers' AttentionInterface (again is a no-op)."""
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ROUTE, prefixed_attention)


def _prefix_route(path: str, attention: nn.Module, eager: Callable[..., Any], extend: KeyValueExtension) -> Dict[str, Any]:
    """The patch that routes ``attention``'s core call through ``extend`` (AttentionSite.prefix_route)."""
    _register_route()  # also for attention of a family outside FAMILIES that takes this route (VideoMAE)
    implementation = _implementation(attention.config)
    where = f"{type(attention).__name__} {path!r}"
    if implementation not in IMPLEMENTATIONS:
        raise UnsupportedModelError(f"prefix tuning cannot operate on {where}: {_unroutable(implementation)}")
    return {"config": PrefixRoutedConfig(attention.config, extend, eager, where)}


def _attention_describer(output: str, eager: Callable[..., Any]) -> Callable[[str, nn.Module], AttentionSite]:
    """Separate ``q_proj``/``k_proj``/``v_proj`` Linears, the output Linear ``output``, and the prefix route
    through the attention interface (``eager``: the model file's ``eager_attention_forward``)."""

    def describe(path: str, attention: nn.Module) -> AttentionSite:
        site = separate_q_k_v(path, attention, ("q_proj", "k_proj", "v_proj"))
        out = getattr(attention, output, None)
        if type(out) is not nn.Linear:
            raise UnsupportedModelError(
                f"attention {path!r} ({type(attention).__name__}) has no Linear {output!r} where its layout "
                f"expects one; found {type(out).__name__}"
            )
        return dataclasses.replace(
            site,
            output=Projection(output, 0, out.out_features),
            prefix_route=functools.partial(_prefix_route, path, attention, eager),
        )

    return describe


# ---------------------------------------------------------------------------------------------- blocks
# The adapter's input="residual" needs the two ends of the MLP's residual branch. Where the layer passes
# both branches through one dropout (ViT, DeiT, ViTMAE, Swin) or one drop path (BEiT, DINOv2, DINOv3),
# that shared module cannot end the MLP's branch: the MLP itself (or the layer scale after it) does,
# exactly, when the shared module is an identity (dropout 0, no drop path); otherwise the layout leaves
# the residual branch unnamed and input="residual" is refused.

NO_RESIDUAL = BlockLayout("attention", "mlp")


def _is_identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0)


def vit_layer_layout(layer: nn.Module) -> BlockLayout:
    """ViT, DeiT, ViTMAE and Swin layers: ``x + dropout(mlp(layernorm_after(x)))``."""
    if _is_identity(layer.dropout):
        return BlockLayout("attention", "mlp", residual_input="layernorm_after", residual_output="mlp")
    return NO_RESIDUAL


def beit_layer_layout(layer: nn.Module) -> BlockLayout:
    """BEiT: ``x + drop_path(lambda_2 * dropout(mlp(layernorm_after(x))))``; lambda_2 a float 1.0 when
    the layer scale is off."""
    plain = isinstance(layer.lambda_2, float) and layer.lambda_2 == 1.0
    if plain and _is_identity(layer.dropout) and _is_identity(layer.drop_path):
        return BlockLayout("attention", "mlp", residual_input="layernorm_after", residual_output="mlp")
    return NO_RESIDUAL


def dinov2_layer_layout(layer: nn.Module) -> BlockLayout:
    """DINOv2 and DINOv3: ``x + drop_path(layer_scale2(mlp(norm2(x))))``."""
    if _is_identity(layer.drop_path):
        return BlockLayout("attention", "mlp", residual_input="norm2", residual_output="layer_scale2")
    return NO_RESIDUAL


# CLIP and SigLIP: ``x + mlp(layer_norm2(x))``.
ENCODER_LAYER = BlockLayout("self_attn", "mlp", residual_input="layer_norm2", residual_output="mlp")


# ---------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class FlatModel:
    """Where a model class keeps its embeddings and the layers its forward runs (paths from the model)."""

    embeddings: str
    layers: str


def prefix_token_count(embeddings: nn.Module) -> int:
    """Tokens the embeddings put in front of the patches: class (``cls_token``, CLIP's
    ``class_embedding``), distillation (DeiT) and register tokens (DINOv2 with registers, DINOv3)."""
    count = sum(
        isinstance(getattr(embeddings, name, None), nn.Parameter)
        for name in ("cls_token", "class_embedding", "distillation_token")
    )
    registers = getattr(embeddings, "register_tokens", None)
    return count + (registers.shape[1] if isinstance(registers, nn.Parameter) else 0)


def _patch_size(model: nn.Module, embeddings: nn.Module) -> Tuple[int, int]:
    """The patch embedding's kernel, or (SigLIP 2's Linear on pre-patchified pixels) its ``patch_size``."""
    conv = next((m for m in embeddings.modules() if isinstance(m, nn.Conv2d)), None)
    size: Any = conv.kernel_size if conv is not None else getattr(embeddings, "patch_size", None)
    size = (size, size) if isinstance(size, int) else tuple(size) if size is not None else None
    if not (size and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise refuse(model, f"its embeddings give no patch size (found {size!r}), which VPT's init needs")
    return size  # type: ignore[return-value]


def flat_token_layout(spec: FlatModel, mask: Optional[str]) -> Callable[[nn.Module, Sequence[Block]], TokenLayout]:
    """The token layout of a flat-token model class; ``mask`` says what reaches each attention as its
    ``attention_mask`` and must be padded for prompts: "bias" (BEiT's relative-position bias), "keys"
    (SigLIP 2's padding mask), None (nothing the model makes itself)."""

    def describe(model: nn.Module, blocks: Sequence[Block]) -> TokenLayout:
        try:
            layers = model.get_submodule(spec.layers)
            embeddings = model.get_submodule(spec.embeddings)
        except AttributeError:
            raise refuse(model, f"it has no {spec.layers!r} and {spec.embeddings!r} where its class keeps them") from None
        if not blocks or [id(block.module) for block in blocks] != [id(layer) for layer in layers]:
            raise refuse(model, f"its discovered blocks are not the layers {spec.layers!r} its forward runs")
        sites = [block.attention for block in blocks]
        if any(site is None for site in sites):
            raise refuse(model, "a layer has no attention petl_surgery knows")
        implementation = _implementation(sites[0].module.config)
        if implementation not in IMPLEMENTATIONS:
            raise refuse(model, _unroutable(implementation))
        biases: Tuple[Tuple[TokenBias, ...], ...] = ()
        if mask is not None:
            biases = tuple((TokenBias(site.path, keyword="attention_mask", key_mask=mask == "keys"),) for site in sites)
        return TokenLayout(
            prefix_token_count(embeddings),
            sites[0].in_features,
            _patch_size(model, embeddings),
            layers[-1],
            tuple(() for _ in blocks),
            biases,
        )

    return describe


def grid_tokens(model: nn.Module, blocks: Sequence[Block]) -> TokenLayout:
    """Swin: refused (every layer re-views its tokens as the image grid)."""
    raise refuse(model, HIERARCHICAL + " (every Swin layer re-views its tokens as the (height, width) grid)")


# ---------------------------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """The classes of one transformers model file (``transformers.models.<name>.modeling_<name>``).

    Attributes:
        name: the model directory (``"vit"``).
        attention, layer: its attention and layer classes; ``output`` the attention's output Linear.
        layout: the layer's BlockLayout, or a function of the layer giving it.
        mlps: MLP classes -> the paths of their ``fc1``/``fc2`` layers when not named so (None: they are).
        models: model classes -> where they keep their embeddings and layers (None: prompts refused).
        mask: what the model passes each attention as ``attention_mask`` (see ``flat_token_layout``).
        heads: classes of attention-pooling heads, outside the blocks.
    """

    name: str
    attention: str
    layer: str
    layout: Any
    mlps: Mapping[str, Optional[Mapping[str, str]]]
    models: Mapping[str, Optional[FlatModel]]
    output: str = "o_proj"
    mask: Optional[str] = None
    heads: Tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return f"transformers.models.{self.name}.modeling_{self.name}"


def _flat(base: str, layers: str) -> FlatModel:
    prefix = f"{base}." if base else ""
    return FlatModel(f"{prefix}embeddings", f"{prefix}{layers}")


DINOV2_MLPS = {"MLP": None, "SwiGLUFFN": {"fc2": "down_proj"}}
FAMILIES: Tuple[Family, ...] = (
    Family(
        "vit", "ViTAttention", "ViTLayer", vit_layer_layout, {"ViTMLP": None},
        {"ViTModel": _flat("", "layers"), "ViTForImageClassification": _flat("vit", "layers")},
    ),
    Family(
        "deit", "DeiTAttention", "DeiTLayer", vit_layer_layout, {"DeiTMLP": None},
        {"DeiTModel": _flat("", "layers"), "DeiTForImageClassification": _flat("deit", "layers")},
    ),
    Family(
        "beit", "BeitAttention", "BeitLayer", beit_layer_layout, {"BeitMLP": None},
        {"BeitModel": _flat("", "layers"), "BeitForImageClassification": _flat("beit", "layers")},
        mask="bias",
    ),
    Family(
        "dinov2", "Dinov2Attention", "Dinov2Layer", dinov2_layer_layout,
        {f"Dinov2{name}": names for name, names in DINOV2_MLPS.items()},
        {"Dinov2Model": _flat("", "encoder.layer"), "Dinov2ForImageClassification": _flat("dinov2", "encoder.layer")},
    ),
    Family(
        "dinov2_with_registers", "Dinov2WithRegistersAttention", "Dinov2WithRegistersLayer", dinov2_layer_layout,
        {f"Dinov2WithRegisters{name}": names for name, names in DINOV2_MLPS.items()},
        {
            "Dinov2WithRegistersModel": _flat("", "encoder.layer"),
            "Dinov2WithRegistersForImageClassification": _flat("dinov2_with_registers", "encoder.layer"),
        },
    ),
    Family(
        "dinov3_vit", "DINOv3ViTAttention", "DINOv3ViTLayer", dinov2_layer_layout,
        {"DINOv3ViTMLP": {"fc1": "up_proj", "fc2": "down_proj"}, "DINOv3ViTGatedMLP": {"fc2": "down_proj"}},
        {"DINOv3ViTModel": _flat("", "model.layer")},
    ),
    Family(
        "clip", "CLIPAttention", "CLIPEncoderLayer", ENCODER_LAYER, {"CLIPMLP": None},
        {
            "CLIPVisionModel": _flat("", "encoder.layers"),
            "CLIPForImageClassification": _flat("vision_model", "encoder.layers"),
        },
        output="out_proj",
    ),
    Family(
        "siglip", "SiglipAttention", "SiglipEncoderLayer", ENCODER_LAYER, {"SiglipMLP": None},
        {
            "SiglipVisionModel": _flat("", "encoder.layers"),
            "SiglipForImageClassification": _flat("vision_model", "encoder.layers"),
        },
        output="out_proj",
        heads=("SiglipMultiheadAttentionPoolingHead",),
    ),
    Family(
        "siglip2", "Siglip2Attention", "Siglip2EncoderLayer", ENCODER_LAYER, {"Siglip2MLP": None},
        {
            "Siglip2VisionModel": _flat("", "encoder.layers"),
            "Siglip2ForImageClassification": _flat("vision_model", "encoder.layers"),
        },
        output="out_proj",
        mask="keys",
        heads=("Siglip2MultiheadAttentionPoolingHead",),
    ),
    Family(
        "swin", "SwinAttention", "SwinLayer", vit_layer_layout, {"SwinMLP": None},
        {"SwinModel": None, "SwinForImageClassification": None},
    ),
    Family(
        "vit_mae", "ViTMAEAttention", "ViTMAELayer", vit_layer_layout, {"ViTMAEMLP": None},
        {"ViTMAEModel": _flat("", "layers")},
    ),
)

POOLING_HEAD = (
    "an attention-pooling head (a learned probe attending over the tokens): part of the model's head path, "
    "not a block"
)


def register_family(family: Family) -> None:
    """Register the classes of ``family`` (its modeling module is imported by then). A class the
    installed transformers does not define is skipped."""
    module = importlib.import_module(family.module)
    _register_route()
    attention = getattr(module, family.attention, None)
    eager = getattr(module, "eager_attention_forward", None)
    if attention is not None and eager is not None:
        register_attention(attention, _attention_describer(family.output, eager))
    for name, projections in family.mlps.items():
        if hasattr(module, name):
            register_mlp(getattr(module, name), torchvision_mlp_features, projections)
    if hasattr(module, family.layer):
        register_block(getattr(module, family.layer), family.layout)
    for name in family.heads:
        if hasattr(module, name):
            register_outside_blocks(getattr(module, name), POOLING_HEAD)
    for name, spec in family.models.items():
        if hasattr(module, name):
            describer = grid_tokens if spec is None else flat_token_layout(spec, family.mask)
            register_token_layout(getattr(module, name), describer)


def register() -> None:
    """Register each family when (and if) its modeling module is imported."""
    for family in FAMILIES:
        register_when_imported(family.module, functools.partial(register_family, family))
