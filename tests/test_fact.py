"""FacT: factored weight increments with factors shared across blocks, exact against the FacT-TT and
FacT-TK equations (computed here, the TK index arithmetic spelled out), the counts of the FacT code's
ViT-B/16 runs, the shared factors through summary, save, load of a block subset and remove, merging,
and the family contract."""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
from conftest import (
    assert_merges_to_plain,
    assert_same_snapshot,
    images,
    make_family,
    make_swin,
    make_vit,
    perturb_inserted,
    snapshot,
)
from family_checks import check_method
from safetensors.torch import load_file

import petl_surgery as ps
from petl_surgery.methods.fact import SharedFactors


def tucker_slices(c, p):
    """``M[:, :, col] = sum_e C[:, :, e] P[e, col]``, column by column."""
    return torch.stack([(c * p[:, col]).sum(-1) for col in range(p.shape[1])], dim=-1)


def cores_by_hand(model, block, variant):
    """Each target's r x r core(s) in ``dW = s V K U``: a list of slices for fc1 (rows) and fc2 (columns)."""
    attention, mlp = block.attn.petl_fact, block.mlp.petl_fact
    r = model.petl_fact.rank
    if variant == "tt":
        cores = {name: [getattr(attention, name)] for name in ("q", "k", "v", "proj")}
        cores["fc1"] = [mlp.fc1[j * r : (j + 1) * r] for j in range(4)]
        cores["fc2"] = [mlp.fc2[:, j * r : (j + 1) * r] for j in range(4)]
        return cores
    c = model.petl_fact.c
    m_attention, m_mlp = tucker_slices(c, attention.p), tucker_slices(c, mlp.p)
    cores = {name: [m_attention[:, :, col].t()] for col, name in enumerate(("q", "k", "v", "proj"))}
    fc1, fc2 = [], []
    for j in range(4):  # the code's reshape(r, 4r): slice j, row/column i reads M[:, m // 4, m % 4], m = jr + i
        k1, k2 = torch.empty(r, r, dtype=c.dtype), torch.empty(r, r, dtype=c.dtype)
        for i in range(r):
            m = j * r + i
            k1[i, :] = m_mlp[:, m // 4, m % 4]
            k2[:, i] = m_mlp[:, m // 4, 4 + m % 4]
        fc1.append(k1)
        fc2.append(k2)
    cores["fc1"], cores["fc2"] = fc1, fc2
    return cores


def increments_by_hand(base, model, variant, scale):
    """The base with ``W += s V K U`` on every target (q, k, v rows of qkv; fc1 slice j = rows
    [jd, (j+1)d); fc2 slice j = columns [jd, (j+1)d)), the FacT equations computed here."""
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for found in ps.blocks(model):
            block, plain = found.module, expected.get_submodule(found.path)
            d = block.attn.qkv.in_features
            factors = getattr(model.petl_fact, f"d{d}")
            u, v = factors.u, factors.v
            cores = cores_by_hand(model, block, variant)
            for n, name in enumerate(("q", "k", "v")):
                plain.attn.qkv.weight[n * d : (n + 1) * d] += scale * v @ cores[name][0] @ u
            plain.attn.proj.weight += scale * v @ cores["proj"][0] @ u
            for j in range(4):
                plain.mlp.fc1.weight[j * d : (j + 1) * d] += scale * v @ cores["fc1"][j] @ u
                plain.mlp.fc2.weight[:, j * d : (j + 1) * d] += scale * v @ cores["fc2"][j] @ u
    return expected


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("variant", ["tt", "tk"])
def test_fact_equals_the_factored_weight_increments(family, variant):
    base = make_family(family).double()
    model = ps.apply(copy.deepcopy(base), "fact", variant=variant, rank=4, scale=0.7)
    x = images(family, dtype=torch.float64)
    assert torch.equal(model(x), base(x))  # V = 0
    perturb_inserted(model)
    torch.testing.assert_close(model(x), increments_by_hand(base, model, variant, 0.7)(x), rtol=0, atol=1e-10)


def test_init_is_the_codes():
    model = ps.apply(make_vit(), "fact", variant="tk", rank=4)
    factors = model.petl_fact.d64
    assert torch.count_nonzero(factors.v) == 0 and 0 < factors.u.abs().max() <= 1 / 64**0.5  # FacTv zero, FacTu Linear's
    assert model.petl_fact.c.abs().max() <= (6 / 32) ** 0.5  # xavier over (r, r, r)
    assert model.blocks[0].mlp.petl_fact.p.abs().max() <= (6 / (4 + 12 * 4)) ** 0.5  # xavier over the whole r x 12L P


@pytest.fixture(scope="module")
def vit_b16():
    with torch.device("meta"):  # shapes only
        return timm.create_model("vit_base_patch16_224")


@pytest.mark.parametrize(
    "variant, rank, expected", [("tt", 8, 21_504), ("tt", 4, 8_448), ("tk", 32, 86_528)]
)
def test_vit_b16_counts_are_the_fact_codes(vit_b16, variant, rank, expected):
    """TT 2dr + 12Lr^2, TK 2dr + 12Lr + r^3 (d 768, L 12); the counts the FacT code and PETL_Vision log
    (TT r 4: the abstract's "8K")."""
    ps.apply(vit_b16, "fact", variant=variant, rank=rank)
    try:
        assert ps.summary(vit_b16).per_method == {"fact": expected}
    finally:
        ps.remove(vit_b16)


@pytest.mark.parametrize("variant", ["tt", "tk"])
def test_count_follows_the_formula_over_the_blocks_and_widths_taken(variant):
    r, model = 4, ps.apply(make_swin(), "fact", variant=variant, rank=4, layers=[0, 1, 2])  # widths 32, 32, 64
    factors = 2 * 32 * r + 2 * 64 * r + (r**3 if variant == "tk" else 0)
    per_block = 12 * r * r if variant == "tt" else 12 * r
    summary = ps.summary(model)
    assert summary.per_method == {"fact": factors + 3 * per_block}
    assert summary.shared == {"fact": factors} and summary.per_block == {0: per_block, 1: per_block, 2: per_block}
    assert re.search(rf"fact +shared +petl_fact +{factors:,}", str(summary))


def test_the_blocks_share_one_pair_of_factors_per_width():
    model = ps.apply(make_swin(), "fact")
    assert sorted(name for name, _ in model.petl_fact.named_children()) == ["d128", "d256", "d32", "d64"]
    names = [name for name in model.state_dict() if "petl_fact.d" in name]
    assert names == [f"petl_fact.d{d}.{t}" for d in (32, 64, 128, 256) for t in ("u", "v")]


def test_every_shared_factor_gets_a_gradient_from_every_width():
    model = perturb_inserted(ps.apply(make_swin(), "fact", variant="tk", rank=4))
    model(images("swin")).square().sum().backward()
    shared = dict(model.petl_fact.named_parameters())
    assert sorted(shared) == ["c"] + [f"d{d}.{t}" for d in (128, 256, 32, 64) for t in ("u", "v")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared.values())


def test_fact_is_applied_once_per_model():
    model = ps.apply(make_vit(), "fact", layers=[0, 1])
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="'fact' is already applied .* apply it once with all the layers"):
        ps.apply(model, "fact", layers=[2, 3])
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("options, message", [({"variant": "cp"}, "'variant'"), ({"rank": 0}, "'rank'"), ({"dropout": -1}, "'dropout'")])
def test_bad_options_raise_and_change_nothing(options, message):
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=message):
        ps.apply(model, "fact", **options)
    assert_same_snapshot(before, snapshot(model))


