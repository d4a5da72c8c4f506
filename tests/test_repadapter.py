"""RepAdapter: parity with the paper's linear group-wise adapter on ViT and Swin, its identity init, its
parameter count (formula and ViT-B/16), the re-parameterisation by merge (outputs kept, the plain
model's state_dict), what merge refuses, options, and the family contract."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from conftest import assert_same_snapshot, images, make_family, make_swin, make_vit, snapshot
from family_checks import check_method, randomize_inserted
from reference_blocks import assert_blocks_follow, tiny_coatnet

import petl_surgery as ps
from petl_surgery.methods.repadapter import ReparameterisableAdapter


def dense_b(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The grouped 1x1 convolution's weight (d, h/g, 1) as the d x h matrix it applies (the code's
    ``sparse2dense``): output block i reads hidden block i."""
    d, per_group = weight.shape[:2]
    dense = weight.new_zeros(d, per_group * groups)
    for i in range(groups):
        rows = slice(i * d // groups, (i + 1) * d // groups)
        dense[rows, i * per_group : (i + 1) * per_group] = weight[rows, :, 0]
    return dense


def repadapter(adapter: ReparameterisableAdapter, x: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    """R(x) = x + s (B_g (A x + a) + b) (dropout is off in eval)."""
    hidden = x @ adapter.down.weight[:, :, 0].T + adapter.down.bias
    return x + scale * (hidden @ dense_b(adapter.up.weight, groups).T + adapter.up.bias)


@pytest.mark.parametrize("family, groups", [("vit", 2), ("vit", 4), ("deit3", 2), ("swin", 2)])
def test_repadapter_equals_the_papers_adapter_before_attention_and_mlp(family, groups):
    def apply(model):
        ps.apply(model, "repadapter", scale=0.6, groups=groups)
        randomize_inserted(model, std=0.2)

    def reference(block):
        first, second = block.attn.petl_repadapter, block.mlp.petl_repadapter
        return {
            "attention": lambda attn, n: attn(repadapter(first, n, 0.6, groups)),
            "mlp": lambda mlp, n: mlp(repadapter(second, n, 0.6, groups)),
        }

    assert assert_blocks_follow(make_family(family), images(family), apply, reference) > 0


def test_init_is_exactly_the_identity_with_xavier_a():
    model = make_vit()
    x = images()
    before = model(x)
    ps.apply(model, "repadapter")
    assert torch.equal(model(x), before)
    adapter = model.blocks[0].attn.petl_repadapter
    assert adapter.down.weight.shape == (8, 64, 1) and adapter.up.weight.shape == (64, 4, 1)  # conv_A, conv_B
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    assert torch.count_nonzero(adapter.down.bias) == 0
    bound = (6 / (64 + 8)) ** 0.5
    assert 0.5 * bound < adapter.down.weight.abs().max() <= bound


def test_parameter_count_is_dh_plus_h_plus_dh_over_g_plus_d_per_adapter():
    d, h, g, depth = 64, 8, 2, 4
    per = d * h + h + d * h // g + d
    assert ps.summary(ps.apply(make_vit(), "repadapter")).per_method == {"repadapter": 2 * depth * per}
    assert ps.summary(ps.apply(make_vit(), "repadapter", positions="attention")).per_method == {"repadapter": depth * per}


def test_vit_b16_counts_239808_of_which_221184_are_weights():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        ps.apply(model, "repadapter")
    assert ps.summary(model).per_method == {"repadapter": 239_808}
    weights = sum(p.numel() for n, p in model.named_parameters() if ".petl_repadapter." in n and n.endswith("weight"))
    assert weights == 221_184  # the "0.22M" of the tables


def randomized(model, std=0.05):
    randomize_inserted(model, std=std)
    return model


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_merge_keeps_the_outputs_and_leaves_the_plain_model(family):
    model = randomized(ps.apply(make_family(family), "repadapter", scale=0.5))
    x = images(family)
    with torch.no_grad():
        unmerged = model(x)
        ps.merge(model)
        assert ps.summary(model).per_method == {}
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        plain = make_swin() if family == "swin" else make_vit()
        assert list(model.state_dict()) == list(plain.state_dict())
        plain.load_state_dict(model.state_dict())
        assert torch.equal(plain(x), model(x))


def test_merge_folds_w_times_identity_plus_sba_and_the_shift_into_the_bias():
    base = make_vit().double()
    model = randomized(ps.apply(make_vit().double(), "repadapter", scale=0.5))
    adapter = model.blocks[0].attn.petl_repadapter
    a, bias_a = adapter.down.weight[:, :, 0].detach().clone(), adapter.down.bias.detach().clone()
    b, bias_b = dense_b(adapter.up.weight.detach(), 2), adapter.up.bias.detach().clone()
    ps.merge(model)
    w, bias = base.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.bias
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0].attn.qkv.weight, w @ (torch.eye(64, dtype=torch.float64) + 0.5 * b @ a))
        torch.testing.assert_close(model.blocks[0].attn.qkv.bias, bias + 0.5 * w @ (b @ bias_a + bias_b))


