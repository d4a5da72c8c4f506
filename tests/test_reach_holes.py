"""Models outside the family sweeps that were refused or misbehaved (issue 19, item 9; docs/reach-notes.md):
timm's mixed-rotary ViT, MobileNetV4-hybrid's multi-query attention, and PATT on Visformer. (Prefix tuning
on VideoMAE under eager is specified in test_families_transformers_legacy.py.)"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import timm
from packaging.version import Version
import torch
import torch.nn.functional as F
from family_checks import WORKS, check_layout, check_method, check_patt_parity, revive
from timm.models._efficientnet_blocks import MobileAttention
from torch import nn
from torch.overrides import TorchFunctionMode

import petl_surgery as ps
from petl_surgery.sites import discover

ALL_METHODS = tuple(ps.METHODS)


# ---------------------------------------------------------------- ViT with mixed rotary embeddings


def rope_mixed_vit() -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(
            "vit_base_patch16_rope_mixed_224", pretrained=False, img_size=32, embed_dim=64, depth=2, num_heads=2,
            num_classes=5,
        ).eval()


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_a_rotary_embedding_is_not_taken_for_attention() -> None:
    model = rope_mixed_vit()
    assert type(model.rope).__name__ == "RotaryEmbeddingMixed" and hasattr(model.rope, "num_heads")
    assert discover(model).unsupported == []


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_on_the_mixed_rope_vit(method: str, tmp_path) -> None:
    assert check_method(rope_mixed_vit, lambda: images(32), method, tmp_path) == WORKS


@pytest.mark.parametrize("mode", ["kv", "qkv"])
def test_patt_on_the_mixed_rope_vit_is_the_v_petl_branch_before_the_rotation(mode: str) -> None:
    """PATT adds to the projection's output, so its q/k part is rotated with the model's own q and k.
    (timm 1.0.30's RotaryEmbeddingMixed computes its frequencies in float32 whatever the model's dtype, so
    the plain model cannot run in float64 there: the check runs in float32 then.)"""
    assert check_patt_parity(rope_mixed_vit, lambda: images(32), mode, dtype=ROPE_MIXED_DTYPE) == 2


# float64, except on timm 1.0.30, whose RotaryEmbeddingMixed cannot run in it (on newer timm a model that
# stops running in float64 fails the test instead of being checked in float32)
ROPE_MIXED_DTYPE = torch.float32 if Version(timm.__version__) < Version("1.0.31") else torch.float64


class _SdpaKeys(TorchFunctionMode):
    """Records the keys of every F.scaled_dot_product_attention call."""

    def __init__(self) -> None:
        super().__init__()
        self.keys = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.keys.append(args[1] if len(args) > 1 else kwargs["key"])
        return func(*args, **kwargs)


def test_prefix_keys_have_no_position_under_rope() -> None:
    """Rotary embeddings rotate the model's own keys by their patch position; the prefix keys join after
    the rotation, as learned (Li & Liang's prefix is past_key_values, which hold rotated keys)."""
    model = ps.apply(rope_mixed_vit(), "prefix", length=3, reparam=False)
    prefixes = [block.attention.module.petl_prefix for block in ps.blocks(model)]
    with torch.no_grad():
        for prefix in prefixes:
            prefix.keys.copy_(torch.randn(prefix.keys.shape, generator=torch.Generator().manual_seed(2)))
    recorder = _SdpaKeys()
    with torch.no_grad(), recorder:
        model(images(32))
    assert len(recorder.keys) == len(prefixes)
    for keys, prefix in zip(recorder.keys, prefixes):
        heads = keys.shape[1]
        expected = prefix.keys.view(3, heads, -1).transpose(0, 1)  # (heads, L, head_dim)
        for sample in keys:
            assert torch.equal(sample[:, :3], expected)


# ---------------------------------------------------------------- MobileNetV4-hybrid's MobileAttention


class TinyHybrid(nn.Module):
    """A stem, one MobileNetV4 multi-query attention block (k/v on a stride-2 depthwise reduction of the
    tokens, one k/v head shared by two query heads), pooling and a head: MobileNetV4-hybrid's attention in
    a model that builds in milliseconds."""

    def __init__(self, multi_query: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), nn.BatchNorm2d(32), nn.ReLU())
        self.block = MobileAttention(
            32, 32, num_heads=2, key_dim=16, value_dim=16, use_multi_query=multi_query, kv_stride=2,
            layer_scale_init_value=None,
        )
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def tiny_hybrid(multi_query: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return TinyHybrid(multi_query).eval()


@pytest.mark.parametrize("multi_query", [True, False], ids=["MultiQueryAttention2d", "Attention2d"])
def test_mobile_attention_layout_self_check_and_patt_parity(multi_query: bool) -> None:
    model = revive(tiny_hybrid(multi_query))
    assert [block.attention.path for block in ps.blocks(model)] == ["block.attn"]
    assert check_layout(model, images(32)) == 1
    assert check_patt_parity(lambda: revive(tiny_hybrid(multi_query)), lambda: images(32)) == 1


@pytest.mark.parametrize("method", ["patt", "lora"])
def test_methods_on_mobile_attention(method: str, tmp_path) -> None:
    assert check_method(tiny_hybrid, lambda: images(32), method, tmp_path) == WORKS


@pytest.mark.parametrize(
    "method, reason",
    [
        ("adapter", r"needs an MLP in block 0 \('block'\)"),
        ("prefix", r"\(MultiQueryAttention2d\) does not compute its attention with one F.scaled_dot_product_attention"),
        ("vpt", r"prompt tokens cannot be added to TinyHybrid"),
    ],
)
def test_what_mobile_attention_cannot_take_is_refused_by_name(method: str, reason: str) -> None:
    with pytest.raises(ps.SurgeryError, match=reason):
        ps.apply(tiny_hybrid(), method)


def test_mobilenetv4_hybrid_is_not_refused() -> None:
    with torch.device("meta"):
        model = timm.create_model("mobilenetv4_hybrid_medium", pretrained=False)
    assert discover(model).unsupported == []
    assert {type(block.attention.module).__name__ for block in ps.blocks(model)} == {"MultiQueryAttention2d"}


# ---------------------------------------------------------------- differential attention (found by the variant sweep)


def differential_vit(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=32, embed_dim=64, depth=2, num_heads=2, num_classes=5).eval()


DIFFERENTIAL = ("vit_dwee_patch16_reg1_gap_256", "vit_dpwee_patch16_reg1_gap_256")


@pytest.mark.parametrize("name", DIFFERENTIAL)
def test_differential_attention_layout_self_check_and_patt_parity(name: str) -> None:
    """Two softmax maps over tokens, subtracted: a constant on k leaves both unchanged (v's check does not
    hold through the per-head RMSNorm after the product, so only k is checked)."""
    assert check_layout(differential_vit(name), images(32), roles=("k",)) == 2
    assert check_patt_parity(lambda: differential_vit(name), lambda: images(32)) == 2


@pytest.mark.parametrize("name", DIFFERENTIAL)
def test_differential_attention_refuses_a_prefix_naming_its_two_calls(name: str) -> None:
    with pytest.raises(ps.SurgeryError, match=r"is differential attention: two SDPA calls"):
        ps.apply(differential_vit(name), "prefix")


# name -> (build, make_input): read by test_layouts.py (every registered class is met by a swept model)
COVERAGE = {
    **{f"timm {name} (tiny)": (partial(differential_vit, name), partial(images, 32)) for name in DIFFERENTIAL},
    "timm vit_base_patch16_rope_mixed_224 (tiny)": (rope_mixed_vit, lambda: images(32)),
    "timm MobileAttention, multi-query (tiny)": (tiny_hybrid, lambda: images(32)),
    "timm MobileAttention, Attention2d (tiny)": (lambda: tiny_hybrid(False), lambda: images(32)),
}


# ---------------------------------------------------------------- PATT on Visformer

# Deep enough for the growth of its residual stream to show (2, 4, 4 blocks), small enough to be quick.
VISFORMER = dict(img_size=64, embed_dim=96, depth=(2, 4, 4), num_heads=2, num_classes=5)


def visformer(calibrated: bool) -> nn.Module:
    """A Visformer whose running statistics are a fresh BatchNorm's (mean 0, variance 1), or, calibrated,
    the statistics of the data it is trained on, as a trained (pretrained) base carries them."""
    torch.manual_seed(0)
    model = timm.create_model("visformer_tiny", pretrained=False, **VISFORMER)
    if calibrated:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = None  # a cumulative average over the calibration batches
        model.train()
        with torch.no_grad():
            for seed in range(4):
                model(torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(10 + seed)))
    return model.eval()


