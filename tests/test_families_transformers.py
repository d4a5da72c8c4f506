"""The family contract on transformers' vision models whose attention goes through transformers' attention
interface (sites/transformers_layouts.py), under attn_implementation "eager" and "sdpa".

Every family has one tiny configuration (2 layers, 2 heads, weights seeded inside the builder). The full
contract (family_checks.check_method) runs for every method on every family under both implementations,
on its ``*ForImageClassification`` class where transformers has one (DINOv3 and ViTMAE have none: their
bare model), and for VPT, whose token layout is per class, and LoRA on the bare ``*Model`` classes too.
Then PATT against its equations on the separate q/k/v projections, a zero prefix against attention with
L extra zero keys and values (ViT, Swin), and deep VPT against an independent reimplementation (ViT, DINOv2
with registers).

Two models take inputs beyond pixels, given by a forward pre-hook of the builder (the model stays
the transformers class): SigLIP 2 its ``pixel_attention_mask`` and ``spatial_shapes`` (the second image
padded, so that the padding mask reaches every attention), ViTMAE a fixed ``noise`` (it masks 75% of the
patches at random on every forward, eval included; with fixed noise it keeps the same ones, so outputs
can be compared bit for bit).
"""

from __future__ import annotations

import copy
import functools
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pytest
import torch
import transformers as T
from family_checks import check_layout, check_method, check_patt_parity, first_output
from torch import nn
from transformers.modeling_utils import AttentionInterface

import petl_surgery as ps

pytestmark = pytest.mark.slow  # a family sweep: -m "not slow" leaves it out

WORKS = "works"
METHODS = tuple(ps.METHODS)
IMPLEMENTATIONS = ("eager", "sdpa")
C = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8)
DINOV2 = dict({k: v for k, v in C.items() if k != "intermediate_size"}, mlp_ratio=2)
SIGLIP2 = dict({k: v for k, v in C.items() if k != "image_size"}, num_patches=16)
# depths (2, 1): the second layer of stage 0 attends in shifted windows (8 x 8 patches, windows of 4)
SWIN = dict(image_size=32, patch_size=4, embed_dim=32, depths=[2, 1], num_heads=[2, 2], window_size=4)
LABELS = 5
BATCH = 2
# A gated MLP (SwiGLU) has no single input layer: the methods that target fc1 by default are refused
NO_FC1 = tuple((method, rf"targets fc1 of method '{method}' are not available .* offers fc2") for method in ("ssf", "repadapter", "fact"))
# transformers' BEiT block runs its MLP residual inline: no module ends the MLP's residual branch
NO_MLP_RESIDUAL = (("adapter_plus", r"adds to the residual stream after the MLP, and block 0 .* has no registered layout"),)
# the methods that need the patch grid: transformers' models take any image size, Swin's stages merge tokens
NO_GRID = r"reads the patch grid of each forward from the patch embedding of \w+, and petl_surgery does not know where it is|lays the patch tokens out on their grid"


def siglip2_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """SigLIP 2's patch mask and grid: the first image 4 x 4 patches, the second 3 x 4 and padded."""
    mask = torch.ones(BATCH, 16, dtype=torch.long)
    mask[1, 12:] = 0
    shapes = torch.tensor([[4, 4], [3, 4]])
    return args, {"pixel_attention_mask": mask, "spatial_shapes": shapes, **kwargs}


