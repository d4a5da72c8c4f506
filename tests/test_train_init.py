"""``petl-surgery train --init DELTA``: a new run that starts from another delta's modules (PVP), its head
left out unless asked, the methods and blocks chosen as ps.load chooses them, and inits that do not fit
refused before anything trains."""

from __future__ import annotations

import hashlib
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import petl_surgery as ps
from petl_surgery import cli

TINY_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY = [arg for key, value in TINY_ARGS.items() for arg in ("--model-arg", f"{key}={value}")]


def tiny(num_classes, **changes):
    return timm.create_model("vit_small_patch16_224", num_classes=num_classes, **{**TINY_ARGS, **changes})


@pytest.fixture
def source(tmp_path):
    """A source delta of 5 classes (the targets have 3) with PATT and LoRA in both blocks, randomised so
    that a loaded module is told apart from a fresh one."""
    torch.manual_seed(3)
    model = tiny(5)
    ps.apply(model, "patt", mid_dim=4)
    ps.apply(model, "lora", rank=2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)
    path = tmp_path / "source.safetensors"
    ps.save(model, path)
    return path


def train(image_folder, out, *extra):
    # lr 0: AdamW leaves every tensor where it started (its decay is scaled by lr too)
    return cli.main(["train", "vit_small_patch16_224", "--data", str(image_folder), "--epochs", "1",
                     "--batch-size", "8", "--image-size", "32", "--lr", "0", "--out", str(out), *TINY, *extra])


def test_init_takes_the_modules_and_leaves_the_head_out(image_folder, source, tmp_path, capsys):
    out = tmp_path / "target.safetensors"
    assert train(image_folder, out, "--init", str(source)) == 0
    capsys.readouterr()
    saved, started = load_file(str(out)), load_file(str(source))
    modules = sorted(name for name in started if ".petl_" in name)
    assert modules and sorted(name for name in saved if ".petl_" in name) == modules
    for name in modules:
        assert torch.equal(saved[name], started[name]), name
    assert saved["head.weight"].shape == (3, 32)  # the target's own head, not the source's 5 classes
    log = json.loads(out.with_suffix(".json").read_text())
    assert log["init"]["path"] == str(source) and log["init"]["head"] is False
    assert log["init"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert [call["method"] for call in log["init"]["surgery"]] == ["patt", "lora"]
    assert log["method"] == "patt+lora"


def test_init_head_takes_the_source_head_where_it_fits(image_folder, tmp_path, capsys):
    torch.manual_seed(4)
    model = tiny(3)
    ps.apply(model, "patt", mid_dim=4)
    with torch.no_grad():
        model.head.weight.normal_()
    source = tmp_path / "three.safetensors"
    ps.save(model, source)
    out = tmp_path / "target.safetensors"
    assert train(image_folder, out, "--init", str(source), "--init-head") == 0
    capsys.readouterr()
    assert torch.equal(load_file(str(out))["head.weight"], model.head.weight.detach())


def test_init_methods_blocks_and_the_chosen_method(image_folder, source, tmp_path, capsys):
    out = tmp_path / "patt_block1.safetensors"
    assert train(image_folder, out, "--init", str(source), "--init-methods", "patt", "--init-layers", "1") == 0
    modules = {name.split(".petl_")[0] + ".petl_" + name.split(".petl_")[1].split(".")[0]
               for name in load_file(str(out)) if ".petl_" in name}
    assert modules == {"blocks.1.attn.petl_patt"}

    out = tmp_path / "lora_only.safetensors"
    assert train(image_folder, out, "--init", str(source), "--method", "lora") == 0
    capsys.readouterr()
    names = [name for name in load_file(str(out)) if ".petl_" in name]
    assert names and all("petl_lora" in name for name in names)
    assert [c["method"] for c in json.loads(out.with_suffix(".json").read_text())["init"]["surgery"]] == ["lora"]


def test_init_block_map_moves_the_modules(image_folder, source, tmp_path, capsys):
    out = tmp_path / "deeper.safetensors"
    assert train(image_folder, out, "--init", str(source), "--init-methods", "patt", "--init-block-map", "0:2,1:3",
                 "--model-arg", "depth=4") == 0
    capsys.readouterr()
    saved, started = load_file(str(out)), load_file(str(source))
    moved = sorted(name for name in saved if ".petl_" in name)
    assert moved and all(name.startswith(("blocks.2.", "blocks.3.")) for name in moved)
    for name in moved:
        original = name.replace("blocks.2.", "blocks.0.").replace("blocks.3.", "blocks.1.")
        assert torch.equal(saved[name], started[original])


@pytest.mark.parametrize(
    "extra, status, message",
    [
        (["--method", "adapter"], 1, "holds no method 'adapter'"),
        (["--model-arg", "embed_dim=48"], 1, "source.safetensors"),  # another architecture
        (["--model-arg", "depth=3"], 1, "block_map"),
        (["--init-layers", "5"], 1, "no surgery on block 5"),
        (["-o", "mid_dim=8"], 2, "--init takes the surgery"),
        (["--layers", "1"], 2, "--init takes the surgery"),
        (["--resume", "x.safetensors"], 2, "exclude each other"),
    ],
)
def test_an_init_that_does_not_fit_is_refused_before_training(image_folder, source, tmp_path, capsys, extra, status,
                                                               message):
    out = tmp_path / "refused.safetensors"
    assert train(image_folder, out, "--init", str(source), *extra) == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("petl-surgery: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "epoch 1/1" not in err and not out.exists() and not out.with_suffix(".json").exists()


def test_init_options_without_init_and_a_missing_init_are_usage_errors(image_folder, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert train(image_folder, out, "--method", "patt", "--init-methods", "patt") == 2
    assert "give --init DELTA" in capsys.readouterr().err
    assert train(image_folder, out, "--init", str(tmp_path / "missing.safetensors")) == 2
    assert "no delta checkpoint" in capsys.readouterr().err
