"""The PVP demonstration's building blocks, at a micro size."""

from __future__ import annotations

import csv

import torch

import petl_surgery as ps
from petl_surgery import demo
from petl_surgery.demo import pvp, report as demo_report
from petl_surgery.demo.tasks import ATTRIBUTES, make_images


def test_task_images_are_deterministic_per_seed():
    task = demo.TARGET_TASKS["texture"]
    a_x, a_y = make_images(task, 12, seed=5)
    b_x, b_y = make_images(task, 12, seed=5)
    c_x, _ = make_images(task, 12, seed=6)
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    assert not torch.equal(a_x, c_x)
    assert a_x.shape == (12, 3, 32, 32) and a_x.dtype == torch.float32
    assert a_x.abs().max() < 2


def test_few_shot_split_is_class_balanced():
    for task in [demo.SOURCE_TASK, *demo.TARGET_TASKS.values()]:
        x, y = demo.few_shot_split(task, 2, seed=0)
        assert torch.equal(y, torch.arange(task.num_classes).repeat_interleave(2))
        assert len(x) == 2 * task.num_classes


def test_tasks_are_distinct():
    classes = {task.classes for task in [demo.BACKBONE_TASK, demo.SOURCE_TASK, *demo.TARGET_TASKS.values()]}
    assert len(classes) == 2 + len(demo.TARGET_TASKS)
    assert demo.SOURCE_TASK.num_classes == 16
    assert all(name in ATTRIBUTES for task in demo.TARGET_TASKS.values() for name in task.attributes)


def test_micro_run_end_to_end(tmp_path):
    logged = []
    report = demo.run(demo.MICRO, tmp_path, log=logged.append, plot=False)
    methods = demo.MICRO.method_list()
    grid = len(demo.MICRO.targets) * len(demo.MICRO.shots) * len(demo.MICRO.seeds) * len(methods) * 2
    tradeoff = len(demo.MICRO.seeds) * len(methods)  # the upper-half runs
    assert len(report.results) == grid + tradeoff
    assert {r.init for r in report.results} == {"random", "pretrained"}
    assert {(r.target, r.data) for r in report.results} == {("digits", "real"), ("texture", "generated")}
    assert all(0.0 <= r.accuracy <= 1.0 for r in report.results)
    assert all(report.reload_identical.values()) and set(report.reload_identical) == set(methods)
    for method, path in report.checkpoints.items():
        assert path.is_file()
    with open(report.files["csv"]) as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == grid // len(demo.MICRO.seeds)
    assert {"target", "data", "method", "init", "shots", "mean", "std"} <= set(rows[0])
    with open(report.files["gains_csv"]) as stream:
        gains = list(csv.DictReader(stream))
    per_target = len(demo.MICRO.targets) * len(demo.MICRO.shots) * len(methods)
    assert len(gains) == per_target + len(demo.MICRO.shots) * len(methods)  # then pooled over targets
    assert {"gain", "ci_low", "ci_high", "pairs", "verdict", "interval"} <= set(gains[0])
    assert {g["pairs"] for g in gains if g["target"] == "all targets"} == {str(2 * len(demo.MICRO.seeds))}
    with open(report.files["tradeoff_csv"]) as stream:
        points = list(csv.DictReader(stream))
    assert {(p["method"], p["position"]) for p in points} == {(m, pos) for m in methods for pos in pvp.POSITIONS}
    parameters = {(p["method"], p["position"]): int(p["parameters"]) for p in points}
    assert all(parameters[(m, "upper half")] * 2 == parameters[(m, "all")] for m in methods)
    assert any("what the intervals support" in line for line in logged)


def test_reduced_demo_shows_the_papers_methods_and_real_images():
    assert {"patt", "bapat", "vpt", "lora", "adapter"} <= set(demo.REDUCED.methods)
    assert "digits" in demo.REDUCED.targets and demo.REDUCED.tradeoff_target == "digits"


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


def test_pretrained_init_loads_source_modules_with_a_new_head(tmp_path):
    config = demo.MICRO
    torch.manual_seed(0)
    backbone = {k: v for k, v in pvp.build_model(config, 16).state_dict().items() if not k.startswith("head.")}
    source = pvp.model_with_backbone(config, backbone, 16, seed=1)
    ps.apply(source, "lora", **pvp.METHOD_OPTIONS["lora"])
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "petl_lora" in name:
                p.normal_()
    ps.save(source, tmp_path / "src.safetensors")
    target = pvp.model_with_backbone(config, backbone, 3, seed=2)
    head_before = target.head.weight.detach().clone()
    ps.load(target, tmp_path / "src.safetensors", load_head=False)
    modules = {n: p for n, p in target.named_parameters() if "petl_lora" in n}
    assert modules and all(torch.equal(p, dict(source.named_parameters())[n]) for n, p in modules.items())
    assert torch.equal(target.head.weight, head_before) and target.head.weight.requires_grad


def test_write_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    rows = [{"target": "texture", "method": "lora", "init": "random", "shots": 1, "mean": 20.0, "std": 1.0}]
    path, message = demo_report.write_plot(rows, [], [], demo.MICRO, ["lora"],
                                           {"texture": demo.TARGET_TASKS["texture"]}, tmp_path / "p.png")
    assert path is None and "matplotlib is not installed" in message
    assert not (tmp_path / "p.png").exists()
