"""The surgery API: apply, remove, blocks, summary, layer selection and freezing."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import assert_same_snapshot, images, make_family, make_swin, make_vit, randomize, snapshot

import petl_surgery as ps
from petl_surgery.methods import PetlModule

# ---------------------------------------------------------------- apply keeps the model what it was


def test_apply_works_in_place_and_keeps_class_and_base_keys():
    model = make_vit()
    keys = list(model.state_dict())
    result = ps.apply(model, "patt")
    assert result is model and type(model) is timm.models.vision_transformer.VisionTransformer
    assert [key for key in model.state_dict() if "petl_" not in key] == keys


def test_inserted_modules_follow_the_models_train_or_eval_mode():
    model = ps.apply(make_vit().eval(), "adapter", dropout=0.5)
    assert not model.blocks[0].mlp.petl_adapter.training
    model.train()
    assert model.blocks[0].mlp.petl_adapter.training


def test_inserted_modules_are_built_on_the_models_dtype():
    model = ps.apply(make_vit().double(), "bapat")
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_pretrained_base_weights_load_after_surgery():
    model = make_vit()
    weights = copy.deepcopy(model.state_dict())
    ps.apply(model, "patt")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert unexpected == [] and all("petl_patt" in key for key in missing)


# ---------------------------------------------------------------- blocks


def test_swin_t_has_blocks_0_to_11_across_its_stages():
    swin_t = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    found = ps.blocks(swin_t)
    assert [block.index for block in found] == list(range(12))
    assert [block.path for block in found][1:4] == ["layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"]
    assert found[11].attention.path == "layers.3.blocks.1.attn"
    assert found[11].mlp.path == "layers.3.blocks.1.mlp"


def test_vit_blocks_name_attention_and_mlp_paths():
    found = ps.blocks(make_vit())
    assert [(b.path, b.attention.path, b.mlp.path) for b in found][2] == ("blocks.2", "blocks.2.attn", "blocks.2.mlp")
    assert found[0].attention.in_features == 64 and found[0].mlp.in_features == 64


def test_a_model_without_transformer_blocks_has_none():
    assert ps.blocks(torch.nn.Sequential(torch.nn.Linear(3, 3))) == []


# ---------------------------------------------------------------- layer selection


@pytest.mark.parametrize(
    "layers, chosen",
    [
        (None, [0, 1, 2, 3]),
        (2, [2]),
        (-1, [3]),
        ([0, -1], [0, 3]),
        (range(1, 3), [1, 2]),
        (slice(-2, None), [2, 3]),
        (slice(None, None, 2), [0, 2]),
        ((x for x in (3, 1)), [1, 3]),
    ],
)
def test_layer_selection(layers, chosen):
    model = ps.apply(make_vit(), "patt", layers=layers)
    assert sorted(ps.summary(model).per_block) == chosen


@pytest.mark.parametrize(
    "layers, message",
    [
        (4, "layer 4 is out of range: the model has 4 blocks"),
        (-5, "layer -5 is out of range: the model has 4 blocks"),
        ([0, 7], "layer 7 is out of range"),
        ([1, -3], "layer -3 is selected twice"),
        ([], "selects no block"),
        (slice(10, 12), r"layers=slice\(10, 12, None\) is out of range: the model has 4 blocks"),
        (slice(2, 10), r"layers=slice\(2, 10, None\) is out of range"),  # Python would clip it to blocks 2-3
        (slice(-5, None), "out of range"),
        (slice(3, 3), "selects no block"),
        ("0", "layers must be"),
        (True, "bool"),
        ([0.5], "layers must be ints"),
    ],
)
def test_bad_layer_selection_raises_and_leaves_the_model_untouched(layers, message):
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=message):
        ps.apply(model, "adapter", layers=layers)
    assert_same_snapshot(before, snapshot(model))


def test_swin_layers_use_the_global_index():
    model = ps.apply(make_swin(), "patt", layers=[1, 2])
    assert [row.path for row in ps.summary(model).rows] == [
        "layers.0.blocks.1.attn.petl_patt",
        "layers.1.blocks.0.attn.petl_patt",
    ]


# ---------------------------------------------------------------- refusals


def test_unknown_method_raises_listing_the_known_ones():
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="unknown method .pat.; known methods: patt, adapter, bapat, lora"):
        ps.apply(model, "pat")
    assert_same_snapshot(before, snapshot(model))


def test_a_model_without_transformer_blocks_is_refused():
    model = timm.create_model("resnet10t", pretrained=False)
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="no transformer block .* in ResNet"):
        ps.apply(model, "adapter")
    assert_same_snapshot(before, snapshot(model))


class UnknownAttention(timm.layers.Attention):
    """A subclass may override forward and stop calling qkv: classes are matched exactly."""


def test_a_model_with_unknown_attention_is_refused_by_name():
    model = make_vit()
    model.blocks[0].attn.__class__ = UnknownAttention
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=r"'blocks.0.attn' \(UnknownAttention\).*not in the attention registry"):
        ps.apply(model, "patt")
    assert_same_snapshot(before, snapshot(model))


def test_not_a_module_is_refused():
    with pytest.raises(ps.SurgeryError, match="expected a torch.nn.Module"):
        ps.apply({"not": "a model"}, "patt")


def test_the_same_method_twice_on_a_block_raises_and_changes_nothing():
    model = ps.apply(make_vit(), "patt", layers=[0, 1])
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="'patt' is already applied to block 1"):
        ps.apply(model, "patt", layers=[2, 1])
    assert_same_snapshot(before, snapshot(model))
    ps.apply(model, "patt", layers=[2, 3])
    assert sorted(ps.summary(model).per_block) == [0, 1, 2, 3]


# ---------------------------------------------------------------- freezing


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_only_inserted_modules_and_the_head_train():
    model = ps.apply(make_vit(), "bapat")
    assert trainable(model) == {n for n in model.state_dict() if ".petl_bapat." in n} | {"head.weight", "head.bias"}


def test_a_distilled_model_trains_both_heads():
    model = ps.apply(make_family("deit_distilled"), "patt")
    assert {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"} <= trainable(model)
    assert "dist_token" not in trainable(model)


def test_swin_head_is_found_through_get_classifier():
    model = ps.apply(make_swin(), "adapter")
    assert {n for n in trainable(model) if "petl" not in n} == {"head.fc.weight", "head.fc.bias"}


def test_the_head_can_stay_frozen():
    model = ps.apply(make_vit(), "patt", train_head=False)
    assert all(".petl_patt." in name for name in trainable(model))


def test_unfreeze_patterns_make_more_base_parameters_trainable():
    model = ps.apply(make_vit(), "patt", unfreeze=[r"norm\d?\.", r"^blocks\.0\..*\.bias$"])
    base = {n for n in trainable(model) if "petl" not in n}
    assert "blocks.3.norm1.weight" in base and "norm.bias" in base and "blocks.0.attn.qkv.bias" in base
    assert "blocks.1.attn.qkv.bias" not in base and "blocks.0.attn.qkv.weight" not in base


@pytest.mark.parametrize("pattern, message", [("nothing_matches", "matches no base parameter"), ("(", "not a valid")])
def test_bad_unfreeze_pattern_raises_and_changes_nothing(pattern, message):
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=message):
        ps.apply(model, "patt", unfreeze=pattern)
    assert_same_snapshot(before, snapshot(model))


def test_a_second_apply_keeps_the_first_method_trainable():
    model = ps.apply(make_vit(), "patt", layers=[0])
    ps.apply(model, "adapter")
    assert {".petl_patt." in n or ".petl_adapter." in n or n.startswith("head") for n in trainable(model)} == {True}
    assert any(".petl_patt." in n for n in trainable(model))


def test_gradients_reach_every_inserted_tensor_and_no_frozen_one():
    model = ps.apply(make_swin(), "bapat", adapter_scale="learnable", layernorm="in")
    for name, module in model.named_modules():
        if isinstance(module, PetlModule):
            randomize(module, std=0.05)
    model.train()
    model(images("swin")).square().sum().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


# ---------------------------------------------------------------- remove


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_remove_gives_back_the_original_model_bit_for_bit(family):
    model = make_family(family)
    model.patch_embed.proj.weight.requires_grad_(False)  # a flag the user set before surgery
    x = images(family)
    before_output = model(x)
    before = snapshot(model)
    ps.apply(model, "bapat", input="residual")
    ps.apply(model, "ssf", layers=[0], init="reference")
    assert not torch.equal(model(x), before_output)
    ps.remove(model)
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(model(x), before_output)


def test_remove_one_method_keeps_the_other():
    model = ps.apply(make_vit(), "patt", init="reference")
    ps.apply(model, "adapter", layers=[0])
    with_patt_only = copy.deepcopy(model)
    ps.remove(with_patt_only, "adapter")
    ps.remove(model, "adapter")
    assert list(ps.summary(model).per_method) == ["patt"]
    assert all(".petl_patt." in n or n.startswith("head") for n in trainable(model))
    x = images()
    assert torch.equal(model(x), with_patt_only(x))


def test_remove_refuses_what_is_not_there():
    model = make_vit()
    with pytest.raises(ps.SurgeryError, match="carries no petl_surgery method"):
        ps.remove(model)
    ps.apply(model, "patt")
    with pytest.raises(ps.SurgeryError, match="'adapter' is not applied to this model; applied: patt"):
        ps.remove(model, "adapter")
    with pytest.raises(ps.SurgeryError, match="unknown method 'glora'"):
        ps.remove(model, "glora")


def test_a_deep_copy_carries_working_surgery():
    model = ps.apply(make_vit(), "bapat", init="reference", input="residual")
    clone = copy.deepcopy(model)
    x = images()
    assert torch.equal(clone(x), model(x))
    ps.remove(clone)
    assert "petl" not in str(list(clone.state_dict())) and any("petl" in k for k in model.state_dict())
    assert not torch.equal(clone(x), model(x))


# ---------------------------------------------------------------- summary


def test_summary_fields_hold_the_numbers():
    model = ps.apply(make_vit(), "adapter", bottleneck=8, layers=[0, 1])
    ps.apply(model, "patt", mid_dim=4, layers=[1])
    report = ps.summary(model)
    adapter, patt = 2 * 64 * 8 + 8 + 64, 64 * 4 + 4 + 2 * 64 * 4 + 2 * 64
    assert report.per_method == {"adapter": 2 * adapter, "patt": patt}
    assert report.per_block == {0: adapter, 1: adapter + patt}
    assert report.head == 64 * 5 + 5
    assert report.trainable == 2 * adapter + patt + 64 * 5 + 5
    assert report.total == sum(p.numel() for p in model.parameters())
    assert [(r.method, r.block, r.path) for r in report.rows] == [
        ("adapter", 0, "blocks.0.mlp.petl_adapter"),
        ("patt", 1, "blocks.1.attn.petl_patt"),
        ("adapter", 1, "blocks.1.mlp.petl_adapter"),
    ]


def test_summary_prints_a_table():
    text = str(ps.summary(ps.apply(make_vit(), "patt", unfreeze="norm")))
    assert "blocks.3.attn.petl_patt" in text and "total patt" in text
    assert "classifier head" in text and "other trainable base" in text and "% of the model" in text
