"""The family contract on timm's flat and ViT-like transformer families (sites/timm_vit_like.py).

Every family gets one tiny configuration (at least 2 heads, weights seeded inside the builder), the
expected outcome of PATT and of the adapter (``"works"`` or a regex the refusal must match), the float64
layout self-check on its softmax attentions, and PATT parity with the V-PETL equations where PATT works.
"""

from __future__ import annotations

import copy
from functools import partial
from dataclasses import dataclass
from typing import Callable, Dict

import pytest
import timm
import torch
from family_checks import assert_outcome, check_layout, check_method, check_patt_parity
from timm.layers import AttentionRope
from timm.models import eva, mvitv2, nest, vitamin, volo
from timm.models.vision_transformer import ParallelScalingBlock
from torch import nn

import petl_surgery as ps

pytestmark = pytest.mark.slow  # a family sweep: -m "not slow" leaves it out

WORKS = "works"
VIT = dict(img_size=64, embed_dim=64, depth=2, num_heads=2)
# Families whose layer scale starts at 1e-5 or 1e-6 start it at 0.5 here: at 1e-5 a branch's effect on
# the logits is below what a float32 comparison can see.
VIT_LS = dict(VIT, init_values=0.5)


@dataclass(frozen=True)
class Family:
    """A tiny configuration and what each method must do on it."""

    build: Callable[[], nn.Module]
    patt: str  # "works", or a regex the refusal must match
    adapter: str
    size: int = 64


def timm_model(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=5, **kwargs)


def constructed(cls: type, **kwargs) -> Callable[[], nn.Module]:
    """For families whose registered names fix the arguments a tiny configuration changes."""
    return lambda: cls(num_classes=5, **kwargs)


def vitamin_tiny() -> nn.Module:
    stem = vitamin.VitCfg(
        embed_dim=(16, 32, 64),
        depths=(1, 1, 1),
        stem_width=16,
        conv_cfg=vitamin.VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6),
        head_type="1d",
    )
    return timm.create_model("vitamin_small_224", pretrained=False, num_classes=5, embed_cfg=stem, **VIT)


def mvitv2_tiny() -> nn.Module:
    return mvitv2.MultiScaleVit(mvitv2.MultiScaleVitCfg(depths=(1, 1), embed_dim=32, num_heads=2), img_size=64, num_classes=5)


ROTARY_ATTENTION = (eva.EvaAttention, AttentionRope)
NO_MLP = r"needs an MLP in block \d+ .*it has none"

