"""LoRA: each target its own low-rank update, exact against the LoRA equation, and merging."""

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

import petl_surgery as ps
from petl_surgery.methods.base import MergeableModule
from petl_surgery.methods.lora import LowRankAdapter

D, DEPTH = 64, 4


def with_random_b(model, std=0.1):
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * std)
    return model


def updated_by_hand(base, model, targets, scaling):
    """A copy of the base model whose weights get ``W[rows] += scaling * B A``, computed here from the
    LoRA equation and the known timm layouts (qkv rows [q | k | v], all of them for "qkv", proj, fc1,
    fc2)."""
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for index, block in enumerate(model.blocks):
            for target in targets:
                host = block.attn if target in ("q", "k", "v", "qkv", "proj") else block.mlp
                pair = getattr(host.petl_lora, target)
                delta = scaling * pair.lora_B @ pair.lora_A
                if target == "qkv":
                    merged.blocks[index].attn.qkv.weight += delta
                elif target in ("q", "k", "v"):
                    rows = slice("qkv".index(target) * D, ("qkv".index(target) + 1) * D)
                    merged.blocks[index].attn.qkv.weight[rows] += delta
                else:
                    layer = {"proj": merged.blocks[index].attn.proj, "fc1": merged.blocks[index].mlp.fc1,
                             "fc2": merged.blocks[index].mlp.fc2}[target]
                    layer.weight += delta
    return merged


@pytest.mark.parametrize(
    "targets", [("q", "v"), ("k",), ("q", "k", "v", "proj", "fc1", "fc2"), ("qkv", "proj", "fc1", "fc2")]
)
def test_lora_equals_the_low_rank_update_of_the_weights(targets):
    base = make_vit().double()
    model = with_random_b(ps.apply(copy.deepcopy(base), "lora", targets=targets, rank=4, alpha=6))
    expected = updated_by_hand(base, model, targets, scaling=6 / 4)
    x = images(dtype=torch.float64)
    torch.testing.assert_close(model(x), expected(x), rtol=0, atol=1e-10)


def test_each_target_gets_its_own_a_and_b_spanning_only_its_rows():
    model = ps.apply(make_vit(), "lora", rank=8)
    lora = model.blocks[0].attn.petl_lora
    assert [name for name, _ in lora.named_children() if name != "dropout"] == ["q", "v"]
    assert lora.q.lora_A.shape == (8, D) and lora.q.lora_B.shape == (D, 8)
    assert lora.q.lora_A is not lora.v.lora_A


def test_qkv_target_is_one_update_of_the_whole_fused_weight():
    """Target "qkv": the fused Linear's output is ``x (W + (alpha / r) B A)^T + b`` over all 3d rows,
    with one A (r x d) and one B (3d x r), as PEFT's LoRA on that Linear."""
    model = with_random_b(ps.apply(make_vit().double(), "lora", targets="qkv", rank=4, alpha=6))
    lora, qkv = model.blocks[0].attn.petl_lora, model.blocks[0].attn.qkv
    assert [name for name, _ in lora.named_children() if name != "dropout"] == ["qkv"]
    assert lora.qkv.lora_A.shape == (4, D) and lora.qkv.lora_B.shape == (3 * D, 4)
    seen = []

    def record(module, args, output):  # registered after surgery: sees the output the model goes on with
        seen.append((args[0], output))

    handle = qkv.register_forward_hook(record)
    with torch.no_grad():
        model(images(dtype=torch.float64))
    handle.remove()
    x, output = seen[0]
    updated = qkv.weight + 6 / 4 * lora.qkv.lora_B @ lora.qkv.lora_A
    torch.testing.assert_close(output, F.linear(x, updated, qkv.bias), rtol=0, atol=1e-12)


def test_qkv_parameter_count_is_r_times_d_plus_3d_per_block():
    r = 4
    model = ps.apply(make_vit(), "lora", rank=r, targets=["qkv"])
    assert ps.summary(model).per_method == {"lora": DEPTH * r * (D + 3 * D)}


@pytest.mark.parametrize(
    "name, build, reason",
    [
        ("separate q/k/v Linears (RoPE ViT unfused)", lambda: timm.create_model(
            "vit_small_patch16_rope_224", img_size=64, embed_dim=64, depth=2, num_heads=2, qkv_fused=False),
            r"q, k and v come from 3 modules \('q_proj', 'k_proj', 'v_proj'\)"),
        ("per-head qkv (MaxViT rw)", lambda: timm.create_model(
            "maxvit_nano_rw_256", img_size=64, embed_dim=(32, 64, 128, 256), depths=(1, 1, 1, 1), transformer_dim_head=16),
            "'qkv' lays q, k and v out per head, interleaved"),
        ("in_proj = [mlp | q | k | v] (parallel ViT)", lambda: timm.create_model(
            "vit_pwee_patch16_reg1_gap_256", img_size=64, embed_dim=64, depth=2, num_heads=2),
            r"'in_proj' also outputs \d+ other channels"),
    ],
)
@pytest.mark.parametrize("method", ["lora", "ssf"])
def test_qkv_target_is_refused_where_q_k_v_are_not_one_whole_output(method, name, build, reason):
    torch.manual_seed(0)
    model = build().eval()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=f"targets qkv of method '{method}' are not available in block 0 .*{reason}"):
        ps.apply(model, method, targets="qkv")
    assert_same_snapshot(before, snapshot(model))


