"""LoRA and SSF on layers chosen by name pattern (the ``modules`` option), in any model, and the adapter on
the MLPs of timm's ConvNeXt blocks (issue 14, item 6)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from family_checks import check_method, randomize_inserted, revive
from torch import nn

import petl_surgery as ps


class UsersNet(nn.Module):
    """A user's own module, no transformer block in it: every layer kind the patterns take, a dilated
    convolution with reflect padding among them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dilated = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
        self.temporal = nn.Conv1d(8, 8, 3, padding=1)
        self.volume = nn.Conv3d(1, 2, 3, padding=1, bias=False)
        self.depthwise = nn.Conv2d(2, 2, 3, padding=1, groups=2)
        self.embedding = nn.Embedding(4, 4)
        self.fc = nn.Linear(2 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dilated(torch.relu(self.conv(x)))  # (B, 8, 8, 8)
        x = self.temporal(x.flatten(2)).unflatten(2, (8, 8))  # a sequence of 64 positions
        x = self.volume(x.unsqueeze(1)).mean(2)  # (B, 2, 8, 8)
        return self.fc(self.depthwise(x).flatten(1))


def users_net() -> nn.Module:
    torch.manual_seed(0)
    return UsersNet()


def images(size: int = 16):
    return lambda: torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


LAYERS = [r"conv", r"dilated", r"temporal", r"volume"]


@pytest.mark.parametrize(
    "method, modules, options", [("lora", LAYERS, {"rank": 2}), ("ssf", LAYERS + [r"depthwise"], {})], ids=["lora", "ssf"]
)
def test_a_users_linear_and_conv_layers_hold_to_the_family_contract(method, modules, options, tmp_path):
    # the head "fc" trains as the head; the patterns choose the layers before it (SSF: the grouped one too)
    assert check_method(users_net, images(), method, tmp_path, modules=modules, **options) == "works"


def test_lora_on_a_convolution_is_peft_shaped_and_equals_its_equation():
    model = ps.apply(revive(users_net()).double().eval(), "lora", modules=r"dilated", rank=3, alpha=6.0)
    randomize_inserted(model, std=0.2)
    layer = model.dilated
    pair = layer.petl_lora.layer
    assert pair.lora_A.shape == (3, 8, 3, 3) and pair.lora_B.shape == (8, 3)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    hidden = F.conv2d(padded, pair.lora_A, stride=2, dilation=2)
    expected = F.conv2d(padded, layer.weight, layer.bias, stride=2, dilation=2) + 2.0 * torch.einsum("or,brhw->bohw", pair.lora_B, hidden)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_merge_folds_pattern_lora_and_ssf_into_the_weights():
    plain = revive(users_net()).double().eval()
    model = copy.deepcopy(plain)
    ps.apply(model, "lora", modules=LAYERS, rank=2)
    ps.apply(model, "ssf", modules=[r"conv", r"dilated", r"depthwise", r"fc"])
    randomize_inserted(model, std=0.1)
    x = images()().double()
    with torch.no_grad():
        expected = model(x)
        ps.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-9)
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_ssf_on_a_layer_without_bias_is_not_merged_and_says_why():
    model = ps.apply(users_net(), "ssf", modules=r"volume")
    with pytest.raises(ps.SurgeryError, match=r"volume\.petl_ssf \(ssf\) cannot be merged: its layer has no bias"):
        ps.merge(model)


def test_remove_gives_back_the_model_bit_for_bit():
    model = users_net()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    x = images()()
    with torch.no_grad():
        output = model(x)
    ps.apply(model, "lora", modules=LAYERS)
    ps.apply(model, "ssf", modules=r"fc")
    randomize_inserted(model)
    ps.remove(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), output)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "method, modules, message",
    [
        ("lora", [r"conv", r"nothing\.here"], r"pattern 'nothing\\\\.here' matches no module of UsersNet"),
        ("lora", r"embedding", r"matches 'embedding' \(Embedding\), which is not an nn.Linear, nn.Conv1d"),
        ("lora", r"depthwise", r"matches 'depthwise' \(Conv2d\), which is a grouped convolution \(groups=2\)"),
        ("ssf", r".*", r"pattern '\.\*' matches '' \(UsersNet\), which is not an nn.Linear"),
        ("lora", [r"conv", r"conv"], r"must be a regular expression or a list of distinct ones"),
        ("lora", r"conv(", r"'conv\(' is not a regular expression"),
    ],
)
def test_a_pattern_that_cannot_be_served_is_refused_before_any_change(method, modules, message):
    model = users_net()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ps.SurgeryError, match=message):
        ps.apply(model, method, modules=modules)
    assert model.state_dict().keys() == before.keys() and all(p.requires_grad for p in model.parameters())


