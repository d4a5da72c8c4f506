"""Adapter+: parity with the paper's post-adapter on ViT and Swin, channel-wise scaling, its init and
stochastic depth, its parameter count (formula and ViT-B/16), options, and the family contract."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import assert_same_snapshot, images, make_family, make_vit, snapshot
from family_checks import check_method, randomize_inserted
from reference_blocks import assert_blocks_follow, tiny_coatnet

import petl_surgery as ps
from petl_surgery.methods.adapter import BottleneckAdapter


def adapter_plus(adapter: BottleneckAdapter, x: torch.Tensor) -> torch.Tensor:
    """x + c * (W_u GELU(W_d x + b_d) + b_u), c one value per channel (stochastic depth is off in eval)."""
    return x + adapter.scale * (F.gelu(x @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias)


@pytest.mark.parametrize("family", ["vit", "deit3", "swin", "vit_res_post"])
def test_adapter_plus_equals_the_post_adapter_on_the_block_output(family):
    def apply(model):
        ps.apply(model, "adapter_plus")
        randomize_inserted(model, std=0.2)

    if family == "vit_res_post":  # post-norm: x1 = x + norm1(attn(x)); out = x1 + norm2(mlp(x1)); then the adapter
        model = make_family(family).double()
        apply(model)
        block = model.blocks[0]
        x = torch.randn(2, 17, 64, dtype=torch.float64)
        with torch.no_grad():
            x1 = x + block.norm1(block.attn(x))
            expected = adapter_plus(block.mlp.petl_adapter_plus, x1 + block.norm2(block.mlp.fc2(block.mlp.act(block.mlp.fc1(x1)))))
            torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-10)
        return

    def reference(block):
        return {"after": lambda out: adapter_plus(block.mlp.petl_adapter_plus, out)}

    assert assert_blocks_follow(make_family(family), images(family), apply, reference) > 0


def test_the_scale_is_one_trainable_value_per_channel_starting_at_one():
    adapter = ps.apply(make_vit(), "adapter_plus").blocks[0].mlp.petl_adapter_plus
    assert isinstance(adapter.scale, torch.nn.Parameter) and adapter.scale.requires_grad
    assert torch.equal(adapter.scale, torch.ones(64))
    assert adapter.layernorm_in is None and adapter.layernorm_out is None


def test_parameter_count_is_2dr_plus_r_plus_2d_per_block():
    d, r, depth = 64, 8, 4
    assert ps.summary(ps.apply(make_vit(), "adapter_plus")).per_method == {"adapter_plus": depth * (2 * d * r + r + 2 * d)}


def test_vit_b16_counts_165984_at_r8():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        assert ps.summary(ps.apply(model, "adapter_plus")).per_method == {"adapter_plus": 165_984}


def test_houlsby_init_is_truncated_normal_std_001_and_lora_init_is_exact():
    torch.manual_seed(0)
    model = make_vit()
    x = images()
    before = model(x)
    ps.apply(model, "adapter_plus")
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    weights = torch.cat([w.flatten() for m in adapters for w in (m.down.weight, m.up.weight)])
    assert weights.abs().max() <= 0.02 and 0.006 < weights.std() < 0.01
    assert all(torch.count_nonzero(m.down.bias) == 0 and torch.count_nonzero(m.up.bias) == 0 for m in adapters)
    assert not torch.equal(model(x), before)
    ps.remove(model)
    ps.apply(model, "adapter_plus", init="lora")
    assert torch.equal(model(x), before)


def test_stochastic_depth_drops_whole_samples_in_training_only():
    model = ps.apply(make_vit(), "adapter_plus", drop_path=0.5)
    adapter = model.blocks[0].mlp.petl_adapter_plus
    randomize_inserted(model, std=0.2)
    x = torch.randn(64, 5, 64)
    assert torch.equal(adapter(x), adapter(x))
    full = adapter(x)
    adapter.train()
    torch.manual_seed(0)
    dropped = adapter(x)
    kept = dropped.flatten(1).abs().sum(1) > 0
    assert 0 < kept.sum() < 64
    torch.testing.assert_close(dropped[kept], full[kept] * 2)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_adapter_plus_meets_the_family_contract(family, tmp_path):
    assert check_method(lambda: make_family(family), lambda: images(family), "adapter_plus", tmp_path, init="lora") == "works"


def test_adapter_plus_meets_the_family_contract_on_a_batchnorm_model(tmp_path):
    assert check_method(tiny_coatnet, images, "adapter_plus", tmp_path, init="lora") == "works"


def test_a_block_without_a_residual_layout_is_refused_by_name():
    model = timm.create_model("cait_xxs24_224", img_size=64, embed_dim=64, depth=2, num_heads=2, depth_token_only=1).eval()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=r"LayerScaleBlock\) has no registered layout of where the MLP's residual"):
        ps.apply(model, "adapter_plus")
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(
    "options, named",
    [({"bottleneck": -1}, "'bottleneck'"), ({"drop_path": 1.0}, "'drop_path'"), ({"init": "bert"}, "'init'"),
     ({"activation": "swish"}, "'activation'"), ({"scale": 2.0}, "'scale'")],
)
def test_bad_options_are_refused_naming_the_option_before_any_change(options, named):
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=named):
        ps.apply(model, "adapter_plus", **options)
    assert_same_snapshot(before, snapshot(model))
