"""Dense prediction on a surgered timm backbone: ``forward_intermediates`` and ``features_only`` give
the plain model's shapes for every method (VPT's prompts never reach them, or they are refused by
name), and segmentation_models_pytorch models on timm encoders train a delta that saves, loads and
reproduces their masks."""

from __future__ import annotations

import warnings

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from timm.models import register_model

import petl_surgery as ps
from conftest import images, make_swin, make_vit, randomize
from petl_surgery.methods import PetlModule

METHODS = list(ps.METHODS)
OPTIONS = {"lora": {"targets": ["q", "k", "v", "proj", "fc1", "fc2"]}, "ssf": {"targets": ["qkv", "proj", "fc1", "fc2"]}}


def with_method(model: torch.nn.Module, method: str, **options) -> torch.nn.Module:
    ps.apply(model, method, **{**OPTIONS.get(method, {}), **options})
    for module in model.modules():
        if isinstance(module, PetlModule):
            randomize(module, std=0.05)
    return model


def shapes(tensors) -> list:
    return [tuple(t.shape) for t in tensors]


@pytest.mark.parametrize("method", METHODS)
def test_forward_intermediates_gives_the_plain_shapes_and_the_forward_features_tokens(method):
    plain = make_vit()
    x = images()
    with torch.no_grad():
        expected = plain.forward_intermediates(x, intermediates_only=True)
        model = with_method(make_vit(), method)
        final, got = model.forward_intermediates(x, norm=True, output_fmt="NLC")
        assert shapes(model.forward_intermediates(x, intermediates_only=True)) == shapes(expected)
        prefixed = model.forward_intermediates(x, intermediates_only=True, return_prefix_tokens=True)
        assert [tuple(p.shape) for _, p in prefixed] == [(2, 1, 64)] * 4
        # the last block's features are the tokens forward_features gives, class token stripped
        torch.testing.assert_close(got[-1], model.forward_features(x)[:, 1:], rtol=0, atol=1e-6)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_features_only_then_surgery_gives_the_plain_feature_maps_shapes(method):
    def build():
        torch.manual_seed(0)
        return timm.create_model(
            "vit_small_patch16_224", img_size=64, embed_dim=64, depth=4, num_heads=2, features_only=True,
            out_indices=(1, 3),
        )

    x = images()
    if method == "fact":  # timm's wrapper is a ModuleDict that runs all its children: no room for shared factors
        with pytest.raises(ps.SurgeryError, match="'fact' keeps its shared factors .* FeatureGetterNet runs"):
            ps.apply(build(), method)
        return
    with torch.no_grad():
        expected = build()(x)
        model = with_method(build(), method)
        got = model(x)
    assert shapes(got) == shapes(expected) == [(2, 64, 4, 4)] * 2
    if method == "vpt":  # the prompts change the features, and they are read at the right tokens
        assert not torch.allclose(got[-1], expected[-1])


# refused on timm's features_only Swin (a FeatureListNet: the model's modules flattened into a ModuleDict)
SWIN_FEATURES_REFUSED = {
    "vpt": "prompt tokens cannot be added to FeatureListNet",
    "convpass": "'convpass' lays the patch tokens out on their grid",
    "fact": "'fact' keeps its shared factors .* FeatureListNet runs",
}


@pytest.mark.parametrize("method", METHODS)
def test_features_only_on_a_hierarchical_model_gives_the_plain_shapes(method):
    def build():
        torch.manual_seed(0)
        return timm.create_model(
            "swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=32, depths=(2, 2, 2, 2),
            num_heads=(1, 2, 4, 8), features_only=True,
        )

    x = images()
    if method in SWIN_FEATURES_REFUSED:
        with pytest.raises(ps.SurgeryError, match=SWIN_FEATURES_REFUSED[method]):
            ps.apply(build(), method)
        return
    with torch.no_grad():
        expected = build()(x)
        got = with_method(build(), method)(x)
    assert shapes(got) == shapes(expected) == [(2, 16, 16, 32), (2, 8, 8, 64), (2, 4, 4, 128), (2, 2, 2, 256)]


