"""A study's init axis (PVP's comparison as a grid): every run from random and from a source delta,
results.csv naming the init, the paired gains and their 95% intervals as an independent computation
over the CSV gives them, resume across the axis, and inits that do not fit refused before training."""

from __future__ import annotations

import math
import statistics

import pytest
import timm
import torch

import petl_surgery as ps
from petl_surgery.training import StudyError, run_study, study

from test_study import MODEL_ARGS, fits, grid_for  # noqa: F401  (fits: the fixture, counting fit's calls)
from test_study import read_rows as read

T_975 = {1: 12.706204736174698, 2: 4.302652729749464, 3: 3.182446305284263}  # Student t tables, two-sided 95%


def make_source(path, patt_mid_dim=4):
    """A delta of 5 classes with the grid's PATT (mid_dim 4, block 1) and LoRA (rank 2, blocks 0 and 1),
    randomised so that it starts somewhere else than a fresh init."""
    torch.manual_seed(11)
    model = timm.create_model("vit_small_patch16_224", num_classes=5, **MODEL_ARGS)
    ps.apply(model, "patt", layers=slice(1, None), mid_dim=patt_mid_dim)
    ps.apply(model, "lora", layers=[0, 1], rank=2)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5)
    ps.save(model, path)
    return path


def test_an_init_axis_writes_paired_gains_equal_to_an_independent_computation(vtab_folder, tmp_path, fits):
    source = str(make_source(tmp_path / "source.safetensors"))
    out, lines = tmp_path / "study", []
    result = run_study(grid_for(vtab_folder, inits=["random", source], seeds=[0, 1, 2]), out, device="cpu",
                       log=lines.append)
    assert (result.trained, len(fits)) == (12, 12)
    rows = read(out / "results.csv")
    assert [(r["method"], r["init"]) for r in rows[::3]] == [
        ("patt", "random"), ("patt", source), ("lora", "random"), ("lora", source)]
    assert len({r["run"] for r in rows}) == 12

    gains = read(out / "gains.csv")
    assert [(g["method"], g["init"], g["shots"], g["pairs"]) for g in gains] == [
        ("patt", source, "2", "3"), ("lora", source, "2", "3")]
    for gain in gains:
        accuracy = {(r["init"], r["seed"]): 100 * float(r["accuracy"]) for r in rows if r["method"] == gain["method"]}
        differences = [accuracy[source, seed] - accuracy["random", seed] for seed in "012"]
        mean = sum(differences) / 3
        half = T_975[2] * statistics.stdev(differences) / math.sqrt(3)
        assert float(gain["gain"]) == pytest.approx(mean, abs=1e-9)
        assert float(gain["ci_low"]) == pytest.approx(mean - half, abs=1e-6)
        assert float(gain["ci_high"]) == pytest.approx(mean + half, abs=1e-6)
        expected = "higher" if mean - half > 0 else "lower" if mean + half < 0 else "inconclusive"
        assert gain["verdict"] == expected
        shown = f"{mean:+.1f} [{mean - half:+.1f},{mean + half:+.1f}] (3)"
        assert any(shown in line for line in lines), (shown, lines)
    assert (out / "gains.png").read_bytes()[:4] == b"\x89PNG" and result.gains_plot == out / "gains.png"


