"""Interop: PEFT LoRA adapters both ways with the real peft package, AdaptFormer, V-PETL and VPT checkpoints
against their own equations, format detection, and every refusal leaving the model untouched."""

from __future__ import annotations

import argparse
import copy
import functools
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import assert_same_snapshot, images, make_swin, make_vit, randomize, snapshot
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import petl_surgery as ps
from petl_surgery import interop
from petl_surgery.methods import PetlModule


def random_tensors(shapes, seed=3, std=0.1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=generator, dtype=torch.float64) * std).to(dtype) for name, shape in shapes.items()}


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------ PEFT


def peft_adapter(tmp_path, safe=True, build=make_vit, **config):
    """A PEFT LoRA on a tiny timm ViT (or the model ``build`` makes) with every trainable tensor random,
    saved by PEFT itself (``adapter_model.safetensors``, or the pickled ``adapter_model.bin`` with
    ``safe=False``)."""
    peft_model = get_peft_model(build(), LoraConfig(**config))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=safe)
    return peft_model.eval(), tmp_path / "adapter"


PEFT_CONFIGS = {
    "qkv": dict(r=4, lora_alpha=8, target_modules=["qkv"]),
    "all_rslora_head": dict(
        r=4, lora_alpha=8, target_modules=["qkv", "attn.proj", "fc1", "fc2"], modules_to_save=["head"], use_rslora=True
    ),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["qkv", "attn.proj", "fc1"], rank_pattern={"fc1": 2}, alpha_pattern={"proj": 3}),
    "some_layers": dict(r=2, lora_alpha=2, target_modules=["qkv", "fc2"], layers_to_transform=[1, 2], layers_pattern="blocks", bias="lora_only"),
}


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_peft_adapter_imports_with_equal_outputs(tmp_path, name):
    peft_model, directory = peft_adapter(tmp_path, **PEFT_CONFIGS[name])
    model = interop.import_peft(make_vit(), directory)
    with torch.no_grad():
        close(model(images()), peft_model(images()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    saved = {
        k[len("base_model.model.") :].replace(".base_layer.", ".")
        for k in load_file(directory / "adapter_model.safetensors")
        if "lora_" not in k
    }
    assert trainable == {n for n, _ in model.named_parameters() if ".petl_lora." in n} | saved


def test_pickled_peft_adapter_is_read_with_weights_only(tmp_path):
    peft_model, directory = peft_adapter(tmp_path, safe=False, **PEFT_CONFIGS["qkv"])
    assert (directory / "adapter_model.bin").is_file() and not (directory / "adapter_model.safetensors").exists()
    model = interop.load_any(make_vit(), directory)
    with torch.no_grad():
        close(model(images()), peft_model(images()))


def test_fused_qkv_becomes_one_qkv_target_holding_pefts_a_and_b(tmp_path):
    _, directory = peft_adapter(tmp_path, **PEFT_CONFIGS["qkv"])
    tensors = load_file(directory / "adapter_model.safetensors")
    model = interop.import_peft(make_vit(), directory)
    for number, block in enumerate(model.blocks):
        adapter = block.attn.petl_lora
        prefix = f"base_model.model.blocks.{number}.attn.qkv"
        assert [name for name, _ in adapter.named_children() if name != "dropout"] == ["qkv"]
        assert torch.equal(adapter.qkv.lora_A, tensors[f"{prefix}.lora_A.weight"])
        assert torch.equal(adapter.qkv.lora_B, tensors[f"{prefix}.lora_B.weight"])
        assert adapter.scaling == 2.0 and adapter.options["targets"] == ("qkv",)


def test_imported_fused_qkv_lora_has_pefts_parameter_count(tmp_path):
    peft_model, directory = peft_adapter(tmp_path, **PEFT_CONFIGS["qkv"])
    model = interop.import_peft(make_vit(), directory)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ps.summary(model).per_method == {"lora": peft_model.get_nb_trainable_parameters()[0]} == {"lora": trainable}


def test_training_after_import_trains_pefts_model(tmp_path):
    """One SGD step on the imported model and on PEFT's, with the same loss, leaves them computing the
    same function (three untied copies of A would each take their own step and drift apart)."""
    peft_model, directory = peft_adapter(tmp_path, **PEFT_CONFIGS["qkv"])
    model = interop.import_peft(make_vit(), directory)
    x = images()
    before = model(x).detach()
    for network in (model, peft_model):
        optimizer = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=0.5)
        network(x).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        after = model(x)
        close(after, peft_model(x))
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3)