FAMILIES: Dict[str, Family] = {
    "beit": Family(timm_model("beit_base_patch16_224", **VIT), WORKS, WORKS),
    "beitv2": Family(timm_model("beitv2_base_patch16_224", **VIT_LS), WORKS, WORKS),
    "eva02_fused_qv_bias": Family(timm_model("eva02_tiny_patch14_224", **dict(VIT, img_size=56)), WORKS, WORKS, 56),
    "eva02_unfused": Family(timm_model("eva02_base_patch14_224", **dict(VIT, img_size=56)), WORKS, WORKS, 56),
    "rope_vit": Family(timm_model("vit_small_patch16_rope_224", **VIT_LS), WORKS, WORKS),
    "rope_vit_unfused_gqa": Family(
        timm_model("vit_small_patch16_rope_224", **dict(VIT_LS, num_heads=4, qkv_fused=False, num_kv_heads=2)),
        WORKS,
        WORKS,
    ),
    "dinov3": Family(timm_model("vit_small_patch16_dinov3", **VIT_LS), WORKS, WORKS),
    "dinov3_qkvb": Family(timm_model("vit_small_patch16_dinov3_qkvb", **VIT_LS), WORKS, WORKS),
    "vit_relpos": Family(timm_model("vit_relpos_small_patch16_224", **VIT_LS), WORKS, WORKS),
    "vit_relpos_res_post": Family(timm_model("vit_relpos_small_patch16_rpn_224", **VIT_LS), WORKS, WORKS),
    "vit_relpos_shared": Family(timm_model("vit_srelpos_small_patch16_224", **VIT_LS), WORKS, WORKS),
    "sam": Family(
        timm_model("samvit_base_patch16", **dict(VIT, global_attn_indexes=(1,), window_size=3)), WORKS, WORKS
    ),
    "cait": Family(timm_model("cait_xxs24_224", **dict(VIT, depth_token_only=1)), WORKS, WORKS),
    "xcit": Family(
        timm_model("xcit_nano_12_p16_224", **dict(VIT, cls_attn_layers=1)),
        r"block 0 .*\(XCA\) is cross-covariance attention",
        WORKS,
    ),
    "crossvit": Family(
        timm_model(
            "crossvit_tiny_240", img_size=64, img_scale=(1.0, 1.0), patch_size=[8, 16], embed_dim=[32, 64],
            depth=[[1, 1, 0]], num_heads=[2, 2], mlp_ratio=[2, 2, 1],
        ),
        WORKS,
        NO_MLP,
    ),
    "convit": Family(timm_model("convit_tiny", **dict(VIT, num_heads=4, local_up_to_layer=1)), WORKS, WORKS),
    "tnt": Family(
        timm_model("tnt_s_patch16_224", img_size=64, embed_dim=64, inner_dim=16, depth=2, num_heads_outer=2, num_heads_inner=2),
        WORKS,
        WORKS,
    ),
    "pit": Family(timm_model("pit_ti_224", img_size=64, base_dims=[16, 16], depth=[1, 1], heads=[2, 4]), WORKS, WORKS),
    "nest": Family(constructed(nest.Nest, img_size=64, embed_dims=(32, 64, 64), num_heads=(2, 2, 2), depths=(1, 1, 1)), WORKS, WORKS),
    "volo": Family(
        constructed(volo.VOLO, img_size=64, layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(2, 2, 2, 2), stem_hidden_dim=16),
        r"block 0 .*\(OutlookAttention\) is outlook attention",
        WORKS,
    ),
    "naflexvit": Family(timm_model("naflexvit_base_patch16_gap", **VIT_LS), WORKS, WORKS),
    "vitamin": Family(vitamin_tiny, WORKS, WORKS),
    "hybrid_vit": Family(timm_model("vit_tiny_r_s16_p8_224", **VIT), WORKS, WORKS),
    "vit_pwee_parallel_scaling": Family(timm_model("vit_pwee_patch16_reg1_gap_256", **VIT_LS), WORKS, WORKS),
    "vit_parallel_scaling_fused_out": Family(
        timm_model("vit_pwee_patch16_reg1_gap_256", **VIT_LS, block_fn=partial(ParallelScalingBlock, fuse_out_proj=True)),
        WORKS,
        NO_MLP,
    ),
    "mvitv2": Family(mvitv2_tiny, WORKS, WORKS),
    # Hiera zero-initialises its classifier: compare its pooled features instead.
    "hiera": Family(
        lambda: timm.create_model("hiera_tiny_224", img_size=64, embed_dim=32, num_heads=2, stages=(1, 1, 1, 1), num_classes=0),
        WORKS,
        WORKS,
    ),
    "mobilevit": Family(timm_model("mobilevit_xxs"), WORKS, WORKS, 32),
    # The MAP head (AttentionPoolLatent): SigLIP's ViT and PE-core's Eva (RoPE), tiny.
    "siglip_map": Family(timm_model("vit_base_patch16_siglip_224", **VIT), WORKS, WORKS),
    "pe_core_map": Family(timm_model("vit_pe_core_tiny_patch16_384", **VIT), WORKS, WORKS),
    "vit_parallel_things": Family(timm_model("vit_small_patch16_18x2_224", **VIT_LS), WORKS, WORKS),
    # SAM2's Hiera: the global-attention block must not be a stage's first (pooling) block.
    "sam2_hiera": Family(
        timm_model(
            "sam2_hiera_tiny", embed_dim=32, num_heads=2, stages=(1, 2, 1, 1), global_att_blocks=(2,),
            window_spec=(4, 4, 2, 2),
        ),
        WORKS,
        WORKS,
    ),
}

# Families refused by default because some of their blocks lack what a method needs: with
# skip_unsupported=True the method works on the others.
WORKS_ON_SUPPORTED_BLOCKS = [("xcit", "patt"), ("volo", "patt"), ("crossvit", "adapter")]


def build(family: str) -> nn.Module:
    """The family's tiny model with seeded weights; q/v bias parameters are made non-zero, so that
    operating through ``qkv_bias_separate`` is shown to leave outputs exactly as they were."""
    torch.manual_seed(0)
    model = FAMILIES[family].build().eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in model.modules():
            for name in ("q_bias", "v_bias"):
                bias = getattr(module, name, None)
                if isinstance(bias, nn.Parameter):
                    bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)
    return model


