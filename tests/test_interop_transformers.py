"""PEFT LoRA adapters on transformers' vision models, both ways: an adapter PEFT saved from a transformers
model (its q_proj/v_proj targets, or CLIP's out_proj and MLP, ``classifier`` in modules_to_save) loads with
``ps.load`` to PEFT's outputs, and ``ps.export(format="peft")`` writes one that PEFT's ``from_pretrained``
turns into the same model. float64, so that the comparisons are exact up to summation order."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from family_checks import first_output
from torch import nn

import petl_surgery as ps

peft = pytest.importorskip("peft")

C = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8)
# case -> (builder, PEFT target_modules)
CASES = {
    "vit": (lambda: T.ViTForImageClassification._from_config(T.ViTConfig(**C, num_labels=5)), ["q_proj", "v_proj"]),
    "clip": (
        lambda: T.CLIPForImageClassification._from_config(T.CLIPConfig(vision_config=C, num_labels=5)),
        ["q_proj", "v_proj", "out_proj", "fc1", "fc2"],
    ),
    "dinov2": (
        lambda: T.Dinov2ForImageClassification._from_config(
            T.Dinov2Config(**{k: v for k, v in C.items() if k != "intermediate_size"}, mlp_ratio=2, num_labels=5)
        ),
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
}


def build(case: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[case][0]().double().eval()


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def randomized(model: nn.Module, names: str) -> None:
    """Seeded values in the parameters whose names contain one of ``names`` (LoRA's B is zero at init)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in names.split()):
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.1)


def peft_adapter(case: str, directory) -> torch.Tensor:
    """A PEFT LoRA (r 4, alpha 8) on the case's targets with ``classifier`` in modules_to_save, trained
    in effect (random B and head), saved to ``directory``; returns its logits on ``images()``."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=CASES[case][1], modules_to_save=["classifier"])
    model = peft.get_peft_model(build(case), config)
    randomized(model, "lora_B modules_to_save")
    model.eval()
    model.save_pretrained(directory)
    with torch.no_grad():
        return first_output(model(images()))


@pytest.mark.parametrize("case", list(CASES))
def test_a_peft_adapter_loads_to_peft_outputs(case: str, tmp_path) -> None:
    expected = peft_adapter(case, tmp_path / "adapter")
    model = ps.load(build(case), tmp_path / "adapter")
    with torch.no_grad():
        logits = first_output(model(images()))
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(logits, first_output(build(case)(images())))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(".petl_" in name or name.startswith("classifier.") for name in trainable)


@pytest.mark.parametrize("case", list(CASES))
def test_export_goes_back_to_peft(case: str, tmp_path) -> None:
    peft_adapter(case, tmp_path / "adapter")
    model = ps.load(build(case), tmp_path / "adapter")
    randomized(model, "petl_ classifier")  # trained further here
    with torch.no_grad():
        ours = first_output(model(images()))
    ps.export(model, tmp_path / "exported", format="peft")
    back = peft.PeftModel.from_pretrained(build(case), tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(first_output(back(images())), ours, rtol=1e-12, atol=1e-12)
