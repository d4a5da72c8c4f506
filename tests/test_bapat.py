"""BAPAT: adapter and PATT together with V-PETL's published settings."""

from __future__ import annotations

import pytest
import torch
from conftest import images, make_swin, make_vit

import petl_surgery as ps
from petl_surgery.methods.adapter import BottleneckAdapter
from petl_surgery.methods.patt import ParallelAttentionBranch


def test_bapat_puts_patt_on_every_attention_and_an_adapter_on_every_mlp():
    model = ps.apply(make_swin(), "bapat")
    for block in ps.blocks(model):
        assert isinstance(block.attention.module.petl_bapat, ParallelAttentionBranch)
        assert isinstance(block.mlp.module.petl_bapat, BottleneckAdapter)


def test_bapat_defaults_are_v_petls_published_settings():
    model = ps.apply(make_vit(), "bapat")
    patt = model.blocks[0].attn.petl_bapat
    adapter = model.blocks[0].mlp.petl_bapat
    assert (patt.down.out_features, patt.scale, patt.up.out_features) == (128, 0.8, 2 * 64)
    assert (adapter.down.out_features, adapter.scale) == (64, 0.1)
    d, m, r = 64, 128, 64
    assert ps.summary(model).per_method == {"bapat": 4 * ((d * m + m + 2 * d * m + 2 * d) + (2 * d * r + r + d))}


def test_bapat_tells_the_two_scales_apart():
    model = ps.apply(make_vit(), "bapat", patt_scale=0.5, adapter_scale="learnable", mid_dim=8, bottleneck=4)
    patt = model.blocks[0].attn.petl_bapat
    adapter = model.blocks[0].mlp.petl_bapat
    assert patt.scale == 0.5 and patt.down.out_features == 8
    assert isinstance(adapter.scale, torch.nn.Parameter) and adapter.down.out_features == 4


def test_plain_scale_is_ambiguous_for_bapat():
    with pytest.raises(ps.SurgeryError, match="'patt_scale'.*'adapter_scale'"):
        ps.apply(make_vit(), "bapat", scale=0.5)


def test_bapat_options_are_validated_by_both_halves():
    with pytest.raises(ps.SurgeryError, match="'mode'"):
        ps.apply(make_vit(), "bapat", mode="kq")
    with pytest.raises(ps.SurgeryError, match="'bottleneck'"):
        ps.apply(make_vit(), "bapat", bottleneck=-1)


def test_bapat_at_zero_init_leaves_the_output_unchanged():
    model = make_swin()
    x = images("swin")
    before = model(x)
    ps.apply(model, "bapat")
    assert torch.equal(model(x), before)


def test_removing_bapat_removes_both_halves():
    model = ps.apply(make_vit(), "bapat")
    ps.remove(model, "bapat")
    assert not any("petl" in name for name, _ in model.named_modules())