def test_a_block_subset_loads_the_factors_of_its_widths_only(tmp_path):
    model = perturb_inserted(ps.apply(make_swin(), "fact", variant="tk", rank=4))
    ps.save(model, tmp_path / "fact.safetensors")
    saved = load_file(tmp_path / "fact.safetensors")
    fresh = ps.load(make_swin(), tmp_path / "fact.safetensors", layers=[0, 1])
    state = fresh.state_dict()
    taken = [name for name in state if "petl_fact" in name]
    assert [name for name in taken if name.startswith("petl_fact")] == ["petl_fact.c", "petl_fact.d32.u", "petl_fact.d32.v"]
    assert all(torch.equal(state[name], saved[name]) for name in taken)
    assert sorted({int(name.split(".")[3]) for name in taken if name.startswith("layers.")}) == [0, 1]
    subset = ps.apply(make_swin(), "fact", variant="tk", rank=4, layers=[0, 1])
    subset.load_state_dict({name: saved.get(name, tensor) for name, tensor in subset.state_dict().items()})
    assert torch.equal(fresh(images("swin")), subset(images("swin")))


def test_a_block_map_moves_the_cores_and_keeps_the_factors(tmp_path):
    model = perturb_inserted(ps.apply(make_vit(), "fact", rank=4))
    ps.save(model, tmp_path / "fact.safetensors")
    shallow = ps.load(make_vit(depth=2), tmp_path / "fact.safetensors", block_map={2: 0, 3: 1}, load_head=False)
    assert torch.equal(shallow.petl_fact.d64.u, model.petl_fact.d64.u)
    assert torch.equal(shallow.blocks[1].mlp.petl_fact.fc2, model.blocks[3].mlp.petl_fact.fc2)
    assert ps.summary(shallow).per_method == ps.summary(ps.apply(make_vit(depth=2), "fact", rank=4)).per_method


def test_remove_takes_the_shared_factors_too():
    model = ps.apply(make_vit(), "fact")
    ps.remove(model, "fact")
    assert not any(isinstance(module, SharedFactors) for module in model.modules())
    assert list(model.state_dict()) == list(make_vit().state_dict())


@pytest.mark.parametrize("family, variant", [("vit", "tt"), ("swin", "tk")])
def test_family_contract(tmp_path, family, variant):
    build = make_swin if family == "swin" else make_vit
    assert check_method(build, lambda: images(family), "fact", tmp_path, variant=variant, rank=4) == "works"


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_merged_outputs_equal_unmerged_and_the_state_dict_loads_into_a_plain_model(family):
    model = perturb_inserted(ps.apply(make_family(family), "fact", variant="tk", rank=4))
    assert_merges_to_plain(model, lambda: make_family(family), images(family))
