"""The petl-surgery command line, run in-process through cli.main(argv) on tiny models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import petl_surgery as ps
from petl_surgery import cli

TINY = ["--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "embed_dim=32",
        "--model-arg", "depth=2", "--model-arg", "num_heads=2"]


def test_plan_prints_insertions_and_counts(capsys):
    assert cli.main(["plan", "vit_small_patch16_224", "--method", "patt", "--layers", "1:", "-o", "mid_dim=8",
                     "--num-classes", "5", *TINY]) == 0
    out = capsys.readouterr().out
    # on the meta device where the model's construction allows it (ViT's init calls .item() on torch 2.6)
    assert ("meta device" in out or "cpu device" in out) and "blocks   1 (1 of 2)" in out
    assert "blocks.1.attn.petl_patt" in out and "forward hook on blocks.1.attn.qkv" in out
    assert "blocks.0.attn.petl_patt" not in out
    # d*m + m + 2d*m + 2d with d=32, m=8 (qkv has a bias)
    assert f"{32 * 8 + 8 + 2 * 32 * 8 + 2 * 32:,}" in out
    assert "classifier head (trainable)" in out and "165" in out  # 32*5 + 5


def test_plan_options_parsing(capsys):
    assert cli.main(["plan", "vit_small_patch16_224", "-m", "lora", "-o", "targets=q,v,proj", "-o", "rank=2",
                     *TINY]) == 0
    out = capsys.readouterr().out
    assert "forward hook on blocks.0.attn.proj" in out
    assert cli.parse_value("true") is True and cli.parse_value("learnable") == "learnable"
    assert cli.parse_value("0.5") == 0.5 and cli.parse_value("q,v") == ["q", "v"]
    assert cli.parse_layers("6:12") == slice(6, 12) and cli.parse_layers("0,2") == [0, 2]
    assert cli.parse_layers("-1") == -1 and cli.parse_layers("all") is None


def test_train_inspect_resume(image_folder, tmp_path, capsys):
    delta = tmp_path / "delta.safetensors"
    argv = ["train", "vit_small_patch16_224", "--data", str(image_folder), "--val-split", "0.25",
            "--method", "adapter", "-o", "bottleneck=4", "--epochs", "2", "--batch-size", "8",
            "--image-size", "32", "--lr", "1e-2", "--out", str(delta), *TINY]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "epoch 2/2" in captured.err and "loss" in captured.err and "acc" in captured.err
    assert delta.is_file()
    log = json.loads(delta.with_suffix(".json").read_text())
    assert log["classes"] == ["blue", "green", "red"] and len(log["history"]) == 2
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(log["history"][0])

    assert cli.main(["inspect", str(delta)]) == 0
    out = capsys.readouterr().out
    assert "adapter" in out and "bottleneck=4" in out and "checksum     ok" in out
    assert "blocks.1.mlp.petl_adapter" in out and "head.weight" in out and "3x32" in out and "float32" in out
    assert "vit_small_patch16_224" in out and "total" in out

    resumed = tmp_path / "resumed.safetensors"
    assert cli.main(["train", "vit_small_patch16_224", "--data", str(image_folder), "--resume", str(delta),
                     "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--out", str(resumed), *TINY]) == 0
    capsys.readouterr()
    assert json.loads(resumed.with_suffix(".json").read_text())["resumed_from"] == str(delta)
    import timm

    model = timm.create_model("vit_small_patch16_224", num_classes=3, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2)
    ps.load(model, resumed)
    assert ps.summary(model).per_method == {"adapter": 2 * (2 * 32 * 4 + 4 + 32)}


def test_train_records_the_statistics_setting_in_the_delta(image_folder, tmp_path, capsys):
    import timm

    delta = tmp_path / "adapted.safetensors"
    assert cli.main(["train", "vit_small_patch16_224", "--data", str(image_folder), "--method", "patt",
                     "--statistics", "adapt", "--epochs", "1", "--batch-size", "8", "--image-size", "32",
                     "--out", str(delta), *TINY]) == 0
    capsys.readouterr()
    model = timm.create_model("vit_small_patch16_224", num_classes=3, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2)
    assert ps.summary(ps.load(model, delta)).statistics == "adapt"


def test_demo_command(tmp_path, capsys, monkeypatch):
    from petl_surgery import demo

    from dataclasses import replace

    # two processes: the target studies run as `python -m petl_surgery study`, side by side
    monkeypatch.setattr(demo, "REDUCED", replace(demo.MICRO, processes=2))
    assert cli.main(["demo", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "what the intervals support" in out and (tmp_path / "d" / "pvp_fewshot.csv").is_file()
    studies = tmp_path / "d" / "studies"
    assert sorted(p.name for p in studies.iterdir() if p.is_dir()) == ["digits", "digits-upper-half", "glyphs", "source"]
    assert all((studies / name / "results.csv").is_file() for name in ("digits", "digits-upper-half", "glyphs"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out
    else:
        assert (tmp_path / "d" / "pvp_fewshot.png").is_file()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["plan", "vit_small_patch16_224", "--method", "nonsense"], "unknown method 'nonsense'"),
        (["plan", "not_a_model", "--method", "patt"], "unknown timm model"),
        (["plan", "vit_small_patch16_224", "--method", "patt", "--layers", "9", *TINY], "out of range"),
        (["plan", "vit_small_patch16_224", "--method", "patt", "--layers", "1:10", *TINY], "layers=slice(1, 10, None) is out of range: the model has 2 blocks"),
        (["plan", "vit_small_patch16_224", "--method", "patt", "-o", "bad"], "key=value"),
        (["inspect", "/no/such/file.safetensors"], "no checkpoint file"),
        (["train", "vit_small_patch16_224", "--data", "/no/such/dir", "--method", "lora"], "no data directory at /no/such/dir"),
        (["train", "vit_small_patch16_224", "--data", "."], "--method"),
        (["plan"], "required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_errors_are_one_line(argv, fragment, capsys):
    status = cli.main(argv)
    captured = capsys.readouterr()
    assert status != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("petl-surgery: error:") and fragment in lines[0]
    assert "Traceback" not in captured.err


def test_inspect_refuses_a_file_that_is_not_a_delta(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    assert cli.main(["inspect", str(bad)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "model, method, patched",
    [
        ("beit_base_patch16_224", "patt", "sets qkv_bias_separate on blocks.0.attn"),
        ("swinv2_tiny_window8_256", "patt", "sets qkv_bias_separate on layers.0.blocks.0.attn"),
        ("vit_small_patch16_224", "prefix", "sets forward on blocks.0.attn"),
    ],
)
def test_plan_names_the_patches_a_site_needs(capsys, model, method, patched):
    assert cli.main(["plan", model, "--method", method, "--layers", "0"]) == 0
    assert patched in capsys.readouterr().out


# -- what a training run records and checks up front (issue 12, item 6) ------------------------------------

def _train_argv(data, out, *extra):
    return ["train", "vit_small_patch16_224", "--data", str(data), "--epochs", "1", "--batch-size", "6",
            "--image-size", "32", "--out", str(out), *TINY, *extra]


@pytest.fixture(scope="module")
def seeded_delta(image_folder, tmp_path_factory):
    """A PATT delta trained on a base initialised with --seed 3 (no --pretrained)."""
    out = tmp_path_factory.mktemp("seeded") / "d.safetensors"
    assert cli.main(_train_argv(image_folder, out, "--method", "patt", "-o", "mid_dim=4", "--layers", "1",
                                "--seed", "3")) == 0
    return out


def test_the_log_holds_what_rebuilds_the_run(vtab_folder, tmp_path, capsys):
    import safetensors.torch

    out = tmp_path / "d.safetensors"
    assert cli.main(_train_argv(vtab_folder, out, "--method", "lora", "-o", "rank=2", "--layers", "0", "--seed", "5",
                                "--shots", "3", "--format", "vtab", "--split", "train800")) == 0
    log = json.loads(out.with_suffix(".json").read_text())
    assert log["model_args"] == {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    assert (log["layers"], log["options"], log["seed"], log["shots"], log["shot_seed"]) == ("0", {"rank": 2}, 5, 3, 5)
    assert (log["data"], log["format"], log["split"], log["weight_decay"]) == (str(vtab_folder), "vtab", "train800", 1e-4)
    assert set(log["versions"]) == {"petl_surgery", "torch", "timm"}
    again = tmp_path / "again.safetensors"
    argv = list(log["argv"])
    argv[argv.index("--out") + 1] = str(again)
    assert cli.main(argv) == 0  # the recorded command line trains the same delta, bit for bit
    capsys.readouterr()
    first, second = safetensors.torch.load_file(out), safetensors.torch.load_file(again)
    assert first.keys() == second.keys() and all(first[k].equal(second[k]) for k in first)


@pytest.mark.parametrize("extra, named", [(["--layers", "0"], "--layers"), (["-o", "mid_dim=8"], "-o/--option"),
                                          (["--statistics", "frozen"], "--statistics")])
def test_resume_refuses_arguments_it_would_ignore(seeded_delta, image_folder, tmp_path, capsys, extra, named):
    out = tmp_path / "r.safetensors"
    assert cli.main(_train_argv(image_folder, out, "--resume", str(seeded_delta), "--seed", "3", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{named} would be ignored" in err[0] and not out.exists()


def test_resume_refuses_another_seed_on_a_randomly_initialised_base(seeded_delta, image_folder, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert cli.main(_train_argv(image_folder, out, "--resume", str(seeded_delta))) == 2
    err = capsys.readouterr().err
    assert "initialised with --seed 3" in err and "give --seed 3" in err and not out.exists()
    assert cli.main(_train_argv(image_folder, out, "--resume", str(seeded_delta), "--pretrained", "--seed", "3")) == 2
    assert "was trained without --pretrained" in capsys.readouterr().err
    assert cli.main(_train_argv(image_folder, out, "--resume", str(seeded_delta), "--seed", "3")) == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    "out, log, message",
    [
        ("missing/d.safetensors", None, "missing is not a directory"),
        ("plain.txt/d.safetensors", None, "plain.txt is not a directory"),
        ("plain.txt", None, "plain.txt exists and is not a petl_surgery delta: not overwriting it"),
        ("d.safetensors", "plain.txt", "plain.txt exists and is not a petl-surgery training log"),
        ("d.safetensors", "d.safetensors", "the delta and the log would both be written to"),
        ("folder", None, "folder is a directory"),
    ],
)
def test_output_paths_are_checked_before_the_first_epoch(image_folder, tmp_path, capsys, out, log, message):
    (tmp_path / "plain.txt").write_text("keep me\n")
    (tmp_path / "folder").mkdir()
    argv = _train_argv(image_folder, tmp_path / out, "--method", "patt") + (["--log-file", str(tmp_path / log)] if log else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "epoch" not in err
    assert (tmp_path / "plain.txt").read_text() == "keep me\n"


def _evaluate_argv(delta, data, *extra):
    return ["evaluate", "vit_small_patch16_224", str(delta), "--data", str(data), "--image-size", "32", *TINY, *extra]


def test_evaluate_refuses_data_whose_class_names_are_not_the_trained_ones(seeded_delta, image_folder, tmp_path, capsys):
    renamed = tmp_path / "renamed"  # the same images and count; "red" is now "crimson", which sorts first
    shutil.copytree(image_folder, renamed)
    (renamed / "red").rename(renamed / "crimson")
    assert cli.main(_evaluate_argv(seeded_delta, renamed, "--seed", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the data's classes [blue, crimson, green] are not the classes" in err[0]
    assert "trained on, [blue, green, red]" in err[0] and "only in the data: ['crimson']" in err[0]
    assert cli.main(_evaluate_argv(seeded_delta, image_folder, "--seed", "3")) == 0
    capsys.readouterr()


def test_class_names_in_another_order_are_refused_as_a_permutation(tmp_path):
    from petl_surgery.training.outputs import check_classes

    check_classes(tmp_path / "d.safetensors", {"classes": ["a", "b"]}, ["a", "b"])
    check_classes(tmp_path / "d.safetensors", None, ["b", "a"])  # no log: nothing to check against
    with pytest.raises(ps.SurgeryError, match=r"\[b, a\] are not .* \[a, b\]: the same names in another order"):
        check_classes(tmp_path / "d.safetensors", {"classes": ["a", "b"]}, ["b", "a"])


def test_evaluate_refuses_another_base_than_the_delta_was_trained_on(seeded_delta, image_folder, tmp_path, capsys):
    assert cli.main(_evaluate_argv(seeded_delta, image_folder)) == 2  # --seed 0, trained with --seed 3
    err = capsys.readouterr().err
    assert "initialised with --seed 3" in err and "--seed 0 would build another base" in err
    assert cli.main(_evaluate_argv(seeded_delta, image_folder, "--pretrained", "--seed", "3")) == 2
    assert "was trained without --pretrained; evaluate it the same way" in capsys.readouterr().err
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert cli.main(_evaluate_argv(seeded_delta, image_folder, "--weights", str(weights), "--seed", "3")) == 2
    assert "was trained without --weights; --weights" in capsys.readouterr().err


def test_evaluate_and_resume_check_the_weights_file_by_its_bytes(image_folder, tmp_path, capsys):
    import safetensors.torch
    import timm

    torch.manual_seed(1)
    base = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=0)
    weights, other = tmp_path / "w.safetensors", tmp_path / "other.safetensors"
    safetensors.torch.save_file(base.state_dict(), weights)
    safetensors.torch.save_file({k: v + 1 for k, v in base.state_dict().items()}, other)
    delta = tmp_path / "d.safetensors"
    assert cli.main(_train_argv(image_folder, delta, "--method", "patt", "--weights", str(weights))) == 0
    assert cli.main(_evaluate_argv(delta, image_folder, "--weights", str(weights))) == 0
    capsys.readouterr()
    assert cli.main(_evaluate_argv(delta, image_folder, "--weights", str(other))) == 2
    assert f"--weights {other} holds other bytes" in capsys.readouterr().err
    assert cli.main(_evaluate_argv(delta, image_folder)) == 2
    assert f"trained on the base weights of --weights {weights}; evaluate it with the same file" in capsys.readouterr().err
    resumed = tmp_path / "r.safetensors"
    assert cli.main(_train_argv(image_folder, resumed, "--resume", str(delta), "--weights", str(other))) == 2
    assert "holds other bytes" in capsys.readouterr().err and not resumed.exists()
