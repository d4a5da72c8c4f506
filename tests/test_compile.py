"""torch.compile after surgery gives the eager outputs and gradients; surgery on a compiled model refuses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import petl_surgery as ps
import timm
from conftest import images, make_vit, randomize
from petl_surgery.hooks import hook_owner
from petl_surgery.methods import PetlModule
from petl_surgery.verification import RunCheck

# every hook kind: PATT on the fused qkv, the parallel adapter on the MLP, LoRA on every projection
SURGERIES = [("bapat", {}), ("lora", {"targets": ["q", "k", "v", "proj", "fc1", "fc2"]})]


def small_vit() -> torch.nn.Module:
    return make_vit(depth=1)


def small_swin() -> torch.nn.Module:
    """One Swin stage of two blocks (the second shifts its windows), 32 px."""
    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16, depths=(2,), num_heads=(1,),
        num_classes=5,
    ).eval()


def with_surgery(model: torch.nn.Module, surgeries=SURGERIES) -> torch.nn.Module:
    for method, options in surgeries:
        ps.apply(model, method, **options)
    return with_random_branches(model)


def with_random_branches(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, PetlModule):
            randomize(module)
    return model


def gradients(model: torch.nn.Module, runner, x: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    runner(x).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_compiled_matches_eager(model: torch.nn.Module, rtol: float, **compile_options) -> None:
    """After the first (eager) forward, which fires the run check: the compiled model gives the eager
    outputs in eval mode and the eager gradients of every trainable tensor in train mode."""
    x = images()
    eager = model(x)
    compiled = torch.compile(model, **compile_options)
    torch.testing.assert_close(compiled(x), eager, rtol=rtol, atol=1e-5)
    model.train()
    expected = gradients(model, model, x)
    got = gradients(model, compiled, x)
    assert got.keys() == expected.keys() and any(".petl_" in n for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=10 * rtol, atol=1e-5, msg=name)


def test_fullgraph_compile_on_vit_gives_the_eager_outputs_and_gradients():
    assert_compiled_matches_eager(with_surgery(small_vit()), 1e-5, backend="aot_eager", fullgraph=True)


def test_default_backend_fullgraph_compile_on_vit_gives_the_eager_outputs_and_gradients():
    # inductor, the backend users get from torch.compile(model): generated C++ on the CPU
    assert_compiled_matches_eager(with_surgery(small_vit()), 1e-4, fullgraph=True)


@pytest.mark.parametrize("method", list(ps.METHODS))
def test_aot_eager_compile_trains_every_method_as_eager_does(method):
    options = {"targets": ["q", "k", "v", "proj", "fc1", "fc2"]} if method in ("lora", "ssf") else {}
    # compiled and eager dropout and stochastic depth draw different masks: every such option off
    fields = {field.name: field.default for field in dataclasses.fields(ps.METHODS[method].Options)}
    options.update({name: 0.0 for name, default in fields.items() if name in ("dropout", "drop_path") and default})
    assert_compiled_matches_eager(with_surgery(small_vit(), [(method, options)]), 1e-5, backend="aot_eager")


def test_compile_on_swin_gives_the_eager_outputs():
    model = with_surgery(small_swin())
    x = images()[:, :, :32, :32]
    eager = model(x)
    torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), eager, rtol=1e-5, atol=1e-5)


def test_fullgraph_compile_before_the_first_forward_names_the_run_check():
    model = ps.apply(small_vit(), "patt")
    # dynamo's refusal to trace a disabled function, carrying the check's reason (torch 2.6 and newer)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="first-forward check"):
        torch.compile(model, backend="aot_eager", fullgraph=True)(images())


def test_compile_before_the_first_forward_without_fullgraph_still_runs_the_check():
    model = with_random_branches(ps.apply(small_vit(), "lora"))
    x = images()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    # the check ran (eagerly, at a graph break) and removed itself
    assert not [hook for hook in model._forward_hooks.values() if isinstance(hook_owner(hook), RunCheck)]
    torch.testing.assert_close(compiled(x), out)
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)


def test_surgery_on_a_compiled_model_refuses_and_reading_it_works():
    model = make_vit()
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.raises(ps.SurgeryError, match=r"torch.compile wrapper.*_orig_mod"):
        ps.apply(compiled, "patt")
    assert len(ps.blocks(compiled)) == len(ps.blocks(model)) == 4
    ps.apply(compiled._orig_mod, "patt")
    assert ps.summary(compiled).trainable == ps.summary(model).trainable
    with pytest.raises(ps.SurgeryError, match="torch.compile wrapper"):
        ps.remove(compiled)