def test_merge_on_a_batchnorm_model_with_1x1_conv_projections():
    model = randomized(ps.apply(tiny_coatnet(), "repadapter"))
    x = images()
    with torch.no_grad():
        unmerged = model(x)
        ps.merge(model)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        plain = tiny_coatnet()
        plain.load_state_dict(model.state_dict())
        assert torch.equal(plain(x), model(x))


class EncoderNet(nn.Module):
    """Two pre-norm ``nn.TransformerEncoderLayer`` (their MLP runs inline: linear1, ReLU, linear2) and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def test_an_inline_mlp_is_adapted_at_its_first_linear_and_merges_into_it():
    base = EncoderNet().double().eval()
    model = randomized(ps.apply(EncoderNet().double().eval(), "repadapter", positions="mlp", scale=0.5), std=0.2)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    layer, adapter = base.encoder.layers[0], model.encoder.layers[0].petl_repadapter
    with torch.no_grad():
        normed = layer.norm1(x)
        h = x + layer.self_attn(normed, normed, normed, need_weights=False)[0]
        expected = h + layer.linear2(torch.relu(layer.linear1(repadapter(adapter, layer.norm2(h), 0.5, 2))))
        torch.testing.assert_close(model.encoder.layers[0](x), expected, rtol=0, atol=1e-10)
        unmerged = model(x)
        ps.merge(model)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-10)
        base.load_state_dict(model.state_dict())
        assert torch.equal(base(x), model(x))


def test_merge_after_a_lora_applied_before_it_folds_both():
    model = ps.apply(make_vit(), "lora", targets=["q", "v"])
    ps.apply(model, "repadapter")
    randomize_inserted(model, std=0.05)
    x = images()
    with torch.no_grad():
        unmerged = model(x)
        ps.merge(model)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "prepare, reason",
    [
        (lambda: ps.apply(make_vit(qkv_bias=False), "repadapter"), r"its target 'qkv' has no bias to fold the shift into"),
        (
            lambda: ps.apply(ps.apply(make_vit(), "repadapter"), "lora", targets=["v"]),
            r"the lora branch on 'qkv' reads the input this RepAdapter changes and was applied after it",
        ),
    ],
)
def test_merge_refuses_what_it_cannot_fold_and_changes_nothing(prepare, reason):
    model = prepare()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=reason):
        ps.merge(model)
    assert_same_snapshot(before, snapshot(model))


def test_merge_refuses_while_a_kept_branch_reads_the_adapted_input():
    model = ps.apply(make_vit(), "repadapter")
    ps.apply(model, "patt")
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=r"the patt branch on 'qkv' reads the input this RepAdapter changes; remove"):
        ps.merge(model, keep_unmergeable=True)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_repadapter_meets_the_family_contract(family, tmp_path):
    assert check_method(lambda: make_family(family), lambda: images(family), "repadapter", tmp_path) == "works"


def test_repadapter_meets_the_family_contract_on_a_batchnorm_model(tmp_path):
    assert check_method(tiny_coatnet, images, "repadapter", tmp_path) == "works"


@pytest.mark.parametrize(
    "options, named",
    [({"bottleneck": 6, "groups": 4}, "'bottleneck' of method 'repadapter' must be a multiple of 'groups'"),
     ({"groups": 0}, "'groups'"), ({"positions": "head"}, "'positions'"), ({"scale": "1"}, "'scale'"),
     ({"dropout": 1.5}, "'dropout'"), ({"groups": 3, "bottleneck": 6}, "groups=3 needs a token width divisible by it")],
)
def test_bad_options_are_refused_naming_the_option_before_any_change(options, named):
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=named):
        ps.apply(model, "repadapter", **options)
    assert_same_snapshot(before, snapshot(model))
