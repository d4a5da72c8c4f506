"""The family contract on transformers' vision models with legacy attention names or hand-computed
attention (sites/transformers_legacy.py): Data2VecVision and VideoMAE under "eager" and "sdpa" (prefix
tuning on VideoMAE under both, with equal outputs), Swinv2
and Hiera under "eager" (transformers refuses "sdpa" and "flex_attention" for both), each as its
classification model and as the bare model.

Every model gets one tiny configuration (seeded inside the builder, transformers' own defaults
otherwise: drop path 0.1 in Data2VecVision and Swinv2, layer scale 0.1 in Data2VecVision; the contract
compares eval outputs after its train-mode steps, so stochastic depth needs no switching off), the
expected outcome of every method ("works" or a regex the refusal must match), the float64 layout
self-check, and PATT parity with the V-PETL equations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict

import pytest
import torch
import transformers
from family_checks import (
    WORKS,
    assert_outcome,
    attention_inputs,
    check_layout,
    check_method,
    check_patt_parity,
    first_output,
    randomize_inserted,
    shifted_output,
)
from torch import nn

import petl_surgery as ps
from petl_surgery.methods import PetlModule

pytestmark = pytest.mark.slow  # a family sweep: -m "not slow" leaves it out

METHODS = tuple(ps.METHODS)
# None of these blocks has a module that ends its MLP's residual branch (they add it inline)
NO_MLP_RESIDUAL = r"adds to the residual stream after the MLP, and block 0 .* has no registered layout"
# the methods that need the patch grid: these models take any image size, or merge tokens in stages
NO_GRID = r"reads the patch grid of each forward from the patch embedding of \w+, and petl_surgery does not know where it is|lays the patch tokens out on their grid"
FLAT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8)
SWINV2 = dict(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 2], window_size=4)
HIERA = dict(
    embed_dim=32, image_size=[32, 32], patch_size=[7, 7], patch_stride=[4, 4], patch_padding=[3, 3], depths=[1, 1],
    num_heads=[2, 2], query_stride=[2, 2], masked_unit_size=[4, 4], masked_unit_attention=[True, False],
    num_query_pool=1,
)
SWINV2_COSINE = r"\(Swinv2Attention\) is Swinv2's cosine attention, computed inline"
HIERA_MASK_UNIT = r"\(HieraMaskUnitAttention\) is Hiera's mask-unit attention, computed inline"


@dataclass(frozen=True)
class Model:
    """A tiny model, its input, and what each method must do on it (``"works"`` unless listed)."""

    build: Callable[[], nn.Module]
    make_input: Callable[..., torch.Tensor]
    refusals: Dict[str, str] = field(default_factory=dict)

    def expected(self, method: str) -> str:
        if method in self.refusals:
            return self.refusals[method]
        return NO_GRID if ps.METHODS[method].needs_token_grid else WORKS


def built(cls: type, config: type, **options) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls(config(num_labels=5, **options)).eval()

    return build


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def videos(batch: int = 2) -> torch.Tensor:
    """(batch, frames, channels, height, width), VideoMAE's layout."""
    return torch.randn(batch, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


T = transformers


def data2vec(cls: type, implementation: str, **options) -> Model:
    refusals = {"adapter_plus": NO_MLP_RESIDUAL}
    if implementation != "sdpa":
        refusals["prefix"] = r"is Data2VecVision's eager class .*attn_implementation='sdpa'"
    config = {**FLAT, "use_relative_position_bias": True, "attn_implementation": implementation, **options}
    return Model(built(cls, T.Data2VecVisionConfig, **config), images, refusals)


def videomae(cls: type, implementation: str, **options) -> Model:
    refusals = {"adapter_plus": NO_MLP_RESIDUAL}
    if implementation not in ("eager", "sdpa"):
        refusals["prefix"] = rf"its attn_implementation is '{implementation}'"
    config = dict(FLAT, num_frames=2, tubelet_size=2, attn_implementation=implementation, **options)
    return Model(built(cls, T.VideoMAEConfig, **config), videos, refusals)


def swinv2(cls: type) -> Model:
    vpt = rf"prompt tokens cannot be added to {cls.__name__}: it is hierarchical"
    return Model(built(cls, T.Swinv2Config, **SWINV2), images, {"prefix": SWINV2_COSINE, "vpt": vpt, "adapter_plus": NO_MLP_RESIDUAL})


def hiera(cls: type) -> Model:
    vpt = rf"prompt tokens cannot be added to {cls.__name__}: it is hierarchical: its mask-unit attention"
    # FacT's factors are shared across blocks, so every block must keep one width: Hiera's stages widen
    fact = r"method 'fact' needs target 'q' in block 1 .* to map width 32 to width 32"
    refusals = {"prefix": HIERA_MASK_UNIT, "vpt": vpt, "adapter_plus": NO_MLP_RESIDUAL, "fact": fact}
    return Model(built(cls, T.HieraConfig, **HIERA), images, refusals)


# The classification and the bare models, under every implementation each accepts.
MODELS: Dict[str, Model] = {
    "data2vec_vision_eager": data2vec(T.Data2VecVisionForImageClassification, "eager"),
    "data2vec_vision_sdpa": data2vec(T.Data2VecVisionForImageClassification, "sdpa"),
    "videomae_eager": videomae(T.VideoMAEForVideoClassification, "eager"),
    "videomae_sdpa": videomae(T.VideoMAEForVideoClassification, "sdpa"),
    "swinv2": swinv2(T.Swinv2ForImageClassification),
    "hiera": hiera(T.HieraForImageClassification),
    "data2vec_vision_bare_eager": data2vec(T.Data2VecVisionModel, "eager"),
    "data2vec_vision_bare_sdpa": data2vec(T.Data2VecVisionModel, "sdpa"),
    "videomae_bare_eager": videomae(T.VideoMAEModel, "eager"),
    "videomae_bare_sdpa": videomae(T.VideoMAEModel, "sdpa"),
    "swinv2_bare": swinv2(T.Swinv2Model),
    "hiera_bare": hiera(T.HieraModel),
}
# Token layouts beyond the defaults: the bias the encoder shares between layers; token-0 pooling.
PROMPT_VARIANTS: Dict[str, Model] = {
    "data2vec_vision_shared_bias_eager": data2vec(
        T.Data2VecVisionForImageClassification, "eager", use_relative_position_bias=False, use_shared_relative_position_bias=True
    ),
    "videomae_token0_pooling": videomae(T.VideoMAEForVideoClassification, "sdpa", use_mean_pooling=False),
}
CLASSIFIERS = [name for name in MODELS if "bare" not in name]
COSINE = ("swinv2", "swinv2_bare")  # a constant on k does not survive its normalisation: check v only

# name -> (build, make_input), read by docs/make_coverage.py
COVERAGE = {f"transformers {name}": (model.build, model.make_input) for name, model in MODELS.items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_family_contract(name: str, method: str, tmp_path) -> None:
    model = MODELS[name]
    assert_outcome(check_method(model.build, model.make_input, method, tmp_path), model.expected(method))


@pytest.mark.parametrize("name", list(PROMPT_VARIANTS))
def test_prompt_tokens_on_other_token_layouts(name: str, tmp_path) -> None:
    model = PROMPT_VARIANTS[name]
    assert check_method(model.build, model.make_input, "vpt", tmp_path) == WORKS


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_layout_self_check(name: str) -> None:
    model = MODELS[name]
    roles = ("v",) if name in COSINE else ("k", "v")
    assert check_layout(model.build(), model.make_input(batch=1), roles=roles) == len(ps.blocks(model.build())) == 2


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_patt_parity_through_the_layout(name: str) -> None:
    model = MODELS[name]
    assert check_patt_parity(model.build, partial(model.make_input, batch=1), "qkv") == 2


def test_cosine_attention_is_not_invariant_to_a_shift_of_k() -> None:
    """Why Swinv2's self-check leaves k out: its cosine attention normalises k, so a constant added to k
    changes the output (in a softmax attention it cancels)."""
    model = MODELS["swinv2"].build().double()
    calls = attention_inputs(model, images(batch=1).double())
    for block in ps.blocks(model):
        args, kwargs = calls[block.attention.path]
        base = shifted_output(block.attention, args, kwargs, None)
        assert (shifted_output(block.attention, args, kwargs, "k") - base).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["data2vec_vision_sdpa", "videomae_sdpa", "swinv2"])
def test_legacy_layers_are_described_by_their_own_names(name: str) -> None:
    block = ps.blocks(MODELS[name].build())[0]
    inner = "self" if name == "swinv2" else "attention"
    assert block.attention.path == f"{block.path}.attention"
    assert {role: p.module for role, p in block.attention.projections.items()} == {
        "q": f"{inner}.query", "k": f"{inner}.key", "v": f"{inner}.value"
    }
    assert block.attention.output.module == "output.dense"
    assert block.mlp.module is block.module.output.dense and block.mlp.input_module is block.module.intermediate.dense
    assert {target: p.module for target, p in block.mlp.projections.items()} == {
        "fc1": "intermediate.dense", "fc2": "output.dense"
    }


def test_lora_on_the_mlp_of_a_legacy_layer_is_held_by_the_layer() -> None:
    model = ps.apply(MODELS["videomae_sdpa"].build(), "lora", targets=("q", "fc1", "fc2"))
    inserted = {path for path, module in model.named_modules() if isinstance(module, PetlModule)}
    assert inserted == {
        f"videomae.encoder.layer.{i}.{where}petl_lora" for i in range(2) for where in ("attention.", "")
    }
    ps.merge(model)
    assert not any(isinstance(module, PetlModule) for module in model.modules())


@pytest.mark.parametrize("name, method", [("data2vec_vision_sdpa", "vpt"), ("videomae_sdpa", "prefix"), ("hiera", "lora")])
def test_output_objects_pass_through(name: str, method: str) -> None:
    model = ps.apply(MODELS[name].build(), method)
    output = model(MODELS[name].make_input())
    assert isinstance(output, transformers.modeling_outputs.ImageClassifierOutput)
    assert output.logits.shape == (2, 5)


def _adapter_reference(model: nn.Module, trained: nn.Module, position: str) -> nn.Module:
    """An untouched copy of ``model`` whose ``output.dense`` (the MLP's last Linear) gets the trained
    adapter's ``z`` added by a plain hook: of ``intermediate.dense``'s input (parallel) or of
    ``output.dense``'s own output (sequential)."""
    reference = copy.deepcopy(model)
    for block, trained_block in zip(ps.blocks(reference), ps.blocks(trained)):
        adapter = trained_block.mlp.module.petl_adapter
        layer = block.module
        seen = []
        layer.intermediate.dense.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))

        def add(module, args, output, adapter=adapter, seen=seen):
            return output + adapter(seen.pop() if position == "parallel" else output)

        layer.output.dense.register_forward_hook(add)
    return reference


