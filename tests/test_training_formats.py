"""Data formats (ImageFolder, VTAB-1k lists, VPT's FGVC JSON), --split, --shots and their errors, on
generated layouts (tests/conftest.py); training and evaluation through the command line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import TINY
from test_training import tiny_vit

import petl_surgery as ps
from petl_surgery import cli
from petl_surgery.training import DataError, evaluation_data, open_layout, training_data

NORMAL = dict(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_auto_tells_the_formats_apart(image_folder, vtab_folder, fgvc_folder, tmp_path):
    assert [open_layout(str(d)).format for d in (image_folder, vtab_folder, fgvc_folder)] == ["imagefolder", "vtab", "fgvc"]
    both = tmp_path / "both"
    shutil.copytree(vtab_folder, both)
    shutil.copy(fgvc_folder / "train.json", both / "train.json")
    with pytest.raises(DataError, match="both VTAB-1k lists .* and FGVC files .*give --format"):
        open_layout(str(both))
    (tmp_path / "lists" / "train.json").parent.mkdir()
    (tmp_path / "lists" / "train.json").write_text("{}")
    with pytest.raises(DataError, match="the fgvc files of .* \\(train.json\\) list no images"):
        open_layout(str(tmp_path / "lists"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell the format"):
        open_layout(str(tmp_path / "empty"))


@pytest.mark.parametrize("fixture, format, split, count", [
    ("image_folder", "imagefolder", None, 18), ("vtab_folder", "vtab", "train800val200", 18), ("fgvc_folder", "fgvc", "train", 12),
])
def test_train_reads_each_format_and_records_it(request, tmp_path, capsys, fixture, format, split, count):
    out = tmp_path / "d.safetensors"
    assert cli.main(["train", "vit_small_patch16_224", "--data", str(request.getfixturevalue(fixture)), "--method", "patt",
                     "-o", "mid_dim=4", "--epochs", "1", "--batch-size", "6", "--image-size", "32", "--out", str(out),
                     *TINY]) == 0
    assert "epoch 1/1" in capsys.readouterr().err
    log = json.loads(out.with_suffix(".json").read_text())
    assert (log["format"], log["split"], log["train_images"], len(log["history"])) == (format, split, count, 1)
    assert ps.summary(ps.load(tiny_vit(), out)).per_method == {"patt": 2 * (32 * 4 + 4 + 2 * 32 * 4 + 2 * 32)}


def test_vtab_trains_on_train800val200_and_evaluates_on_test_by_default(vtab_folder):
    data = training_data(str(vtab_folder), **NORMAL)
    assert (data.layout.format, data.split, data.classes) == ("vtab", "train800val200", ["0", "1", "2"])
    assert len(data.train) == 18 and data.val is None
    listed = [line.rsplit(" ", 1) for line in (vtab_folder / "train800val200.txt").read_text().split("\n") if line]
    assert data.train.samples == [(path, int(label)) for path, label in listed]
    test, _, split = evaluation_data(str(vtab_folder), **NORMAL)
    assert split == "test" and len(test) == 9
    assert len(training_data(str(vtab_folder), split="train800", val="val200", **NORMAL).val) == 6


def test_vtab_preprocessing_is_a_bicubic_resize_to_the_input_size_without_augmentation(vtab_folder):
    data = training_data(str(vtab_folder), **NORMAL)
    path, label = data.train.samples[0]
    with Image.open(vtab_folder / path) as image:
        resized = image.convert("RGB").resize((32, 32), Image.BICUBIC)
    expected = (torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    first, again = data.train[0], data.train[0]
    assert first[1] == label and torch.allclose(first[0], expected, atol=1e-6) and torch.equal(first[0], again[0])


def test_fgvc_reads_paths_under_images_and_numbers_the_labels_in_order(fgvc_folder):
    data = training_data(str(fgvc_folder), val="val", **NORMAL)
    assert (data.layout.format, data.split, data.classes) == ("fgvc", "train", ["10", "20", "30"])
    assert data.layout.image_root == fgvc_folder / "images"
    train_json = json.loads((fgvc_folder / "train.json").read_text())
    assert data.train.samples == [(path, label // 10 - 1) for path, label in train_json.items()]
    assert len(data.val) == 6 and data.train[0][0].shape == (3, 32, 32)


def test_a_validation_split_inside_the_training_split_is_refused(vtab_folder):
    with pytest.raises(DataError, match="'val200' shares 6 images with the training split 'train800val200'"):
        training_data(str(vtab_folder), val="val200", **NORMAL)


def _copy(folder, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "test.txt").unlink(), r"test\.txt is missing \(vtab layout, split 'test'\)"),
        (lambda d: (d / "images" / "c1_test_0.png").unlink(), r"test\.txt line 4: image images/c1_test_0\.png does not exist"),
        (lambda d: (d / "test.txt").write_text("images/c0_test_0.png cat\n"), r"test\.txt line 1: label 'cat' is not a non-negative"),
        (lambda d: (d / "test.txt").write_text("images/c0_test_0.png\n"), r"test\.txt line 1: expected 'relative/path label'"),
        (lambda d: (d / "images" / "c2_test_2.png").write_bytes(b"not a png"), r"cannot read the image .*c2_test_2\.png"),
        (lambda d: (d / "test.txt").write_text("images/c0_test_0.png 7\n"), r"c0_test_0\.png: label 7 is out of range for the model's 3 classes"),
    ],
    ids=["missing-list", "missing-image", "bad-label", "bad-line", "unreadable-image", "label-out-of-range"],
)
def test_evaluate_refuses_a_broken_layout_in_one_line_naming_the_file(vtab_folder, tmp_path, capsys, damage, message):
    import re

    data = _copy(vtab_folder, tmp_path)
    delta = tmp_path / "d.safetensors"
    ps.save(ps.apply(tiny_vit(), "patt", mid_dim=4), delta)
    damage(data)
    status = cli.main(["evaluate", "vit_small_patch16_224", str(delta), "--data", str(data), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and re.search(message, err[0]), err


def test_a_broken_training_image_is_refused_before_the_first_epoch(vtab_folder, tmp_path, capsys):
    data = _copy(vtab_folder, tmp_path)
    (data / "images" / "c0_val_1.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "d.safetensors"
    status = cli.main(["train", "vit_small_patch16_224", "--data", str(data), "--method", "patt",
                       "--image-size", "32", "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert status == 2 and "cannot read the image" in err and "c0_val_1.png" in err and "epoch" not in err
    assert not out.exists()


def test_shots_draw_k_per_class_seeded(vtab_folder):
    draws = [training_data(str(vtab_folder), shots=2, shot_seed=s, **NORMAL).train.samples for s in (0, 0, 1)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    for draw in draws:
        assert sorted(label for _, label in draw) == [0, 0, 1, 1, 2, 2]
    listed = training_data(str(vtab_folder), **NORMAL).train.samples
    assert all(sample in listed for sample in draws[0])
    assert draws[0] == sorted(draws[0], key=listed.index)  # kept in their listed order


def test_shots_more_than_a_class_has_is_refused_naming_the_class(vtab_folder):
    with pytest.raises(DataError, match="class '0' has 6 training images, fewer than --shots 7"):
        training_data(str(vtab_folder), shots=7, **NORMAL)
    with pytest.raises(DataError, match="--shots with --val-split"):
        training_data(str(vtab_folder), shots=2, val_split=0.25, **NORMAL)


def test_train_with_shots_records_the_draw(vtab_folder, tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    assert cli.main(["train", "vit_small_patch16_224", "--data", str(vtab_folder), "--method", "lora",
                     "--shots", "2", "--shot-seed", "4", "--val", "val200", "--split", "train800", "--epochs", "1",
                     "--batch-size", "6", "--image-size", "32", "--out", str(out), *TINY]) == 0
    assert "6 training and 6 validation images" in capsys.readouterr().err
    log = json.loads(out.with_suffix(".json").read_text())
    expected = training_data(str(vtab_folder), split="train800", shots=2, shot_seed=4, **NORMAL).train.samples
    assert (log["format"], log["split"], log["val"], log["shots"], log["shot_seed"]) == ("vtab", "train800", "val200", 2, 4)
    assert log["shot_images"] == [path for path, _ in expected] and log["train_images"] == 6


@pytest.mark.parametrize("fixture, split, images", [("vtab_folder", None, 9), ("fgvc_folder", "val", 6), ("image_folder", None, 18)])
def test_evaluate_equals_an_independent_computation_over_the_split(request, tmp_path, capsys, fixture, split, images):
    folder = request.getfixturevalue(fixture)
    delta = tmp_path / "d.safetensors"
    model = ps.apply(tiny_vit(), "patt", mid_dim=4)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    ps.save(model, delta)
    argv = ["evaluate", "vit_small_patch16_224", str(delta), "--data", str(folder), "--batch-size", "4", "--image-size", "32",
            *(["--split", split] if split else []), *TINY]
    results = []
    for name in ("a.json", "b.json"):
        assert cli.main(argv + ["--json", str(tmp_path / name)]) == 0
        results.append(json.loads((tmp_path / name).read_text()))
    printed = capsys.readouterr().out
    assert results[0] == results[1]  # deterministic
    report = results[0]
    # independently: the images and labels the split's own file lists, each through a fresh model with the delta
    dataset, layout, _ = evaluation_data(str(folder), split=split, **NORMAL)
    assert dataset.samples == listed(folder, fixture, split)
    fresh = ps.load(tiny_vit(), delta).eval()
    with torch.no_grad():
        predicted = torch.cat([fresh(dataset[i][0][None]).argmax(1) for i in range(len(dataset))])
    labels = torch.tensor([label for _, label in dataset.samples])
    assert report["images"] == images == len(labels)
    assert report["top1"] == (predicted == labels).sum().item() / images
    assert f"top-1 {100 * report['top1']:.1f}%" in printed
    assert report["per_class"] == {
        name: (predicted[labels == c] == c).sum().item() / (labels == c).sum().item() for c, name in enumerate(layout.classes)
    }


def listed(folder, fixture, split):
    """(path, class index) of a split, read straight from the layout's files."""
    if fixture == "vtab_folder":
        return [(p, int(k)) for p, k in (line.split(" ") for line in (folder / "test.txt").read_text().split("\n") if line)]
    if fixture == "fgvc_folder":
        return [(p, k // 10 - 1) for p, k in json.loads((folder / f"{split}.json").read_text()).items()]
    classes = sorted(d.name for d in folder.iterdir())
    return [(f"{c}/{f.name}", i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir())]


def test_a_vtab_split_naming_fewer_classes_than_the_head_evaluates_over_the_head(vtab_folder, tmp_path, capsys):
    data = _copy(vtab_folder, tmp_path)
    for name in ("train800", "val200", "train800val200"):
        (data / f"{name}.txt").unlink()
    (data / "test.txt").write_text("images/c0_test_0.png 0\nimages/c1_test_0.png 1\n")
    delta = tmp_path / "d.safetensors"
    ps.save(ps.apply(tiny_vit(), "patt", mid_dim=4), delta)
    result = tmp_path / "r.json"
    assert cli.main(["evaluate", "vit_small_patch16_224", str(delta), "--data", str(data), "--image-size", "32",
                     "--json", str(result), *TINY]) == 0
    capsys.readouterr()
    report = json.loads(result.read_text())
    assert report["images"] == 2 and list(report["per_class"]) == ["0", "1", "2"] and report["per_class"]["2"] is None