@pytest.mark.parametrize("options", [{"deep": False}, {"deep": True, "layers": [0, 1]}], ids=["shallow", "deep_partial"])
def test_prompts_that_travel_between_blocks_refuse_forward_intermediates_by_name(options):
    model = make_vit()
    ps.apply(model, "vpt", **options)
    x = images()
    model(x)  # the model itself works
    with pytest.raises(ps.SurgeryError, match=r"prompt tokens travel on from block \d.*deep=True on every block"):
        model.forward_intermediates(x)
    with pytest.raises(ps.SurgeryError, match="prompt tokens travel"):
        model.get_intermediate_layers(x)
    ps.remove(model)
    assert "forward_intermediates" not in model.__dict__
    assert shapes(model.forward_intermediates(x, intermediates_only=True)) == [(2, 64, 4, 4)] * 4


def test_deep_prompts_stay_inside_each_block():
    model = ps.apply(make_vit(), "vpt", num_tokens=3)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[1], out.shape[1])))
    model(images())
    assert seen == [(20, 17)] * 4  # each block gets its prompts (after its pre-hooks) and drops them
    outside = []
    model.blocks[1].register_forward_pre_hook(lambda m, args: outside.append(args[0].shape[1]), prepend=True)
    model(images())
    assert outside == [17]  # between blocks: the plain model's tokens


# --- segmentation_models_pytorch ---------------------------------------------------------------


@register_model
def petl_test_tiny_vit(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """A ViT small enough for a test, under a timm name (smp's DPT builds its encoder by name)."""
    kwargs = {"img_size": 64, "embed_dim": 64, "depth": 4, "num_heads": 2, **kwargs}
    return timm.create_model("vit_small_patch16_224", pretrained=pretrained, **kwargs)


def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return smp.Unet(
        "tu-swin_tiny_patch4_window7_224", encoder_weights=None, encoder_depth=4, decoder_channels=(32, 16, 8, 8),
        classes=3, img_size=64, window_size=4, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
    ).eval()


def dpt() -> torch.nn.Module:
    torch.manual_seed(0)
    return smp.DPT(
        "tu-petl_test_tiny_vit", encoder_weights=None, encoder_depth=4, classes=3,
        decoder_intermediate_channels=(16, 16, 16, 16), decoder_fusion_channels=16,
    ).eval()


def train_a_few_steps(model: torch.nn.Module, x: torch.Tensor, masks: torch.Tensor) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), masks).backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize(
    "build, method",
    [(unet, "lora"), (unet, "adapter"), (dpt, "vpt"), (dpt, "convpass"), (dpt, "lora")],
    ids=["unet-lora", "unet-adapter", "dpt-vpt", "dpt-convpass", "dpt-lora"],
)
def test_a_segmentation_model_on_a_timm_encoder_trains_saves_and_loads_its_delta(build, method, tmp_path):
    x = images()
    masks = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(4))
    model = build()
    with torch.no_grad():
        plain = model(x)
    options = {"targets": ["q", "v"]} if method == "lora" else {}
    # the decoder is new: it trains with the delta, its BatchNorm statistics too
    ps.apply(model, method, head="segmentation_head", unfreeze=r"^decoder\.", statistics="adapt", **options)
    inserted = {name: p for name, p in model.named_parameters() if ".petl_" in name}
    before = {name: p.detach().clone() for name, p in inserted.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # smp's and timm's deprecation notices
        train_a_few_steps(model, x, masks)
    assert inserted and all(not torch.equal(p, before[name]) for name, p in inserted.items())
    with torch.no_grad():
        trained = model(x)
    assert trained.shape == plain.shape == (2, 3, 64, 64)
    ps.save(model, tmp_path / "seg.safetensors")
    fresh = ps.load(build(), tmp_path / "seg.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained, rtol=0, atol=1e-6)
        assert torch.equal(fresh(x).argmax(1), trained.argmax(1))
