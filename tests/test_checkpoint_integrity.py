"""A delta checkpoint cannot be altered without a check noticing, and a load takes all of it or nothing:
the metadata is under the checksum and validated as strictly as apply's arguments, block_map keeps the
architecture check, nothing recorded is skipped and nothing unrecorded is dropped, and wrong argument
types are SurgeryErrors. Every refusal leaves the model as it was."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from conftest import assert_same_snapshot, make_family, make_vit, snapshot
from safetensors.torch import load_file, save_file
from test_checkpoints import header_of, refuses, rewrite

import petl_surgery as ps


@pytest.fixture
def saved(tmp_path):
    model = ps.apply(make_vit(), "bapat")
    path = tmp_path / "delta.safetensors"
    ps.save(model, path)
    return path


def metadata_of(path) -> dict:
    return json.loads(header_of(path)[1]["__metadata__"]["petl_surgery"])


def edited(path, target, change):
    """``path`` with its metadata changed by ``change(metadata)`` and nothing resealed."""
    metadata = metadata_of(path)
    change(metadata)
    save_file(load_file(path), target, metadata={"petl_surgery": json.dumps(metadata)})
    return target


def set_option(name, value):
    def change(metadata):
        metadata["methods"][0]["options"][name] = value

    return change


@pytest.mark.parametrize("name, value", [("position", "sequential"), ("patt_scale", 0.1), ("adapter_scale", 3.0)])
def test_edited_options_are_refused_by_the_checksum(saved, tmp_path, name, value):
    assert name in metadata_of(saved)["methods"][0]["options"]
    path = edited(saved, tmp_path / "edited.safetensors", set_option(name, value))
    refuses(make_vit(), path, "metadata does not match the checksum")


def test_an_edited_statistics_entry_is_refused_by_the_checksum(saved, tmp_path):
    path = edited(saved, tmp_path / "edited.safetensors", lambda metadata: metadata.update(statistics="adapt"))
    refuses(make_vit(), path, "metadata does not match the checksum")


def test_swapped_block_paths_are_refused_by_the_checksum(saved, tmp_path):
    def swap(metadata):
        paths = metadata["model"]["block_paths"]
        paths[0], paths[1] = paths[1], paths[0]

    refuses(make_vit(), edited(saved, tmp_path / "swapped.safetensors", swap), "metadata does not match the checksum")


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"format_version": True}, "format version True"),
        ({"format_version": 1.0}, "format version 1.0"),
        ({"statistics": "thawed"}, "invalid 'statistics' entry"),
        ({"head": "head.weight"}, "invalid 'head' entry"),
        ({"fingerprint": "abc"}, "invalid 'fingerprint' entry"),
    ],
)
def test_resealed_metadata_of_the_wrong_type_is_refused(saved, tmp_path, entry, message):
    refuses(make_vit(), rewrite(saved, tmp_path / "v.safetensors", metadata=entry), message)


@pytest.mark.parametrize("blocks", [[True, 0], [0, 0], [], [0.0]])
def test_recorded_blocks_must_be_distinct_ints_in_range(saved, tmp_path, blocks):
    calls = metadata_of(saved)["methods"]
    calls[0]["blocks"] = blocks
    refuses(make_vit(), rewrite(saved, tmp_path / "v.safetensors", metadata={"methods": calls}), "malformed method entry")


def test_an_infinite_option_in_a_file_is_refused(saved, tmp_path):
    calls = metadata_of(saved)["methods"]
    calls[0]["options"]["adapter_scale"] = math.inf  # json writes Infinity
    path = rewrite(saved, tmp_path / "v.safetensors", metadata={"methods": calls}, digest=False)
    refuses(make_vit(), path, "not valid JSON.*Infinity")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_apply_refuses_a_non_finite_scale_before_any_change(value):
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="must be a finite number"):
        ps.apply(model, "patt", scale=value)
    assert_same_snapshot(before, snapshot(model))


def test_block_map_keeps_the_architecture_check(saved):
    # an identity map of two blocks from a ViT into a distilled DeiT (its distillation token differs)
    model = make_family("deit_distilled")
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="outside its blocks"):
        ps.load(model, saved, block_map={0: 0, 1: 1}, load_head=False)
    assert_same_snapshot(before, snapshot(model))


def test_block_map_refuses_pairs_of_blocks_of_other_shapes(tmp_path):
    model = ps.apply(make_family("swin"), "patt", layers=[0])
    path = tmp_path / "swin.safetensors"
    ps.save(model, path)
    target = make_family("swin")
    before = snapshot(target)
    with pytest.raises(ps.SurgeryError, match=r"saved block 0 -> block 4"):
        ps.load(target, path, block_map={0: 4})  # stage 0 (width 32) into stage 2 (width 128)
    assert_same_snapshot(before, snapshot(target))


def test_block_map_between_depths_of_one_architecture_still_loads(saved):
    deeper = make_vit(depth=6)
    ps.load(deeper, saved, block_map={0: 2, 1: 3})
    assert sorted(ps.summary(deeper).per_block) == [2, 3]


def efficientformer_v2() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("efficientformerv2_s0", num_classes=5).eval()


def test_a_recorded_block_the_method_cannot_operate_on_is_refused(tmp_path):
    model = ps.apply(efficientformer_v2(), "adapter", skip_unsupported=True)
    path = tmp_path / "skipping.safetensors"
    ps.save(model, path)
    calls = metadata_of(path)["methods"]
    assert 2 not in calls[0]["blocks"]  # stages.3.downsample has no MLP
    calls[0]["blocks"] = sorted(calls[0]["blocks"] + [2])
    forged = rewrite(path, tmp_path / "forged.safetensors", metadata={"methods": calls})
    refuses(efficientformer_v2(), forged, r"records method 'adapter' on block 2, which this model's block cannot take")


def test_tensors_of_an_unrecorded_method_are_refused(saved, tmp_path):
    tensors = load_file(saved)
    tensors["blocks.0.attn.petl_lora.q.lora_A"] = torch.zeros(8, 64)
    path = rewrite(saved, tmp_path / "v.safetensors", tensors=tensors)
    refuses(make_vit(), path, r"tensors of a method its metadata does not record: blocks.0.attn.petl_lora.q.lora_A")


@pytest.mark.parametrize(
    "keywords, message",
    [
        ({"layers": 1}, "layers must be a list"),
        ({"layers": [True]}, "layers must be a list of saved block indices"),
        ({"block_map": {"0": 0}}, "block_map must map saved block indices"),
        ({"load_head": 123}, "load_head must be True, False or None"),
        ({"methods": "bapat"}, "methods must be a list of method names"),
    ],
)
def test_load_arguments_of_the_wrong_type_are_surgery_errors(saved, keywords, message):
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=message):
        ps.load(model, saved, **keywords)
    assert_same_snapshot(before, snapshot(model))


def test_load_and_save_without_a_path_are_surgery_errors():
    with pytest.raises(ps.SurgeryError, match="expected a file path"):
        ps.load(make_vit(), None)
    with pytest.raises(ps.SurgeryError, match="expected a file path"):
        ps.save(ps.apply(make_vit(), "patt"), None)


@pytest.mark.parametrize("method, option, value", [("patt", "mid_dim", 300_000), ("lora", "rank", 10**6)])
def test_recorded_sizes_are_checked_before_anything_is_allocated(tmp_path, monkeypatch, method, option, value):
    from petl_surgery.checkpoints import delta

    path = tmp_path / "small.safetensors"
    ps.save(ps.apply(make_vit(), method), path)
    calls = metadata_of(path)["methods"]
    calls[0]["options"][option] = value
    forged = rewrite(path, tmp_path / "large.safetensors", metadata={"methods": calls})
    planned_on = []
    real_plan = delta.plan_calls

    def spy(*args, **kwargs):
        planned_on.append(str(kwargs.get("device")))
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(delta, "plan_calls", spy)
    refuses(make_vit(), forged, "wrong shape")
    assert planned_on == ["meta"]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_values_in_a_delta_are_refused(saved, tmp_path, value):
    tensors = load_file(saved)
    tensors["blocks.1.attn.petl_bapat.up.weight"][0, 0] = value
    path = rewrite(saved, tmp_path / "v.safetensors", tensors=tensors)
    refuses(make_vit(), path, r"NaN or infinite values in: blocks.1.attn.petl_bapat.up.weight")


def test_values_that_overflow_a_half_model_are_refused(saved, tmp_path):
    tensors = load_file(saved)
    tensors["blocks.1.attn.petl_bapat.up.weight"][0, 0] = 1e6  # float16 holds up to 65504
    path = rewrite(saved, tmp_path / "v.safetensors", tensors=tensors)
    refuses(make_vit().half(), path, r"blocks.1.attn.petl_bapat.up.weight overflow the model's dtype torch.float16")


def test_a_load_that_casts_says_so(saved):
    model = make_vit().to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"casts \d+ tensor\(s\) to the model's dtype \(float32 -> bfloat16\)"):
        ps.load(model, saved)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_load_into_a_meta_device_model_is_refused(saved):
    model = make_vit().to("meta")
    with pytest.raises(ps.SurgeryError, match="meta device"):
        ps.load(model, saved)
    assert not ps.summary(model).rows


def test_an_unrecognised_pickle_names_its_format_problem(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ps.SurgeryError, match=r"cannot tell the format of .*weights.pth: it is not a safetensors file"):
        ps.load(make_vit(), path)


def test_a_delta_without_its_head_into_a_model_with_another_head_suggests_head_false(tmp_path):
    path = tmp_path / "headless.safetensors"
    ps.save(ps.apply(make_vit(), "patt", train_head=False), path)
    refuses(make_vit(num_classes=7), path, r"the head in .* does not fit this model \(head.bias: checkpoint \[5\], model \[7\].*pass load_head=False")
    assert ps.summary(ps.load(make_vit(num_classes=7), path, load_head=False)).per_method


def test_another_width_names_the_tensors_that_differ(saved):
    refuses(make_vit(embed_dim=96, num_heads=2), saved, r"tensors of other shapes: .*checkpoint \[\d+(, \d+)*\], model")


def test_blocks_sharing_a_path_cannot_be_chosen_or_moved_apart(tmp_path):
    """TNT's inner and outer transformer are two blocks at one module path; tensors are matched to blocks
    by path, so blocks= or block_map= that would split them is refused before anything changes."""
    import timm

    def tnt():
        torch.manual_seed(0)
        return timm.create_model("tnt_s_patch16_224", pretrained=False, img_size=64, embed_dim=64, inner_dim=16,
                                 depth=2, num_heads_outer=2, num_heads_inner=2, num_classes=3)

    source = ps.apply(tnt(), "lora")
    ps.save(source, tmp_path / "tnt.safetensors")
    for keywords in ({"layers": [0]}, {"block_map": {0: 1, 1: 0, 2: 2, 3: 3}}):
        fresh = tnt()
        before = {name: tensor.clone() for name, tensor in fresh.state_dict().items()}
        with pytest.raises(ps.SurgeryError, match="share a module path"):
            ps.load(fresh, tmp_path / "tnt.safetensors", **keywords)
        after = fresh.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())
    whole = ps.load(tnt(), tmp_path / "tnt.safetensors")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(whole.eval()(x), source.eval()(x))
