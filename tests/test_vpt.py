"""VPT (visual prompt tuning): parity with a hand-run reference, parameter counts, options, training
behaviour, checkpoints, removal and refusals."""

from __future__ import annotations

import copy
import math
from typing import Dict, Optional

import pytest
import timm
import torch
from conftest import assert_same_snapshot, images, make_family, make_swin, make_vit, snapshot
from torch import nn

import petl_surgery as ps
from petl_surgery.methods.vpt import PromptTokens

FLAT = ["vit", "vit_avg", "deit_distilled", "dinov2_registers"]
PREFIX_TOKENS = {"vit": 1, "vit_avg": 1, "deit_distilled": 2, "dinov2_registers": 5}
ROPE = {
    "rope_vit": lambda: timm.create_model(
        "vit_small_patch16_rope_224", img_size=64, embed_dim=64, depth=3, num_heads=2, num_classes=5
    ),
    "eva02": lambda: timm.create_model(
        "eva02_tiny_patch14_224", img_size=56, embed_dim=64, depth=3, num_heads=2, num_classes=5
    ),
}


def make(name: str) -> nn.Module:
    if name == "vit_avg":
        return make_vit(global_pool="avg")
    if name in ROPE:
        torch.manual_seed(0)
        return ROPE[name]().eval()
    return make_family(name)


def inputs(name: str) -> torch.Tensor:
    """Images in float64: 56 px for the patch-14 models, 64 px for the others."""
    return images("dinov2_registers" if name in ("dinov2_registers", "eva02") else "vit", dtype=torch.float64)


def prompts_by_block(model: nn.Module) -> Dict[int, torch.Tensor]:
    return {m.block: m.prompts.detach() for m in model.modules() if isinstance(m, PromptTokens)}


def reference(base: nn.Module, prompts: Dict[int, torch.Tensor], deep: bool, x: torch.Tensor) -> torch.Tensor:
    """VPT written out on an untouched copy of the model, running its blocks by hand: timm's patch
    embedding, position embedding and prefix tokens; the prompts after the prefix tokens before the
    first prompted block, replaced before every other prompted block (deep); dropped before the final
    norm, pooling and head."""
    first = min(prompts)
    length = prompts[first].shape[0]
    p = base.num_prefix_tokens
    tokens = base.patch_embed(x)
    embedded = base._pos_embed(tokens)
    rope: Optional[torch.Tensor] = None
    if isinstance(embedded, tuple):  # Eva: (tokens, rotary embedding), patch dropout already applied
        tokens, rope = embedded
    else:
        tokens = base.patch_drop(embedded)
    tokens = base.norm_pre(tokens)
    for index, block in enumerate(base.blocks):
        expanded = lambda: prompts[index].expand(tokens.shape[0], -1, -1)  # noqa: E731
        if index == first:
            tokens = torch.cat([tokens[:, :p], expanded(), tokens[:, p:]], dim=1)
        elif deep and index in prompts:
            tokens = torch.cat([tokens[:, :p], expanded(), tokens[:, p + length :]], dim=1)
        if index >= first and hasattr(block.attn, "num_prefix_tokens"):
            block.attn.num_prefix_tokens = p + length  # RoPE: prompts are not rotated, as prefix tokens
        tokens = block(tokens) if rope is None else block(tokens, rope=rope)
    tokens = torch.cat([tokens[:, :p], tokens[:, p + length :]], dim=1)
    return base.forward_head(base.norm(tokens))


def surgery_and_reference(name: str, **options) -> tuple:
    model = make(name).double()
    base = copy.deepcopy(model)
    ps.apply(model, "vpt", **options)
    return model, base


# ---------------------------------------------------------------- parity


PARITY_CASES = [(name, None) for name in FLAT] + [("vit", [1, 3])]


