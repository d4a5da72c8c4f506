"""One record of a run's settings (issue 20, item 9): the command line builds a RunConfig once, fit takes
its arguments, the run log writes each key once; plan's counts are a Summary's."""

from __future__ import annotations

import inspect
import json

import pytest

import petl_surgery as ps
from petl_surgery import cli
from petl_surgery.summary import planned_summary
from petl_surgery.training import fit
from petl_surgery.training.config import RunConfig, run_log
from conftest import make_vit

TINY = ["--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "embed_dim=32",
        "--model-arg", "depth=2", "--model-arg", "num_heads=2"]


def test_fit_arguments_are_every_setting_of_fit_with_its_defaults():
    parameters = inspect.signature(fit).parameters
    settings = {name: p.default for name, p in parameters.items()
                if p.kind is p.KEYWORD_ONLY and name not in ("device", "after_epoch")}
    assert RunConfig(model="vit_tiny_patch16_224").fit_arguments() == settings


def test_run_log_refuses_a_key_written_twice():
    config = RunConfig(model="vit_tiny_patch16_224", data="images/")
    log = run_log(config, {"data": "/abs/images", "train_images": 4}, {"history": []})
    assert log["data"] == "/abs/images" and log["lr"] == 1e-3 and log["history"] == []
    with pytest.raises(ps.SurgeryError, match="'lr' would be written twice"):
        run_log(config, {"lr": 0.1}, {})
    with pytest.raises(ps.SurgeryError, match="'train_images' would be written twice"):
        run_log(config, {"train_images": 4}, {"train_images": 4})
    with pytest.raises(ps.SurgeryError, match="no setting 'learning_rate'"):
        config.resolved(learning_rate=0.1)


def test_train_log_holds_the_settings_of_the_config_the_arguments_build(image_folder, tmp_path):
    out = tmp_path / "delta.safetensors"
    argv = ["train", "vit_small_patch16_224", "--data", str(image_folder), "-m", "lora", "-o", "rank=2",
            "--epochs", "1", "--batch-size", "6", "--image-size", "32", "--lr", "0.01", "--sched", "step",
            "--seed", "3", "--out", str(out), *TINY]
    assert cli.main(argv) == 0
    log = json.loads(out.with_suffix(".json").read_text())
    args = cli.build_parser().parse_args(argv)
    args.argv = argv
    given = cli.run_config(args, cli.parse_options(args.model_arg)).settings()
    settled = {"layers": "all", "statistics": "frozen", "device": "cpu", "image_size": 32, "cache_features": None}
    assert {key: log[key] for key in given} == {**given, **settled}
    assert (log["lr"], log["sched"], log["seed"], log["options"]) == (0.01, "step", 3, {"rank": 2})


def test_plan_counts_are_the_summary_apply_leaves():
    model = make_vit(num_classes=5)
    counts = planned_summary(model, ps.plan(model, "fact", slice(1, None), rank=4))
    ps.apply(model, "fact", layers=slice(1, None), rank=4)
    applied = ps.summary(model)
    assert counts.rows == applied.rows and counts.shared == applied.shared == {"fact": counts.shared["fact"]}
    assert (counts.per_method, counts.per_block, counts.head) == (applied.per_method, applied.per_block, applied.head)
    assert (counts.trainable, counts.total) == (applied.trainable, applied.total)