def test_init_is_kaiming_uniform_a_and_zero_b_so_the_output_is_unchanged():
    model = make_vit()
    before = model(images())
    ps.apply(model, "lora", targets=["q", "k", "v", "proj", "fc1", "fc2"])
    assert torch.equal(model(images()), before)
    pair = model.blocks[0].attn.petl_lora.q
    assert torch.count_nonzero(pair.lora_B) == 0 and 0 < pair.lora_A.abs().max() <= 1 / D**0.5


def test_parameter_count_is_r_times_in_plus_out_per_target():
    r = 4
    model = ps.apply(make_vit(), "lora", rank=r, targets=["q", "v", "fc1"])
    per_block = 2 * r * (D + D) + r * (D + 4 * D)
    assert ps.summary(model).per_method == {"lora": 4 * per_block}


def test_alpha_defaults_to_rank_and_is_recorded_resolved():
    lora = ps.apply(make_vit(), "lora", rank=4).blocks[0].attn.petl_lora
    assert lora.scaling == 1.0
    assert lora.options == {"rank": 4, "alpha": 4.0, "dropout": 0.0, "targets": ("q", "v"), "modules": None}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"targets": ["q", "x"]}, "'targets'"),
        ({"targets": []}, "'targets'"),
        ({"targets": ["q", "q"]}, "'targets'"),
        ({"targets": ["qkv", "q"]}, "option 'targets' of method 'lora' names 'qkv' together with 'q'"),
        ({"rank": 0}, "'rank'"),
        ({"dropout": 2.0}, "'dropout'"),
        ({"r": 4}, "unknown option 'r' for method 'lora'; valid options: rank, alpha, dropout, targets"),
    ],
)
def test_bad_options_raise_and_change_nothing(options, message):
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=message):
        ps.apply(model, "lora", **options)
    assert_same_snapshot(before, snapshot(model))


def test_a_target_the_block_does_not_offer_is_refused():
    # torchvision's Swin computes its output projection with F.linear inside its own function.
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=5
    )
    with pytest.raises(ps.SurgeryError, match="targets proj of method 'lora' are not available in block 0"):
        ps.apply(model, "lora", targets=["q", "proj"])


def test_gradients_reach_every_lora_tensor_and_no_frozen_one():
    model = with_random_b(ps.apply(make_swin(), "lora", targets=["q", "k", "v", "proj", "fc1", "fc2"]))
    model(images("swin")).square().sum().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


# ---------------------------------------------------------------- merge


def test_merge_touches_only_the_targeted_rows_with_a_rank_r_update():
    base = make_vit()
    model = with_random_b(ps.apply(copy.deepcopy(base), "lora", rank=3))
    ps.merge(model)
    delta = model.blocks[1].attn.qkv.weight - base.blocks[1].attn.qkv.weight
    q, k, v = delta.split(D)
    assert torch.count_nonzero(k) == 0
    assert torch.linalg.matrix_rank(q) <= 3 and torch.linalg.matrix_rank(v) <= 3 and torch.count_nonzero(q) > 0
    assert torch.equal(model.blocks[1].attn.proj.weight, base.blocks[1].attn.proj.weight)


def test_merge_adds_the_qkv_update_to_every_row_of_the_fused_weight():
    base = make_vit()
    model = with_random_b(ps.apply(copy.deepcopy(base), "lora", targets="qkv", rank=3, alpha=6))
    pair = model.blocks[1].attn.petl_lora.qkv
    expected = base.blocks[1].attn.qkv.weight + 2.0 * pair.lora_B @ pair.lora_A
    x = images()
    unmerged = model(x)
    ps.merge(model)
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == list(base.state_dict())


def test_qkv_target_round_trips_through_a_checkpoint(tmp_path):
    model = with_random_b(ps.apply(make_vit(), "lora", targets=["qkv", "fc2"], rank=2))
    ps.save(model, tmp_path / "lora.safetensors")
    fresh = ps.load(make_vit(), tmp_path / "lora.safetensors")
    assert fresh.blocks[0].attn.petl_lora.options["targets"] == ("qkv", "fc2")
    assert torch.equal(fresh(images()), model(images()))


@pytest.mark.parametrize("family", ["vit", "swin", "deit_distilled"])
def test_merged_outputs_equal_unmerged_and_the_state_dict_loads_into_a_plain_model(family):
    model = with_random_b(ps.apply(make_family(family), "lora", targets=["q", "v", "proj", "fc1", "fc2"]))
    assert_merges_to_plain(model, lambda: make_family(family), images(family))
    assert all(p.requires_grad for p in model.parameters())  # the flags from before surgery


