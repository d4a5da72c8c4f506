"""Prefix tuning: parity with attention written by hand, parameter counts, options, training, removal."""

from __future__ import annotations

from typing import List, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import assert_same_snapshot, images, make_family, make_vit, randomize, snapshot

import petl_surgery as ps
from petl_surgery.methods.prefix import PrefixTokens, pad_mask

D, DEPTH = 64, 4  # make_vit's width and depth


def capture_attention_calls(model) -> List[Tuple[torch.nn.Module, torch.Tensor, object, torch.Tensor]]:
    """Record (attention module, input, mask, output) of every attention call of one forward."""
    calls = []
    for block in ps.blocks(model):

        def hook(module, args, kwargs, output):
            calls.append((module, args[0], kwargs.get("mask", args[1] if len(args) > 1 else None), output))

        block.attention.module.register_forward_hook(hook, with_kwargs=True)
    return calls


def prefix_by_hand(prefix: PrefixTokens, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Pk, Pv) from the module's parameters: free tensors, or up(tanh(down(E))) split as [Pk | Pv]."""
    if hasattr(prefix, "keys"):
        return prefix.keys, prefix.values
    hidden = torch.tanh(prefix.embedding @ prefix.down.weight.T + prefix.down.bias)
    both = hidden @ prefix.up.weight.T + prefix.up.bias
    return both[:, :width], both[:, width:]


def reference_prefix_attention(attention, x, mask, keys, values):
    """Multi-head attention in which each query also attends to L prefix keys/values, from the
    definition: the prefix logits q Pk^T * scale get no bias and no mask; the token logits get the
    model's relative-position bias and shifted-window mask; one softmax over [prefix ; tokens]."""
    d = attention.qkv.out_features // 3
    q, k, v = F.linear(x, attention.qkv.weight, attention.qkv.bias).split(d, dim=-1)
    batch, tokens, _ = x.shape
    heads = attention.num_heads

    def split_heads(t):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    pk, pv = split_heads(keys[None])[0], split_heads(values[None])[0]  # heads, L, head_dim
    token_logits = (q * attention.scale) @ k.transpose(-2, -1)
    if hasattr(attention, "relative_position_bias_table"):
        token_logits = token_logits + attention._get_rel_pos_bias()
        if mask is not None:
            windows = mask.shape[0]
            shifted = token_logits.view(-1, windows, heads, tokens, tokens) + mask[None, :, None]
            token_logits = shifted.view_as(token_logits)
    prefix_logits = torch.einsum("bhnc,hlc->bhnl", q * attention.scale, pk)
    weights = torch.cat([prefix_logits, token_logits], dim=-1).softmax(dim=-1)
    out = torch.einsum("bhnl,hlc->bhnc", weights[..., : pk.shape[1]], pv) + weights[..., pk.shape[1] :] @ v
    return attention.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


def check_parity(family: str, randomized: bool, **options) -> None:
    model = make_family(family).double()
    ps.apply(model, "prefix", **options)
    if randomized:
        for module in model.modules():
            if isinstance(module, PrefixTokens):
                randomize(module)
    calls = capture_attention_calls(model)
    with torch.no_grad():
        model(images(family, dtype=torch.float64))
    assert len(calls) == len(ps.blocks(model))
    if family == "swin":
        assert any(mask is not None for _, _, mask, _ in calls), "the tiny Swin must shift windows"
    for attention, x, mask, output in calls:
        keys, values = prefix_by_hand(attention.petl_prefix, attention.qkv.out_features // 3)
        if not randomized:
            assert torch.count_nonzero(keys) == 0 and torch.count_nonzero(values) == 0
        expected = reference_prefix_attention(attention, x, mask, keys, values)
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_zero_prefix_equals_attention_with_zero_keys_and_values(family):
    check_parity(family, randomized=False, reparam=False, init="zero", length=5)


@pytest.mark.parametrize("reparam", [True, False])
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_random_prefix_equals_the_reference(family, reparam):
    check_parity(family, randomized=True, reparam=reparam, length=3, mid_dim=8)


def test_zero_prefix_changes_the_output_because_its_logits_take_softmax_mass():
    model = make_vit()
    before = model(images())
    ps.apply(model, "prefix", reparam=False, init="zero")
    assert not torch.allclose(model(images()), before)


@pytest.mark.parametrize(
    "options, per_layer",
    [
        ({"reparam": False}, 2 * 16 * D),
        ({"reparam": False, "length": 3}, 2 * 3 * D),
        ({}, 16 * D + D * 512 + 512 + 2 * D * 512 + 2 * D),
        ({"length": 4, "mid_dim": 32}, 4 * D + D * 32 + 32 + 2 * D * 32 + 2 * D),
    ],
)
def test_parameter_counts_follow_methods_md(options, per_layer):
    model = ps.apply(make_vit(), "prefix", **options)
    assert ps.summary(model).per_method == {"prefix": DEPTH * per_layer}


def test_defaults_are_recorded_and_the_module_is_hosted_on_the_attention():
    model = ps.apply(make_vit(), "prefix", layers=[1])
    prefix = model.blocks[1].attn.petl_prefix
    assert (prefix.method, prefix.block) == ("prefix", 1)
    assert prefix.options == {"length": 16, "reparam": True, "mid_dim": 512, "init": "reference"}
    assert prefix.embedding.shape == (16, D) and prefix.up.out_features == 2 * D


@pytest.mark.parametrize(
    "options, named",
    [
        ({"length": 0}, "'length'"),
        ({"length": 2.5}, "'length'"),
        ({"reparam": "yes"}, "'reparam'"),
        ({"mid_dim": -1}, "'mid_dim'"),
        ({"init": "xavier"}, "'init'"),
        ({"prefix_length": 4}, "valid options: length, reparam, mid_dim, init"),
    ],
)
def test_bad_options_raise_naming_the_option_and_leave_the_model_untouched(options, named):
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=named):
        ps.apply(model, "prefix", **options)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("reparam", [True, False])
