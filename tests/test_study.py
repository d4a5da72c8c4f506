"""The V-PETL study (training/study.py): a grid of two runs on a generated VTAB-1k layout, its CSV, its
plot, its resume, and the grids it refuses before anything trains."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from petl_surgery import cli
from petl_surgery.training import StudyError, load_grid, run_study, study
from petl_surgery.training.tradeoff import pareto_front

MODEL_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def grid_for(data, **changes):
    grid = {
        "model": "vit_small_patch16_224", "model_args": MODEL_ARGS, "image_size": 32, "data": str(data),
        "format": "vtab", "epochs": 1, "batch_size": 6, "lr": 0.01,
        "runs": [{"method": "patt", "options": {"mid_dim": 4}, "layers": "1:"},
                 {"method": "lora", "options": {"rank": 2}, "layers": [0, 1]}],
        "shots": [2], "seeds": [0, 1],
    }
    grid.update(changes)
    return grid


@pytest.fixture
def fits(monkeypatch):
    """The runs the study trains, counted at its call of fit."""
    calls = []
    real = study.fit

    def counting(*args, **kwargs):
        calls.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(study, "fit", counting)
    return calls


def read_rows(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_a_study_of_two_runs_writes_deltas_logs_csv_and_plot_and_resumes(vtab_folder, tmp_path, fits):
    out = tmp_path / "study"
    result = run_study(grid_for(vtab_folder), out, device="cpu", log=lambda line: None)
    assert (result.trained, result.reused, len(fits)) == (4, 0, 4)
    rows = read_rows(out / "results.csv")
    assert list(rows[0]) == list(study.CSV_COLUMNS)
    assert [(r["method"], r["layers"], r["shots"], r["seed"]) for r in rows] == [
        ("patt", "1:", "2", "0"), ("patt", "1:", "2", "1"), ("lora", "0,1", "2", "0"), ("lora", "0,1", "2", "1")]
    for row in rows:
        folder = out / "runs" / row["run"]
        log = json.loads((folder / "log.json").read_text())
        assert int(row["delta_bytes"]) == (folder / "delta.safetensors").stat().st_size
        assert float(row["accuracy"]) == log["evaluation"]["top1"] and log["evaluation"]["images"] == 9
        assert int(row["trainable_parameters"]) == log["result"]["trainable_parameters"]
        assert log["shots"] == 2 and len(log["shot_images"]) == 6 and log["shot_seed"] == int(row["seed"])
    # PATT on block 1 (32*4 + 4 + 2*32*4 + 2*32) and the head (3*32 + 3)
    assert int(rows[0]["trainable_parameters"]) == 32 * 4 + 4 + 2 * 32 * 4 + 2 * 32 + 3 * 32 + 3
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result.plot == out / "tradeoff.png"

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*")}
    again = run_study(grid_for(vtab_folder), out, device="cpu", log=lambda line: None)
    assert (again.trained, again.reused, len(fits)) == (0, 4, 4)  # nothing trained again
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*")} == mtimes
    assert read_rows(out / "results.csv") == rows

    more = run_study(grid_for(vtab_folder, seeds=[0, 1, 2]), out, device="cpu", log=lambda line: None)
    assert (more.trained, more.reused, fits[4:]) == (2, 4, [2, 2])  # only the new seed's runs


def test_the_study_command_reports_what_it_trained(vtab_folder, tmp_path, capsys):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(grid_for(vtab_folder, runs=grid_for(vtab_folder)["runs"][:1], seeds=[0])))
    assert cli.main(["study", str(grid), "--out", str(tmp_path / "s"), "--device", "cpu", "--no-plot"]) == 0
    assert "1 runs (1 trained now, 0 finished before)" in capsys.readouterr().out
    assert (tmp_path / "s" / "results.csv").is_file() and not (tmp_path / "s" / "tradeoff.png").exists()
    assert cli.main(["study", str(grid), "--out", str(tmp_path / "s"), "--device", "cpu", "--no-plot"]) == 0
    assert "1 runs (0 trained now, 1 finished before)" in capsys.readouterr().out


def test_without_matplotlib_the_study_says_so_and_writes_the_csv(vtab_folder, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    lines = []
    result = run_study(grid_for(vtab_folder, runs=grid_for(vtab_folder)["runs"][:1], seeds=[0]), tmp_path / "s",
                       device="cpu", log=lines.append)
    assert result.plot is None and any("matplotlib is not installed" in line for line in lines)
    assert len(read_rows(tmp_path / "s" / "results.csv")) == 1 and not (tmp_path / "s" / "tradeoff.png").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optimiser": "sgd"}, "unknown grid key 'optimiser'"),
        ({"model": None}, "grid key 'model' must be str"),
        ({"epochs": "1"}, "grid key 'epochs' must be int"),
        ({"epochs": True}, "grid key 'epochs' must be int"),
        ({"seeds": [0, "1"]}, "grid key 'seeds' must be a non-empty list of ints"),
        ({"shots": [0]}, "grid key 'shots' must be a non-empty list of positive ints"),
        ({"format": "coco"}, "grid key 'format' 'coco' is not one of"),
        ({"runs": [{"method": "glora"}]}, "grid key runs[0].'method': unknown method 'glora'"),
        ({"runs": [{"method": "patt", "rank": 2}]}, "unknown grid key runs[0].'rank'"),
        ({"runs": [{"options": {}}]}, "grid key runs[0].'method' is missing"),
        ({"runs": [{"method": "patt", "options": {"mid_dims": 4}}]}, "grid key runs[0] (patt): "),
        ({"runs": [{"method": "patt", "layers": [5]}]}, "grid key runs[0] (patt): layer 5 is out of range"),
        ({"shots": [7]}, "grid key 'data': class '0' has 6 training images, fewer than --shots 7"),
        ({"eval_split": "val"}, "grid key 'data': unknown vtab split 'val'"),
        ({"eval_split": "val200"}, "grid key 'eval_split': the evaluation split 'val200' shares 2 images"),
    ],
)
def test_a_bad_grid_is_refused_naming_the_key_before_anything_trains(vtab_folder, tmp_path, fits, change, message):
    with pytest.raises(StudyError) as error:
        run_study(grid_for(vtab_folder, **change), tmp_path / "s", device="cpu", log=lambda line: None)
    assert message in str(error.value)
    assert fits == [] and not (tmp_path / "s").exists()


def test_a_missing_key_is_named(vtab_folder):
    grid = grid_for(vtab_folder)
    del grid["lr"]
    with pytest.raises(StudyError, match="grid key 'lr' is missing"):
        load_grid(grid)


def test_a_directory_of_another_study_is_refused(vtab_folder, tmp_path, fits):
    one = grid_for(vtab_folder, runs=grid_for(vtab_folder)["runs"][:1], seeds=[0])
    run_study(one, tmp_path / "s", device="cpu", plot=False, log=lambda line: None)
    with pytest.raises(StudyError, match="holds a study with other settings \\(epochs, lr differ\\)"):
        run_study({**one, "epochs": 2, "lr": 0.1}, tmp_path / "s", device="cpu", log=lambda line: None)
    assert len(fits) == 1


def test_the_pareto_front_keeps_the_undominated_points():
    points = [(100, 0.5), (50, 0.6), (200, 0.7), (300, 0.65), (50, 0.55)]
    assert pareto_front(points) == [1, 2]