def test_export_loads_in_peft_with_equal_outputs_and_imports_back(tmp_path):
    model = ps.apply(make_vit(), "lora", rank=4, alpha=8, targets=["q", "v", "fc2"], layers=[0, 1, 2])
    ps.apply(model, "lora", rank=2, alpha=6, targets=["k", "proj"], layers=[3])
    for module in model.modules():
        if isinstance(module, PetlModule):
            randomize(module, std=0.1)
    with torch.no_grad():
        model.head.weight.add_(0.5)
    interop.export(model, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"] and "blocks.0.attn.qkv" in config["target_modules"]
    loaded = PeftModel.from_pretrained(make_vit(), tmp_path / "exported").eval()
    with torch.no_grad():
        expected = model(images())
        close(loaded(images()), expected)
        close(interop.import_peft(make_vit(), tmp_path / "exported")(images()), expected)


@pytest.mark.parametrize("name", ["qkv", "all_rslora_head"])
def test_import_then_export_gives_back_pefts_own_tensors(tmp_path, name):
    _, directory = peft_adapter(tmp_path, **PEFT_CONFIGS[name])
    model = interop.import_peft(make_vit(), directory)
    interop.export(model, tmp_path / "again")
    original = load_file(directory / "adapter_model.safetensors")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert original.keys() == again.keys()
    for key, tensor in original.items():
        assert torch.equal(again[key], tensor), key


def test_qkv_target_exports_as_pefts_lora_on_the_fused_linear(tmp_path):
    model = ps.apply(make_vit(), "lora", rank=4, alpha=8, targets="qkv")
    for module in model.modules():
        if isinstance(module, PetlModule):
            randomize(module, std=0.1)
    interop.export(model, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert config["target_modules"] == [f"blocks.{n}.attn.qkv" for n in range(4)]
    tensors = load_file(tmp_path / "exported" / "adapter_model.safetensors")
    pair = model.blocks[3].attn.petl_lora.qkv
    assert torch.equal(tensors["base_model.model.blocks.3.attn.qkv.lora_A.weight"], pair.lora_A.detach())
    assert torch.equal(tensors["base_model.model.blocks.3.attn.qkv.lora_B.weight"], pair.lora_B.detach())
    loaded = PeftModel.from_pretrained(make_vit(), tmp_path / "exported").eval()
    with torch.no_grad():
        close(loaded(images()), model(images()))


def write_adapter(directory, config, tensors):
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, directory / "adapter_model.safetensors")
    return directory


def test_peft_refusals_leave_the_model_untouched(tmp_path):
    _, good = peft_adapter(tmp_path, **PEFT_CONFIGS["qkv"])
    good_tensors = load_file(good / "adapter_model.safetensors")
    base = json.loads((good / "adapter_config.json").read_text())
    wide = {k: torch.zeros(v.shape[0], 96) if "lora_A" in k else v for k, v in good_tensors.items()}
    patch = {"base_model.model.blocks.0.norm1.lora_A.weight": torch.zeros(2, 64), "base_model.model.blocks.0.norm1.lora_B.weight": torch.zeros(64, 2)}
    cases = {
        "type 'IA3'": ({**base, "peft_type": "IA3"}, good_tensors),
        "'blocks.0.attn.qkv' has lora_magnitude_vector missing": ({**base, "use_dora": True}, good_tensors),
        "other shapes": (base, wide),
        "blocks.0.norm1": (base, patch),
        "rank 4, its config says r = 8": ({**base, "r": 8}, good_tensors),
    }
    for number, (message, (config, tensors)) in enumerate(cases.items()):
        model = make_vit()
        before = snapshot(model)
        with pytest.raises(ps.SurgeryError, match=message):
            interop.import_peft(model, write_adapter(tmp_path / f"bad{number}", config, tensors))
        assert_same_snapshot(before, snapshot(model))


def test_export_refuses_what_peft_cannot_hold(tmp_path):
    model = ps.apply(make_vit(), "lora")
    ps.apply(model, "patt", layers=[0])
    with pytest.raises(ps.SurgeryError, match="cannot hold method.*patt"):
        interop.export(model, tmp_path / "out")
    with pytest.raises(ps.SurgeryError, match="export formats: peft"):
        interop.export(model, tmp_path / "out", format="vpt")
    with pytest.raises(ps.SurgeryError, match="no LoRA"):
        interop.export(make_vit(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def make_convnext(conv_mlp: bool = False) -> nn.Module:
    """timm's ConvNeXt shrunk: one block per stage, widths 8..32, layer scale 0.5, 3 classes."""
    torch.manual_seed(0)
    return timm.create_model(
        "convnext_atto", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=3,
        ls_init_value=0.5, conv_mlp=conv_mlp,
    ).eval()


CONVNEXT_CONVS = ["stem.0", "stages.1.downsample.1", "stages.3.downsample.1"]


@pytest.mark.parametrize("conv_mlp", [False, True], ids=["linear_mlp", "conv_mlp"])
def test_peft_lora_on_convnext_convolutions_loads_with_equal_outputs(tmp_path, conv_mlp):
    targets = CONVNEXT_CONVS + ["stages.2.blocks.0.mlp.fc1"]
    build = functools.partial(make_convnext, conv_mlp)
    peft_model, directory = peft_adapter(tmp_path, build=build, r=4, lora_alpha=8, target_modules=targets, rank_pattern={"stem.0": 2})
    model = ps.load(build(), directory)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(model(x), peft_model(x))
    assert model.stem[0].petl_lora.layer.lora_A.shape == (2, 3, 4, 4)
    assert model.stages[2].blocks[0].mlp.petl_lora.fc1.lora_A.shape == (4, 24)  # the block's semantic target fc1
    ps.export(model, tmp_path / "again")
    original = load_file(directory / "adapter_model.safetensors")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert original.keys() == again.keys() and all(torch.equal(again[k], t) for k, t in original.items())


def test_pattern_lora_on_convnext_exports_for_peft_with_equal_outputs(tmp_path):
    model = ps.apply(make_convnext(), "lora", rank=3, alpha=6, modules=[r"stem\.0", r"stages\.\d\.downsample\.1"])
    ps.apply(model, "lora", rank=2, targets=["fc1", "fc2"], layers=[1])
    for module in model.modules():
        if isinstance(module, PetlModule):
            randomize(module, std=0.1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ps.export(model, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert "stem.0" in config["target_modules"] and config["modules_to_save"] == ["head.fc"]
    loaded = PeftModel.from_pretrained(make_convnext(), tmp_path / "exported").eval()
    with torch.no_grad():
        expected = model(x)
        close(loaded(x), expected)
        close(ps.load(make_convnext(), tmp_path / "exported")(x), expected)


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups")
def test_peft_lora_on_a_grouped_convolution_is_refused_by_name(tmp_path):
    peft_model = get_peft_model(make_convnext(), LoraConfig(r=8, target_modules=["stages.0.blocks.0.conv_dw"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    model = make_convnext()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=r"'stages\.0\.blocks\.0\.conv_dw', which is a grouped convolution \(groups=8\)"):
        ps.load(model, tmp_path / "adapter")
    assert_same_snapshot(before, snapshot(model))


def test_export_refuses_a_dilated_convolution_and_two_updates_on_one_layer(tmp_path):
    torch.manual_seed(0)
    model = ps.apply(nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2), nn.Flatten(), nn.Linear(4 * 12 * 12, 2)), "lora", modules="0")
    with pytest.raises(ps.SurgeryError, match=r"LoRA on '0' cannot be written for PEFT: the layer is dilated \(dilation=\(2, 2\)\)"):
        ps.export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    vit = ps.apply(ps.apply(make_vit(), "lora", targets=["fc1"], layers=[0]), "lora", modules=r"blocks\.0\.mlp\.fc1")
    with pytest.raises(ps.SurgeryError, match=r"two LoRA updates act on 'blocks\.0\.mlp\.fc1'"):
        ps.export(vit, tmp_path / "out")


# ------------------------------------------------------------------------------------ PEFT DoRA


def rope_vit_unfused():
    """A ViT with separate q_proj, k_proj, v_proj Linears."""
    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch16_rope_224", img_size=64, embed_dim=64, depth=2, num_heads=2, qkv_fused=False, num_classes=5
    ).eval()


def peft_dora(tmp_path, build, **config):
    """A PEFT DoRA (``use_dora=True``) with every trainable tensor moved off its init, saved by PEFT."""
    peft_model = get_peft_model(build(), LoraConfig(use_dora=True, **config))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "dora")
    return peft_model.eval(), tmp_path / "dora"


@pytest.mark.parametrize(
    "build, config",
    [
        (make_vit, dict(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], modules_to_save=["head"])),
        (rope_vit_unfused, dict(r=4, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "fc2"], use_rslora=True)),
    ],
    ids=["fused_qkv", "separate_projections"],
)
def test_peft_dora_imports_with_identical_outputs(tmp_path, build, config):
    peft_model, directory = peft_dora(tmp_path, build, **config)
    model = ps.load(build(), directory)
    assert {module.method for module in model.modules() if isinstance(module, PetlModule)} == {"dora"}
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft_model(x), rtol=0, atol=1e-6)
    peft_count = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert ps.summary(model).inserted == peft_count


