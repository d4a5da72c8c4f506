"""PyTorch's nn.MultiheadAttention / nn.TransformerEncoderLayer and torchvision's ViT, Swin (V1, V2) and
Video Swin: the family contract, the layout self-check, PATT parity, exact parity of the patched forwards
with the libraries' own, refusals, and the V-PETL / AdaptFormer parameter counts on the full-size models.

The contract compares outputs bit for bit with the model before surgery. Two effects of PyTorch itself,
not of surgery, would break that comparison on CPU, so the tests control for them:

- nn.MultiheadAttention (and nn.TransformerEncoderLayer) take a fused inference kernel in eval mode without
  grad when batch_first; the patched forward copies PyTorch's standard path instead, so bit-for-bit tests
  run with that fast path off (``standard_path``), and one test compares with it on, to float tolerance.
- ``F.linear`` on a non-contiguous 3-D input (batch_first MHA transposes its input) takes another matmul
  path when the weight requires grad, even under ``torch.no_grad()``: freezing an nn.MultiheadAttention
  alone moves its output in the last bit. The models are therefore built with their base weights frozen,
  as surgery leaves them.
"""

from __future__ import annotations

import copy
import pickle
import re
from typing import Callable, Dict, Iterator, Tuple

import pytest
import timm
import torch
import torchvision
from conftest import assert_same_snapshot, snapshot
from family_checks import (
    attention_inputs,
    check_layout,
    check_method,
    check_patt_parity,
    first_output,
    randomize_inserted,
    shifted_output,
    site_patched,
)
from torch import nn
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
from torchvision.models.video.swin_transformer import SwinTransformer3d
from torchvision.ops import MLP

import petl_surgery as ps
from petl_surgery.freezing import find_heads
from petl_surgery.inventory import surgery_record


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every parameter frozen, as surgery leaves the base (see the docstring)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


@pytest.fixture
def standard_path() -> Iterator[None]:
    """PyTorch's standard attention path: the fused MHA / encoder-layer inference kernels off."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


# ---------------------------------------------------------------------------------------------- models


def make_vit() -> nn.Module:
    """torchvision's VisionTransformer shrunk: 32 px, patch 8, 2 layers, 2 heads, width 64. torchvision
    zero-initialises the head, which would hide every change upstream: it gets random weights here."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=5
    )
    nn.init.normal_(model.heads.head.weight, std=0.2)
    return frozen(model)


def make_swin(v2: bool = False) -> nn.Module:
    """torchvision's Swin-T (or V2-T) shrunk: width 32, depths (2, 2), window 4: stage 0 shifts windows.
    No stochastic depth, which could drop a whole block's branch from the contract's one backward."""
    torch.manual_seed(0)
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return frozen(
        SwinTransformer(
            patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
            stochastic_depth_prob=0.0, num_classes=5, **extra,
        )
    )


def make_swin3d() -> nn.Module:
    """torchvision's Video Swin shrunk: patch (2, 4, 4), window (2, 4, 4), width 32, depths (2, 2)."""
    torch.manual_seed(0)
    return frozen(
        SwinTransformer3d(
            patch_size=[2, 4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[2, 4, 4],
            stochastic_depth_prob=0.0, num_classes=5,
        )
    )


class EncoderNet(nn.Module):
    """Tokens -> nn.TransformerEncoder of two nn.TransformerEncoderLayer -> mean -> ``head``."""

    def __init__(self, batch_first: bool, norm_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1 if self.batch_first else 0))