@pytest.mark.parametrize("name, layers", PARITY_CASES)
def test_deep_vpt_equals_the_hand_run_reference(name, layers):
    model, base = surgery_and_reference(name, num_tokens=3, layers=layers)
    x = inputs(name)
    with torch.no_grad():
        expected = reference(base, prompts_by_block(model), True, x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
        assert not torch.allclose(expected, base(x))


@pytest.mark.parametrize("name, layers", PARITY_CASES)
def test_shallow_vpt_equals_the_hand_run_reference(name, layers):
    model, base = surgery_and_reference(name, num_tokens=3, deep=False, layers=layers)
    prompts = prompts_by_block(model)
    assert list(prompts) == [0 if layers is None else 1]
    x = inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(base, prompts, False, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", FLAT)
def test_prompts_sit_after_the_prefix_tokens_and_never_reach_the_norm_or_pooling(name):
    model = make(name)
    seen = {}
    model.norm.register_forward_pre_hook(lambda m, args: seen.setdefault("norm", []).append(args[0].shape[1]))
    x = inputs(name).float()
    model(x)
    ps.apply(model, "vpt", num_tokens=4)
    block_input = {}
    # (returns None: a forward hook's return value would replace the block's output)
    model.blocks[0].register_forward_hook(lambda m, args, out: block_input.update(x=args[0]))
    model(x)
    tokens = seen["norm"][0]
    assert seen["norm"] == [tokens, tokens]
    p = PREFIX_TOKENS[name]
    assert block_input["x"].shape[1] == tokens + 4
    prompts = model.blocks[0].petl_vpt.prompts
    assert torch.equal(block_input["x"][:, p : p + 4], prompts.expand(2, -1, -1))


@pytest.mark.parametrize("deep", [True, False])
@pytest.mark.parametrize("name", list(ROPE))
def test_rope_models_count_the_prompts_as_prefix_tokens(name, deep):
    model, base = surgery_and_reference(name, num_tokens=3, deep=deep, layers=[1, 2])
    assert [block.attn.num_prefix_tokens for block in model.blocks] == [1, 4, 4]
    x = inputs(name)
    with torch.no_grad():
        expected = reference(base, prompts_by_block(model), deep, x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    ps.remove(model)
    assert [block.attn.num_prefix_tokens for block in model.blocks] == [1, 1, 1]


# ---------------------------------------------------------------- parameters, init, options


@pytest.mark.parametrize(
    "options, blocks",
    [({}, 4), ({"layers": [1, 3]}, 2), ({"deep": False}, 1), ({"deep": False, "layers": [2, 3]}, 1)],
)
def test_parameter_counts(options, blocks):
    d, length = 64, 7
    model = ps.apply(make_vit(), "vpt", num_tokens=length, **options)
    summary = ps.summary(model)
    assert summary.per_method == {"vpt": blocks * length * d}
    assert summary.trainable == blocks * length * d + 64 * 5 + 5  # prompts and the head


def test_default_options_are_recorded_and_init_is_vpts_uniform():
    model = ps.apply(make_vit(), "vpt")
    prompts = model.blocks[0].petl_vpt
    assert prompts.options == {"num_tokens": 10, "deep": True, "dropout": 0.1}
    bound = math.sqrt(6 / (3 * 16 * 16 + 64))
    values = torch.cat([m.prompts.detach().flatten() for m in model.modules() if isinstance(m, PromptTokens)])
    assert values.abs().max() <= bound and values.abs().max() > 0.9 * bound
    assert abs(values.mean()) < 0.1 * bound


@pytest.mark.parametrize(
    "options, named",
    [
        ({"num_tokens": 0}, "'num_tokens'"),
        ({"num_tokens": 2.0}, "'num_tokens'"),
        ({"deep": 1}, "'deep'"),
        ({"dropout": 1.5}, "'dropout'"),
        ({"length": 4}, "'length'"),
    ],
)
def test_bad_options_raise_naming_the_option_and_leave_the_model_untouched(options, named):
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=named) as raised:
        ps.apply(model, "vpt", **options)
    if "length" in options:
        assert "valid options: num_tokens, deep, dropout" in str(raised.value)
    assert_same_snapshot(before, snapshot(model))


# ---------------------------------------------------------------- training


def test_gradients_reach_every_prompt_and_no_frozen_tensor():
    model = ps.apply(make_vit(), "vpt", num_tokens=2, layers=[0, 2]).train()
    model(images()).square().sum().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "blocks.0.petl_vpt.prompts", "blocks.2.petl_vpt.prompts", "head.weight", "head.bias"
    }


def test_dropout_acts_in_training_only():
    model = ps.apply(make_vit(), "vpt", dropout=0.5)
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))
    plain = ps.apply(make_vit(), "vpt", dropout=0.0).train()
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x))