def test_imported_dora_trains_as_pefts_with_dropout(tmp_path):
    """Train mode with lora_dropout: both draw one dropout mask per wrapped module, in the same order,
    and compute ``(m/n - 1) W0 x~ + (m/n) s B A x~`` on the dropped input x~."""
    peft_model, directory = peft_dora(tmp_path, make_vit, r=4, lora_alpha=8, target_modules=["qkv", "fc1"], lora_dropout=0.3)
    model = ps.load(make_vit(), directory)
    outputs = []
    for network in (model, peft_model):
        network.train()
        torch.manual_seed(11)
        outputs.append(network(images()))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


def test_dora_exports_to_peft_with_equal_outputs_and_imports_back(tmp_path):
    model = ps.apply(make_vit(), "dora", rank=4, alpha=6, targets=["q", "v", "fc2"])  # k rows: B 0, m ||W0_k||
    for module in model.modules():
        if isinstance(module, PetlModule):
            randomize(module, std=0.1)
    ps.export(model, tmp_path / "exported", format="peft")
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    tensors = load_file(tmp_path / "exported" / "adapter_model.safetensors")
    assert tensors["base_model.model.blocks.0.attn.qkv.lora_magnitude_vector"].shape == (192,)
    loaded = PeftModel.from_pretrained(make_vit(), tmp_path / "exported").eval()
    with torch.no_grad():
        expected = model(images())
        close(loaded(images()), expected)
        close(ps.load(make_vit(), tmp_path / "exported")(images()), expected)


