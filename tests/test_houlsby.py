"""The Houlsby adapter: parity with Houlsby's equations on ViT and Swin, its init, its parameter count
(formula and ViT-B/16), options, and the family contract."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import assert_same_snapshot, images, make_family, make_vit, snapshot
from family_checks import check_method, randomize_inserted
from reference_blocks import assert_blocks_follow, tiny_coatnet

import petl_surgery as ps
from petl_surgery.hooks import hook_owner
from petl_surgery.methods.adapter import BottleneckAdapter

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu}


def houlsby(adapter: BottleneckAdapter, y: torch.Tensor, activation: str) -> torch.Tensor:
    """A(y) = y + W_u act(W_d y + b_d) + b_u."""
    hidden = ACTIVATIONS[activation](y @ adapter.down.weight.T + adapter.down.bias)
    return y + hidden @ adapter.up.weight.T + adapter.up.bias


@pytest.mark.parametrize("family, activation", [("vit", "gelu"), ("vit", "gelu_tanh"), ("deit3", "gelu"), ("swin", "gelu")])
def test_houlsby_equals_the_papers_equations_after_attention_and_mlp(family, activation):
    def apply(model):
        ps.apply(model, "houlsby", activation=activation)
        randomize_inserted(model, std=0.2)

    def reference(block):
        first, second = block.attn.petl_houlsby, block.mlp.petl_houlsby
        return {
            "attention": lambda attn, n: houlsby(first, attn(n), activation),
            "mlp": lambda mlp, n: houlsby(second, mlp(n), activation),
        }

    assert assert_blocks_follow(make_family(family), images(family), apply, reference) == len(ps.blocks(make_family(family)))


def test_parameter_count_is_2L_times_2dh_plus_h_plus_d():
    d, h, depth = 64, 8, 4
    assert ps.summary(ps.apply(make_vit(), "houlsby")).per_method == {"houlsby": 2 * depth * (2 * d * h + h + d)}
    assert ps.summary(ps.apply(make_vit(), "houlsby", bottleneck=3)).per_method == {"houlsby": 2 * depth * (2 * d * 3 + 3 + d)}


def test_vit_b16_counts_313536_at_h8_and_1198848_at_h32():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        assert ps.summary(ps.apply(model, "houlsby")).per_method == {"houlsby": 313_536}
        ps.remove(model)
        assert ps.summary(ps.apply(model, "houlsby", bottleneck=32)).per_method == {"houlsby": 1_198_848}
        ps.remove(model)
        # the "Adapter 0.16M" of Convpass's Table 1: one adapter per block, after the MLP (Pfeiffer's)
        assert ps.summary(ps.apply(model, "adapter", position="sequential", bottleneck=8)).per_method == {"adapter": 156_768}


def test_houlsby_init_is_near_identity_truncated_normal_and_lora_init_is_exact():
    torch.manual_seed(0)
    model = make_vit()
    x = images()
    before = model(x)
    ps.apply(model, "houlsby", init_std=0.01)
    weights = torch.cat([m.down.weight.flatten() for m in model.modules() if isinstance(m, BottleneckAdapter)])
    assert weights.abs().max() <= 0.02 and 0.006 < weights.std() < 0.01  # N(0, 0.01) cut at 2 std
    assert all(torch.count_nonzero(m.down.bias) == 0 and torch.count_nonzero(m.up.bias) == 0 for m in model.modules() if isinstance(m, BottleneckAdapter))
    after = model(x)
    assert not torch.equal(after, before) and (after - before).abs().max() < 1e-2
    ps.remove(model)
    ps.apply(model, "houlsby", init="lora")
    assert torch.equal(model(x), before)


def test_the_attention_adapter_hooks_the_output_projection_and_the_mlp_adapter_the_mlp():
    model = ps.apply(make_vit(), "houlsby")
    block = model.blocks[0]

    def owners(module):
        return [hook_owner(hook) for hook in module._forward_hooks.values() if isinstance(hook_owner(hook), BottleneckAdapter)]

    assert owners(block.attn.proj) == [block.attn.petl_houlsby] and owners(block.mlp) == [block.mlp.petl_houlsby]
    assert not owners(block.attn) and not owners(block)
    assert block.attn.petl_houlsby.method == block.mlp.petl_houlsby.method == "houlsby"


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_houlsby_meets_the_family_contract(family, tmp_path):
    # the contract starts from an exact identity: the "lora" init (Houlsby's own is near-identity)
    assert check_method(lambda: make_family(family), lambda: images(family), "houlsby", tmp_path, init="lora") == "works"


def test_houlsby_meets_the_family_contract_on_a_batchnorm_model_with_nchw_projections(tmp_path):
    assert check_method(tiny_coatnet, images, "houlsby", tmp_path, init="lora") == "works"


def test_an_attention_without_a_known_output_projection_is_refused_by_name():
    model = timm.create_model("levit_128s", img_size=64).eval()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=r"needs the output projection of the attention .*\(Attention\)"):
        ps.apply(model, "houlsby")
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(
    "options, named",
    [({"bottleneck": 0}, "'bottleneck'"), ({"activation": "tanh"}, "'activation'"), ({"init": "zero"}, "'init'"),
     ({"init_std": -1.0}, "'init_std'"), ({"dropout": 2.0}, "'dropout'"), ({"scale": 0.1}, "'scale'")],
)
def test_bad_options_are_refused_naming_the_option_before_any_change(options, named):
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=named):
        ps.apply(model, "houlsby", **options)
    assert_same_snapshot(before, snapshot(model))


def test_a_model_carrying_the_adapters_pickles_to_the_same_outputs():
    model = ps.apply(make_vit(), "houlsby", activation="gelu_tanh")
    x = images()
    out = model(x)
    assert torch.equal(pickle.loads(pickle.dumps(model))(x), out)
