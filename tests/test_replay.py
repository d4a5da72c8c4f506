"""One replay of a recorded surgery (petl_surgery.replay), shared by load and every importer: checked by
planning first, then committed call by call, so that a later call finds what an earlier one installed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torchvision
from family_checks import randomize_inserted
from torch import nn

import petl_surgery as ps
from petl_surgery.interop.common import Call, install
from petl_surgery.methods import PetlModule

SRC = Path(ps.__file__).resolve().parent


def tv_vit() -> nn.Module:
    """torchvision's VisionTransformer (nn.MultiheadAttention inside) shrunk: 32 px, 2 layers, width 64."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=5
    )
    nn.init.normal_(model.heads.head.weight, std=0.2)
    return model.eval()


@pytest.fixture
def standard_mha():
    """PyTorch's fused MHA inference kernel differs from its standard path in the last bit."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(enabled)


def test_an_import_of_two_calls_on_one_multihead_attention_gives_the_applied_model(standard_mha) -> None:
    """PATT, then LoRA, on the same nn.MultiheadAttention blocks: both act through the hookable stand-in
    of its in_proj_weight that the first call installs, which the second must find."""
    reference = ps.apply(ps.apply(tv_vit(), "patt"), "lora")
    randomize_inserted(reference)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
    calls = []
    for method in ("patt", "lora"):
        call = Call(method, [0, 1], dict(next(m.options for m in reference.modules() if isinstance(m, PetlModule) and m.method == method)))
        for module in reference.modules():
            if isinstance(module, PetlModule) and module.method == method:
                call.tensors[module.block] = {key: value.clone() for key, value in module.state_dict().items()}
        calls.append(call)
    imported = install(tv_vit(), calls, {}, "a two-call file")
    with torch.no_grad():
        assert torch.equal(imported(x), expected)


def test_load_and_the_importers_replay_through_one_function() -> None:
    """Nothing under checkpoints/ or interop/ plans or commits surgery itself: petl_surgery.replay does."""
    offenders = []
    for folder in ("checkpoints", "interop"):
        for path in sorted((SRC / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("api"):
                    offenders += [f"{path.name}: {alias.name}" for alias in node.names if alias.name in ("plan", "commit")]
    assert not offenders