def test_dora_export_refuses_a_mix_with_lora(tmp_path):
    model = ps.apply(make_vit(), "dora", targets=["q"])
    ps.apply(model, "lora", targets=["v"])
    with pytest.raises(ps.SurgeryError, match="LoRA or DoRA in all its modules"):
        ps.export(model, tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ AdaptFormer


def adaptformer_file(path, depth=4, d=64, r=8, learnable=False, probe_head=False):
    """A checkpoint as AdaptFormer's training script saves it: {"model", "optimizer", "epoch", "args"},
    its ViT's own base weights beside the adapters."""
    shapes = {}
    for n in range(depth):
        shapes.update({
            f"blocks.{n}.adaptmlp.down_proj.weight": (r, d), f"blocks.{n}.adaptmlp.down_proj.bias": (r,),
            f"blocks.{n}.adaptmlp.up_proj.weight": (d, r), f"blocks.{n}.adaptmlp.up_proj.bias": (d,),
            f"blocks.{n}.attn.q_proj.weight": (d, d),
        })
        if learnable:
            shapes[f"blocks.{n}.adaptmlp.scale"] = (1,)
    if probe_head:
        shapes.update({"head.1.weight": (5, d), "head.1.bias": (5,), "head.0.running_mean": (d,)})
    state = random_tensors(shapes, std=0.3)
    if probe_head:
        state["head.0.running_var"] = torch.rand(d, generator=torch.Generator().manual_seed(4)) + 0.5
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 7, "args": argparse.Namespace(ffn_num=r, lr=0.1)}, path)
    return state


def adaptformer_block(base_block, state, n, x, scale):
    """AdaptFormer's Block.forward (custom_modules.py), parallel, in eval mode, on timm's attention/MLP."""
    x = x + base_block.attn(base_block.norm1(x))
    down = F.relu(F.linear(x, state[f"blocks.{n}.adaptmlp.down_proj.weight"], state[f"blocks.{n}.adaptmlp.down_proj.bias"]))
    adapt = F.linear(down, state[f"blocks.{n}.adaptmlp.up_proj.weight"], state[f"blocks.{n}.adaptmlp.up_proj.bias"]) * scale
    return x + base_block.mlp(base_block.norm2(x)) + adapt