def images(family: str, batch: int = 2) -> torch.Tensor:
    size = FAMILIES[family].size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def patt_works(family: str) -> bool:
    return FAMILIES[family].patt == WORKS


# name -> (build, make_input), read by docs/make_coverage.py
COVERAGE = {f"timm {name}": (partial(build, name), partial(images, name)) for name in FAMILIES}

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["patt", "adapter"])
def test_family_contract(family: str, method: str, tmp_path) -> None:
    outcome = check_method(lambda: build(family), lambda: images(family), method, tmp_path)
    assert_outcome(outcome, getattr(FAMILIES[family], method))


@pytest.mark.parametrize("family, method", WORKS_ON_SUPPORTED_BLOCKS)
def test_skip_unsupported_operates_on_the_rest(family: str, method: str, tmp_path) -> None:
    outcome = check_method(lambda: build(family), lambda: images(family), method, tmp_path, skip_unsupported=True)
    assert outcome == WORKS


def _drop_rope(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    return args, dict(kwargs, rope=None)


def prepared_for_layout_check(model: nn.Module) -> nn.Module:
    """A copy on which the layout self-check's premise holds for every softmax attention.

    RoPE rotates k per position, so a constant added to k is no longer constant across keys: the check
    runs with the rotary embedding left out. MViTv2 pools k and v with depthwise convolutions and then
    normalises them: the check runs with those convolutions reduced to subsampling (a kernel that is 1 at
    its centre, so the token counts stay) and without the k/v norms."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module) in ROTARY_ATTENTION:
            module.register_forward_pre_hook(_drop_rope, with_kwargs=True)
        if type(module) is mvitv2.MultiScaleAttention:
            for pool in (module.pool_k, module.pool_v):
                _subsample_only(pool)
            module.norm_k = module.norm_v = None
    return model


def _subsample_only(conv: nn.Conv2d) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layout_self_check(family: str) -> None:
    model = build(family)
    supported = [b for b in ps.blocks(model) if b.attention is not None and b.attention.unsupported is None]
    assert check_layout(prepared_for_layout_check(model), images(family, batch=1)) == len(supported) > 0


@pytest.mark.parametrize("family", [name for name in FAMILIES if patt_works(name)])
def test_patt_parity_through_the_layout(family: str) -> None:
    assert check_patt_parity(lambda: build(family), lambda: images(family, batch=1), "qkv") > 0


@pytest.mark.parametrize("family", ["beit", "eva02_fused_qv_bias", "dinov3_qkvb"])
def test_bypassed_qkv_is_operated_through_qkv_bias_separate(family: str) -> None:
    model = build(family)
    attention = ps.blocks(model)[0].attention
    assert attention.patches == {"qkv_bias_separate": True} and attention.has_bias
    x = images(family)
    with torch.no_grad():
        before = model(x)
    ps.apply(model, "patt")
    assert all(b.attention.module.qkv_bias_separate for b in ps.blocks(model))
    with torch.no_grad():
        assert torch.equal(model(x), before)
    ps.remove(model)
    assert not any(b.attention.module.qkv_bias_separate for b in ps.blocks(model))


@pytest.mark.parametrize("family", ["eva02_unfused", "rope_vit_unfused_gqa"])
def test_unfused_projections_keep_their_own_widths(family: str) -> None:
    attention = ps.blocks(build(family))[0].attention
    widths = {role: (p.module, p.width) for role, p in attention.projections.items()}
    module = attention.module
    assert widths == {
        "q": ("q_proj", module.q_proj.out_features),
        "k": ("k_proj", module.k_proj.out_features),
        "v": ("v_proj", module.v_proj.out_features),
    }
    if family == "rope_vit_unfused_gqa":
        assert module.k_proj.out_features == module.q_proj.out_features // 2


def test_parallel_scaling_block_is_its_own_attention() -> None:
    block = ps.blocks(build("vit_pwee_parallel_scaling"))[0]
    assert block.attention.path == block.path == "blocks.0"
    assert block.mlp.module is block.module.mlp_out_proj and block.mlp.input_module is block.module.in_proj
    hidden = block.module.in_split[0]
    assert [block.attention.projections[r].start for r in "qkv"] == [hidden, hidden + 64, hidden + 128]


HIERARCHICAL_VPT = r"prompt tokens cannot be added to \w+: it is hierarchical"
NO_SDPA_PREFIX = r"cannot operate on block 0 .*does not compute its attention with one F\.scaled_dot_product_attention"
NO_FLAT_GRID = r"method 'convpass' lays the patch tokens out on their grid and needs the flat token layout"
# The families of issue 14's item 1 under every registered method: "works" unless a refusal's regex is given.
EVERY_METHOD: Dict[str, Dict[str, str]] = {
    "siglip_map": {},
    "pe_core_map": {},
    "vit_parallel_things": {
        "vpt": r"run several attention/MLP branches side by side \(timm's ParallelThingsBlock\)",
        "convpass": NO_FLAT_GRID,
    },
    "sam2_hiera": {
        "prefix": NO_SDPA_PREFIX,
        "vpt": HIERARCHICAL_VPT,
        "convpass": NO_FLAT_GRID,
        # FacT's factors are shared across blocks of one width; Hiera's stages widen
        "fact": r"method 'fact' needs target 'q' in block 1 \('blocks\.1'\) to map width 32 to width 32",
    },
    "tnt": {
        "prefix": NO_SDPA_PREFIX,
        "vpt": r"TNT: each of its blocks also runs pixel-level inner tokens",
        "convpass": NO_FLAT_GRID,
        "adapter_plus": r"adds to the residual stream after the MLP, and block 0 \('blocks\.0', Block\) has no registered layout",
    },
}


@pytest.mark.parametrize(
    "family, method",
    # PATT and the adapter: test_family_contract
    [(f, m) for f in EVERY_METHOD for m in ps.METHODS if m not in ("patt", "adapter")],
)
def test_every_method_on_the_newly_reached_families(family: str, method: str, tmp_path) -> None:
    assert FAMILIES[family].patt == FAMILIES[family].adapter == WORKS
    outcome = check_method(lambda: build(family), lambda: images(family), method, tmp_path)
    assert_outcome(outcome, EVERY_METHOD[family].get(method, WORKS))


@pytest.mark.parametrize("family", ["siglip_map", "pe_core_map"])
def test_map_head_is_the_head_path_not_a_block(family: str) -> None:
    """The MAP pool is not a block and is left frozen; unfreeze=["attn_pool"] trains it, and the delta
    then carries it."""
    model = build(family)
    assert [b.path for b in ps.blocks(model)] == ["blocks.0", "blocks.1"]
    ps.apply(model, "patt")
    pool = {name: p.requires_grad for name, p in model.named_parameters() if name.startswith("attn_pool.")}
    assert pool and not any(pool.values())
    assert all(p.requires_grad for p in model.head.parameters())
    ps.remove(model)
    ps.apply(model, "patt", unfreeze=["attn_pool"])
    assert all(p.requires_grad for name, p in model.named_parameters() if name.startswith("attn_pool."))


@pytest.mark.parametrize("family", ["siglip_map", "pe_core_map"])
@pytest.mark.parametrize("deep", [True, False])
def test_vpt_prompts_leave_before_the_map_pool_attends(family: str, deep: bool) -> None:
    model = build(family)
    seen = []
    model.attn_pool.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model(images(family))
    ps.apply(model, "vpt", num_tokens=3, deep=deep)
    widths = []
    model.blocks[-1].register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    with torch.no_grad():
        model(images(family))
    assert seen[1] == seen[0] == model.num_prefix_tokens + model.patch_embed.num_patches
    assert widths == [seen[0] + 3]  # the prompts reach the last block and are dropped after it


def test_tnt_inner_and_outer_transformers_are_blocks_of_their_own() -> None:
    found = ps.blocks(build("tnt"))
    assert [(b.path, b.attention.path, b.mlp.path) for b in found] == [
        (f"blocks.{i}", f"blocks.{i}.{attn}", f"blocks.{i}.{mlp}")
        for i in range(2)
        for attn, mlp in (("attn_in", "mlp_in"), ("attn_out", "mlp"))
    ]


def test_parallel_branches_are_blocks_with_their_own_mlp_residual() -> None:
    model = build("vit_parallel_things")
    found = ps.blocks(model)
    assert [(b.attention.path, b.mlp.path) for b in found] == [
        (f"blocks.{i}.attns.{j}.attn", f"blocks.{i}.ffns.{j}.mlp") for i in range(2) for j in range(2)
    ]
    for block, (i, j) in zip(found, [(i, j) for i in range(2) for j in range(2)]):
        assert block.mlp.residual_input is model.blocks[i].ffns[j].norm
        assert block.mlp.residual_output is model.blocks[i].ffns[j].drop_path