def test_patterns_and_semantic_targets_or_layers_do_not_mix():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=3)
    with pytest.raises(ps.SurgeryError, match=r"either 'targets' .* or 'modules'"):
        ps.apply(vit, "lora", targets=["q"], modules=r"blocks\.0\.attn\.qkv")
    with pytest.raises(ps.SurgeryError, match=r"'modules' chooses layers by name pattern, and layers= chooses blocks"):
        ps.apply(vit, "ssf", modules=r"blocks\.0\.attn\.qkv", layers=[0])


def test_a_layer_inside_inserted_surgery_or_a_layer_subclass_is_refused():
    vit = ps.apply(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=3), "adapter")
    with pytest.raises(ps.SurgeryError, match=r"'blocks\.0\.mlp\.petl_adapter\.down', which is inside the module surgery inserted"):
        ps.apply(vit, "lora", modules=r".*petl_adapter\.down")
    encoder = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(ps.SurgeryError, match=r"\(NonDynamicallyQuantizableLinear\), which is not an nn.Linear"):
        ps.apply(encoder, "lora", modules=r"self_attn\.out_proj")


def test_a_pattern_applied_twice_to_a_layer_is_refused():
    model = ps.apply(users_net(), "lora", modules=r"conv")
    with pytest.raises(ps.SurgeryError, match=r"already applied to 'conv'"):
        ps.apply(model, "lora", modules=[r"conv", r"dilated"])


def resnet() -> nn.Module:
    """A timm ResNet (BasicBlock, one per stage, BatchNorm), narrow."""
    torch.manual_seed(0)
    return timm.models.resnet.ResNet(
        timm.models.resnet.BasicBlock, (1, 1, 1, 1), num_classes=3, stem_width=8, channels=(8, 16, 24, 32)
    )


def test_lora_on_a_timm_resnets_convolutions_holds_to_the_family_contract(tmp_path):
    modules = [r"conv1", r"layer\d\.0\.conv[12]", r"layer[234]\.0\.downsample\.0"]
    assert check_method(resnet, images(32), "lora", tmp_path, modules=modules, rank=2) == "works"


# ---------------------------------------------------------------------------------------------- ConvNeXt


def convnext(name="convnext_atto", **kwargs):
    def build():
        torch.manual_seed(0)
        return timm.create_model(
            name, pretrained=False, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=3, ls_init_value=0.5, **kwargs
        )

    return build


CONVNEXTS = {
    "channels_last_mlp": convnext(),
    "conv_mlp": convnext(conv_mlp=True),
    "v2_response_norm_mlp": convnext("convnextv2_atto"),
}


# name -> (build, make_input), for docs/make_coverage.py (FAMILY_MODULES)
COVERAGE = {f"timm ConvNeXt, {name}": (build, images(32)) for name, build in CONVNEXTS.items()}


@pytest.mark.parametrize("name", list(CONVNEXTS))
def test_the_adapter_on_convnext_blocks_holds_to_the_family_contract(name, tmp_path):
    assert check_method(CONVNEXTS[name], images(32), "adapter", tmp_path, bottleneck=4) == "works"


def test_lora_on_convnext_convolutions_and_mlps_holds_to_the_family_contract(tmp_path):
    modules = [r"stem\.0", r"stages\.[123]\.downsample\.1", r"stages\.\d\.blocks\.0\.mlp\.fc[12]"]
    assert check_method(convnext(conv_mlp=True), images(32), "lora", tmp_path, modules=modules, rank=2) == "works"


@pytest.mark.parametrize("conv_mlp", [False, True], ids=["channels_last_mlp", "conv_mlp"])
def test_the_convnext_adapter_is_added_inside_the_layer_scale(conv_mlp):
    model = revive(convnext(conv_mlp=conv_mlp)()).double().eval()
    ps.apply(model, "adapter", bottleneck=4, scale=0.3)
    randomize_inserted(model, std=0.1)
    block = model.stages[1].blocks[0]
    adapter = block.mlp.petl_adapter
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        h = block.conv_dw(x)
        h = block.norm(h) if conv_mlp else block.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        mlp = block.mlp.fc2(block.mlp.norm(block.mlp.drop1(block.mlp.act(block.mlp.fc1(h if conv_mlp else h.permute(0, 2, 3, 1))))))
        mlp = mlp if conv_mlp else mlp.permute(0, 3, 1, 2)
        z = 0.3 * adapter.up(torch.relu(adapter.down(h.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        expected = x + block.gamma.view(1, -1, 1, 1) * (mlp + z)
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_a_model_without_blocks_for_the_adapter_refuses_it_by_name():
    with pytest.raises(ps.SurgeryError, match=r"found no transformer block .* in ResNet"):
        ps.apply(resnet(), "adapter")
    with pytest.raises(ps.SurgeryError, match=r"needs an attention in block 0 \('stages\.0\.blocks\.0'\); it has none"):
        ps.apply(convnext()(), "lora")