@pytest.mark.parametrize("learnable", [False, True])
def test_adaptformer_import_equals_adaptformers_block_equations(tmp_path, learnable):
    state = {k: v.double() for k, v in adaptformer_file(tmp_path / "af.pth", learnable=learnable).items()}
    base = make_vit().double()
    model = interop.load_any(copy.deepcopy(base), tmp_path / "af.pth")
    x = torch.randn(2, 17, 64, dtype=torch.float64)
    with torch.no_grad():
        for n in range(4):
            scale = state[f"blocks.{n}.adaptmlp.scale"] if learnable else 0.1
            close(model.blocks[n](x), adaptformer_block(base.blocks[n], state, n, x, scale), tol=1e-10)
    adapter = model.blocks[0].mlp.petl_adapter
    assert adapter.options["input"] == "residual" and adapter.options["dropout"] == 0.1
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters() if "petl_adapter" in n}


def test_adaptformer_linear_probe_head_is_folded(tmp_path):
    state = adaptformer_file(tmp_path / "af.pth", probe_head=True)
    model = interop.import_adaptformer(make_vit(), tmp_path / "af.pth", head=True)
    features = torch.randn(3, 64)
    bn = nn.BatchNorm1d(64, affine=False, eps=1e-6).eval()
    bn.running_mean.copy_(state["head.0.running_mean"])
    bn.running_var.copy_(state["head.0.running_var"])
    with torch.no_grad():
        close(model.head(features), F.linear(bn(features), state["head.1.weight"], state["head.1.bias"]))
    assert model.head.weight.requires_grad


def test_adaptformer_refusals_leave_the_model_untouched(tmp_path):
    adaptformer_file(tmp_path / "narrow.pth", d=32)
    adaptformer_file(tmp_path / "deep.pth", depth=6)
    torch.save({"model": {"blocks.0.adaptmlp.down_proj.weight": torch.zeros(8, 64)}, "args": Opaque()}, tmp_path / "pickled.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "narrow.pth").read_bytes()[:100])
    cases = {
        "narrow.pth": "other shapes",
        "deep.pth": "cannot tell which blocks",
        "pickled.pth": "weights_only",
        "truncated.pth": "weights_only",
    }
    for name, message in cases.items():
        model = make_vit()
        before = snapshot(model)
        with pytest.raises(ps.SurgeryError, match=message):
            interop.import_adaptformer(model, tmp_path / name)
        assert_same_snapshot(before, snapshot(model))
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="head .* does not fit the model's head 'head'.*head=False"):
        interop.import_adaptformer(model, _with_head(tmp_path, classes=7), head=True)
    assert_same_snapshot(before, snapshot(model))


class Opaque:
    """A class torch.load(weights_only=True) must refuse to build."""


def _with_head(tmp_path, classes):
    state = adaptformer_file(tmp_path / "h.pth")
    state.update(random_tensors({"head.weight": (classes, 64), "head.bias": (classes,)}))
    torch.save({"model": state}, tmp_path / "h.pth")
    return tmp_path / "h.pth"


# ----------------------------------------------------------------------------------------- V-PETL


def vpetl_state(blocks, d_of, mid=16, adapters=True, prefix="backbone."):
    shapes = {}
    for key in blocks:
        d = d_of(key)
        shapes.update({
            f"{prefix}{key}.attn.qkv_adapter.0.weight": (mid, d), f"{prefix}{key}.attn.qkv_adapter.0.bias": (mid,),
            f"{prefix}{key}.attn.qkv_adapter.2.weight": (2 * d, mid), f"{prefix}{key}.attn.qkv_adapter.2.bias": (2 * d,),
        })
        if adapters:
            shapes.update({
                f"{prefix}{key}.adaptmlp.down_proj.weight": (8, d), f"{prefix}{key}.adaptmlp.down_proj.bias": (8,),
                f"{prefix}{key}.adaptmlp.up_proj.weight": (d, 8), f"{prefix}{key}.adaptmlp.up_proj.bias": (d,),
            })
    return random_tensors(shapes, std=0.3, dtype=torch.float64)


