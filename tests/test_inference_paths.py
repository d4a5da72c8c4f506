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

# LoRA's target layouts: end to end over a fused output (tiling), a part of it (q and v of a fused qkv), one
# target per producer (q, k, v apart), and the MLP's two projections
LORA_LAYOUTS = {
    "fused qkv, all of it": {"targets": ["qkv"]},
    "fused qkv, q and v": {"targets": ["q", "v"]},
    "every projection": {"targets": ["q", "k", "v", "proj", "fc1", "fc2"]},
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


def _autograd_and_inference(model: nn.Module, x: torch.Tensor, logits_of) -> tuple:
    with torch.enable_grad():
        recorded = logits_of(model(x))
    assert recorded.requires_grad
    with torch.no_grad():
        plain = logits_of(model(x))
    with torch.inference_mode():
        inference = logits_of(model(x))
    return recorded.detach(), plain, inference


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
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    model(x)  # the first forward's branch check
    recorded, plain, inference = _autograd_and_inference(model, x, logits_of)
    torch.testing.assert_close(plain, recorded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inference, recorded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", list(LORA_LAYOUTS))
def test_lora_inference_path_equals_the_autograd_path_for_every_target_layout(layout):
    model = make_vit()
    ps.apply(model, "lora", **LORA_LAYOUTS[layout])
    _randomized(model)
    x = images()
    model(x)
    recorded, plain, inference = _autograd_and_inference(model, x, lambda out: out)
    torch.testing.assert_close(plain, recorded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inference, recorded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["parallel", "sequential"])
def test_adapter_inference_path_equals_the_autograd_path_at_either_position(position):
    model = make_vit()
    ps.apply(model, "adapter", position=position)
    _randomized(model)
    x = images()
    model(x)
    recorded, plain, inference = _autograd_and_inference(model, x, lambda out: out)
    torch.testing.assert_close(plain, recorded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inference, recorded, rtol=1e-5, atol=1e-5)


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
