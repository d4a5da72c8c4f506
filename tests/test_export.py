"""Where a surgered model leaves PyTorch eager mode: parametrizations on inserted weights, dynamic
quantization, the ONNX exporters (legacy and dynamo, checked with onnxruntime), torch.export, and
TorchScript (refused, naming what works)."""

from __future__ import annotations

import warnings

import onnxruntime
import pytest
import torch
from conftest import images, make_vit, perturb_inserted
from family_checks import train_steps
from safetensors import safe_open
from torch import nn
from torch.nn.utils import parametrizations

import petl_surgery as ps
from petl_surgery.inventory import inserted_modules
from petl_surgery.methods.base import MergeableModule

METHODS = list(ps.METHODS)


def surgered(method: str, depth: int = 2) -> nn.Module:
    """A tiny ViT with ``method`` applied and its branches perturbed away from their (identity) init."""
    model = ps.apply(make_vit(depth=depth), method)
    perturb_inserted(model)
    with torch.no_grad():
        model(images(batch=1))  # the first forward's checks, before any exporter traces it
    return model.eval()


def mergeable(model: nn.Module) -> bool:
    return all(isinstance(module, MergeableModule) for _, module in inserted_modules(model))


def run_onnx(path, x: torch.Tensor):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def assert_onnx_matches(model: nn.Module, path, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(run_onnx(path, x), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ parametrize


def test_a_parametrized_inserted_weight_is_saved_under_its_plain_name_and_loads(tmp_path):
    model = ps.apply(make_vit(), "adapter")
    perturb_inserted(model)
    down = model.get_submodule("blocks.0.mlp.petl_adapter.down")
    parametrizations.weight_norm(down)  # weight = g v / |v|, stored as parametrizations.weight.original0/1
    assert down.parametrizations.weight.original1.requires_grad
    train_steps(model, images())
    ps.save(model, tmp_path / "delta.safetensors")
    with safe_open(str(tmp_path / "delta.safetensors"), "pt") as file:
        names = set(file.keys())
        assert "blocks.0.mlp.petl_adapter.down.weight" in names
        assert not any("parametrizations" in name for name in names)
        torch.testing.assert_close(file.get_tensor("blocks.0.mlp.petl_adapter.down.weight"), down.weight.detach())
    fresh = ps.load(make_vit(), tmp_path / "delta.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(images()), model(images()), rtol=1e-6, atol=1e-6)


def test_a_delta_loads_into_a_model_whose_inserted_weight_is_parametrized(tmp_path):
    model = surgered("lora")
    ps.save(model, tmp_path / "delta.safetensors")
    target = ps.apply(make_vit(depth=2), "lora")
    pair = next(module for name, module in target.named_modules() if hasattr(module, "lora_A"))
    torch.nn.utils.parametrize.register_parametrization(pair, "lora_A", _Doubled())
    path = next(name for name, module in target.named_modules() if module is pair)
    ps.load(target, tmp_path / "delta.safetensors")  # through the parametrization's right inverse
    torch.testing.assert_close(pair.lora_A, model.get_submodule(path).lora_A.detach())


class _Doubled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x / 2


# ----------------------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("method", METHODS)
def test_quantize_dynamic_quantizes_the_base_and_keeps_the_branches_in_float(method):
    model = surgered(method, depth=4)
    x = images()
    with torch.no_grad():
        plain = make_vit()(x)
        unquantized = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization is moving to torchao
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert type(quantized.get_submodule("blocks.0.mlp.fc1")).__module__.startswith("torch.ao.nn.quantized")
    for _, module in inserted_modules(quantized):
        assert not any(type(m).__module__.startswith("torch.ao.") for m in module.modules())
        assert all(p.dtype == torch.float32 for p in module.parameters())
    if method == "dora":  # DoRA normalises the float weight of its projection, which a quantized layer packs
        with pytest.raises(ps.SurgeryError, match=r"merge DoRA into the base first \(petl_surgery.merge\)"):
            quantized(x)
        ps.merge(model)
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        error = (quantized(x) - unquantized).abs().max()
    assert error < 0.03 and error < 0.25 * (unquantized - plain).abs().max()  # the branches ran, in float


# ----------------------------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("method", METHODS)
def test_the_legacy_onnx_exporter_gives_the_models_outputs(method, tmp_path):
    model = surgered(method)
    x = images(batch=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(model, (x,), str(tmp_path / "model.onnx"), dynamo=False)
    assert_onnx_matches(model, tmp_path / "model.onnx", x)


@pytest.mark.slow  # about 5 to 15 s per export on a busy CPU
@pytest.mark.parametrize("method", METHODS)
def test_the_dynamo_onnx_exporter_gives_the_models_outputs_merged_and_unmerged(method, tmp_path):
    model = surgered(method, depth=1)
    x = images(batch=1)
    exported = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False)
    exported.save(str(tmp_path / "unmerged.onnx"))
    assert_onnx_matches(model, tmp_path / "unmerged.onnx", x)
    if mergeable(model):
        ps.merge(model)
        exported = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False)
        exported.save(str(tmp_path / "merged.onnx"))
        assert_onnx_matches(model, tmp_path / "merged.onnx", x)


# ---------------------------------------------------------------------------------- torch.export, jit


@pytest.mark.parametrize("method", METHODS)
def test_torch_export_gives_the_models_outputs(method):
    model = surgered(method)
    x = images(batch=1)
    # non-strict, the default of recent torch (2.14 here); torch 2.6's strict export refuses any model with a hook on
    # the model itself ("whole graph export entails exactly one guard export"), as surgery's guard is
    program = torch.export.export(model, (x,), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_torch_jit_script_is_refused_naming_trace_and_the_dynamo_exporter_and_trace_works(method):
    model = surgered(method)
    with pytest.raises(ps.SurgeryError, match=r"torch.jit.script .*torch.jit.trace.*dynamo=True"):
        torch.jit.script(model)
    x = images(batch=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python values taken as constants
        traced = torch.jit.trace(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_merged_model_scripts():
    model = surgered("lora")
    ps.merge(model)
    scripted = torch.jit.script(model)
    x = images(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