class ReferenceQkv(nn.Module):
    """V-PETL's patt_kv on a fused qkv: q, k + s*D1, v + s*D2 with [D1|D2] = up(tanh(down(x)))."""

    def __init__(self, qkv, state, key, scale):
        super().__init__()
        self.qkv, self.state, self.key, self.scale = qkv, state, key, scale

    def forward(self, x):
        w = lambda i, kind: self.state[f"{self.key}.attn.qkv_adapter.{i}.{kind}"]  # noqa: E731
        delta = F.linear(torch.tanh(F.linear(x, w(0, "weight"), w(0, "bias"))), w(2, "weight"), w(2, "bias"))
        out = self.qkv(x)
        d = out.shape[-1] // 3
        return out + self.scale * torch.cat([torch.zeros_like(delta[..., :d]), delta], dim=-1)


class ReferenceMlp(nn.Module):
    """V-PETL's adapter inside the MLP: mlp(x) + 0.1 * up(relu(down(x)))."""

    def __init__(self, mlp, state, key):
        super().__init__()
        self.mlp, self.state, self.key = mlp, state, key

    def forward(self, x):
        w = lambda name: self.state[f"{self.key}.adaptmlp.{name}"]  # noqa: E731
        return self.mlp(x) + 0.1 * F.linear(F.relu(F.linear(x, w("down_proj.weight"), w("down_proj.bias"))), w("up_proj.weight"), w("up_proj.bias"))


def test_vpetl_import_equals_patt_and_adapter_equations_on_swin(tmp_path):
    base = make_swin().double()
    paths = [block.path for block in ps.blocks(base)]
    state = vpetl_state(paths, lambda key: base.get_submodule(key).attn.qkv.in_features)
    torch.save({"model": state, "epoch": 3}, tmp_path / "vpetl.pth")
    assert interop.detect(tmp_path / "vpetl.pth") == "vpetl"
    model = interop.load_any(copy.deepcopy(base), tmp_path / "vpetl.pth")
    reference = copy.deepcopy(base)
    for key in paths:
        block = reference.get_submodule(key)
        block.attn.qkv = ReferenceQkv(block.attn.qkv, state, "backbone." + key, 0.8)
        block.mlp = ReferenceMlp(block.mlp, state, "backbone." + key)
    x = images(batch=1, dtype=torch.float64)
    with torch.no_grad():
        close(model(x), reference(x), tol=1e-10)
    assert ps.summary(model).per_method.keys() == {"patt", "adapter"}


def test_vpetl_swin_names_map_onto_a_vit_by_depth_order(tmp_path):
    keys = ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"]
    state = vpetl_state(keys, lambda key: 64, adapters=False, prefix="")
    save_file({k: v.float() for k, v in state.items()}, tmp_path / "vpetl.safetensors")
    model = interop.load_any(make_vit(), tmp_path / "vpetl.safetensors", mode="qv")
    assert torch.equal(model.blocks[2].attn.petl_patt.down.weight, state["layers.1.blocks.0.attn.qkv_adapter.0.weight"].float())
    assert model.blocks[2].attn.petl_patt.options["mode"] == "qv"


# -------------------------------------------------------------------------------------------- VPT


def vpt_reference(base, x, prompts):
    """VPT's PromptedTransformer.forward_deep_prompt and head, on the base timm ViT's modules."""
    t = base.norm_pre(base.patch_drop(base._pos_embed(base.patch_embed(x))))
    length = prompts[0].shape[0]
    t = torch.cat([t[:, :1], prompts[0].expand(t.shape[0], -1, -1), t[:, 1:]], dim=1)
    for i, block in enumerate(base.blocks):
        if 1 <= i < len(prompts):
            t = torch.cat([t[:, :1], prompts[i].expand(t.shape[0], -1, -1), t[:, 1 + length :]], dim=1)
        t = block(t)
    return base.forward_head(base.norm(t))


@pytest.mark.parametrize("deep_rows, project", [(3, False), (2, False), (0, True)])
def test_vpt_import_equals_vpts_forward(tmp_path, deep_rows, project):
    assert "vpt" in ps.METHODS
    width = 32 if project else 64
    shapes = {"enc.transformer.prompt_embeddings": (1, 3, width)}
    if deep_rows:
        shapes["enc.transformer.deep_prompt_embeddings"] = (deep_rows, 3, width)
    if project:
        shapes.update({"enc.transformer.prompt_proj.weight": (64, width), "enc.transformer.prompt_proj.bias": (64,)})
    state = random_tensors(shapes, std=0.5, dtype=torch.float64)
    torch.save({"model": state}, tmp_path / "vpt.pth")
    base = make_vit().double()
    model = interop.load_any(copy.deepcopy(base), tmp_path / "vpt.pth")
    prompts = [state["enc.transformer.prompt_embeddings"][0]]
    if deep_rows:
        prompts += list(state["enc.transformer.deep_prompt_embeddings"].unbind(0))
    if project:
        prompts = [F.linear(p, state["enc.transformer.prompt_proj.weight"], state["enc.transformer.prompt_proj.bias"]) for p in prompts]
    x = images(dtype=torch.float64)
    with torch.no_grad():
        close(model(x), vpt_reference(base, x, prompts), tol=1e-10)
    assert len(ps.summary(model).per_block) == 1 + deep_rows


