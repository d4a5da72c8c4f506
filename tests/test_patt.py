"""PATT (V-PETL): parity with the paper's equations, init, parameter counts and options."""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from conftest import VIT_FAMILY, images, make_family, make_vit, randomize

import petl_surgery as ps
from petl_surgery.methods import patt as patt_module
from petl_surgery.methods.fused import add_tanh_bottleneck_
from petl_surgery.methods.patt import ParallelAttentionBranch

MODES = ["kv", "qv", "qk", "qkv"]


def capture_attention_calls(model) -> List[Tuple[torch.nn.Module, torch.Tensor, object, torch.Tensor]]:
    """Record (attention module, input, mask, output) of every attention call of one forward."""
    calls = []
    handles = []
    for block in ps.blocks(model):
        attention = block.attention.module

        def hook(module, args, kwargs, output, calls=calls):
            calls.append((module, args[0], kwargs.get("mask", args[1] if len(args) > 1 else None), output))

        handles.append(attention.register_forward_hook(hook, with_kwargs=True))
    return calls, handles


def reference_patt_attention(attention, x, mask, branch: ParallelAttentionBranch, mode: str, scale: float):
    """Multi-head attention with PATT written from the V-PETL equations, straight from q, k and v:
    h = tanh(x A + a); [D1|D2] = h B + b; the two chosen of q, k, v get s * D1 and s * D2."""
    d = attention.qkv.out_features // 3
    q, k, v = F.linear(x, attention.qkv.weight, attention.qkv.bias).split(d, dim=-1)
    h = torch.tanh(x @ branch.down.weight.T + branch.down.bias)
    deltas = (h @ branch.up.weight.T + branch.up.bias).split(d, dim=-1)
    parts = {"q": q, "k": k, "v": v}
    for role, delta in zip(mode, deltas):
        parts[role] = parts[role] + scale * delta
    q, k, v = parts["q"], parts["k"], parts["v"]

    batch, tokens, _ = x.shape
    heads = attention.num_heads

    def split_heads(t):
        return t.reshape(batch, tokens, heads, -1).transpose(1, 2)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    logits = (q * attention.scale) @ k.transpose(-2, -1)
    if hasattr(attention, "relative_position_bias_table"):  # Swin: bias, then the shifted-window mask
        logits = logits + attention._get_rel_pos_bias()
        if mask is not None:
            windows = mask.shape[0]
            logits = (logits.view(-1, windows, heads, tokens, tokens) + mask[None, :, None]).view_as(logits)
    out = logits.softmax(dim=-1) @ v
    return attention.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_patt_equals_the_v_petl_equations_with_random_branch_weights(family, mode):
    model = make_family(family).double()
    ps.apply(model, "patt", mode=mode, scale=0.7)
    branches = {}
    for name, module in model.named_modules():
        if isinstance(module, ParallelAttentionBranch):
            randomize(module)
            branches[name.rsplit(".", 1)[0]] = module
    calls, _ = capture_attention_calls(model)
    with torch.no_grad():
        model(images(family, dtype=torch.float64))
    paths = {id(m): name for name, m in model.named_modules()}
    assert len(calls) == len(ps.blocks(model))
    if family == "swin":
        assert any(mask is not None for _, _, mask, _ in calls), "the tiny Swin must shift windows"
    for attention, x, mask, output in calls:
        branch = branches[paths[id(attention)]]
        expected = reference_patt_attention(attention, x, mask, branch, mode, 0.7)
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", list(VIT_FAMILY) + ["swin"])
def test_zero_init_leaves_the_output_unchanged(family):
    model = make_family(family)
    x = images(family)
    before = model(x)
    ps.apply(model, "patt")
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_reference_init_changes_the_output(family):
    model = make_family(family)
    x = images(family)
    before = model(x)
    ps.apply(model, "patt", init="reference")
    assert not torch.allclose(model(x), before)


def test_reference_init_is_pytorchs_linear_default_and_zero_init_zeroes_only_up():
    model = ps.apply(make_vit(), "patt", init="reference")
    branch = model.blocks[0].attn.petl_patt
    assert branch.up.weight.abs().max() > 0 and branch.up.bias.abs().max() > 0
    bound = 1 / branch.down.in_features**0.5  # kaiming-uniform(a=sqrt(5)) bound of nn.Linear
    assert branch.down.weight.abs().max() <= bound
    zero = ps.apply(make_vit(), "patt").blocks[0].attn.petl_patt
    assert torch.count_nonzero(zero.up.weight) == 0 and torch.count_nonzero(zero.up.bias) == 0
    assert torch.count_nonzero(zero.down.weight) > 0


