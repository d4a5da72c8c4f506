"""Attribute patches are owned by the inserted modules that need them, so methods sharing a module can
be removed in any order."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import assert_same_snapshot, images, snapshot
from torch import nn

import petl_surgery as ps
from petl_surgery.methods import PetlModule
from petl_surgery.patches import Patch, apply_patch, undo_patches


def tiny_beit():
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", img_size=64, embed_dim=64, depth=2, num_heads=2).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_bias.normal_(std=0.1)  # a bias that only the bypassed F.linear path would add
    return model


def randomized(model):
    for module in model.modules():
        if isinstance(module, PetlModule):
            for parameter in module.parameters():
                nn.init.normal_(parameter, std=0.05)
    return model


@pytest.mark.parametrize("first", ["patt", "lora"])
def test_two_methods_needing_the_same_switch_come_off_in_any_order(first):
    # BEiT calls its qkv module only with qkv_bias_separate=True: both PATT and LoRA need that switch.
    model = tiny_beit()
    before = snapshot(model)
    ps.apply(model, "patt", init="reference")
    ps.apply(model, "lora")
    randomized(model)
    second = "lora" if first == "patt" else "patt"
    only_second = tiny_beit()
    ps.apply(only_second, second)
    only_second.load_state_dict(model.state_dict(), strict=False)
    ps.remove(model, first)
    assert all(block.attn.qkv_bias_separate for block in model.blocks)
    assert torch.equal(model(images()), only_second(images()))
    ps.remove(model)
    assert_same_snapshot(before, snapshot(model))
    assert not any(block.attn.qkv_bias_separate for block in model.blocks)


def test_layers_restore_the_original_and_its_absence():
    module = nn.Linear(2, 2)
    apply_patch(Patch(module, "switch", True), "a")
    apply_patch(Patch(module, "switch", False), "b")  # shared: the installed True stays
    assert module.switch is True
    module.count = 1
    apply_patch(Patch(module, "count", update=lambda n: n + 3, shared=False), "c")
    apply_patch(Patch(module, "count", update=lambda n: n + 2, shared=False), "d")
    assert module.count == 6
    undo_patches(module, "a")
    assert module.switch is True  # b still needs it
    undo_patches(module, "b")
    assert not hasattr(module, "switch")
    undo_patches(module, "d")
    undo_patches(module, "c")
    assert module.count == 1 and "_petl_surgery_patched" not in vars(module)
