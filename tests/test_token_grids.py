"""Methods follow the token grid of each forward: timm's ``set_input_size`` after surgery and
``dynamic_img_size`` give the outputs of the same surgery on a model built at that size."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import petl_surgery as ps
from conftest import randomize
from petl_surgery.methods import PetlModule

OPTIONS = {"lora": {"targets": ["q", "k", "v", "proj", "fc1", "fc2"]}, "ssf": {"targets": ["qkv", "proj", "fc1", "fc2"]}}
NEW_SIZE = (96, 80)  # a 6 x 5 grid of 16-px patches, from the 4 x 4 one the model is built with


def build(img_size, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch16_224", img_size=img_size, embed_dim=64, depth=2, num_heads=2, num_classes=5, **kwargs
    ).eval()


def with_method(model: torch.nn.Module, method: str) -> torch.nn.Module:
    ps.apply(model, method, **OPTIONS.get(method, {}))
    for module in model.modules():
        if isinstance(module, PetlModule):
            randomize(module, std=0.05)
    return model


def pixels(size) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))


def built_at(size, method: str, state: dict) -> torch.nn.Module:
    """The same surgery on a model built at ``size``, holding ``state`` (base and delta)."""
    model = with_method(build(size), method)
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("method", list(ps.METHODS))
def test_set_input_size_after_surgery_gives_the_model_built_at_that_size(method):
    model = with_method(build(64), method)
    model.set_input_size(img_size=NEW_SIZE)
    reference = built_at(NEW_SIZE, method, model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(pixels(NEW_SIZE)), reference(pixels(NEW_SIZE)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", list(ps.METHODS))
def test_dynamic_img_size_follows_each_forwards_grid(method):
    model = with_method(build(64, dynamic_img_size=True), method)
    for size in ((64, 64), NEW_SIZE):
        state = dict(model.state_dict())
        grid = (size[0] // 16, size[1] // 16)
        state["pos_embed"] = resample_abs_pos_embed(model.pos_embed, new_size=grid, old_size=(4, 4), num_prefix_tokens=1)
        reference = built_at(size, method, state)
        with torch.no_grad():
            torch.testing.assert_close(model(pixels(size)), reference(pixels(size)), rtol=0, atol=1e-5)


def test_convpass_reads_the_grid_of_forward_intermediates_too():
    model = with_method(build(64, dynamic_img_size=True), "convpass")
    state = dict(model.state_dict())
    state["pos_embed"] = resample_abs_pos_embed(model.pos_embed, new_size=(6, 5), old_size=(4, 4), num_prefix_tokens=1)
    reference = built_at(NEW_SIZE, "convpass", state)
    with torch.no_grad():
        got = model.forward_intermediates(pixels(NEW_SIZE), intermediates_only=True)
        expected = reference.forward_intermediates(pixels(NEW_SIZE), intermediates_only=True)
    assert [tuple(y.shape) for y in got] == [(2, 64, 6, 5)] * 2
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_convpass_without_the_patch_embedding_refuses_naming_it():
    model = with_method(build(64), "convpass")
    tokens = torch.randn(2, 17, 64)
    with pytest.raises(RuntimeError, match="patch grid of this forward is unknown.*patch embedding did not run"):
        model.blocks(tokens)


@pytest.mark.parametrize("method", ["vpt", "prefix", "convpass"])
def test_set_input_size_on_a_rope_model_gives_the_model_built_at_that_size(method):
    """EVA02: its rotary embedding follows the grid, and VPT's prompts stay out of it."""

    def eva(size) -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model(
            "eva02_tiny_patch14_224", img_size=size, embed_dim=64, depth=2, num_heads=2, num_classes=5
        ).eval()

    size = (84, 70)  # 6 x 5 patches of 14 px, from 4 x 4
    model = with_method(eva(56), method)
    model.set_input_size(img_size=size)
    reference = with_method(eva(size), method)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(pixels(size)), reference(pixels(size)), rtol=0, atol=1e-6)
