"""Several methods on one model: recorded, saved and loaded together, removed one at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_snapshot, images, make_swin, make_vit, randomize, snapshot

import petl_surgery as ps
from petl_surgery.methods import PetlModule


def three_methods(model):
    ps.apply(model, "lora", targets=["q", "v", "fc1"])
    ps.apply(model, "patt", layers=slice(0, 2), mode="qv")
    ps.apply(model, "adapter", layers=[-1], input="residual")
    for module in model.modules():
        if isinstance(module, PetlModule):
            randomize(module, std=0.05)
    return model


@pytest.mark.parametrize("family, build", [("vit", make_vit), ("swin", make_swin)])
def test_three_methods_round_trip_through_one_checkpoint(tmp_path, family, build):
    model = three_methods(build())
    ps.save(model, tmp_path / "delta.safetensors")
    fresh = ps.load(build(), tmp_path / "delta.safetensors")
    assert torch.equal(fresh(images(family)), model(images(family)))
    assert list(ps.summary(fresh).per_method) == ["lora", "patt", "adapter"]


def test_removing_one_of_three_keeps_the_other_two():
    model = three_methods(make_vit())
    ps.remove(model, "patt")
    assert sorted(ps.summary(model).per_method) == ["adapter", "lora"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".petl_lora." in n for n in trainable) and any(".petl_adapter." in n for n in trainable)
    assert not any(".petl_patt." in n for n, _ in model.named_parameters())
    reference = three_methods(make_vit())
    ps.remove(reference, "patt")
    assert torch.equal(model(images()), reference(images()))


def test_the_same_method_twice_on_the_same_blocks_raises():
    model = ps.apply(make_vit(), "lora")
    with pytest.raises(ps.SurgeryError, match="'lora' is already applied to block 0"):
        ps.apply(model, "lora", targets=["k"])


def test_methods_sharing_a_projection_both_act_on_it():
    model = ps.apply(make_vit().double(), "patt", init="reference")
    ps.apply(model, "lora", targets=["k", "v"])
    for module in model.modules():
        if isinstance(module, PetlModule):
            randomize(module, std=0.1)
    x = images(dtype=torch.float64)
    both = model(x)
    without_lora = ps.remove(model, "lora")(x)
    assert not torch.allclose(both, without_lora)


@pytest.mark.parametrize("first, second, component", [("bapat", "patt", "patt"), ("bapat", "adapter", "adapter"), ("patt", "bapat", "patt")])
def test_a_second_branch_of_the_same_kind_on_a_projection_is_refused(first, second, component):
    model = ps.apply(make_vit(), first)
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=rf"already carries a {component} branch from method '{first}'"):
        ps.apply(model, second)
    assert_same_snapshot(before, snapshot(model))
