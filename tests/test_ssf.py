"""SSF: per-channel scale and shift of each target projection's output, exact against its equation,
mergeable into the plain model, and the family contract."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import VIT_FAMILY, assert_same_snapshot, images, make_family, make_swin, make_vit, randomize, snapshot
from family_checks import check_method

import petl_surgery as ps

D, HIDDEN, DEPTH = 64, 256, 4


def projection_outputs(model, names):
    """Block 0's outputs of the named Linears (paths under ``blocks.0``) in one forward, recorded by
    hooks registered after surgery (so they see what the model's forward goes on with), and their
    inputs."""
    seen = {}

    def record(module, args, output, name):
        seen.setdefault(name, (args[0], output))

    handles = [
        model.blocks[0].get_submodule(name).register_forward_hook(functools.partial(record, name=name))
        for name in names
    ]
    with torch.no_grad():
        model(images(dtype=torch.float64))
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize(
    "targets, rows",
    [
        (["v"], {"attn.qkv": (2 * D, 3 * D)}),
        (["q", "k", "v"], {"attn.qkv": (0, 3 * D)}),
        (["qkv"], {"attn.qkv": (0, 3 * D)}),
        (["k", "fc1"], {"attn.qkv": (D, 2 * D), "mlp.fc1": (0, HIDDEN)}),
        (["proj", "fc2"], {"attn.proj": (0, D), "mlp.fc2": (0, D)}),
    ],
)
def test_ssf_scales_and_shifts_exactly_the_target_channels(targets, rows):
    model = ps.apply(make_vit().double(), "ssf", targets=targets)
    ssf_modules = {name: m for name, m in model.blocks[0].named_modules() if name.endswith("petl_ssf")}
    for module in ssf_modules.values():
        randomize(module)
    seen = projection_outputs(model, rows)
    for name, (low, high) in rows.items():
        layer = model.blocks[0].get_submodule(name)
        x, output = seen[name]
        plain = F.linear(x, layer.weight, layer.bias)
        host = model.blocks[0].get_submodule(name.split(".")[0]).petl_ssf
        scale, shift = host.vectors(name.split(".")[1], plain.shape[-1])
        expected = plain.clone()
        expected[..., low:high] = plain[..., low:high] * scale[low:high] + shift[low:high]
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(output[..., :low], plain[..., :low], rtol=0, atol=0)
        torch.testing.assert_close(output[..., high:], plain[..., high:], rtol=0, atol=0)
    # the vectors are the targets' own parameters, on their channels
    offsets = {"q": 0, "k": D, "v": 2 * D, "qkv": 0, "proj": 0, "fc1": 0, "fc2": 0}
    producers = {
        "q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
    }
    for target in targets:
        host_name, producer = producers[target].split(".")
        host = model.blocks[0].get_submodule(host_name).petl_ssf
        scale, shift = host.vectors(producer, model.blocks[0].get_submodule(producers[target]).out_features)
        pair, start = getattr(host, target), offsets[target]
        assert torch.equal(scale[start : start + pair.scale.shape[0]], pair.scale)
        assert torch.equal(shift[start : start + pair.shift.shape[0]], pair.shift)


def test_identity_init_leaves_the_output_unchanged_and_reference_init_follows_the_reference():
    model = make_vit()
    x = images()
    before = model(x)
    ps.apply(model, "ssf")
    assert torch.equal(model(x), before)
    ps.remove(model)
    torch.manual_seed(0)
    ps.apply(model, "ssf", init="reference", std=0.02)
    scales = torch.cat([m.scale.flatten() for n, m in model.named_modules() if n.endswith(".petl_ssf.q") or n.endswith(".petl_ssf.fc1")])
    assert 0.015 < scales.std() < 0.025 and abs(scales.mean() - 1) < 0.005
    assert not torch.allclose(model(x), before)


def test_parameter_count_is_two_per_target_channel():
    model = ps.apply(make_vit(), "ssf")
    per_block = 2 * (3 * D + D + HIDDEN + D)
    assert ps.summary(model).per_method == {"ssf": DEPTH * per_block}
    assert ps.summary(ps.apply(make_vit(), "ssf", targets="v")).per_method == {"ssf": DEPTH * 2 * D}


def with_random_ssf(model, std=0.2):
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".petl_ssf." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * std)
    return model


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_merge_gives_the_plain_model_with_the_same_outputs(family):
    model = with_random_ssf(ps.apply(make_family(family), "ssf"))
    x = images(family)
    unmerged = model(x)
    ps.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    plain = make_swin() if family == "swin" else make_vit()
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain(x), model(x))


def test_merge_changes_only_the_target_rows():
    base = make_vit()
    model = with_random_ssf(ps.apply(make_vit(), "ssf", targets=["v"]))
    scale, shift = model.blocks[0].attn.petl_ssf.vectors("qkv", 3 * D)
    ps.merge(model)
    qkv, plain = model.blocks[0].attn.qkv, base.blocks[0].attn.qkv
    assert torch.equal(qkv.weight[: 2 * D], plain.weight[: 2 * D]) and torch.equal(qkv.bias[: 2 * D], plain.bias[: 2 * D])
    torch.testing.assert_close(qkv.weight[2 * D :], plain.weight[2 * D :] * scale[2 * D :, None])
    torch.testing.assert_close(qkv.bias[2 * D :], plain.bias[2 * D :] * scale[2 * D :] + shift[2 * D :])
    assert torch.equal(model.blocks[0].mlp.fc1.weight, base.blocks[0].mlp.fc1.weight)


def test_qkv_target_is_one_gamma_and_beta_over_all_fused_channels_and_merges():
    base = make_vit()
    model = with_random_ssf(ps.apply(make_vit(), "ssf", targets="qkv"))
    ssf = model.blocks[0].attn.petl_ssf
    assert [name for name, _ in ssf.named_children()] == ["qkv"]
    assert ssf.qkv.scale.shape == ssf.qkv.shift.shape == (3 * D,)
    assert ps.summary(model).per_method == {"ssf": DEPTH * 2 * 3 * D}
    scale, shift = ssf.qkv.scale.detach().clone(), ssf.qkv.shift.detach().clone()
    x = images()
    unmerged = model(x)
    ps.merge(model)
    qkv, plain = model.blocks[0].attn.qkv, base.blocks[0].attn.qkv
    torch.testing.assert_close(qkv.weight, plain.weight * scale[:, None], rtol=0, atol=1e-6)
    torch.testing.assert_close(qkv.bias, plain.bias * scale + shift, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == list(base.state_dict())


def test_merge_folds_ssf_and_lora_on_one_projection_in_the_order_applied():
    x = images()
    for first, second in (("ssf", "lora"), ("lora", "ssf")):
        model = ps.apply(make_vit(), first, targets=["q", "v"])
        ps.apply(model, second, targets=["q", "v"])
        randomize(model.blocks[0].attn.petl_ssf)
        randomize(model.blocks[0].attn.petl_lora, std=0.05)
        unmerged = model(x)
        ps.merge(model)
        assert ps.summary(model).per_method == {}
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_refuses_ssf_after_a_kept_branch_on_its_projection():
    model = ps.apply(make_vit(), "patt", init="reference")
    ps.apply(model, "ssf", targets=["v"])
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="the patt branch on 'qkv', which stays, adds into that output before it"):
        ps.merge(model, keep_unmergeable=True)
    assert_same_snapshot(before, snapshot(model))


def test_merge_keeps_a_branch_that_runs_after_ssf():
    model = with_random_ssf(ps.apply(make_vit(), "ssf", targets=["v"]))
    ps.apply(model, "patt", init="reference")
    x = images()
    expected = model(x)
    ps.merge(model, keep_unmergeable=True)
    assert list(ps.summary(model).per_method) == ["patt"]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_projection_without_bias():
    model = ps.apply(make_vit(qkv_bias=False), "ssf", targets=["v"])
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="its target 'qkv' has no bias to fold the shift into"):
        ps.merge(model)
    assert_same_snapshot(before, snapshot(model))


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = with_random_ssf(ps.apply(make_vit(), "ssf", targets=["k", "fc2"]))
    x = images()
    ps.save(model, tmp_path / "ssf.safetensors")
    fresh = ps.load(make_vit(), tmp_path / "ssf.safetensors")
    assert torch.equal(fresh(x), model(x))
    assert fresh.blocks[0].attn.petl_ssf.options["targets"] == ("k", "fc2")


@pytest.mark.parametrize("family", list(VIT_FAMILY) + ["swin"])
def test_ssf_meets_the_family_contract(family, tmp_path):
    assert check_method(lambda: make_family(family), lambda: images(family), "ssf", tmp_path) == "works"


def test_ssf_scales_channels_first_conv_projections(tmp_path):
    def build():
        torch.manual_seed(0)
        return timm.create_model(
            "coatnet_nano_rw_224", img_size=64, embed_dim=(32, 64, 128, 256), depths=(1, 1, 1, 1), transformer_dim_head=16
        )

    assert check_method(build, images, "ssf", tmp_path) == "works"
    model = with_random_ssf(ps.apply(build().eval(), "ssf"))
    x = images()
    unmerged = model(x)
    ps.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options, named",
    [
        ({"targets": ["qk"]}, "'targets'"),
        ({"targets": ["qkv", "k", "v"]}, "option 'targets' of method 'ssf' names 'qkv' together with 'k', 'v'"),
        ({"targets": []}, "'targets'"),
        ({"targets": ["q", "q"]}, "'targets'"),
        ({"init": "ones"}, "'init'"),
        ({"std": -1.0}, "'std'"),
        ({"rank": 4}, "'rank'"),
    ],
)
def test_bad_options_raise_naming_the_option_and_leave_the_model_untouched(options, named):
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=named):
        ps.apply(model, "ssf", **options)
    assert_same_snapshot(before, snapshot(model))
