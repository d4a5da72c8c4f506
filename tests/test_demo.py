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
    expected = len(demo.MICRO.targets) * len(demo.MICRO.shots) * len(demo.MICRO.seeds) * len(methods) * 2
    assert len(report.results) == expected
    assert {r.init for r in report.results} == {"random", "pretrained"}
    assert all(0.0 <= r.accuracy <= 1.0 for r in report.results)
    assert all(report.reload_identical.values()) and set(report.reload_identical) == set(methods)
    for method, path in report.checkpoints.items():
        assert path.is_file()
    with open(report.files["csv"]) as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == expected // len(demo.MICRO.seeds)
    assert {"target", "method", "init", "shots", "mean", "std"} <= set(rows[0])
    assert any("gain" in line for line in logged)


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
    ps.load(target, tmp_path / "src.safetensors", head=False)
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
    path, message = demo_report.write_plot(rows, demo.MICRO, ["lora"], {"texture": demo.TARGET_TASKS["texture"]},
                                           tmp_path / "p.png")
    assert path is None and "matplotlib is not installed" in message
    assert not (tmp_path / "p.png").exists()