def test_vpt_refusals_leave_the_model_untouched(tmp_path):
    cases = {
        "layer 4 is out of range": {"prompt_embeddings": (1, 2, 64), "deep_prompt_embeddings": (5, 2, 64)},
        r"prompts: file \[2, 32\], model \[2, 64\]": {"prompt_embeddings": (1, 2, 32)},
        "no VPT prompts": {"prompt_proj.weight": (64, 64)},
    }
    for number, (message, shapes) in enumerate(cases.items()):
        torch.save(random_tensors(shapes), tmp_path / f"vpt{number}.pth")
        model = make_vit()
        before = snapshot(model)
        with pytest.raises(ps.SurgeryError, match=message):
            interop.import_vpt(model, tmp_path / f"vpt{number}.pth")
        assert_same_snapshot(before, snapshot(model))


# ---------------------------------------------------------------------------------- detect, load_any


def test_detect_and_load_any_dispatch(tmp_path):
    model = ps.apply(make_vit(), "adapter")
    ps.save(model, tmp_path / "ours.safetensors")
    _, peft_dir = peft_adapter(tmp_path, **PEFT_CONFIGS["qkv"])
    adaptformer_file(tmp_path / "af.pth")
    torch.save({"model": {"blocks.0.norm1.weight": torch.ones(64)}}, tmp_path / "plain.pth")
    (tmp_path / "notes.txt").write_text("hello")
    assert interop.detect(tmp_path / "ours.safetensors") == "petl_surgery"
    assert interop.detect(peft_dir) == "peft" == interop.detect(peft_dir / "adapter_config.json")
    assert interop.detect(tmp_path / "af.pth") == "adaptformer"
    assert interop.detect(tmp_path / "plain.pth") is None
    assert interop.detect(tmp_path / "notes.txt") is None
    assert interop.detect(tmp_path / "missing.pth") is None
    for path in (tmp_path / "ours.safetensors", peft_dir, tmp_path / "af.pth"):
        assert ps.summary(interop.load_any(make_vit(), path)).trainable > 0
    for path, kwargs, message in [
        (tmp_path / "plain.pth", {}, "cannot tell the format"),
        (tmp_path / "af.pth", {"format": "vpt"}, "looks like a 'adaptformer'"),
        (tmp_path / "af.pth", {"bottleneck": 3}, "unknown option 'bottleneck'"),
        (tmp_path / "af.pth", {"format": "lora"}, "unknown checkpoint format"),
        (peft_dir, {"head": True}, "takes no options"),
    ]:
        model = make_vit()
        before = snapshot(model)
        with pytest.raises(ps.SurgeryError, match=message):
            interop.load_any(model, path, **kwargs)
        assert_same_snapshot(before, snapshot(model))


def test_petl_surgery_load_detects_other_formats_and_export_writes_peft(tmp_path):
    adaptformer_file(tmp_path / "af.pth")
    model = ps.load(make_vit(), tmp_path / "af.pth")
    assert ps.summary(model).per_method == {"adapter": 4 * (2 * 64 * 8 + 8 + 64)}
    assert model.blocks[0].mlp.petl_adapter.options["input"] == "residual"
    lora = ps.apply(make_vit(), "lora", targets=["q", "v"])
    randomize(lora.blocks[0].attn.petl_lora)
    ps.export(lora, tmp_path / "adapter")
    back = ps.load(make_vit(), tmp_path / "adapter")
    close(back(images()), lora(images()))
    with pytest.raises(ps.SurgeryError, match="block_map apply to petl_surgery delta checkpoints, not to 'adaptformer'"):
        ps.load(make_vit(), tmp_path / "af.pth", block_map={0: 0})
    with pytest.raises(ps.SurgeryError, match="unknown checkpoint format 'lora'"):
        ps.load(make_vit(), tmp_path / "af.pth", format="lora")