def test_gradients_reach_every_prefix_parameter_and_no_frozen_one(reparam):
    model = ps.apply(make_vit(), "prefix", reparam=reparam, length=4, mid_dim=16)
    model(images()).square().mean().backward()
    for name, parameter in model.named_parameters():
        if ".petl_prefix." in name:
            assert parameter.requires_grad and parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        elif not parameter.requires_grad:
            assert parameter.grad is None, name


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_checkpoint_round_trip_is_exact(family, tmp_path):
    model = ps.apply(make_family(family), "prefix", length=4, mid_dim=16)
    expected = model(images(family))
    ps.save(model, tmp_path / "prefix.safetensors")
    fresh = ps.load(make_family(family), tmp_path / "prefix.safetensors")
    assert torch.equal(fresh(images(family)), expected)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_remove_restores_the_model_bit_for_bit(family):
    model = make_family(family)
    before, output = snapshot(model), model(images(family))
    attention_state = [dict(vars(block.attention.module)) for block in ps.blocks(model)]
    ps.apply(model, "prefix", length=4)
    model(images(family))
    ps.remove(model)
    assert_same_snapshot(before, snapshot(model))
    assert [dict(vars(block.attention.module)) for block in ps.blocks(model)] == attention_state
    assert torch.equal(model(images(family)), output)


def test_composes_with_patt(tmp_path):
    model = ps.apply(make_vit(), "patt", init="reference", mid_dim=8)
    patt_only = model(images())
    ps.apply(model, "prefix", length=4, mid_dim=16)
    both = model(images())
    assert not torch.allclose(both, patt_only)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(".petl_patt." in name for name in trainable) and any(".petl_prefix." in name for name in trainable)
    assert set(ps.summary(model).per_method) == {"patt", "prefix"}

    ps.save(model, tmp_path / "both.safetensors")
    fresh = ps.load(make_vit(), tmp_path / "both.safetensors")
    assert torch.equal(fresh(images()), both)

    ps.remove(model, "prefix")  # the prefix's forward goes with it; PATT stays
    assert "forward" not in vars(model.blocks[0].attn)
    assert torch.equal(model(images()), patt_only)


def test_attention_that_stops_calling_sdpa_raises_instead_of_running_without_the_prefix():
    model = ps.apply(make_vit(), "prefix", length=4)
    model.blocks[2].attn.fused_attn = False  # its inline path: no SDPA call to take the prefix
    with pytest.raises(ps.SurgeryRuntimeError, match=r"block 2 .*no F\.scaled_dot_product_attention call"):
        model(images())


def test_attention_without_sdpa_is_refused_with_the_model_untouched():
    # SwinV2's scaled cosine attention computes its softmax inline, never through SDPA.
    torch.manual_seed(0)
    model = timm.create_model(
        "swinv2_tiny_window8_256", img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
        num_classes=5,
    )
    before = snapshot(model)
    refusal = r"block 0 .*\(WindowAttention\) does not compute its attention with one F\.scaled_dot_product_attention"
    with pytest.raises(ps.SurgeryError, match=refusal):
        ps.apply(model, "prefix")
    assert_same_snapshot(before, snapshot(model))


def test_non_softmax_attention_is_refused_for_its_reason():
    torch.manual_seed(0)
    model = timm.create_model("xcit_nano_12_p16_224", img_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    with pytest.raises(ps.SurgeryError, match="cross-covariance attention"):
        ps.apply(model, "prefix", layers=0)


def test_masks_get_columns_that_let_every_query_attend_to_the_prefix():
    boolean = torch.tensor([[True, False], [False, True]])
    assert pad_mask(boolean, 2, 3).tolist() == [[True] * 3 + [True, False], [True] * 3 + [False, True]]
    additive = torch.full((1, 2, 2), float("-inf"))
    assert torch.equal(pad_mask(additive, 2, 1), torch.tensor([[[0.0, -1e999, -1e999]] * 2]))
    broadcast = torch.tensor([[-5.0]])  # one value for every key: it must not reach the prefix
    assert pad_mask(broadcast, 3, 2).tolist() == [[0.0, 0.0, -5.0, -5.0, -5.0]]
