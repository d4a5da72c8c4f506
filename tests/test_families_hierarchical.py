"""The family contract on timm's hierarchical, pyramid and convolutional-attention families.

Each family is one tiny configuration (timm-families.md), seeded inside its build function. Scales that
timm initialises to (near) zero so that a fresh model ignores its residual branches (SwinV2's res-post
norms, layer scales of 1e-5, LeViT's BatchNorms with weight 0) are set to 1, as in trained weights:
otherwise no change could reach the output and "works" could not be told from "silently unchanged".
"""

from __future__ import annotations

import contextlib
import re
from functools import partial
from typing import Callable, Dict, Tuple

import pytest
import timm
import torch
from family_checks import check_layout, check_method, check_patt_parity
from torch import nn

import petl_surgery as ps
from petl_surgery.patches import temporarily

pytestmark = pytest.mark.slow  # a family sweep: -m "not slow" leaves it out

# MaxViT/CoAtNet/MaxxViTv2 overlay their config: 4 stages of one block, 16-wide heads (>= 2 heads each).
MAXXVIT = dict(img_size=64, embed_dim=(32, 64, 128, 256), depths=(1, 1, 1, 1), transformer_dim_head=16)
PYRAMID = dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256), num_heads=(2, 2, 4, 8))
SWIN = dict(img_size=64, window_size=4, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def _wake(model: nn.Module) -> nn.Module:
    """Set (near-)zero initialised scales and norm weights to 1 (see the module docstring)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("weight", "gamma", "scale") and parameter.abs().max() < 1e-4:
                parameter.fill_(1.0)
    return model


def _caformer() -> nn.Module:
    from timm.models import metaformer as mf

    return mf.MetaFormer(
        depths=(1, 1, 1, 1),
        dims=(32, 64, 128, 256),
        token_mixers=[mf.SepConv, mf.SepConv, mf.Attention, mf.Attention],
        norm_layers=[mf.LayerNorm2dNoBias] * 2 + [mf.LayerNormNoBias] * 2,
        num_classes=5,
    )


def _frozen(model: nn.Module) -> nn.Module:
    """Twins-SVT feeds 6-D tensors to its Linear layers, whose float32 results move by ~1e-7 when their
    weights stop requiring grad (a PyTorch kernel choice, not surgery): freeze before the reference run,
    as apply does, so that "unchanged at zero init" can be checked exactly."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("head"))
    return model


# name -> (factory, input size)
FAMILIES: Dict[str, Tuple[Callable[[], nn.Module], int]] = {
    "swinv2": (lambda: timm.create_model("swinv2_tiny_window8_256", **SWIN), 64),
    "swinv2_cr": (lambda: timm.create_model("swinv2_cr_tiny_224", **SWIN), 64),
    "pvt_v2": (lambda: timm.create_model("pvt_v2_b0", **PYRAMID), 64),
    "pvt_v2_linear": (lambda: timm.create_model("pvt_v2_b2_li", **PYRAMID), 64),
    "twins_pcpvt": (lambda: timm.create_model("twins_pcpvt_small", **PYRAMID), 64),
    "twins_svt": (
        lambda: _frozen(timm.create_model("twins_svt_small", **{**PYRAMID, "depths": (2, 2, 2, 2)}, wss=[2] * 4)),
        64,
    ),
    "maxvit_rw": (lambda: timm.create_model("maxvit_nano_rw_256", **MAXXVIT), 64),
    "maxvit_tf": (lambda: timm.create_model("maxvit_tiny_tf_224", **MAXXVIT), 64),
    "coatnet": (lambda: timm.create_model("coatnet_nano_rw_224", **MAXXVIT), 64),
    "maxxvitv2": (lambda: timm.create_model("maxxvitv2_nano_rw_256", img_size=64), 64),
    # 128 px: the last stage keeps 2x2 tokens, so q and k matter there (at 1x1 their gradients vanish)
    "levit": (lambda: timm.create_model("levit_128s", img_size=128), 128),
    "levit_conv": (lambda: timm.create_model("levit_conv_128s", img_size=128), 128),
    "tiny_vit": (lambda: timm.create_model("tiny_vit_5m_224", **PYRAMID, window_sizes=(2, 2, 2, 2)), 64),
    "efficientformer": (
        lambda: timm.create_model("efficientformer_l1", depths=(1, 1, 1, 2), embed_dims=(16, 32, 64, 96), num_vit=1),
        224,
    ),
    "efficientformerv2": (lambda: timm.create_model("efficientformerv2_s0"), 224),
    "efficientvit_msra": (lambda: timm.create_model("efficientvit_m0", img_size=64), 64),
    "efficientvit_mit": (lambda: timm.create_model("efficientvit_b0"), 64),
    "gcvit": (lambda: timm.create_model("gcvit_xxtiny", img_size=64, window_size=(2, 2, 2, 2)), 64),
    "nextvit": (lambda: timm.create_model("nextvit_small"), 64),
    "davit": (lambda: timm.create_model("davit_tiny", **PYRAMID), 64),
    "davit_channel_v2": (lambda: timm.create_model("davit_tiny", **PYRAMID, channel_attn_v2=True), 64),
    "coat_lite": (lambda: timm.create_model("coat_lite_tiny", img_size=64), 64),
    "coat": (lambda: timm.create_model("coat_tiny", img_size=64), 64),
    "edgenext": (lambda: timm.create_model("edgenext_xx_small"), 64),
    "fastvit": (lambda: timm.create_model("fastvit_sa12"), 64),
    "visformer": (lambda: timm.create_model("visformer_tiny", img_size=64, embed_dim=96, depth=(1, 1, 1), num_heads=2), 64),
    "caformer": (_caformer, 64),
    "swiftformer": (lambda: timm.create_model("swiftformer_xs"), 64),
    "mobilevitv2": (lambda: timm.create_model("mobilevitv2_050"), 64),
    "repvit": (lambda: timm.create_model("repvit_m0_9"), 64),
    "shvit": (lambda: timm.create_model("shvit_s1"), 64),
    "iformer": (lambda: timm.create_model("iformer_t"), 64),
}

WORKS = "works"
NO_BLOCK = r"found no transformer block"
# family -> (patt, adapter): "works", or a regex the refusal must match.
EXPECTED: Dict[str, Tuple[str, str]] = {
    "swinv2": (WORKS, WORKS),
    "swinv2_cr": (WORKS, WORKS),
    "pvt_v2": (WORKS, WORKS),
    "pvt_v2_linear": (WORKS, WORKS),
    "twins_pcpvt": (WORKS, WORKS),
    "twins_svt": (WORKS, WORKS),
    "maxvit_rw": (WORKS, WORKS),
    "maxvit_tf": (WORKS, WORKS),
    "coatnet": (WORKS, WORKS),
    "maxxvitv2": (WORKS, WORKS),
    "levit": (WORKS, WORKS),
    "levit_conv": (WORKS, WORKS),
    "tiny_vit": (WORKS, WORKS),
    "efficientformer": (WORKS, WORKS),
    # The attention in the stage-4 downsample has no MLP beside it.
    "efficientformerv2": (WORKS, r"needs an MLP in block \d+ \('stages\.3\.downsample'\)"),
    "efficientvit_msra": (r"\(LocalWindowAttention\) is cascaded group attention", WORKS),
    "efficientvit_mit": (r"\(LiteMLA\) is ReLU linear attention", WORKS),
    "gcvit": (WORKS, WORKS),
    "nextvit": (WORKS, WORKS),
    "davit": (r"\(ChannelAttention\) attends over channels", WORKS),
    "davit_channel_v2": (r"\(ChannelAttentionV2\) attends over channels", WORKS),
    "coat_lite": (r"\(FactorAttnConvRelPosEnc\) is factorised attention", WORKS),
    # Parallel blocks hold three factorised attentions (and three MLPs) each: one block layout cannot name them.
    "coat": (r"'parallel_blocks\.0\.factoratt_crpe3' \(FactorAttnConvRelPosEnc\)",) * 2,
    "edgenext": (r"\(CrossCovarianceAttn\) is cross-covariance attention", WORKS),
    "fastvit": (WORKS, WORKS),
    "visformer": (WORKS, WORKS),
    "caformer": (WORKS, WORKS),
    "swiftformer": (r"\(EfficientAdditiveAttention\) is additive attention", WORKS),
    "mobilevitv2": (r"\(LinearSelfAttention\) is separable linear attention", WORKS),
    # No attention at all (RepViT), or attention-like mixers under other names (SHViT's SHSA, iFormer's SHMA).
    "repvit": (NO_BLOCK, NO_BLOCK),
    "shvit": (NO_BLOCK, NO_BLOCK),
    "iformer": (NO_BLOCK, NO_BLOCK),
}

# Families whose float64 layout self-check runs on the input of the attention's output projection
# instead of the attention's output, with the roles it can check there, and why:
LAYOUT_AT_PROJECTION: Dict[str, Tuple[str, ...]] = {
    # cosine attention normalises q and k, so a constant on k changes the attention: v only
    "swinv2": ("v",),
    "swinv2_cr": ("v",),
    # an activation sits between attn @ v and the output projection (proj = act + LinearNorm)
    "levit": ("k", "v"),
    "levit_conv": ("k", "v"),
    # the output is NCHW while the projections work on flattened tokens
    "fastvit": ("k", "v"),
    # talking heads mix the softmax output across heads and v also feeds a local conv: k only
    "efficientformerv2": ("k",),
}
PROJECTION_INPUT = {"efficientformerv2": "act"}

PATT_WORKS = [name for name, (patt, _) in EXPECTED.items() if patt == WORKS]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[name][0]()
    model.reset_classifier(5)
    if name.startswith("levit") or name == "efficientvit_msra":
        _heads_without_batchnorm(model)
    return _wake(model).eval()


def _heads_without_batchnorm(model: nn.Module) -> None:
    """LeViT's and EfficientViT's heads start with a BatchNorm, which in train mode cancels any shift shared by the whole
    batch, e.g. the last adapter's bias, whose gradient is then exactly zero; heads without it let the
    gradient check see every inserted tensor."""
    for name in ("head", "head_dist"):
        head = getattr(model, name, None)
        if head is not None:
            head.bn = nn.Identity()


def images(name: str, batch: int = 2) -> torch.Tensor:
    size = FAMILIES[name][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


# name -> (build, make_input), read by docs/make_coverage.py
COVERAGE = {f"timm {name}": (partial(build, name), partial(images, name)) for name in FAMILIES}

def assert_outcome(outcome: str, expected: str) -> None:
    if expected == WORKS:
        assert outcome == WORKS
    else:
        assert outcome.startswith("refused: ") and re.search(expected, outcome), outcome


@pytest.mark.parametrize("method", ["patt", "adapter"])
@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_contract(family, method, tmp_path):
    outcome = check_method(lambda: build(family), lambda: images(family), method, tmp_path)
    assert_outcome(outcome, EXPECTED[family][0 if method == "patt" else 1])


@pytest.mark.parametrize(
    "family, method",
    [("davit", "patt"), ("efficientformerv2", "adapter"), ("efficientvit_mit", "patt"), ("coat_lite", "patt")],
)
def test_skip_unsupported_operates_on_the_rest(family, method, tmp_path):
    """DaViT mixes window attention (supported) and channel attention (refused); skip_unsupported operates
    on the supported blocks only. Where nothing is supported, it still refuses, naming the reason."""
    outcome = check_method(lambda: build(family), lambda: images(family), method, tmp_path, skip_unsupported=True)
    if family in ("davit", "efficientformerv2"):
        assert outcome == WORKS
    else:
        assert outcome.startswith("refused: ") and "can operate on none" in outcome


def test_davit_patt_skips_exactly_the_channel_attention_blocks():
    model = ps.apply(build("davit"), "patt", skip_unsupported=True)
    for block in ps.blocks(model):
        has_branch = hasattr(block.attention.module, "petl_patt")
        assert has_branch == (type(block.attention.module).__name__ == "WindowAttention"), block


def test_gcvit_global_blocks_have_no_q_so_modes_with_q_are_refused(tmp_path):
    kinds = {block.attention.module.use_global for block in ps.blocks(build("gcvit"))}
    assert kinds == {True, False}
    outcome = check_method(lambda: build("gcvit"), lambda: images("gcvit"), "patt", tmp_path, mode="qkv")
    assert outcome.startswith("refused: ") and "only projects k, v" in outcome


def test_swinv2_patch_keeps_the_output_identical():
    model = build("swinv2")
    x = images("swinv2")
    with torch.no_grad():
        before = model(x)
    site = ps.blocks(model)[0].attention
    assert site.patches == {"qkv_bias_separate": True}
    with contextlib.ExitStack() as stack, torch.no_grad():
        for block in ps.blocks(model):
            stack.enter_context(temporarily(block.attention.module, dict(block.attention.patches)))
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_blocks_are_numbered_across_stages_in_depth_order():
    model = build("maxvit_rw")
    paths = [block.path for block in ps.blocks(model)]
    maxvit_blocks = [name for name, m in model.named_modules() if type(m).__name__ == "MaxxVitBlock"]
    assert paths == [f"{name}.{part}" for name in maxvit_blocks for part in ("attn_block", "attn_grid")]
    assert [b.path for b in ps.blocks(build("pvt_v2"))] == [f"stages.{i}.blocks.0" for i in range(4)]


@pytest.mark.parametrize("family", PATT_WORKS)
def test_layout_self_check(family):
    model, x = build(family), images(family, batch=1)
    supported = sum(1 for b in ps.blocks(model) if b.attention is not None and b.attention.unsupported is None)
    if family in LAYOUT_AT_PROJECTION:
        readout = PROJECTION_INPUT.get(family, "proj")
        assert check_layout(model, x, roles=LAYOUT_AT_PROJECTION[family], readout=readout) == supported
    else:
        assert check_layout(model, x) == supported


@pytest.mark.parametrize("family", PATT_WORKS)
def test_patt_parity_through_the_layout(family):
    assert check_patt_parity(lambda: build(family), lambda: images(family, batch=1), "kv") > 0
