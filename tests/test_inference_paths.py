"""Inference paths (issue 21, item 6): without grad, LoRA and the tanh bottlenecks add their branches in place
into the producer's output; the numbers must be those of the autograd path, for every method and target
layout, and a mixed-task batch written in place must equal each task alone."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import images, make_swin, make_vit, randomize
from test_tasks import _perturbed
from torch import nn

import petl_surgery as ps
from petl_surgery.methods import PetlModule

# options whose inference paths differ: LoRA's target layouts (end to end over a fused output, a part of it,
# one target per producer, the MLP's two projections) and the adapter's two positions
LAYOUTS = {
    "lora on all of a fused qkv": ("lora", {"targets": ["qkv"]}),
    "lora on q and v of a fused qkv": ("lora", {"targets": ["q", "v"]}),
    "lora on every projection": ("lora", {"targets": ["q", "k", "v", "proj", "fc1", "fc2"]}),
    "adapter beside the MLP": ("adapter", {"position": "parallel"}),
    "adapter after the MLP": ("adapter", {"position": "sequential"}),
}


def _transformers_vit() -> nn.Module:
    torch.manual_seed(0)
    config = T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                         image_size=32, patch_size=8, num_labels=5)
    return T.ViTForImageClassification(config).eval()


MODELS = {
    "timm vit": (make_vit, 64, lambda out: out),
    "timm swin": (make_swin, 64, lambda out: out),
    "transformers vit": (_transformers_vit, 32, lambda out: out.logits),
}


def _randomized(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, PetlModule):
            randomize(module)
    return model


def _assert_inference_paths_agree(model: nn.Module, x: torch.Tensor, logits_of) -> None:
    """The outputs under ``no_grad`` and ``inference_mode`` equal those of the autograd path."""
    model(x)  # the first forward's branch check
    with torch.enable_grad():
        recorded = logits_of(model(x))
    assert recorded.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model(x)), recorded.detach(), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(logits_of(model(x)), recorded.detach(), rtol=1e-5, atol=1e-5)


# refused by name there (prompt tokens on a hierarchical model; no flat token grid, or none known)
REFUSED = {"timm swin": ("vpt", "convpass"), "transformers vit": ("convpass",)}


@pytest.mark.parametrize(
    "family, method", [(f, m) for f in MODELS for m in ps.METHODS if m not in REFUSED.get(f, ())]
)
def test_no_grad_gives_the_autograd_paths_numbers(family, method):
    build, size, logits_of = MODELS[family]
    model = build()
    ps.apply(model, method)
    _randomized(model)
    _assert_inference_paths_agree(model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3)),
                                  logits_of)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_inference_path_equals_the_autograd_path_for_every_layout(layout):
    method, options = LAYOUTS[layout]
    model = make_vit()
    ps.apply(model, method, **options)
    _randomized(model)
    _assert_inference_paths_agree(model, images(), lambda out: out)


def test_no_in_place_add_into_an_output_that_shares_the_inputs_memory():
    from petl_surgery.methods.fused import fused_path_applies

    x, weight = torch.randn(2, 3, 4), torch.randn(5, 4)
    with torch.no_grad():
        assert fused_path_applies(x * 1, x, weight)
        assert not fused_path_applies(x, x, weight)  # a module that hands its input back
        assert not fused_path_applies(x[:1], x, weight)  # a view of the input


def test_the_inference_path_leaves_the_input_and_a_second_forward_alone():
    model = make_vit()
    ps.apply(model, "lora", targets=["q", "v", "fc1"])
    _randomized(model)
    x = images()
    kept = x.clone()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(x, kept)
    assert torch.equal(first, second)


@pytest.mark.parametrize("method, options", [("lora", {"targets": ["q", "v"]}), ("patt", {}), ("bapat", {})])
def test_a_mixed_batch_written_in_place_equals_each_task_alone(method, options, tmp_path):
    singles = {}
    for number in range(3):
        single = make_vit()
        ps.apply(single, method, **options)
        _perturbed(single, number)
        ps.save(single, tmp_path / f"t{number}.safetensors")
        singles[f"t{number}"] = single.eval()
    model = make_vit()
    for name in singles:
        ps.load(model, tmp_path / f"{name}.safetensors", name=name)
    x = images(batch=6)
    tasks = ["t2", "t0", "t1", "t1", "t0", "t2"]
    with torch.no_grad():
        mixed = ps.forward_tasks(model, x, tasks)
        for row, name in enumerate(tasks):
            torch.testing.assert_close(mixed[row], singles[name](x[row:row + 1])[0], rtol=1e-5, atol=1e-5)
