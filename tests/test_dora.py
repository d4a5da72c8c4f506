"""DoRA: LoRA's targets and module with a magnitude per row, exact against the DoRA equation (computed
here), its norm detached, counts, merging, and the family contract."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import (
    assert_merges_to_plain,
    assert_same_snapshot,
    images,
    make_family,
    make_swin,
    make_vit,
    perturb_inserted,
    snapshot,
)
from family_checks import check_method

import petl_surgery as ps
from petl_surgery.methods.dora import WeightDecomposedAdapter
from petl_surgery.methods.lora import LowRankAdapter

ROWS = {"q": 0, "k": 1, "v": 2}


def layer_and_rows(block, target):
    """The timm module a target lives in and its rows there (qkv rows [q | k | v])."""
    if target in ROWS:
        width = block.attn.qkv.weight.shape[0] // 3
        return block.attn.qkv, slice(ROWS[target] * width, (ROWS[target] + 1) * width)
    layer = {"qkv": block.attn.qkv, "proj": block.attn.proj, "fc1": block.mlp.fc1, "fc2": block.mlp.fc2}[target]
    return layer, slice(0, layer.weight.shape[0])


def decomposed_by_hand(base, model, targets, scaling):
    """The base with each target's rows replaced by ``m * (W0 + s B A) / ||W0 + s B A||`` (row norms),
    the DoRA equation, computed here."""
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for block in ps.blocks(model):
            plain = expected.get_submodule(block.path)
            for target in targets:
                host = block.module.attn if target in ("q", "k", "v", "qkv", "proj") else block.module.mlp
                pair = getattr(host.petl_dora, target)
                layer, rows = layer_and_rows(plain, target)
                directed = layer.weight[rows] + scaling * pair.lora_B @ pair.lora_A
                layer.weight[rows] = pair.magnitude[:, None] * directed / directed.norm(dim=1, keepdim=True)
    return expected


@pytest.mark.parametrize(
    "family, targets",
    [("vit", ("q", "v")), ("vit", ("q", "k", "v", "proj", "fc1", "fc2")), ("vit", ("qkv", "fc2")), ("swin", ("k", "proj", "fc1"))],
)
def test_dora_equals_the_weight_decomposed_update(family, targets):
    base = make_family(family).double()
    model = perturb_inserted(ps.apply(copy.deepcopy(base), "dora", targets=targets, rank=4, alpha=6))
    x = images(family, dtype=torch.float64)
    torch.testing.assert_close(model(x), decomposed_by_hand(base, model, targets, 6 / 4)(x), rtol=0, atol=1e-10)


def test_init_is_loras_with_the_row_norms_as_magnitude_so_the_output_is_unchanged():
    base = make_vit()
    model = ps.apply(copy.deepcopy(base), "dora", targets=["q", "v", "fc1"])
    assert torch.equal(model(images()), base(images()))
    dora = model.blocks[0].attn.petl_dora
    assert isinstance(dora, WeightDecomposedAdapter) and isinstance(dora, LowRankAdapter)
    assert torch.count_nonzero(dora.q.lora_B) == 0
    torch.testing.assert_close(dora.v.magnitude, base.blocks[0].attn.qkv.weight[128:].norm(dim=1), rtol=0, atol=1e-6)


def test_the_norm_is_detached_in_backward():
    """Gradients of A, B and m are those of ``m * (W0 + s B A) / n`` with n a constant (DoRA 4.3, PEFT)."""
    model = perturb_inserted(ps.apply(make_vit().double(), "dora", targets=["q"], rank=2, alpha=2))
    qkv, pair = model.blocks[0].attn.qkv, model.blocks[0].attn.petl_dora.q
    seen = []
    handle = qkv.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    model(images(dtype=torch.float64))
    handle.remove()
    x, output = seen[0]
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = [pair.lora_A, pair.lora_B, pair.magnitude]
    ours = torch.autograd.grad((output * weights).sum(), params)

    def by_hand(detach):
        directed = qkv.weight[:64] + pair.lora_B @ pair.lora_A
        norm = directed.norm(dim=1, keepdim=True)
        q = F.linear(x, pair.magnitude[:, None] * directed / (norm.detach() if detach else norm), qkv.bias[:64])
        return torch.autograd.grad((q * weights[..., :64]).sum(), params)

    for got, expected in zip(ours, by_hand(detach=True)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(ours[0], by_hand(detach=False)[0], rtol=1e-6, atol=1e-9)


def test_parameter_count_is_r_times_in_plus_out_plus_out_per_target():
    r = 4
    model = ps.apply(make_vit(), "dora", rank=r, targets=["q", "v", "fc1"])
    assert ps.summary(model).per_method == {"dora": 4 * (2 * (r * (64 + 64) + 64) + r * (64 + 256) + 256)}


def test_vit_b16_count_on_q_and_v_is_2L_times_2dr_plus_d():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224")
    assert ps.summary(ps.apply(model, "dora", rank=8, targets=["q", "v"])).per_method == {"dora": 313_344}


def test_a_projection_followed_by_a_norm_is_refused_by_name():
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", img_size=64).eval()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="method 'dora' needs the weight of target 'v' .* LinearNorm"):
        ps.apply(model, "dora", targets=["v"])
    assert_same_snapshot(before, snapshot(model))


def test_bad_options_name_dora():
    with pytest.raises(ps.SurgeryError, match="option 'rank' of method 'dora'"):
        ps.apply(make_vit(), "dora", rank=0)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_family_contract(tmp_path, family):
    build = make_swin if family == "swin" else make_vit
    outcome = check_method(build, lambda: images(family), "dora", tmp_path, targets=["q", "v", "proj", "fc1", "fc2"], dropout=0.1)
    assert outcome == "works"


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_merged_outputs_equal_unmerged_and_the_state_dict_loads_into_a_plain_model(family):
    model = perturb_inserted(ps.apply(make_family(family), "dora", targets=["q", "v", "proj", "fc1", "fc2"], rank=4))
    assert_merges_to_plain(model, lambda: make_family(family), images(family))