def sgd_losses(model: nn.Module, steps: int = 3, lr: float = 0.05) -> list:
    """Cross-entropy of ``steps`` plain SGD steps in train mode (no gradient clipping), as users train."""
    x, y = images(64, batch=8), torch.arange(8) % 5
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_untrained_visformer_statistics_do_not_normalise() -> None:
    """The cause of PATT's NaN on Visformer: its norms are all BatchNorm, which in eval mode (frozen
    statistics) divide by the running variance; a fresh BatchNorm's (1) does not normalise an untrained
    base, whose residual stream grows block by block, so its logits start ~100x too large and any
    training of a frozen base (the head alone too) diverges. A base with statistics trains."""
    with torch.no_grad():
        assert visformer(calibrated=False)(images(64, batch=8)).std() > 20
        assert visformer(calibrated=True)(images(64, batch=8)).std() < 5


@pytest.mark.parametrize("statistics", ["frozen", "adapt"])
def test_patt_on_visformer_trains_three_sgd_steps(statistics: str) -> None:
    """Frozen statistics on a base that has them, or statistics adapted (trained with the delta) on an
    untrained base: three SGD steps at lr 0.05 stay finite and lower the loss."""
    model = ps.apply(visformer(calibrated=statistics == "frozen"), "patt", statistics=statistics)
    losses = sgd_losses(model)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