@pytest.mark.parametrize("name", ["data2vec_vision_sdpa", "videomae_sdpa", "swinv2"])
@pytest.mark.parametrize("position", ["parallel", "sequential"])
def test_the_adapter_adds_to_the_mlp_branch_itself(name: str, position: str) -> None:
    """Before Data2VecVision's layer scale lambda_2, before Swinv2's post-norm, and, for VideoMAE, before
    the residual that VideoMAEOutput adds inside its forward: a sequential adapter reads the MLP's own
    output, not that output plus the residual."""
    base = MODELS[name].build().double()
    model = ps.apply(copy.deepcopy(base), "adapter", position=position)
    randomize_inserted(model, std=0.1)
    reference = _adapter_reference(base, model, position)
    x = MODELS[name].make_input().double()
    with torch.no_grad():
        torch.testing.assert_close(first_output(model(x)), first_output(reference(x)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["data2vec_vision_sdpa", "videomae_sdpa", "swinv2", "hiera"])
def test_the_adapter_reading_the_residual_stream_is_refused(name: str) -> None:
    with pytest.raises(ps.SurgeryError, match="input='residual' of method 'adapter' needs to know where the MLP's residual"):
        ps.apply(MODELS[name].build(), "adapter", input="residual")


def test_videomae_prefix_is_refused_under_flex_attention() -> None:
    model = videomae(T.VideoMAEForVideoClassification, "flex_attention").build()
    with pytest.raises(ps.SurgeryError, match=r"VideoMAESelfAttention .*its attn_implementation is 'flex_attention'"):
        ps.apply(model, "prefix")
    assert not any(isinstance(module, PetlModule) for module in model.modules())


def _prefixed_videomae(implementation: str, path) -> nn.Module:
    """The tiny VideoMAE under ``implementation`` with the delta at ``path`` loaded."""
    return ps.load(MODELS[f"videomae_{implementation}"].build(), path)


def test_videomae_prefix_gives_the_same_outputs_under_eager_and_sdpa(tmp_path) -> None:
    """The same prefix, in the keys and values of eager's matmuls and of sdpa's kernel, gives the same model
    (the prefix changes its outputs: it is not simply left out by either)."""
    model = ps.apply(MODELS["videomae_sdpa"].build(), "prefix", length=4)
    randomize_inserted(model, std=0.5)
    ps.save(model, tmp_path / "prefix.safetensors")
    x = videos()
    with torch.no_grad():
        sdpa = _prefixed_videomae("sdpa", tmp_path / "prefix.safetensors")(x).logits
        eager = _prefixed_videomae("eager", tmp_path / "prefix.safetensors")(x).logits
        plain = MODELS["videomae_eager"].build()(x).logits
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)
    assert (eager - plain).abs().max() > 1e-3


def test_videomae_prefix_follows_a_switch_of_attention_implementation() -> None:
    model = ps.apply(MODELS["videomae_sdpa"].build(), "prefix", length=4)
    randomize_inserted(model, std=0.5)
    with torch.no_grad():
        sdpa = model(videos()).logits
        model.set_attn_implementation("eager")
        torch.testing.assert_close(model(videos()).logits, sdpa, rtol=1e-5, atol=1e-5)