@pytest.mark.parametrize(
    "name, build",
    [
        ("per-head qkv (MaxViT rw)", lambda: timm.create_model(
            "maxvit_nano_rw_256", img_size=64, embed_dim=(32, 64, 128, 256), depths=(1, 1, 1, 1), transformer_dim_head=16)),
        ("1x1 conv on NCHW (CoAtNet)", lambda: timm.create_model(
            "coatnet_nano_rw_224", img_size=64, embed_dim=(32, 64, 128, 256), depths=(1, 1, 1, 1), transformer_dim_head=16)),
    ],
)
def test_merge_handles_scattered_rows_and_conv_projections(name, build):
    torch.manual_seed(0)
    model = with_random_b(ps.apply(build().eval(), "lora", targets=["q", "k", "v"]))
    x = images()
    unmerged = model(x)
    ps.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_refuses_unmergeable_methods_unless_told_to_keep_them():
    model = with_random_b(ps.apply(make_vit(), "lora"))
    ps.apply(model, "patt", layers=[0], init="reference")
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="patt cannot be merged"):
        ps.merge(model)
    assert_same_snapshot(before, snapshot(model))
    x = images()
    expected = model(x)
    ps.merge(model, keep_unmergeable=True)
    assert list(ps.summary(model).per_method) == ["patt"]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_projection_followed_by_a_norm():
    torch.manual_seed(0)
    model = ps.apply(timm.create_model("levit_128s", img_size=64).eval(), "lora", targets=["v"])
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="cannot be merged: its target 'qkv' is a LinearNorm"):
        ps.merge(model)
    assert_same_snapshot(before, snapshot(model))


def test_merge_without_lora_raises():
    with pytest.raises(ps.SurgeryError, match="no mergeable method"):
        ps.merge(ps.apply(make_vit(), "adapter"))


def test_lora_modules_are_low_rank_adapters():
    model = ps.apply(make_vit(), "lora", targets=["q", "fc2"])
    assert isinstance(model.blocks[0].attn.petl_lora, LowRankAdapter)
    assert isinstance(model.blocks[0].mlp.petl_lora, LowRankAdapter)


# ---------------------------------------------------------------- merge: every mergeable method, stacked


@pytest.mark.parametrize(
    "family, order",
    [("vit", ("lora", "ssf", "dora", "fact")), ("vit", ("ssf", "dora", "lora", "fact")), ("vit", ("dora", "fact", "ssf", "lora"))],
    ids=["lora-ssf-dora-fact", "ssf-dora-lora-fact", "dora-fact-ssf-lora"],
)
def test_stacked_lora_ssf_dora_fact_on_the_same_projections_merge_in_apply_order(family, order):
    """SSF scales what the branches applied before it added; DoRA's norm is the stored weight's; merge
    folds them in apply order, each reading the unmerged weights first, and gives the plain model."""
    options = {"lora": {"targets": ["q", "v", "fc1"]}, "ssf": {}, "dora": {"targets": ["q", "k", "fc1", "fc2"]}, "fact": {"dropout": 0.0}}
    model = make_family(family).double()
    for method in order:
        ps.apply(model, method, **options[method])
    perturb_inserted(model, seed=6)
    assert_merges_to_plain(model, lambda: make_family(family).double(), images(family, dtype=torch.float64), tol=1e-10)


class InputScale(MergeableModule):
    """A test-only module transforming a producer's input, ``x -> x * c`` per channel (folded as
    ``W <- W diag(c)``), as a re-parameterised input adapter is."""

    acts_on_input = True
    component = "input_scale"

    def __init__(self, width):
        super().__init__("input_scale", {}, 0)
        self.c = torch.nn.Parameter(1 + 0.1 * torch.randn(width, generator=torch.Generator().manual_seed(7), dtype=torch.float64))

    def scale_input(self, module, args):
        return (args[0] * self.c,)

    def producers(self):
        return ["qkv"]

    def merge_refusal(self, host):
        return None

    def merge_into(self, host):
        with torch.no_grad():
            host.qkv.weight.mul_(self.c)


@pytest.mark.parametrize("first", ["input", "lora"])
def test_a_module_acting_on_the_input_is_folded_after_the_output_side_ones(first):
    """The projection's weight multiplies the input transform whichever was applied first, so merge
    folds ``acts_on_input`` modules last (``(W + dW) diag(c)``, not ``W diag(c) + dW``)."""
    from petl_surgery.api import commit
    from petl_surgery.methods.base import Hook, Insertion

    model = make_vit().double()
    attention = model.blocks[0].attn

    def insert_scale():
        module = InputScale(attention.qkv.in_features)
        commit(model, [Insertion(0, "blocks.0.attn", attention, "petl_input_scale", module, [Hook(attention.qkv, "forward_pre", module.scale_input)])], "frozen")

    if first == "input":
        insert_scale()
    ps.apply(model, "lora", targets=["q", "v"])
    if first == "lora":
        insert_scale()
    with_random_b(model)
    x = images(dtype=torch.float64)
    unmerged = model(x)
    ps.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-10)
    assert not any(isinstance(module, MergeableModule) for module in model.modules())
