"""open_clip's VisionTransformer (sites/open_clip_layouts.py): the family contract for every method, with and
without layer scale, the custom block type, and equations checked against independent reimplementations
(deep VPT, prefix tuning, the adapter under layer scale)."""

from __future__ import annotations

import re
import sys
import types

import open_clip.transformer as open_clip_transformer
import pytest
import torch
import torch.nn.functional as F
from family_checks import check_method, randomize_inserted, revive
from torch import nn

import petl_surgery as ps
from petl_surgery.sites import registry

pytestmark = pytest.mark.slow  # a family sweep: -m "not slow" leaves it out


def test_a_zoos_layouts_register_once_its_module_is_imported(monkeypatch):
    # how open_clip's layouts register: petl_surgery never imports open_clip itself (seconds of import)
    calls = []
    monkeypatch.setattr(registry, "_DEFERRED", list(registry._DEFERRED))
    registry.register_when_imported("petl_surgery_test_zoo", lambda: calls.append("registered"))
    ps.blocks(nn.Linear(2, 2))
    assert calls == []
    monkeypatch.setitem(sys.modules, "petl_surgery_test_zoo", types.ModuleType("petl_surgery_test_zoo"))
    ps.blocks(nn.Linear(2, 2))
    ps.blocks(nn.Linear(2, 2))
    assert calls == ["registered"]


def vision(ls_init_value=None, block_type=None):
    def build():
        torch.manual_seed(0)
        return open_clip_transformer.VisionTransformer(
            image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2.0, output_dim=32,
            ls_init_value=ls_init_value, block_type=block_type,
        )

    return build


def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# name -> (build, make_input), for docs/make_coverage.py (FAMILY_MODULES)
COVERAGE = {
    "open_clip VisionTransformer": (vision(), images),
    "open_clip VisionTransformer, layer scale": (vision(1e-5), images),
    "open_clip VisionTransformer, block_type='custom'": (vision(0.5, block_type="custom"), images),
}
QKV_MLP = ("q", "k", "v", "fc1", "fc2")
METHODS = {
    "patt": {},
    "adapter": {},
    "adapter_residual": {"input": "residual"},
    "bapat": {},
    "lora": {"targets": ("q", "v", "fc1", "fc2")},
    "ssf": {"targets": QKV_MLP},
    "prefix": {"length": 4, "mid_dim": 16},
    "vpt": {"num_tokens": 3},
    "vpt_shallow": {"num_tokens": 3, "deep": False},
}


@pytest.mark.parametrize("ls_init_value", [None, 1e-5], ids=["no_layer_scale", "layer_scale"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_holds_to_the_family_contract(name, ls_init_value, tmp_path):
    method = name.split("_")[0]
    assert check_method(vision(ls_init_value), images, method, tmp_path, **METHODS[name]) == "works"


def test_ssf_default_targets_name_the_missing_output_projection(tmp_path):
    outcome = check_method(vision(), images, "ssf", tmp_path)
    assert re.match(r"refused: targets proj of method 'ssf' are not available in block 0", outcome)


def test_custom_blocks_take_the_mlp_methods_and_refuse_qkv_ones_by_name(tmp_path):
    build = vision(0.5, block_type="custom")
    assert check_method(build, images, "adapter", tmp_path) == "works"
    assert check_method(build, images, "lora", tmp_path, targets=("proj", "fc1", "fc2")) == "works"
    assert check_method(build, images, "vpt", tmp_path, num_tokens=2) == "works"
    for method in ("patt", "prefix", "lora"):
        outcome = check_method(build, images, method, tmp_path)
        assert "open_clip's Attention (block_type='custom')" in outcome, outcome


def _prompts(model, block):
    return model.transformer.resblocks[block].petl_vpt.prompts


def test_deep_vpt_equals_an_independent_reimplementation():
    model = revive(vision(0.5)()).double().eval()
    ps.apply(model, "vpt", num_tokens=3, dropout=0.0)
    randomize_inserted(model, std=0.1)
    x = images().double()
    with torch.no_grad():
        tokens = model.conv1(x).flatten(2).transpose(1, 2)
        cls = model.class_embedding.expand(x.shape[0], 1, -1)
        tokens = model.ln_pre(torch.cat([cls, tokens], dim=1) + model.positional_embedding)
        for index, block in enumerate(model.transformer.resblocks):
            prompts = _prompts(model, index).expand(x.shape[0], -1, -1)
            rest = tokens[:, 1:] if index == 0 else tokens[:, 4:]
            tokens = torch.cat([tokens[:, :1], prompts, rest], dim=1)
            h = block.ln_1(tokens)
            attended = F.multi_head_attention_forward(
                h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), 64, 2,
                block.attn.in_proj_weight, block.attn.in_proj_bias, None, None, False, 0.0,
                block.attn.out_proj.weight, block.attn.out_proj.bias, need_weights=False,
            )[0].transpose(0, 1)
            tokens = tokens + block.ls_1.gamma * attended
            tokens = tokens + block.ls_2.gamma * block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(tokens))))
        tokens = torch.cat([tokens[:, :1], tokens[:, 4:]], dim=1)
        expected = model.ln_post(tokens)[:, 0] @ model.proj
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def _attention_with_prefix(attention, x, keys, values):
    """Multi-head softmax attention of ``x`` (B, N, D) with the L x D prefix keys and values in front of
    its own, computed from the module's weights by hand."""
    q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    batch = x.shape[0]
    k = torch.cat([keys.expand(batch, -1, -1), k], dim=1)
    v = torch.cat([values.expand(batch, -1, -1), v], dim=1)
    heads = attention.num_heads
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5
    out = (scores.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)
    return attention.out_proj(out)


def test_prefix_equals_attention_with_the_prefix_keys_and_values_in_front():
    model = revive(vision(0.5)()).double().eval()
    ps.apply(model, "prefix", length=3, reparam=False)
    randomize_inserted(model, std=0.3)
    x = images().double()
    with torch.no_grad():
        tokens = model._embeds(x)
        for block in model.transformer.resblocks:
            keys, values = block.attn.petl_prefix()
            tokens = tokens + block.ls_1.gamma * _attention_with_prefix(block.attn, block.ln_1(tokens), keys, values)
            tokens = tokens + block.ls_2.gamma * block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(tokens))))
        expected = model.ln_post(tokens)[:, 0] @ model.proj
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_the_adapter_is_added_inside_the_layer_scale():
    model = revive(vision(0.5)()).double().eval()
    block = model.transformer.resblocks[0]
    x = torch.randn(2, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ps.apply(model, "adapter", bottleneck=4, scale=0.3, layers=[0])
    randomize_inserted(model, std=0.1)
    adapter = block.petl_adapter
    with torch.no_grad():
        residual = x + block.ls_1.gamma * block.attn(block.ln_1(x), block.ln_1(x), block.ln_1(x), need_weights=False)[0]
        h = block.ln_2(residual)
        mlp = block.mlp.c_proj(F.gelu(block.mlp.c_fc(h)))
        z = 0.3 * adapter.up(torch.relu(adapter.down(h)))
        expected = residual + block.ls_2.gamma * (mlp + z)
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_prefix_weights_cover_the_prefix_keys_and_the_output_is_the_same_with_them():
    model = ps.apply(vision()(), "prefix", length=2)
    attention = model.transformer.resblocks[0].attn
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        output, weights = attention(x, x, x)  # need_weights=True, PyTorch's default
        torch.testing.assert_close(output, attention(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)
    assert weights.shape == (2, 5, 2 + 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
