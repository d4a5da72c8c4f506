"""Branches under timm's gradient checkpointing, under bfloat16 autocast, and kept in float32 on a
bfloat16 model (apply's ``branch_dtype``)."""

from __future__ import annotations

import pytest
import torch

import petl_surgery as ps
from conftest import images, make_swin, make_vit, randomize
from petl_surgery.methods import PetlModule

SURGERIES = [
    ("patt", {}),
    ("adapter", {}),
    ("lora", {"targets": ["q", "k", "v", "proj", "fc1", "fc2"]}),
]


def with_branches(model: torch.nn.Module, surgeries=SURGERIES) -> torch.nn.Module:
    for method, options in surgeries:
        ps.apply(model, method, **options)
    for module in model.modules():
        if isinstance(module, PetlModule):
            randomize(module, std=0.05)
    return model


def trainable_gradients(model: torch.nn.Module, x: torch.Tensor) -> dict:
    torch.manual_seed(5)  # Swin-T trains with stochastic depth; checkpointing replays its random state
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("build", [make_vit, make_swin], ids=["vit", "swin"])
def test_gradient_checkpointing_gives_the_same_gradients(build):
    model = with_branches(build()).train()
    x = images()
    expected = trainable_gradients(model, x)
    model.set_grad_checkpointing(True)
    got = trainable_gradients(model, x)
    assert got.keys() == expected.keys() and any(".petl_" in name for name in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bfloat16_autocast_runs_the_branches_and_keeps_their_weights_in_float32():
    model = with_branches(make_vit()).train()
    x = images()
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    out.float().square().mean().backward()
    branches = {n: p for n, p in model.named_parameters() if ".petl_" in n}
    assert branches and all(p.dtype == torch.float32 and p.grad is not None for p in branches.values())
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in branches.values())


def test_branch_dtype_keeps_float32_branches_on_a_bfloat16_model():
    reference = with_branches(make_vit())
    model = make_vit().to(torch.bfloat16)
    for method, options in SURGERIES:
        ps.apply(model, method, branch_dtype=torch.float32, **options)
    with torch.no_grad():  # the same branch values as the float32 reference
        for name, parameter in model.named_parameters():
            if ".petl_" in name:
                parameter.copy_(reference.get_parameter(name))
    branches = {n: p for n, p in model.named_parameters() if ".petl_" in n}
    assert branches and all(p.dtype == torch.float32 for p in branches.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in branches)
    x = images()
    out = model(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(x), rtol=0.1, atol=0.1)
    model.train()
    out = model(x.to(torch.bfloat16))
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in branches.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks the matmul dtype itself
        assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("value", ["float32", torch.int64])
def test_branch_dtype_must_be_a_floating_dtype(value):
    with pytest.raises(ps.SurgeryError, match="branch_dtype"):
        ps.apply(make_vit(), "patt", branch_dtype=value)


def one_method(method: str) -> torch.nn.Module:
    """A ViT with ``method`` applied (LoRA and SSF on every projection) and random branch weights."""
    options = {"targets": ["q", "k", "v", "proj", "fc1", "fc2"]} if method in ("lora", "ssf") else {}
    return with_branches(make_vit(), [(method, options)])


@pytest.mark.parametrize("method", list(ps.METHODS))
def test_bfloat16_autocast_training_steps_for_every_method(method):
    model = one_method(method).train()
    x = images()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        branches = {n: p for n, p in model.named_parameters() if ".petl_" in n}
        assert branches and all(p.grad is not None and p.grad.dtype == torch.float32 for p in branches.values())
        assert all(torch.isfinite(p.grad).all() for p in branches.values())
        assert any(p.grad.abs().sum() > 0 for p in branches.values())
        optimizer.step()
    with torch.no_grad():
        reference = model.eval()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(model(x).float(), reference, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("method", list(ps.METHODS))
def test_inference_mode_gives_the_no_grad_outputs_for_every_method(method):
    model = one_method(method)
    x = images()
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        got = model(x)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # kernels may differ in the last bit