def fixed_noise(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    noise = torch.rand(BATCH, 16, generator=torch.Generator().manual_seed(5))
    return args, {"noise": noise, **kwargs}


@dataclass(frozen=True)
class Family:
    """A tiny configuration of one model file: its classes, their config, and the input it takes."""

    classes: tuple  # the *ForImageClassification class first where there is one, then the bare model
    config: Callable[[], object]
    pixels: tuple = (3, 32, 32)  # input shape without the batch
    inputs: Optional[Callable] = None  # a forward pre-hook giving inputs beyond the pixels
    vpt: str = WORKS
    # the MLP variants run under sdpa only: their MLP does not meet the attention implementation
    implementations: tuple = IMPLEMENTATIONS
    refused: tuple = ()  # (method, regex) pairs: methods refused on this family, with the reason


def _vision(config_class, vision: dict) -> Callable[[], object]:
    return lambda: config_class(vision_config=vision, num_labels=LABELS)


FAMILIES: Dict[str, Family] = {
    "vit": Family(("ViTForImageClassification", "ViTModel"), lambda: T.ViTConfig(**C, num_labels=LABELS)),
    "deit": Family(("DeiTForImageClassification", "DeiTModel"), lambda: T.DeiTConfig(**C, num_labels=LABELS)),
    "beit": Family(
        ("BeitForImageClassification", "BeitModel"),
        lambda: T.BeitConfig(**C, use_relative_position_bias=True, num_labels=LABELS),
        refused=NO_MLP_RESIDUAL,
    ),
    "dinov2": Family(("Dinov2ForImageClassification", "Dinov2Model"), lambda: T.Dinov2Config(**DINOV2, num_labels=LABELS)),
    "dinov2_registers": Family(
        ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersModel"),
        lambda: T.Dinov2WithRegistersConfig(**DINOV2, num_labels=LABELS),
    ),
    "dinov2_swiglu": Family(
        ("Dinov2ForImageClassification",),
        lambda: T.Dinov2Config(**DINOV2, use_swiglu_ffn=True, num_labels=LABELS),
        implementations=("sdpa",),
        refused=NO_FC1,
    ),
    "dinov2_registers_swiglu": Family(
        ("Dinov2WithRegistersForImageClassification",),
        lambda: T.Dinov2WithRegistersConfig(**DINOV2, use_swiglu_ffn=True, num_labels=LABELS),
        implementations=("sdpa",),
        refused=NO_FC1,
    ),
    "dinov3": Family(("DINOv3ViTModel",), lambda: T.DINOv3ViTConfig(**C, num_register_tokens=4)),
    "dinov3_gated": Family(
        ("DINOv3ViTModel",), lambda: T.DINOv3ViTConfig(**C, num_register_tokens=4, use_gated_mlp=True),
        implementations=("sdpa",),
        refused=NO_FC1,
    ),
    "clip": Family(("CLIPForImageClassification", "CLIPVisionModel"), _vision(T.CLIPConfig, C)),
    "siglip": Family(("SiglipForImageClassification", "SiglipVisionModel"), _vision(T.SiglipConfig, C)),
    "siglip2": Family(
        ("Siglip2ForImageClassification", "Siglip2VisionModel"), _vision(T.Siglip2Config, SIGLIP2), (16, 192), siglip2_inputs
    ),
    "swin": Family(
        ("SwinForImageClassification", "SwinModel"),
        lambda: T.SwinConfig(**SWIN, num_labels=LABELS),
        vpt=r"prompt tokens cannot be added to Swin\w+: it is hierarchical",
    ),
    "vit_mae": Family(("ViTMAEModel",), lambda: T.ViTMAEConfig(**C), inputs=fixed_noise),
}


def _config_for(cls_name: str, config):
    """A bare vision model of a two-tower family takes the vision config."""
    return config.vision_config if cls_name.endswith("VisionModel") else config


@functools.lru_cache(maxsize=None)
def _prototype(family: str, implementation: str, which: int) -> nn.Module:
    spec = FAMILIES[family]
    name = spec.classes[which]
    torch.manual_seed(0)
    model = getattr(T, name)._from_config(_config_for(name, spec.config()), attn_implementation=implementation).eval()
    if spec.inputs is not None:
        model.register_forward_pre_hook(spec.inputs, with_kwargs=True)
    return model


def build(family: str, implementation: str = "sdpa", which: int = 0) -> nn.Module:
    """The family's tiny model, seeded weights: a copy of one built once (never run), as building takes
    longer than copying."""
    return copy.deepcopy(_prototype(family, implementation, which))


def images(family: str) -> torch.Tensor:
    return torch.randn(BATCH, *FAMILIES[family].pixels, generator=torch.Generator().manual_seed(1))


def expected(family: str, method: str) -> str:
    refused = dict(FAMILIES[family].refused)
    if method in refused:
        return refused[method]
    if ps.METHODS[method].needs_token_grid:
        return NO_GRID
    return FAMILIES[family].vpt if method == "vpt" else WORKS


def tolerance(implementation: str) -> dict:
    """float64 comparisons: exact to 1e-10 under sdpa; the eager functions of ViT, BEiT, Swin and others
    take their softmax in float32 whatever the input's dtype, so there to float32's precision."""
    return dict(rtol=1e-10, atol=1e-10) if implementation == "sdpa" else dict(rtol=1e-5, atol=1e-6)


def assert_outcome(outcome: str, expectation: str) -> None:
    if expectation == WORKS:
        assert outcome == WORKS, outcome
    else:
        assert outcome.startswith("refused: ") and re.search(expectation, outcome), outcome


# name -> (build, make_input), for docs/make_coverage.py
COVERAGE = {
    f"transformers {FAMILIES[family].classes[0]} ({implementation})": (
        lambda family=family, implementation=implementation: build(family, implementation),
        lambda family=family: images(family),
    )
    for family in FAMILIES
    for implementation in FAMILIES[family].implementations
}
CASES = [(family, implementation) for family in FAMILIES for implementation in FAMILIES[family].implementations]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family, implementation", CASES)
def test_family_contract(family: str, method: str, implementation: str, tmp_path) -> None:
    outcome = check_method(lambda: build(family, implementation), lambda: images(family), method, tmp_path)
    assert_outcome(outcome, expected(family, method))


BARE = [family for family, spec in FAMILIES.items() if len(spec.classes) > 1]


@pytest.mark.parametrize("family", BARE)
def test_prompts_on_the_bare_model(family: str, tmp_path) -> None:
    """VPT's token layout is registered per class: the bare ``*Model`` too (the other methods see the same
    layers inside the classification class, test_the_bare_model_has_the_same_blocks)."""
    outcome = check_method(lambda: build(family, "sdpa", which=1), lambda: images(family), "vpt", tmp_path)
    assert_outcome(outcome, expected(family, "vpt"))


@pytest.mark.parametrize("family", BARE)
def test_the_bare_model_has_the_same_blocks(family: str) -> None:
    inside, bare = ps.blocks(build(family)), ps.blocks(build(family, which=1))
    assert [type(b.module) for b in bare] == [type(b.module) for b in inside] and bare
    assert all(i.path.endswith("." + b.path) for i, b in zip(inside, bare))


@pytest.mark.parametrize("family", ["vit", "dinov2", "clip"])
def test_the_adapter_reads_the_residual_stream_where_the_branch_ends_are_exact(family: str, tmp_path) -> None:
    assert check_method(lambda: build(family), lambda: images(family), "adapter", tmp_path, input="residual") == WORKS


def test_a_dropout_shared_by_both_branches_refuses_the_residual_adapter() -> None:
    torch.manual_seed(0)
    model = T.ViTForImageClassification._from_config(T.ViTConfig(**C, hidden_dropout_prob=0.1, num_labels=LABELS))
    with pytest.raises(ps.SurgeryError, match="input='residual'.*use input='mlp'"):
        ps.apply(model, "adapter", input="residual")
    assert ps.apply(model, "adapter") is model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sites_are_the_separate_projections(family: str) -> None:
    model = build(family)
    blocks = ps.blocks(model)
    assert len(blocks) == (3 if family == "swin" else 2)
    for block in blocks:
        site = block.attention
        assert {role: p.module for role, p in site.projections.items()} == {"q": "q_proj", "k": "k_proj", "v": "v_proj"}
        assert site.output.module in ("o_proj", "out_proj") and site.unsupported is None
        gated = FAMILIES[family].refused is NO_FC1  # a gated MLP's input is two layers: no one "fc1"
        assert set(block.mlp.projections) == ({"fc2"} if gated else {"fc1", "fc2"})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layout_self_check(family: str) -> None:
    # DINOv3 rotates k (RoPE) per position: a constant added to k is not constant after it, so only v is checked
    roles = ("v",) if family.startswith("dinov3") else ("k", "v")
    assert check_layout(build(family, "sdpa"), images(family), roles) > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patt_equals_its_equations_on_the_separate_projections(family: str) -> None:
    assert check_patt_parity(lambda: build(family, "sdpa"), lambda: images(family), "qkv") == len(ps.blocks(build(family)))


def test_siglip_pooling_head_is_not_a_block() -> None:
    model = build("siglip", which=1)
    assert [b.path for b in ps.blocks(model)] == ["encoder.layers.0", "encoder.layers.1"]
    ps.apply(model, "patt")
    assert not any("petl_" in name for name, _ in model.head.named_modules())


# --------------------------------------------------------------------------- prefix: zero prefix parity

ZERO_KEYS = "petl_test_zero_keys"
LENGTH = 3


def attention_with_zero_keys(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax([0] * L ++ (q k^T * scaling + mask)) [0 ; v]: attention with L extra zero keys and values."""
    scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores + attention_mask
    scores = torch.cat([scores.new_zeros(*scores.shape[:-1], LENGTH), scores], dim=-1)
    values = torch.cat([value.new_zeros(*value.shape[:-2], LENGTH, value.shape[-1]), value], dim=-2)
    return (scores.softmax(-1) @ values).transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_zero_prefix_equals_attention_with_extra_zero_keys(family: str, implementation: str) -> None:
    AttentionInterface.register(ZERO_KEYS, attention_with_zero_keys)
    model = build(family, implementation).double()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation(ZERO_KEYS)
    ps.apply(model, "prefix", length=LENGTH, reparam=False, init="zero")
    x = images(family).double()
    with torch.no_grad():
        prefixed, expected_output = first_output(model(x)), first_output(reference(x))
        plain = first_output(build(family, implementation).double()(x))
    torch.testing.assert_close(prefixed, expected_output, **tolerance(implementation))
    assert not torch.allclose(prefixed, plain)  # the zero prefix takes softmax mass: it is there


def test_prefix_is_refused_by_name_under_other_implementations() -> None:
    model = build("vit")
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ps.SurgeryError, match="attn_implementation is 'flex_attention'"):
        ps.apply(model, "prefix")
    with pytest.raises(ps.SurgeryError, match="attn_implementation is 'flex_attention'"):
        ps.apply(model, "vpt")
    assert not any("petl_" in name for name, _ in model.named_modules())


def test_switching_implementation_after_the_prefix_keeps_it_or_refuses() -> None:
    model = build("vit", "sdpa").double()
    ps.apply(model, "prefix", length=LENGTH)
    x = images("vit").double()
    with torch.no_grad():
        sdpa = first_output(model(x))
        model.set_attn_implementation("eager")
        torch.testing.assert_close(first_output(model(x)), sdpa, **tolerance("eager"))
        model.set_attn_implementation("flex_attention")
        attention = ps.blocks(model)[0].attention.module  # called alone: the model would build a block mask first
        with pytest.raises(ps.SurgeryRuntimeError, match="attn_implementation is 'flex_attention'"):
            attention(torch.randn(BATCH, 17, 64, dtype=torch.float64))


def test_a_causal_call_is_refused_rather_than_cut() -> None:
    """sdpa_attention_forward cuts keys longer than the queries when is_causal holds: CLIP's text tower
    calls its attention causally, so its prefix is refused at the call, not silently dropped."""
    torch.manual_seed(0)
    config = T.CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    text = T.CLIPTextModel._from_config(config)
    ps.apply(text, "prefix", length=LENGTH)
    with pytest.raises(ps.SurgeryRuntimeError, match="is causal"):
        text(input_ids=torch.tensor([[1, 2, 3]]))


def test_a_prefixed_model_copies_and_pickles_with_its_own_prefix() -> None:
    model = build("vit")
    ps.apply(model, "prefix", length=LENGTH)
    x = images("vit")
    with torch.no_grad():
        before = first_output(model(x))
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        attention = ps.blocks(twin)[0].attention.module
        assert attention.config.petl_extend.__self__ is attention.petl_prefix  # the copy's own prefix
        with torch.no_grad():
            assert torch.equal(first_output(twin(x)), before)
            attention.petl_prefix.up.weight.zero_()  # changing the copy's prefix changes the copy only
            assert not torch.equal(first_output(twin(x)), before) and torch.equal(first_output(model(x)), before)
    ps.remove(model)
    assert all(type(b.attention.module.config).__name__ == "ViTConfig" for b in ps.blocks(model))


# --------------------------------------------------------------------------- VPT: deep prompts by hand


def deep_prompts_by_hand(model: nn.Module, x: torch.Tensor, prompts, prefix: int) -> torch.Tensor:
    """Deep VPT written out on an untouched model: embeddings, then before layer i the prompts P_i after
    the ``prefix`` tokens (replacing the previous layer's), after the last layer the prompts dropped, then
    the model's own norm, pooling and classifier."""
    base = model.vit if hasattr(model, "vit") else model.dinov2_with_registers
    layers = base.layers if hasattr(base, "layers") else base.encoder.layer
    h = base.embeddings(x)
    for i, layer in enumerate(layers):
        rest = h[:, prefix:] if i == 0 else h[:, prefix + prompts[i].shape[0] :]
        h = layer(torch.cat([h[:, :prefix], prompts[i].expand(x.shape[0], -1, -1), rest], dim=1))
    h = torch.cat([h[:, :prefix], h[:, prefix + prompts[-1].shape[0] :]], dim=1)
    h = base.layernorm(h)
    if hasattr(model, "vit"):
        return model.classifier(h[:, 0])
    return model.classifier(torch.cat([h[:, 0], h[:, prefix:].mean(dim=1)], dim=-1))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family, prefix", [("vit", 1), ("dinov2_registers", 5)])
def test_deep_vpt_equals_an_independent_reimplementation(family: str, prefix: int, implementation: str) -> None:
    model = build(family, implementation).double()
    untouched = copy.deepcopy(model)
    ps.apply(model, "vpt", num_tokens=4, deep=True)
    prompts = []
    for i, block in enumerate(ps.blocks(model)):
        with torch.no_grad():
            block.module.petl_vpt.prompts.normal_(generator=torch.Generator().manual_seed(i))
        prompts.append(block.module.petl_vpt.prompts.detach())
    x = images(family).double()
    with torch.no_grad():
        torch.testing.assert_close(
            first_output(model(x)), deep_prompts_by_hand(untouched, x, prompts, prefix), **tolerance(implementation)
        )


def test_prompts_see_siglip2_padding_as_its_tokens_do() -> None:
    """With prompts, the padded patches of SigLIP 2's second image still change nothing."""
    model = build("siglip2", "sdpa").double()
    ps.apply(model, "vpt", num_tokens=3)
    x = images("siglip2").double()
    changed = x.clone()
    changed[1, 12:] = 100.0  # the second image's padding
    with torch.no_grad():
        torch.testing.assert_close(first_output(model(changed)), first_output(model(x)), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- transformers stays optional

BLOCKED = """
import importlib.abc, sys
tried = []
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformers":
            tried.append(name)
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Blocker())
import timm, torch, petl_surgery as ps
model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
ps.apply(model, "lora")
print(tried, model(torch.randn(1, 3, 32, 32)).shape[-1], ps.summary(model).trainable > 0)
"""


def test_the_library_imports_and_works_without_transformers() -> None:
    """With every import of transformers failing, the library imports (trying none) and operates on timm."""
    result = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "3", "True"]
