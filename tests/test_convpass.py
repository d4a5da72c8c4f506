"""Convpass: parity with the paper's convolutional bypass on ViTs with 1, 2 and 5 prefix tokens and a
non-square grid, its identity init, its parameter count (formula and ViT-B/16, the paper's 0.33M),
options, refusals by name, and the family contract."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import HybridEmbed
from timm.models.vision_transformer import VisionTransformer
from conftest import assert_same_snapshot, images, make_family, make_swin, make_vit, snapshot
from family_checks import check_method, randomize_inserted
from reference_blocks import assert_blocks_follow

import petl_surgery as ps
from petl_surgery.methods.convpass import ConvolutionalBypass


def quick_gelu(u: torch.Tensor) -> torch.Tensor:
    return u * torch.sigmoid(1.702 * u)


def convpass(bypass: ConvolutionalBypass, x: torch.Tensor, prefix: int, grid, scale: float) -> torch.Tensor:
    """s * C(x) as the paper's code computes it: down, QuickGELU, the patch tokens on their grid through
    the 3x3 convolution, every prefix token through the same convolution as a 1x1 image, QuickGELU, up."""
    rows, columns = grid
    batch = x.shape[0]
    z = quick_gelu(x @ bypass.down.weight.T + bypass.down.bias)
    patches = z[:, prefix:].reshape(batch, rows, columns, -1).permute(0, 3, 1, 2)
    patches = F.conv2d(patches, bypass.conv.weight, bypass.conv.bias, padding=1).permute(0, 2, 3, 1).reshape(batch, rows * columns, -1)
    alone = [
        F.conv2d(z[:, t].reshape(batch, -1, 1, 1), bypass.conv.weight, bypass.conv.bias, padding=1).reshape(batch, 1, -1)
        for t in range(prefix)
    ]
    z = quick_gelu(torch.cat(alone + [patches], dim=1))
    return scale * (z @ bypass.up.weight.T + bypass.up.bias)


def non_square_vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", img_size=(64, 96), embed_dim=64, depth=2, num_heads=2, num_classes=5, **kwargs).eval()


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "dinov2_registers", "non_square"])
def test_convpass_equals_the_papers_bypass_beside_attention_and_mlp(family):
    model = non_square_vit() if family == "non_square" else make_family(family)
    x = torch.randn(2, 3, 64, 96) if family == "non_square" else images(family)
    prefix, grid = model.num_prefix_tokens, model.patch_embed.grid_size

    def apply(model):
        ps.apply(model, "convpass", scale=0.7)
        randomize_inserted(model, std=0.2)

    def reference(block):
        first, second = block.attn.petl_convpass, block.mlp.petl_convpass
        return {
            "attention": lambda attn, n: attn(n) + convpass(first, n, prefix, grid, 0.7),
            "mlp": lambda mlp, n: mlp(n) + convpass(second, n, prefix, grid, 0.7),
        }

    assert family != "non_square" or grid == (4, 6)
    assert assert_blocks_follow(model, x, apply, reference) == len(model.blocks)


def test_prompt_tokens_in_front_of_the_patches_are_convolved_as_1x1_images():
    model = ps.apply(make_vit().double(), "vpt", num_tokens=3)
    ps.apply(model, "convpass", positions="attention")
    randomize_inserted(model, std=0.2)
    seen = []
    model.blocks[1].attn.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        model(images(dtype=torch.float64))
        inputs, output = seen[0]
        assert inputs.shape[1] == 1 + 3 + 16
        bypass = model.blocks[1].attn.petl_convpass
        ps.remove(model, "convpass")
        plain = model.blocks[1].attn(inputs)
    torch.testing.assert_close(output, plain + convpass(bypass, inputs, 4, (4, 4), 1.0), rtol=0, atol=1e-10)


def test_identity_init_leaves_the_output_unchanged_and_follows_the_code():
    model = make_vit()
    x = images()
    before = model(x)
    ps.apply(model, "convpass")
    assert torch.equal(model(x), before)
    bypass = model.blocks[0].attn.petl_convpass
    assert torch.equal(bypass.conv.weight[:, :, 1, 1], torch.eye(8))
    assert torch.count_nonzero(bypass.conv.weight) == 8 and torch.count_nonzero(bypass.up.weight) == 0
    assert all(torch.count_nonzero(b) == 0 for b in (bypass.down.bias, bypass.conv.bias, bypass.up.bias))
    bound = (6 / (64 + 8)) ** 0.5  # xavier-uniform
    assert 0.5 * bound < bypass.down.weight.abs().max() <= bound
    ps.remove(model)
    ps.apply(model, "convpass", conv_init="xavier")
    assert torch.equal(model(x), before)  # the up projection is still zero
    assert torch.count_nonzero(model.blocks[0].attn.petl_convpass.conv.weight) == 8 * 8 * 9


def test_parameter_count_is_2L_times_2h_plus_1_d_plus_9h2_plus_2h():
    d, h, depth = 64, 8, 4
    assert ps.summary(ps.apply(make_vit(), "convpass")).per_method == {"convpass": 2 * depth * ((2 * h + 1) * d + 9 * h * h + 2 * h)}
    assert ps.summary(ps.apply(make_vit(), "convpass", positions=["attention"])).per_method == {"convpass": depth * ((2 * h + 1) * d + 9 * h * h + 2 * h)}


def test_vit_b16_counts_327552_the_papers_033m():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        assert ps.summary(ps.apply(model, "convpass")).per_method == {"convpass": 327_552}


@pytest.mark.parametrize("family", ["vit", "dinov2_registers"])
def test_convpass_meets_the_family_contract(family, tmp_path):
    assert check_method(lambda: make_family(family), lambda: images(family), "convpass", tmp_path) == "works"


def hybrid_vit_with_batchnorm():
    """A flat ViT whose patch embedding is a small ResNet (BatchNorm) feature map: 4 x 4 tokens of 32 px."""
    torch.manual_seed(0)
    backbone = timm.create_model("resnet10t", features_only=True, out_indices=(2,), pretrained=False)
    embed = functools.partial(HybridEmbed, backbone=backbone)
    return VisionTransformer(img_size=32, patch_size=1, embed_dim=64, depth=2, num_heads=2, num_classes=5, embed_layer=embed).eval()


def test_convpass_meets_the_family_contract_on_a_flat_vit_with_batchnorm(tmp_path):
    assert hybrid_vit_with_batchnorm().patch_embed.grid_size == (4, 4)
    assert check_method(hybrid_vit_with_batchnorm, lambda: torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), "convpass", tmp_path) == "works"


def tiny_transformers_vit() -> torch.nn.Module:
    import transformers as T

    config = T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return T.ViTForImageClassification._from_config(config)


@pytest.mark.parametrize(
    "build, reason",
    [
        (make_swin, r"convpass' lays the patch tokens out on their grid .*SwinTransformer: it is hierarchical"),
        (tiny_transformers_vit, r"reads the patch grid .* of ViTForImageClassification, and petl_surgery does not know"),
    ],
)
def test_models_without_a_known_flat_grid_are_refused_by_name(build, reason):
    model = build()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=reason):
        ps.apply(model, "convpass")
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(
    "options, named",
    [({"bottleneck": 0}, "'bottleneck'"), ({"conv_init": "zero"}, "'conv_init'"), ({"positions": ["qkv"]}, "'positions'"),
     ({"positions": []}, "'positions'"), ({"dropout": -0.1}, "'dropout'"), ({"scale": float("nan")}, "'scale'")],
)
def test_bad_options_are_refused_naming_the_option_before_any_change(options, named):
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=named):
        ps.apply(model, "convpass", **options)
    assert_same_snapshot(before, snapshot(model))