class UserBlock(nn.Module):
    """A user's pre-norm block: nn.MultiheadAttention called with its defaults (need_weights=True) and a
    torchvision MLP."""

    def __init__(self, dim: int = 32, heads: int = 4, batch_first: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, [2 * dim, dim], activation_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        out, _weights = self.attn(h, h, h)
        x = x + out
        return x + self.mlp(self.norm2(x))


class UserNet(nn.Module):
    """Two :class:`UserBlock` on (tokens, batch, 8) inputs; the classifier has an unconventional name."""

    def __init__(self, batch_first: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(8, 32)
        self.blocks = nn.Sequential(UserBlock(batch_first=batch_first), UserBlock(batch_first=batch_first))
        self.classify = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.blocks(self.embed(x)).mean(1 if self.batch_first else 0))


def make_encoder(batch_first: bool, norm_first: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return frozen(EncoderNet(batch_first, norm_first))

    return build


def make_user(batch_first: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return frozen(UserNet(batch_first))

    return build


def noise(*shape: int) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(1))

    return make


MODELS: Dict[str, Tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "tv_vit": (make_vit, noise(2, 3, 32, 32)),
    "tv_swin": (make_swin, noise(2, 3, 32, 32)),
    "tv_swin_v2": (lambda: make_swin(v2=True), noise(2, 3, 32, 32)),
    "tv_swin3d": (make_swin3d, noise(1, 3, 4, 32, 32)),
    "encoder_bf_prenorm": (make_encoder(True, True), noise(2, 7, 8)),
    "encoder_bf_postnorm": (make_encoder(True, False), noise(2, 7, 8)),
    "encoder_sf_prenorm": (make_encoder(False, True), noise(7, 2, 8)),
    "encoder_sf_postnorm": (make_encoder(False, False), noise(7, 2, 8)),
    "user_mha": (make_user(False), noise(7, 2, 8)),
    "user_mha_bf": (make_user(True), noise(2, 7, 8)),
}
# name -> (build, make_input), read by docs/make_coverage.py
COVERAGE = {f"torch {name}": entry for name, entry in MODELS.items()}
SOFTMAX_MODELS = [name for name in MODELS if name != "tv_swin_v2"]


# ---------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("method", ["patt", "adapter"])
@pytest.mark.parametrize("name", list(MODELS))
def test_family_contract(name, method, tmp_path, standard_path):
    build, make_input = MODELS[name]
    assert check_method(build, make_input, method, tmp_path) == "works"


@pytest.mark.parametrize("name", [name for name in MODELS if "swin" not in name])
def test_prefix_on_multihead_self_attention(name, tmp_path):
    # through the replacement forward's attention call, need_weights True (user_mha) or False
    build, make_input = MODELS[name]
    assert check_method(build, make_input, "prefix", tmp_path, length=3, mid_dim=8) == "works"


@pytest.mark.parametrize("name", ["tv_vit", "encoder_bf_prenorm", "encoder_sf_postnorm"])
def test_adapter_on_the_residual_stream(name, tmp_path, standard_path):
    build, make_input = MODELS[name]
    assert check_method(build, make_input, "adapter", tmp_path, input="residual") == "works"


@pytest.mark.parametrize("name", ["tv_swin", "tv_swin3d"])
def test_adapter_on_the_residual_stream_is_refused_where_one_module_ends_both_branches(name, tmp_path):
    build, make_input = MODELS[name]
    outcome = check_method(build, make_input, "adapter", tmp_path, input="residual")
    assert re.match(r"refused: option input='residual' .* needs to know where the MLP's residual branch", outcome)


@pytest.mark.parametrize("name", SOFTMAX_MODELS)
def test_layout_self_check(name):
    build, make_input = MODELS[name]
    model = build()
    expected = 4 if "swin" in name else 2
    assert check_layout(model, make_input()) == len(ps.blocks(model)) == expected


@pytest.mark.parametrize("mode", ["kv", "qkv"])
@pytest.mark.parametrize("name", list(MODELS))
def test_patt_parity_through_the_layout(name, mode):
    build, make_input = MODELS[name]
    assert check_patt_parity(build, make_input, mode) == len(ps.blocks(build()))


def check_cosine_layout(model: nn.Module, x: torch.Tensor) -> int:
    """The layout self-check for cosine attention (Swin V2), where a constant added to k is not neutral:
    scaling the k slice by a positive factor is (q and k are normalised per head); a constant added to the
    v slice moves every output by one vector; a change of q at one token changes that token's output
    only, while a change of k at one token changes others. float64; returns the sites checked."""
    model = copy.deepcopy(model).double().eval()
    calls = attention_inputs(model, x.double())
    checked = 0
    for block in ps.blocks(model):
        site = block.attention
        args, kwargs = calls[site.path]

        def edited(role: str, edit: Callable[[torch.Tensor], None]) -> torch.Tensor:
            projection = site.projections[role]

            def hook(module, inputs, output):
                output = output.clone()
                edit(output.narrow(-1, projection.start, projection.width))
                return output

            handle = site.producer(projection.module).register_forward_hook(hook)
            try:
                with torch.no_grad(), site_patched(site):
                    return first_output(site.module(*args, **kwargs))
            finally:
                handle.remove()

        base = shifted_output(site, args, kwargs, None)
        torch.testing.assert_close(edited("k", lambda k: k.mul_(1.7)), base, rtol=1e-9, atol=1e-9)
        moved = (shifted_output(site, args, kwargs, "v") - base).reshape(-1, base.shape[-1])
        assert moved.abs().max() > 1e-6
        torch.testing.assert_close(moved, moved[:1].expand_as(moved), rtol=1e-7, atol=1e-7)
        changed = {}
        for role in ("q", "k"):
            delta = edited(role, lambda t: t[0, 0].add_(0.5)) - base
            changed[role] = int((delta.abs().amax(dim=-1) > 1e-9).sum())
        assert changed["q"] == 1 and changed["k"] > 1, changed
        checked += 1
    return checked


def test_layout_self_check_for_cosine_attention():
    model = make_swin(v2=True)
    assert check_cosine_layout(model, MODELS["tv_swin_v2"][1]()) == len(ps.blocks(model)) == 4


# ---------------------------------------------------------------------------------------------- exact parity


def zero_patt_outputs(build: Callable[[], nn.Module], x: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model's output before and after PATT at zero init (patched forwards in every attention)."""
    model = build().to(dtype)
    with torch.no_grad():
        before = first_output(model(x.to(dtype)))
    ps.apply(model, "patt")
    with torch.no_grad():
        return before, first_output(model(x.to(dtype)))


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_forwards_equal_the_originals_bit_for_bit(name, standard_path):
    build, make_input = MODELS[name]
    for dtype in (torch.float32, torch.float64):
        before, after = zero_patt_outputs(build, make_input(), dtype)
        assert torch.equal(before, after), dtype


@pytest.mark.parametrize("name", ["tv_vit", "encoder_bf_postnorm", "user_mha_bf"])
def test_patched_forwards_match_the_fused_fast_path_to_float_tolerance(name):
    assert torch.backends.mha.get_fastpath_enabled()
    build, make_input = MODELS[name]
    before, after = zero_patt_outputs(build, make_input(), torch.float32)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(1, 3, 40, 40), (1, 3, 36, 44)])
@pytest.mark.parametrize("v2", [False, True])
def test_swin_windows_padding_and_shift_equal_torchvisions(size, v2):
    before, after = zero_patt_outputs(lambda: make_swin(v2), noise(*size)(), torch.float32)
    assert torch.equal(before, after)


def test_video_swin_padding_and_window_clipping_equal_torchvisions():
    before, after = zero_patt_outputs(make_swin3d, noise(1, 3, 6, 40, 36)(), torch.float32)
    assert torch.equal(before, after)


def mha_holder(batch_first: bool, dropout: float = 0.0) -> nn.Module:
    """An nn.MultiheadAttention as the only child of a plain module (so that it forms a block)."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(16, 4, dropout=dropout, batch_first=batch_first)
    with torch.no_grad():
        holder.attn.in_proj_bias.normal_()
        holder.attn.out_proj.bias.normal_()
    return frozen(holder)


def mha_call(case: str, batch_first: bool) -> Tuple[torch.Tensor, dict]:
    """Input and keyword arguments of one nn.MultiheadAttention call: length 6, batch 3, width 16."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 16, generator=g)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[1, 4:] = True
    cases = {
        "plain": {},
        "no_weights": {"need_weights": False},
        "per_head_weights": {"average_attn_weights": False},
        "bool_mask": {"attn_mask": causal.isinf()},
        "float_mask": {"attn_mask": torch.randn(6, 6, generator=g), "need_weights": False},
        "mask_3d": {"attn_mask": torch.randn(12, 6, 6, generator=g)},
        "padding": {"key_padding_mask": padding, "need_weights": False},
        "padding_and_mask": {"key_padding_mask": padding, "attn_mask": causal.isinf()},
        "causal": {"attn_mask": causal, "is_causal": True, "need_weights": False},
        "causal_with_weights": {"attn_mask": causal, "is_causal": True},
        "unbatched": {},
        "unbatched_padding": {"key_padding_mask": padding[1], "need_weights": False},
    }
    kwargs = cases[case]
    if case.startswith("unbatched"):
        return x[1], kwargs
    return (x if batch_first else x.transpose(0, 1)), kwargs


MHA_CASES = [
    "plain", "no_weights", "per_head_weights", "bool_mask", "float_mask", "mask_3d", "padding",
    "padding_and_mask", "causal", "causal_with_weights", "unbatched", "unbatched_padding",
]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", MHA_CASES)
def test_patched_multihead_attention_equals_pytorchs(case, batch_first, standard_path):
    original = mha_holder(batch_first).eval()
    patched = ps.apply(mha_holder(batch_first).eval(), "patt", mode="qkv")
    x, kwargs = mha_call(case, batch_first)
    with torch.no_grad():
        expected = original.attn(x, x, x, **kwargs)
        got = patched.attn(x, x, x, **kwargs)
    assert (got[1] is None) == (expected[1] is None)
    if case.startswith("unbatched"):
        # PyTorch unsqueezes query, key and value one by one, so they are no longer the same tensor and it
        # projects them with three Linears; the patched forward keeps the one fused projection
        for ours, theirs in zip(got, expected):
            if theirs is not None:
                torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        return
    assert torch.equal(got[0], expected[0])
    if expected[1] is not None:
        assert torch.equal(got[1], expected[1])


def test_patched_multihead_attention_equals_pytorchs_in_training_with_dropout():
    original = mha_holder(True, dropout=0.3).train()
    patched = ps.apply(mha_holder(True, dropout=0.3).train(), "patt")
    for need_weights in (True, False):
        x, _ = mha_call("plain", True)
        torch.manual_seed(5)
        expected = original.attn(x, x, x, need_weights=need_weights)
        torch.manual_seed(5)
        got = patched.attn(x, x, x, need_weights=need_weights)
        assert torch.equal(got[0], expected[0])


# ---------------------------------------------------------------------------------------------- refusals


class CrossAttention(nn.Module):
    """Queries from x, keys and values from a second sequence: cross-attention."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mlp = MLP(16, [32, 16])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = x.flip(1)
        return self.mlp(self.attn(x, memory, memory)[0])


def test_patt_on_cross_attention_is_refused_at_the_first_forward():
    model = ps.apply(CrossAttention().eval(), "patt")
    with pytest.raises(ps.SurgeryRuntimeError, match=r"PATT on nn.MultiheadAttention 'attn' needs self-attention"):
        model(torch.randn(2, 5, 16))
    ps.remove(model)
    model(torch.randn(2, 5, 16))


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"kdim": 8, "vdim": 8}, r"kdim/vdim differ from embed_dim.*cross-attention"),
        ({"add_bias_kv": True}, r"add_bias_kv=True"),
        ({"add_zero_attn": True}, r"add_zero_attn=True"),
    ],
)
def test_patt_on_unsupported_multihead_attention_is_refused_and_the_adapter_works(kwargs, reason, tmp_path):
    def build() -> nn.Module:
        torch.manual_seed(0)
        block = CrossAttention()
        block.attn = nn.MultiheadAttention(16, 4, batch_first=True, **kwargs)
        if "kdim" in kwargs:
            block.forward = lambda x: block.mlp(block.attn(x, x[..., :8], x[..., :8])[0])
        return frozen(block)

    outcome = check_method(build, noise(2, 5, 16), "patt", tmp_path)
    assert re.match(r"refused: method 'patt' cannot operate on block 0 \(''\): its attention 'attn'", outcome)
    assert re.search(reason, outcome)
    assert check_method(build, noise(2, 5, 16), "adapter", tmp_path) == "works"


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_patt_refuses_nested_tensors_with_a_way_out():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    encoder = ps.apply(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True), "patt").eval()
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, 3:] = True
    with torch.no_grad(), pytest.raises(ps.SurgeryRuntimeError, match="enable_nested_tensor=False"):
        encoder(torch.randn(2, 5, 16), src_key_padding_mask=padding)


# ---------------------------------------------------------------------------------------------- surgery hygiene


@pytest.mark.parametrize("name", ["tv_vit", "tv_swin_v2", "tv_swin3d", "encoder_sf_prenorm"])
def test_remove_restores_modules_attributes_and_outputs_exactly(name):
    build, make_input = MODELS[name]
    model = build()
    attentions = [block.attention.module for block in ps.blocks(model)]
    before = snapshot(model)
    before_attributes = [sorted(vars(a)) for a in attentions]
    with torch.no_grad():
        output = first_output(model(make_input()))
    ps.apply(model, "bapat")
    assert all("forward" in vars(a) for a in attentions)
    randomize_inserted(model)
    with torch.no_grad():
        model(make_input())
    ps.remove(model)
    assert_same_snapshot(before, snapshot(model))
    assert [sorted(vars(a)) for a in attentions] == before_attributes
    with torch.no_grad():
        assert torch.equal(first_output(model(make_input())), output)


def test_the_shims_add_no_state_dict_keys():
    for build in (make_vit, lambda: make_swin(v2=True)):
        model = build()
        keys = set(model.state_dict())
        ps.apply(model, "patt")
        names = {name for name, _ in model.named_modules()}
        assert any(name.endswith(("petl_in_proj", "petl_qkv")) for name in names)
        added = set(model.state_dict()) - keys
        assert added and all(".petl_patt." in key for key in added)


def test_a_deep_copy_after_surgery_runs_its_own_branches():
    model = ps.apply(make_vit(), "patt")
    randomize_inserted(model)
    twin = copy.deepcopy(model)
    x = noise(2, 3, 32, 32)()
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
        twin_attention = ps.blocks(twin)[0].attention.module
        assert twin_attention.forward.module is twin_attention
        twin_attention.petl_patt.up.weight.mul_(3.0)
        assert not torch.equal(twin(x), model(x))


def test_a_pickled_model_keeps_its_surgery_and_removes_it_exactly():
    model = ps.apply(make_swin(v2=True), "bapat")
    randomize_inserted(model)
    x = noise(2, 3, 32, 32)()
    twin = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
    attention = ps.blocks(twin)[0].attention.module
    assert attention.forward.module is attention
    ps.remove(twin)
    assert "forward" not in vars(attention) and not hasattr(attention, "petl_qkv")
    with torch.no_grad():
        assert torch.equal(twin(x), make_swin(v2=True)(x))


# ---------------------------------------------------------------------------------------------- heads


@pytest.mark.parametrize(
    "build, head", [(make_vit, "heads.head"), (make_swin, "head"), (make_swin3d, "head"), (make_encoder(True, True), "head")]
)
def test_the_head_is_found_by_convention(build, head):
    model = build()
    assert find_heads(model) == [model.get_submodule(head)]
    ps.apply(model, "patt")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".petl_" not in n} == {f"{head}.weight", f"{head}.bias"}


def test_a_head_with_another_name_is_named_by_the_user():
    model = make_user()()
    assert find_heads(model) == []
    ps.apply(model, "adapter", head="classify")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".petl_" not in n} == {"classify.weight", "classify.bias"}


def test_blocks_of_the_encoder_name_the_inline_mlp():
    model = make_encoder(True, True)()
    block = ps.blocks(model)[0]
    assert (block.path, block.attention.path, block.mlp.path) == ("encoder.layers.0", "encoder.layers.0.self_attn", "encoder.layers.0.linear2")
    assert block.mlp.input_module is model.encoder.layers[0].linear1
    assert (block.mlp.in_features, block.mlp.out_features) == (32, 32)


# ---------------------------------------------------------------------------------------------- counts


@pytest.fixture(scope="module")
def swin3d_b() -> nn.Module:
    """Full-size torchvision Video Swin-B, on the meta device: shapes only, for counting."""
    with torch.device("meta"):
        return torchvision.models.video.swin3d_b(weights=None)


@pytest.mark.parametrize(
    "method, count", [("adapter", 1_553_664), ("patt", 4_647_424), ("bapat", 6_201_088)]
)
def test_v_petl_parameter_counts_on_video_swin_b(swin3d_b, method, count):
    assert len(ps.blocks(swin3d_b)) == 24
    ps.apply(swin3d_b, method)
    try:
        assert ps.summary(swin3d_b).per_method == {method: count}
    finally:
        ps.remove(swin3d_b)


def test_adaptformer_parameter_count_on_vit_base():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    ps.apply(model, "adapter")
    assert ps.summary(model).per_method == {"adapter": 1_189_632}


@pytest.mark.parametrize("order", [("patt", "lora"), ("lora", "patt")], ids=["patt_lora", "lora_patt"])
@pytest.mark.parametrize("name", ["tv_vit", "encoder_bf_prenorm", "user_mha"])
def test_patt_and_lora_through_the_stand_in_projections_round_trip_in_either_order(name, order, tmp_path, standard_path):
    build, make_input = MODELS[name]
    model = build().eval()
    for method in order:
        ps.apply(model, method)
    randomize_inserted(model)
    x = make_input()
    with torch.no_grad():
        expected = model(x)
    ps.save(model, tmp_path / "both.safetensors")
    fresh = ps.load(build().eval(), tmp_path / "both.safetensors")
    assert [call["method"] for call in surgery_record(fresh)] == list(order)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