@pytest.mark.parametrize("mode, parts", [("kv", 2), ("qv", 2), ("qk", 2), ("qkv", 3)])
def test_parameter_count_follows_methods_md(mode, parts):
    d, m, depth = 64, 128, 4
    model = ps.apply(make_vit(), "patt", mode=mode)
    per_layer = d * m + m + parts * d * m + parts * d
    assert ps.summary(model).per_method == {"patt": depth * per_layer}


def test_branch_biases_exist_exactly_when_qkv_has_a_bias():
    model = ps.apply(make_vit(qkv_bias=False), "patt", mid_dim=16)
    branch = model.blocks[0].attn.petl_patt
    assert branch.down.bias is None and branch.up.bias is None
    assert ps.summary(model).per_method["patt"] == 4 * (64 * 16 + 2 * 64 * 16)
    with_bias = ps.apply(make_vit(), "patt", mid_dim=16).blocks[0].attn.petl_patt
    assert with_bias.down.bias.shape == (16,) and with_bias.up.bias.shape == (128,)


def test_mid_dim_and_defaults_are_recorded():
    model = ps.apply(make_vit(), "patt", mid_dim=32)
    branch = model.blocks[0].attn.petl_patt
    assert branch.options == {"mode": "kv", "mid_dim": 32, "scale": 0.8, "init": "zero"}
    assert branch.down.out_features == 32


@pytest.mark.parametrize(
    "options, named",
    [
        ({"mode": "vk"}, "'mode'"),
        ({"mid_dim": 0}, "'mid_dim'"),
        ({"mid_dim": 2.5}, "'mid_dim'"),
        ({"scale": "big"}, "'scale'"),
        ({"init": "xavier"}, "'init'"),
        ({"rank": 4}, "'rank'"),
    ],
)
def test_bad_options_raise_naming_the_option_and_leave_the_model_untouched(options, named):
    model = make_vit()
    before = [name for name, _ in model.named_modules()]
    with pytest.raises(ps.SurgeryError, match=named):
        ps.apply(model, "patt", **options)
    assert [name for name, _ in model.named_modules()] == before


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ps.SurgeryError, match="valid options: mode, mid_dim, scale, init"):
        ps.apply(make_vit(), "patt", rank=4)


@pytest.mark.parametrize("biases", [True, False])
def test_fused_branch_backward_passes_gradcheck_in_float64(biases):
    generator = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    output, x = rand(2, 5, 12), rand(2, 5, 4)
    down_weight, up_weight = rand(3, 4), rand(6, 3)
    down_bias, up_bias = (rand(3), rand(6)) if biases else (None, None)

    def branch(output, x, down_weight, up_weight):
        return add_tanh_bottleneck_(output.clone(), 4, x, (down_weight, down_bias, up_weight, up_bias), 0.7)

    torch.autograd.gradcheck(branch, (output, x, down_weight, up_weight))
    if biases:
        torch.autograd.gradcheck(
            lambda a, b: add_tanh_bottleneck_(output.clone(), 4, x, (down_weight, a, up_weight, b), 0.7), (down_bias, up_bias)
        )
    delta = torch.tanh(x @ down_weight.T + (down_bias if biases else 0)) @ up_weight.T + (up_bias if biases else 0)
    expected = output.detach().clone()
    expected[..., 4:10] += 0.7 * delta
    torch.testing.assert_close(branch(output, x, down_weight, up_weight), expected)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_fused_path_gives_the_gradients_of_the_general_path(family, monkeypatch):
    def gradients(fused: bool):
        monkeypatch.setattr(patt_module, "fused_path_applies", lambda *args: fused)
        model = make_family(family).double().train()
        ps.apply(model, "patt", init="reference")
        x = images(family, dtype=torch.float64).requires_grad_(True)
        model(x).square().sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        return grads, x.grad

    fused_grads, fused_input = gradients(True)
    general_grads, general_input = gradients(False)
    assert fused_grads.keys() == general_grads.keys() and len(fused_grads) > 2
    for name, grad in general_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(fused_input, general_input, rtol=1e-10, atol=1e-12)