# ---------------------------------------------------------------- checkpoints, removal, composition


@pytest.mark.parametrize("name, options", [("dinov2_registers", {}), ("vit", {"deep": False, "layers": [1, 2]})])
def test_round_trip_into_a_fresh_model_is_exact(tmp_path, name, options):
    model = ps.apply(make(name), "vpt", num_tokens=3, **options)
    ps.save(model, tmp_path / "vpt.safetensors")
    fresh = ps.load(make(name), tmp_path / "vpt.safetensors")
    x = inputs(name).float()
    assert torch.equal(fresh(x), model(x))
    assert prompts_by_block(fresh).keys() == prompts_by_block(model).keys()
    assert {n: p.requires_grad for n, p in fresh.named_parameters()} == {
        n: p.requires_grad for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("name", ["vit", "rope_vit"])
def test_remove_gives_back_the_original_model_bit_for_bit(name):
    model = make(name)
    x = inputs(name).float()
    before_output, before = model(x), snapshot(model)
    attention_state = [dict(vars(block.attn)) for block in model.blocks]
    ps.apply(model, "vpt", layers=[1, 2])
    assert not torch.equal(model(x), before_output)
    ps.remove(model)
    assert_same_snapshot(before, snapshot(model))
    assert [dict(vars(block.attn)) for block in model.blocks] == attention_state
    assert torch.equal(model(x), before_output)


def test_composes_with_patt_round_trip_and_removal(tmp_path):
    model = ps.apply(make_vit(), "patt", init="reference", layers=[2, 3])
    ps.apply(model, "vpt", num_tokens=3)
    vpt_only = ps.apply(make_vit(), "vpt", num_tokens=3)
    vpt_only.load_state_dict(model.state_dict(), strict=False)
    assert ps.summary(model).per_method == {"patt": 2 * (64 * 128 + 128 + 2 * 64 * 128 + 2 * 64), "vpt": 4 * 3 * 64}
    ps.save(model, tmp_path / "both.safetensors")
    fresh = ps.load(make_vit(), tmp_path / "both.safetensors")
    x = images()
    assert torch.equal(fresh(x), model(x))
    ps.remove(model, "patt")
    assert torch.equal(model(x), vpt_only(x))
    ps.remove(model)
    assert torch.equal(model(x), make_vit()(x))


def test_a_second_vpt_is_refused():
    model = ps.apply(make_vit(), "vpt", layers=[0, 1])
    with pytest.raises(ps.SurgeryError, match="already inserted"):
        ps.apply(model, "vpt", layers=[2, 3])


# ---------------------------------------------------------------- refusals


def test_swin_is_refused_before_anything_changes():
    model = make_swin()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=r"SwinTransformer: it is hierarchical.*no single flat token sequence"):
        ps.apply(model, "vpt")
    assert_same_snapshot(before, snapshot(model))


# ------------------------------------------------------------ relative-position biases

TINY_LS = dict(img_size=64, embed_dim=64, depth=3, num_heads=2, init_values=0.5, num_classes=5)
RELPOS = {
    "beit": lambda: timm.create_model("beit_base_patch16_224", **TINY_LS),
    "beit_shared_bias": lambda: timm.create_model(
        "beit_base_patch16_224", use_rel_pos_bias=False, use_shared_rel_pos_bias=True, **TINY_LS
    ),
    "vit_relpos": lambda: timm.create_model("vit_relpos_small_patch16_224", **TINY_LS),
    "vit_relpos_class_token": lambda: timm.create_model("vit_relpos_base_patch16_clsgap_224", **TINY_LS),
    "vit_relpos_shared_bias": lambda: timm.create_model("vit_srelpos_small_patch16_224", **TINY_LS),
}


