"""Activation checkpointing in both modes (reentrant and not) trains every inserted tensor, with the
gradients of the run without checkpointing: timm's ``set_grad_checkpointing`` and transformers'
``gradient_checkpointing_enable``."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import timm
import torch
import transformers as T

import petl_surgery as ps
from conftest import images, make_swin, make_vit, randomize
from petl_surgery.methods import PetlModule

METHODS = list(ps.METHODS)
OPTIONS = {"lora": {"targets": ["q", "k", "v", "proj", "fc1", "fc2"]}, "ssf": {"targets": ["qkv", "proj", "fc1", "fc2"]}}


@contextlib.contextmanager
def timm_reentrant(enabled: bool):
    """timm's process-wide choice of reentrant checkpoints (``timm.layers.set_reentrant_ckpt``; default off)."""
    before = timm.layers.use_reentrant_ckpt()
    timm.layers.set_reentrant_ckpt(enabled)
    try:
        yield
    finally:
        timm.layers.set_reentrant_ckpt(before)


def with_method(model: torch.nn.Module, method: str, **options) -> torch.nn.Module:
    ps.apply(model, method, **{**OPTIONS.get(method, {}), **options})
    for module in model.modules():
        if isinstance(module, PetlModule):
            randomize(module, std=0.05)
    return model.train()


def gradients(model: torch.nn.Module, run) -> dict:
    """``.grad`` of every trainable tensor after one backward of ``run(model)`` (the same dropout masks
    each time: reentrant checkpointing replays the random state of the forward)."""
    torch.manual_seed(3)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "none of the inputs have requires_grad" under reentrant mode
        run(model).square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_same_gradients(got: dict, expected: dict) -> None:
    """Every inserted tensor has a gradient, and each tensor the plain run reaches has its gradient."""
    assert got.keys() == expected.keys() and any("petl_" in name for name in got)
    missing = sorted(name for name, grad in got.items() if grad is None and ("petl_" in name or expected[name] is not None))
    assert not missing, f"no gradient for {missing}"
    for name in expected:
        if expected[name] is not None:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def assert_timm_checkpointing_keeps_gradients(model: torch.nn.Module, reentrant: bool, run=None) -> None:
    """``run(model)`` (default: ``model(images())``) gives the same gradients with timm's checkpointing."""
    x = images()
    run = run or (lambda m: m(x))
    expected = gradients(model, run)
    model.set_grad_checkpointing(True)
    with timm_reentrant(reentrant):
        got = gradients(model, run)
    assert_same_gradients(got, expected)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("method", METHODS)
def test_timm_checkpointing_gives_every_inserted_tensor_its_gradient(method, reentrant):
    assert_timm_checkpointing_keeps_gradients(with_method(make_vit(), method), reentrant)


@pytest.mark.parametrize("build, layers", [(make_vit, [2, 3]), (make_swin, [5, 6])], ids=["vit", "swin"])
def test_timm_reentrant_checkpointing_reaches_blocks_after_frozen_ones_and_swin_stages(build, layers):
    assert_timm_checkpointing_keeps_gradients(with_method(build(), "patt", layers=layers), reentrant=True)


def test_timm_reentrant_checkpointing_under_forward_intermediates():
    def run(m):
        return torch.stack(m.forward_intermediates(images(), intermediates_only=True)).sum(0)

    assert_timm_checkpointing_keeps_gradients(with_method(make_vit(), "adapter"), True, run)


def test_the_caller_tensor_keeps_its_flag_and_remove_takes_the_hooks_away():
    model = with_method(make_vit(), "lora")
    model.set_grad_checkpointing(True)
    x = images()
    with timm_reentrant(True):
        gradients(model, lambda m: m(x))
    assert not x.requires_grad
    ps.remove(model)
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    assert sum(hooks) == 0


def tiny_transformers_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3, attn_implementation="eager",
    )
    return T.ViTForImageClassification._from_config(config).eval()


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("method", ["patt", "lora", "vpt", "prefix", "adapter"])
def test_transformers_gradient_checkpointing_gives_every_inserted_tensor_its_gradient(method, reentrant):
    options = {"lora": {"targets": ["q", "v"]}}.get(method, {})
    model = with_method(tiny_transformers_vit(), method, **options)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = gradients(model, lambda m: m(pixel_values=pixels).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias the brief names
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_gradient_checkpointing
    got = gradients(model, lambda m: m(pixel_values=pixels).logits)
    assert_same_gradients(got, expected)
