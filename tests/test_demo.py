"""The PVP demonstration's building blocks, and a micro-sized run through the studies it is made of."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import statistics

import torch

from petl_surgery import demo
from petl_surgery.demo import pvp, report as demo_report
from petl_surgery.demo.folders import write_image_folder
from petl_surgery.demo.glyphs import EDGES, _connected, glyph_classes, glyph_images
from petl_surgery.training import training_data
from petl_surgery.training.intervals import t_quantile


def test_glyph_class_sets_are_disjoint_connected_and_seeded():
    sets = glyph_classes([5, 4, 3], seed=2)
    assert [len(s) for s in sets] == [5, 4, 3]
    every = [glyph for s in sets for glyph in s]
    assert len(set(every)) == 12 and all(3 <= len(g) <= 5 and _connected(g) for g in every)
    assert all(0 <= e < len(EDGES) for g in every for e in g) and len(EDGES) == 20
    assert glyph_classes([5, 4, 3], seed=2) == sets and glyph_classes([5, 4, 3], seed=3) != sets


def test_glyph_images_are_class_ordered_deterministic_and_in_range():
    classes = glyph_classes([3], seed=0)[0]
    x, y = glyph_images(classes, 4, seed=5)
    again, _ = glyph_images(classes, 4, seed=5)
    other, _ = glyph_images(classes, 4, seed=6)
    assert x.shape == (12, 3, 32, 32) and torch.equal(y, torch.arange(3).repeat_interleave(4))
    assert torch.equal(x, again) and not torch.equal(x, other)
    assert x.min() >= -1 and x.max() <= 1 and torch.equal(x[:, 0], x[:, 1])  # grey, like the digits


def test_written_folders_read_back_as_the_images(tmp_path):
    x, y = glyph_images(glyph_classes([2], seed=0)[0], 3, seed=1)
    write_image_folder(tmp_path / "d", x, y, ["a", "b"])
    data = training_data(str(tmp_path / "d"), size=32, mean=(0.5,) * 3, std=(0.5,) * 3, format="imagefolder")
    assert data.classes == ["a", "b"] and len(data.train) == 6
    image, label = data.train[4]
    assert label == 1 and (image - x[4]).abs().max() <= 1 / 255 + 1e-6  # 8-bit rounding only


def read(path):
    with open(path) as stream:
        return list(csv.DictReader(stream))


def test_micro_run_goes_through_the_studies_and_pools_their_gains(tmp_path):
    logged = []
    config = demo.MICRO
    report = demo.run(config, tmp_path, log=logged.append, plot=False)
    methods = config.method_list()
    grid = len(config.targets) * len(config.shots) * len(config.seeds) * len(methods) * 2
    tradeoff = len(config.seeds) * len(methods)  # the upper-half runs, at the largest shot count
    assert len(report.results) == grid + tradeoff
    assert {r.init for r in report.results} == {"random", "pretrained"}
    assert {(r.target, r.data) for r in report.results} == {("digits", "real"), ("glyphs", "generated")}
    # every pre-trained run started from its method's source delta, as the study's log records
    for target in config.targets:
        for row in read(tmp_path / "studies" / target / "results.csv"):
            log = json.loads((tmp_path / "studies" / target / "runs" / row["run"] / "log.json").read_text())
            if row["init"] == "random":
                assert log["init"] == "random"
            else:
                source = report.checkpoints[row["method"]]
                assert row["init"] == str(source) and log["init"]["head"] is False
                assert log["init"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    # the demo's per-target gains are the study's own gains.csv (one statistics module)
    gains = read(report.files["gains_csv"])
    for target in config.targets:
        for study_gain in read(tmp_path / "studies" / target / "gains.csv"):
            mine = [g for g in gains if g["target"] == target and g["method"] == study_gain["method"]
                    and g["shots"] == study_gain["shots"]]
            assert len(mine) == 1 and float(mine[0]["gain"]) == round(float(study_gain["gain"]), 2)
    # pooled over the targets: the differences of both studies' CSVs, t interval by hand
    for pooled in (g for g in gains if g["target"] == "all targets"):
        differences = []
        for target in config.targets:
            rows = read(tmp_path / "studies" / target / "results.csv")
            accuracy = {(r["init"] == "random", r["seed"]): 100 * float(r["accuracy"]) for r in rows
                        if r["method"] == pooled["method"] and r["shots"] == pooled["shots"] and r["layers"] == "all"}
            differences += [accuracy[False, s] - accuracy[True, s] for s in map(str, config.seeds)]
        assert int(pooled["pairs"]) == len(differences) == 2 * len(config.seeds)
        mean = statistics.fmean(differences)
        half = t_quantile(0.975, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
        assert float(pooled["gain"]) == round(mean, 2)
        assert float(pooled["ci_low"]) == round(mean - half, 2) and float(pooled["ci_high"]) == round(mean + half, 2)
    points = read(report.files["tradeoff_csv"])
    assert {(p["method"], p["position"]) for p in points} == {(m, pos) for m in methods for pos in pvp.POSITIONS}
    parameters = {(p["method"], p["position"]): int(p["parameters"]) for p in points}
    assert all(parameters[(m, "upper half")] * 2 == parameters[(m, "all")] for m in methods)
    assert any("what the intervals support" in line for line in logged)
    assert any(line.startswith("timings (wall / CPU)") for line in logged)
    assert "epoch 1/1" in (tmp_path / "training.log").read_text()  # the per-epoch lines, out of the report


def test_reduced_demo_has_patt_bapat_and_the_real_image_target():
    assert {"patt", "bapat"} <= set(demo.REDUCED.methods)
    assert "digits" in demo.REDUCED.targets and demo.REDUCED.tradeoff_target == "digits"
    assert max(demo.REDUCED.shots) == 16 and len(demo.REDUCED.seeds) >= 5


def _results(pairs, target="t", method="lora", shots=1):
    """Results whose pre-trained minus random accuracies are ``pairs`` (in points), one pair a seed."""
    out = []
    for seed, gain in enumerate(pairs):
        out.append(pvp.Result(target, "generated", method, "random", shots, seed, 0.5))
        out.append(pvp.Result(target, "generated", method, "pretrained", shots, seed, 0.5 + gain / 100))
    return out


def test_gain_rows_pair_runs_of_the_same_seed_and_pool_over_targets():
    results = _results([1.0, 2.0], target="a") + _results([3.0, 4.0], target="b")
    rows = {row["target"]: row for row in demo_report.gain_rows(results)}
    assert rows["a"]["gain"] == 1.5 and rows["b"]["gain"] == 3.5 and rows["a"]["pairs"] == 2
    pooled = rows["all targets"]
    assert pooled["pairs"] == 4 and pooled["gain"] == 2.5
    assert (pooled["ci_low"], pooled["ci_high"]) == (0.45, 4.55)  # 2.5 -+ t(0.975, 3) * 1.29099 / 2
    assert pooled["verdict"] == "higher" and rows["a"]["verdict"] == "inconclusive"


def test_tradeoff_rows_mark_the_pareto_front():
    def run(method, position, parameters, accuracy):
        return pvp.Result("digits", "real", method, "random", 16, 0, accuracy, position, parameters)

    results = [run("lora", "all", 2000, 0.6), run("lora", "upper half", 1000, 0.5), run("vpt", "all", 3000, 0.55),
               run("patt", "all", 4000, 0.7)]
    rows = {(r["method"], r["position"]): r for r in demo_report.tradeoff_rows(results, "digits", 16)}
    assert {key: row["pareto"] for key, row in rows.items()} == {
        ("lora", "all"): True, ("lora", "upper half"): True, ("vpt", "all"): False, ("patt", "all"): True
    }
    assert rows[("patt", "all")]["mean"] == 70.0 and rows[("patt", "all")]["parameters"] == 4000


def test_write_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    rows = [{"target": "glyphs", "method": "lora", "init": "random", "shots": 1, "mean": 20.0, "std": 1.0}]
    target = pvp.Target("glyphs", "generated", 10, "")
    path, message = demo_report.write_plot(rows, [], [], demo.MICRO, ["lora"], {"glyphs": target}, tmp_path / "p.png")
    assert path is None and "matplotlib is not installed" in message
    assert not (tmp_path / "p.png").exists()