def relpos_model(name: str) -> nn.Module:
    """The tiny model, with random relative-position bias tables (BEiT starts them at zero, which would
    hide where the prompts' rows and columns go)."""
    torch.manual_seed(0)
    model = RELPOS[name]().eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("relative_position_bias_table"):
                parameter.normal_(0, 0.5)
    return model


def padded_by_index(bias: torch.Tensor, p: int, length: int) -> torch.Tensor:
    """``bias`` placed at the non-prompt positions of a zero (N + L) x (N + L) bias."""
    n = bias.shape[-1]
    keep = torch.tensor([*range(p), *range(p + length, n + length)])
    full = bias.new_zeros(*bias.shape[:-2], n + length, n + length)
    full[..., keep[:, None], keep[None, :]] = bias
    return full


def relpos_reference(base: nn.Module, prompts: Dict[int, torch.Tensor], deep: bool, x: torch.Tensor) -> torch.Tensor:
    """VPT on BEiT or the relative-position ViT, run by hand on an untouched copy: the prompts after the
    prefix tokens as in ``reference``, and in every block they pass through, each relative-position bias
    (the attention's own and the one shared between blocks) with zero rows and columns for them."""
    base = copy.deepcopy(base)  # its bias methods get replaced below
    first = min(prompts)
    length = prompts[first].shape[0]
    p = base.num_prefix_tokens
    beit = type(base).__name__ == "Beit"
    tokens = base.patch_embed(x)
    if base.cls_token is not None:
        tokens = torch.cat([base.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    if beit and base.pos_embed is not None:
        tokens = tokens + base.pos_embed
    shared_module = base.rel_pos_bias if beit else base.shared_rel_pos
    shared = None if shared_module is None else (shared_module() if beit else shared_module.get_bias())
    keyword = "shared_rel_pos_bias" if beit else "shared_rel_pos"
    for index, block in enumerate(base.blocks):
        expanded = lambda: prompts[index].expand(tokens.shape[0], -1, -1)  # noqa: E731
        if index == first:
            tokens = torch.cat([tokens[:, :p], expanded(), tokens[:, p:]], dim=1)
        elif deep and index in prompts:
            tokens = torch.cat([tokens[:, :p], expanded(), tokens[:, p + length :]], dim=1)
        bias = shared
        if index >= first:
            owner, name = (block.attn, "_get_rel_pos_bias") if beit else (block.attn.rel_pos, "get_bias")
            if owner is not None:
                own = getattr(owner, name)
                setattr(owner, name, lambda own=own: padded_by_index(own(), p, length))
            bias = None if shared is None else padded_by_index(shared, p, length)
        tokens = block(tokens, **{keyword: bias})
    tokens = torch.cat([tokens[:, :p], tokens[:, p + length :]], dim=1)
    return base.forward_head(base.norm(tokens))


@pytest.mark.parametrize("deep", [True, False])
@pytest.mark.parametrize("layers", [None, [1, 2]])
@pytest.mark.parametrize("name", list(RELPOS))
def test_relative_position_biases_get_zero_rows_and_columns_for_the_prompts(name, layers, deep):
    model = relpos_model(name).double()
    base = copy.deepcopy(model)
    ps.apply(model, "vpt", num_tokens=3, layers=layers, deep=deep)
    x = images(dtype=torch.float64)
    with torch.no_grad():
        expected = relpos_reference(base, prompts_by_block(model), deep, x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
        assert not torch.allclose(expected, base(x))


@pytest.mark.parametrize("name", list(RELPOS))
def test_remove_from_relative_position_models_gives_back_the_original_bit_for_bit(name):
    model = relpos_model(name)
    x = images()
    before, state = model(x), snapshot(model)
    ps.apply(model, "vpt", num_tokens=3, layers=[1, 2])
    model(x)
    ps.remove(model)
    assert_same_snapshot(state, snapshot(model))
    assert torch.equal(model(x), before)
