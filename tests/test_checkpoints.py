"""Delta checkpoints: round trips, the file's content, and every way a checkpoint can fail to fit."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from conftest import assert_same_snapshot, images, make_family, make_swin, make_vit, randomize, snapshot
from safetensors.torch import load_file, save_file

import petl_surgery as ps
from petl_surgery.checkpoints.format import metadata_checksum, tensors_digest
from petl_surgery.methods import PetlModule


def trained(model, method="bapat", **options):
    """``model`` after surgery with random delta weights, as if trained."""
    ps.apply(model, method, **options)
    for module in model.modules():
        if isinstance(module, PetlModule):
            randomize(module, std=0.05)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and "petl" not in name:
                parameter.add_(0.01)
    return model


def header_of(path):
    with open(path, "rb") as stream:
        (size,) = struct.unpack("<Q", stream.read(8))
        return size, json.loads(stream.read(size))


def rewrite(path, target, tensors=None, metadata=None, digest=True):
    """Write a variant of checkpoint ``path`` to ``target``, with a fresh checksum unless told not to."""
    original = json.loads(header_of(path)[1]["__metadata__"]["petl_surgery"])
    tensors = load_file(path) if tensors is None else tensors
    metadata = {**original, **(metadata or {})}
    if digest:
        metadata["tensors_sha256"] = tensors_digest(tensors)
        metadata["checksum"] = metadata_checksum(metadata)
    save_file(tensors, target, metadata={"petl_surgery": json.dumps(metadata)})
    return target


@pytest.fixture
def saved_vit(tmp_path):
    model = trained(make_vit(), unfreeze=r"\.bias$")
    path = tmp_path / "delta.safetensors"
    ps.save(model, path)
    return model, path


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("family, method", [("vit", "bapat"), ("swin", "patt"), ("deit_distilled", "adapter")])
def test_round_trip_into_a_fresh_model_reproduces_outputs_bit_for_bit(tmp_path, family, method):
    model = trained(make_family(family), method)
    ps.save(model, tmp_path / "delta.safetensors")
    fresh = make_family(family)
    ps.load(fresh, tmp_path / "delta.safetensors")
    x = images(family)
    assert torch.equal(fresh(x), model(x))
    assert {n: p.requires_grad for n, p in fresh.named_parameters()} == {
        n: p.requires_grad for n, p in model.named_parameters()
    }


def test_composed_surgery_round_trips_in_order(tmp_path):
    model = trained(make_vit(), "patt", layers=[2, 3])
    trained(model, "bapat", layers=[0, 1], mode="qkv", input="residual")
    ps.save(model, tmp_path / "delta.safetensors")
    fresh = ps.load(make_vit(), tmp_path / "delta.safetensors")
    assert torch.equal(fresh(images()), model(images()))
    assert [row.path for row in ps.summary(fresh).rows] == [row.path for row in ps.summary(model).rows]


def test_unfrozen_base_tensors_are_saved_and_trainable_after_load(saved_vit):
    model, path = saved_vit
    fresh = ps.load(make_vit(), path)
    assert fresh.blocks[0].attn.qkv.bias.requires_grad and not fresh.blocks[0].attn.qkv.weight.requires_grad
    assert torch.equal(fresh.blocks[0].attn.qkv.bias, model.blocks[0].attn.qkv.bias)


def test_loading_into_a_model_with_the_same_surgery_only_loads(saved_vit):
    model, path = saved_vit
    target = ps.apply(make_vit(), "bapat", unfreeze=r"\.bias$")
    modules = [name for name, _ in target.named_modules()]
    ps.load(target, path)
    assert [name for name, _ in target.named_modules()] == modules
    assert torch.equal(target(images()), model(images()))


def test_load_leaves_the_users_random_state_alone(saved_vit):
    _, path = saved_vit
    fresh = make_vit()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ps.load(fresh, path)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- what the file holds


def test_the_file_holds_exactly_the_trainable_tensors_plus_a_small_header(saved_vit):
    model, path = saved_vit
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    stored = load_file(path)
    assert stored.keys() == trainable.keys()
    for name, tensor in stored.items():
        assert torch.equal(tensor, trainable[name]), name
    header_size, _ = header_of(path)
    delta_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    assert os.path.getsize(path) == 8 + header_size + delta_bytes
    assert header_size < 16 * 1024


def test_the_metadata_describes_the_surgery(saved_vit):
    _, path = saved_vit
    metadata = json.loads(header_of(path)[1]["__metadata__"]["petl_surgery"])
    assert metadata["format"] == "petl_surgery.delta" and metadata["format_version"] == 1
    assert metadata["library_version"] == ps.__version__
    assert metadata["methods"] == [
        {
            "method": "bapat",
            "blocks": [0, 1, 2, 3],
            "options": {
                "mode": "kv", "mid_dim": 128, "patt_scale": 0.8, "init": "zero", "bottleneck": 64,
                "adapter_scale": 0.1, "position": "parallel", "layernorm": None, "dropout": 0.0, "input": "mlp",
            },
        }
    ]
    assert metadata["model"] == {
        "class": "timm.models.vision_transformer.VisionTransformer",
        "timm_name": "vit_small_patch16_224",
        "blocks": 4,
        "block_paths": ["blocks.0", "blocks.1", "blocks.2", "blocks.3"],
    }
    assert metadata["head"] == ["head.bias", "head.weight"]
    assert len(metadata["fingerprint"]) == len(metadata["fingerprint_without_head"]) == 64


# ---------------------------------------------------------------- saving refuses, atomically


def test_save_without_surgery_raises_and_writes_nothing(tmp_path):
    with pytest.raises(ps.SurgeryError, match="no delta to save"):
        ps.save(make_vit(), tmp_path / "delta.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_into_a_missing_directory_raises(tmp_path):
    with pytest.raises(ps.SurgeryError, match="does not exist"):
        ps.save(ps.apply(make_vit(), "patt"), tmp_path / "missing" / "delta.safetensors")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(saved_vit, monkeypatch):
    model, path = saved_vit
    old = path.read_bytes()

    def broken_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(ps.SurgeryError, match="disk full"):
        ps.save(ps.apply(make_vit(), "adapter"), path)
    assert path.read_bytes() == old
    assert list(path.parent.iterdir()) == [path]


# ---------------------------------------------------------------- loading refuses, before any change


def refuses(model, path, message):
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=message):
        ps.load(model, path)
    assert_same_snapshot(before, snapshot(model))


def test_another_architecture_is_refused(saved_vit):
    refuses(make_swin(), saved_vit[1], "another base architecture .*SwinTransformer")


def test_another_head_size_is_refused_saying_how_to_leave_it_out(saved_vit):
    refuses(
        make_vit(num_classes=7),
        saved_vit[1],
        r"the head in .* does not fit this model \(.*head.weight: checkpoint \[5, 64\], model \[7, 64\].*pass load_head=False",
    )


def test_missing_tensors_are_refused(saved_vit, tmp_path):
    _, path = saved_vit
    tensors = load_file(path)
    del tensors["blocks.2.mlp.petl_bapat.up.weight"]
    refuses(make_vit(), rewrite(path, tmp_path / "v.safetensors", tensors), "lacks .*blocks.2.mlp.petl_bapat.up.weight")


def test_unexpected_tensors_are_refused(saved_vit, tmp_path):
    _, path = saved_vit
    tensors = {**load_file(path), "blocks.0.extra.weight": torch.zeros(2)}
    refuses(make_vit(), rewrite(path, tmp_path / "v.safetensors", tensors), "does not have: blocks.0.extra.weight")


def test_tensors_of_the_wrong_shape_are_refused(saved_vit, tmp_path):
    _, path = saved_vit
    tensors = load_file(path)
    tensors["blocks.1.attn.petl_bapat.down.weight"] = torch.zeros(64, 64)
    refuses(make_vit(), rewrite(path, tmp_path / "v.safetensors", tensors), "wrong shape: blocks.1.attn.petl_bapat")


def test_a_truncated_file_is_refused(saved_vit, tmp_path):
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(saved_vit[1].read_bytes()[:-100])
    refuses(make_vit(), truncated, "corrupt or truncated")


def test_flipped_bytes_in_the_tensors_are_refused(saved_vit, tmp_path):
    data = bytearray(saved_vit[1].read_bytes())
    data[-10] ^= 0xFF
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(bytes(data))
    refuses(make_vit(), corrupt, "do not match the checksum")


def test_a_damaged_header_is_refused(saved_vit, tmp_path):
    data = bytearray(saved_vit[1].read_bytes())
    data[12:20] = b"\x00" * 8
    corrupt = tmp_path / "h.safetensors"
    corrupt.write_bytes(bytes(data))
    refuses(make_vit(), corrupt, "corrupt or truncated")


def test_garbage_is_refused(tmp_path):
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x80\x04\x95 this is a pickle, not a checkpoint")
    refuses(make_vit(), garbage, "truncated or not a safetensors file")


def test_an_unknown_format_version_is_refused(saved_vit, tmp_path):
    path = rewrite(saved_vit[1], tmp_path / "v.safetensors", metadata={"format_version": 99})
    refuses(make_vit(), path, "format version 99; this petl_surgery reads version 1")


def test_a_safetensors_file_of_someone_else_is_refused(tmp_path):
    other = tmp_path / "o.safetensors"
    save_file({"x": torch.zeros(1)}, other)
    refuses(make_vit(), other, "not a petl_surgery delta checkpoint")


def test_a_missing_file_is_refused(tmp_path):
    refuses(make_vit(), tmp_path / "nowhere.safetensors", "no checkpoint file")


def test_a_model_with_other_surgery_is_refused(saved_vit):
    refuses(ps.apply(make_vit(), "patt"), saved_vit[1], "already carries surgery")


def test_a_method_this_version_does_not_know_is_refused(saved_vit, tmp_path):
    path = rewrite(saved_vit[1], tmp_path / "v.safetensors", metadata={"methods": [{"method": "glora", "options": {}, "blocks": [0]}]})
    refuses(make_vit(), path, "cannot take: unknown method 'glora'")


def test_block_indices_the_model_lacks_are_refused(saved_vit, tmp_path):
    path = rewrite(saved_vit[1], tmp_path / "v.safetensors", metadata={"methods": [{"method": "patt", "options": {}, "blocks": [9]}]})
    refuses(make_vit(), path, r"malformed method entry .*distinct block indices in 0\.\.3")


def test_a_module_shared_by_two_blocks_takes_one_branch_and_round_trips(tmp_path):
    def shared():
        model = make_vit()
        model.blocks[1].mlp = model.blocks[0].mlp
        return model

    model = trained(shared(), "adapter")
    assert [row.path for row in ps.summary(model).rows] == [
        "blocks.0.mlp.petl_adapter", "blocks.2.mlp.petl_adapter", "blocks.3.mlp.petl_adapter"
    ]
    ps.save(model, tmp_path / "delta.safetensors")
    assert not any(key.startswith("blocks.1.") for key in load_file(tmp_path / "delta.safetensors"))
    fresh = ps.load(shared(), tmp_path / "delta.safetensors")
    assert torch.equal(fresh(images()), model(images()))
