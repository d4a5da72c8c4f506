"""Bottleneck adapter (AdaptFormer): parity with AdaptFormer's block equations, init and counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import images, make_family, make_vit, randomize

import petl_surgery as ps
from petl_surgery.methods.adapter import BottleneckAdapter


def adapter_z(adapter: BottleneckAdapter, x: torch.Tensor, scale: float, layernorm=None) -> torch.Tensor:
    """AdaptFormer's AdaptMLP: s * up(relu(down(LN_in?(x)))), then LN_out? (dropout is off in eval)."""
    if layernorm == "in":
        x = F.layer_norm(x, x.shape[-1:], adapter.layernorm_in.weight, adapter.layernorm_in.bias)
    z = F.linear(F.relu(F.linear(x, adapter.down.weight, adapter.down.bias)), adapter.up.weight, adapter.up.bias) * scale
    if layernorm == "out":
        z = F.layer_norm(z, z.shape[-1:], adapter.layernorm_out.weight, adapter.layernorm_out.bias)
    return z


def reference_block(base_block, adapter, x, position, source, scale, layernorm=None):
    """A timm pre-norm block (ViT's or Swin's) with an adapter, from AdaptFormer's equations, run on an
    untouched copy of the block."""
    swin = hasattr(base_block, "_attn")
    shape = x.shape
    x1 = x + (base_block._attn(base_block.norm1(x)) if swin else base_block.ls1(base_block.attn(base_block.norm1(x))))
    if swin:
        x1 = x1.reshape(shape[0], -1, shape[-1])
    ls2 = getattr(base_block, "ls2", torch.nn.Identity())
    n = base_block.norm2(x1)
    y = base_block.mlp(n)
    if position == "sequential":
        out = x1 + ls2(y + adapter_z(adapter, y, scale, layernorm))
    elif source == "mlp":  # V-PETL: inside the MLP, on the MLP's input
        out = x1 + ls2(y + adapter_z(adapter, n, scale, layernorm))
    else:  # AdaptFormer's ViT: on the residual stream before norm2, added outside the MLP branch
        out = x1 + ls2(y) + adapter_z(adapter, x1, scale, layernorm)
    return out.reshape(shape)


VARIANTS = [("parallel", "mlp"), ("parallel", "residual"), ("sequential", "mlp")]


@pytest.mark.parametrize("position, source", VARIANTS)
@pytest.mark.parametrize("family", ["vit", "deit3", "swin"])
def test_adapter_equals_adaptformers_equations(family, position, source):
    model = make_family(family).double()
    base = copy.deepcopy(model)
    ps.apply(model, "adapter", position=position, input=source, scale=0.3)
    calls = []
    for block in ps.blocks(model):
        randomize(block.mlp.module.petl_adapter)
        block.module.register_forward_hook(lambda m, args, out, calls=calls: calls.append((m, args[0], out)))
    with torch.no_grad():
        model(images(family, dtype=torch.float64))
    base_blocks = {id(b.module): base_b.module for b, base_b in zip(ps.blocks(model), ps.blocks(base))}
    assert len(calls) == len(ps.blocks(model))
    for block, x, output in calls:
        expected = reference_block(base_blocks[id(block)], block.mlp.petl_adapter, x, position, source, 0.3)
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("layernorm", ["in", "out"])
def test_adapter_layernorm_options_follow_adaptformer(layernorm):
    model = make_vit().double()
    base = copy.deepcopy(model)
    ps.apply(model, "adapter", layernorm=layernorm)
    adapter = model.blocks[0].mlp.petl_adapter
    randomize(adapter)
    x = torch.randn(2, 17, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = reference_block(base.blocks[0], adapter, x, "parallel", "mlp", 0.1, layernorm)
        torch.testing.assert_close(model.blocks[0](x), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("position, source", VARIANTS)
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_lora_init_leaves_the_output_unchanged(family, position, source):
    model = make_family(family)
    x = images(family)
    before = model(x)
    ps.apply(model, "adapter", position=position, input=source)
    assert torch.equal(model(x), before)


def test_init_is_adaptformers_lora_init():
    adapter = ps.apply(make_vit(), "adapter").blocks[0].mlp.petl_adapter
    assert torch.count_nonzero(adapter.up.weight) == 0
    assert torch.count_nonzero(adapter.up.bias) == 0 and torch.count_nonzero(adapter.down.bias) == 0
    assert 0 < adapter.down.weight.abs().max() <= 1 / 64**0.5


def test_parameter_count_is_2dr_plus_r_plus_d_per_mlp():
    d, r, depth = 64, 16, 4
    model = ps.apply(make_vit(), "adapter", bottleneck=r)
    assert ps.summary(model).per_method == {"adapter": depth * (2 * d * r + r + d)}


def test_learnable_scale_is_one_trainable_scalar_starting_at_one():
    model = ps.apply(make_vit(), "adapter", scale="learnable", layernorm="in")
    adapter = model.blocks[0].mlp.petl_adapter
    assert isinstance(adapter.scale, torch.nn.Parameter) and adapter.scale.item() == 1.0
    assert adapter.scale.requires_grad
    assert ps.summary(model).per_method["adapter"] == 4 * (2 * 64 * 64 + 64 + 64 + 1 + 2 * 64)


def test_dropout_is_applied_in_training_only():
    model = make_vit()
    ps.apply(model, "adapter", dropout=0.5)
    adapter = model.blocks[0].mlp.petl_adapter
    randomize(adapter)
    x = torch.randn(2, 17, 64)
    assert torch.equal(adapter(x), adapter(x))
    adapter.train()
    torch.manual_seed(0)
    first = adapter(x)
    assert not torch.equal(first, adapter(x))


def test_sequential_adapter_cannot_read_the_residual_stream():
    with pytest.raises(ps.SurgeryError, match="'input'"):
        ps.apply(make_vit(), "adapter", position="sequential", input="residual")