def test_an_init_run_starts_from_the_source_modules_and_the_log_names_the_file(vtab_folder, tmp_path, monkeypatch):
    import json

    source = make_source(tmp_path / "source.safetensors")
    started = {}
    real = study.fit

    def first_state(model, *args, **kwargs):
        started.update({name: p.detach().clone() for name, p in model.named_parameters() if ".petl_" in name})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(study, "fit", first_state)
    grid = grid_for(vtab_folder, runs=[{"method": "patt", "options": {"mid_dim": 4}, "layers": "1:", "init": str(source)}],
                    seeds=[0])
    run_study(grid, tmp_path / "s", device="cpu", plot=False, log=lambda line: None)
    from safetensors.torch import load_file

    saved = load_file(str(source))
    assert started and all(torch.equal(value, saved[name]) for name, value in started.items())
    (row,) = read(tmp_path / "s" / "results.csv")
    log = json.loads((tmp_path / "s" / "runs" / row["run"] / "log.json").read_text())
    assert log["init"]["path"] == str(source) and log["init"]["head"] is False
    import hashlib

    assert log["init"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert not (tmp_path / "s" / "gains.csv").exists()  # no random run to pair with


def test_resume_across_the_init_axis_trains_only_the_new_init(vtab_folder, tmp_path, fits):
    source = str(make_source(tmp_path / "source.safetensors"))
    out = tmp_path / "study"
    first = run_study(grid_for(vtab_folder), out, device="cpu", plot=False, log=lambda line: None)
    assert (first.trained, len(fits)) == (4, 4)
    before = read(out / "results.csv")
    both = run_study(grid_for(vtab_folder, inits=["random", source]), out, device="cpu", plot=False,
                     log=lambda line: None)
    assert (both.trained, both.reused, len(fits)) == (4, 4, 8)
    rows = read(out / "results.csv")
    assert [r for r in rows if r["init"] == "random"] == before  # the random runs: the same runs, reused
    again = run_study(grid_for(vtab_folder, inits=["random", source]), out, device="cpu", plot=False,
                      log=lambda line: None)
    assert (again.trained, again.reused, len(fits)) == (0, 8, 8)
    make_source(tmp_path / "source.safetensors", patt_mid_dim=4)  # rewritten: same bytes, same runs
    assert run_study(grid_for(vtab_folder, inits=["random", source]), out, device="cpu", plot=False,
                     log=lambda line: None).trained == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: make_source(p, patt_mid_dim=8), "a gain over random would compare other modules"),
        (lambda p: None, "no delta checkpoint at"),
    ],
)
def test_an_init_that_does_not_fit_the_runs_is_refused_before_training(vtab_folder, tmp_path, fits, make, message):
    path = tmp_path / "source.safetensors"
    make(path)
    with pytest.raises(StudyError) as error:
        run_study(grid_for(vtab_folder, inits=["random", str(path)]), tmp_path / "s", device="cpu",
                  log=lambda line: None)
    assert "grid key runs[0] (patt), init" in str(error.value) and message in str(error.value)
    assert fits == [] and not (tmp_path / "s").exists()


def test_an_init_without_the_runs_method_is_refused(vtab_folder, tmp_path, fits):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", num_classes=3, **MODEL_ARGS)
    ps.apply(model, "adapter", bottleneck=2)
    ps.save(model, tmp_path / "adapter.safetensors")
    with pytest.raises(StudyError, match="holds no method 'patt'"):
        run_study(grid_for(vtab_folder, inits=[str(tmp_path / "adapter.safetensors")]), tmp_path / "s", device="cpu",
                  log=lambda line: None)
    assert fits == []


@pytest.mark.parametrize("inits", [[], ["random", "random"], [None]])
def test_bad_inits_are_named(vtab_folder, tmp_path, inits):
    with pytest.raises(StudyError, match="grid key 'inits'"):
        run_study(grid_for(vtab_folder, inits=inits), tmp_path / "s", device="cpu", log=lambda line: None)


def test_weights_from_a_file_build_every_runs_base(vtab_folder, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    torch.manual_seed(21)
    base = timm.create_model("vit_small_patch16_224", num_classes=7, **MODEL_ARGS)
    save_file({k: v for k, v in base.state_dict().items() if not k.startswith("head.")}, str(tmp_path / "base.safetensors"))
    seen = []
    real = study.fit

    def check(model, *args, **kwargs):
        seen.append(torch.equal(model.patch_embed.proj.weight, base.patch_embed.proj.weight))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(study, "fit", check)
    grid = grid_for(vtab_folder, weights=str(tmp_path / "base.safetensors"), seeds=[0, 1])
    run_study(grid, tmp_path / "s", device="cpu", plot=False, log=lambda line: None)
    assert seen == [True] * 4


@pytest.mark.parametrize("change, message", [({"weights": "missing.safetensors"}, "no weights file"),
                                             ({"weights": "x", "pretrained": True}, "exclude each other")])
def test_bad_weights_are_refused(vtab_folder, tmp_path, change, message):
    with pytest.raises(StudyError, match=message):
        run_study(grid_for(vtab_folder, **change), tmp_path / "s", device="cpu", log=lambda line: None)


def test_cached_images_train_and_evaluate_as_read_ones(vtab_folder, tmp_path):
    grid = grid_for(vtab_folder, seeds=[0])
    plain = run_study(grid, tmp_path / "plain", device="cpu", plot=False, log=lambda line: None).rows
    cached = run_study({**grid, "cache_images": True}, tmp_path / "cached", device="cpu", plot=False,
                       log=lambda line: None).rows
    assert [r["accuracy"] for r in cached] == [r["accuracy"] for r in plain]
    from safetensors.torch import load_file

    for row in plain:  # the deltas: the same tensors, bit for bit
        a = load_file(str(tmp_path / "plain" / "runs" / row["run"] / "delta.safetensors"))
        b = load_file(str(tmp_path / "cached" / "runs" / row["run"] / "delta.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
