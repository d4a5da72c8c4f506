"""The training module the CLI calls: ImageFolder splits, fit and evaluate, on generated images."""

from __future__ import annotations

import pytest
import torch
from test_cli import TINY, image_folder  # noqa: F401  (the generated ImageFolder fixture)

import petl_surgery as ps
from petl_surgery import cli
from petl_surgery.training import DataError, evaluate, fit, image_folder_splits

NORMAL = dict(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def tiny_vit(classes: int = 3) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", num_classes=classes, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2)


def test_a_validation_split_is_seeded_and_disjoint(image_folder):
    train, val, classes = image_folder_splits(str(image_folder), None, 0.25, 3, **NORMAL)
    again, val_again, _ = image_folder_splits(str(image_folder), None, 0.25, 3, **NORMAL)
    assert classes == ["blue", "green", "red"] and len(train) + len(val) == 18 and len(val) == 4
    assert val.indices == val_again.indices and not set(val.indices) & set(train.indices)


def test_a_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no image folder at"):
        image_folder_splits(str(tmp_path / "absent"), None, 0.0, 0, **NORMAL)


def test_fit_trains_only_the_delta_and_reports_every_epoch(image_folder):
    train, val, _ = image_folder_splits(str(image_folder), None, 0.25, 0, **NORMAL)
    model = ps.apply(tiny_vit(), "adapter", bottleneck=4)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    seen = []
    records = fit(model, train, val, epochs=2, lr=1e-2, batch_size=8, after_epoch=seen.append)
    assert [r.epoch for r in records] == [1, 2] and seen == records
    assert all(r.val_accuracy is not None and 0.0 <= r.val_accuracy <= 1.0 for r in records)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_evaluate_equals_an_independent_count(image_folder):
    train, _, _ = image_folder_splits(str(image_folder), None, 0.0, 0, **NORMAL)
    model = tiny_vit().eval()
    loader = torch.utils.data.DataLoader(train, batch_size=5)
    loss, accuracy = evaluate(model, loader)
    with torch.no_grad():
        images = torch.stack([train[i][0] for i in range(len(train))])
        labels = torch.tensor([train[i][1] for i in range(len(train))])
        logits = model(images)
    assert accuracy == (logits.argmax(1) == labels).sum().item() / len(labels)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_train_refuses_val_with_val_split(image_folder, tmp_path, capsys):
    argv = ["train", "vit_small_patch16_224", "--data", str(image_folder), "--val", str(image_folder),
            "--val-split", "0.25", "--method", "patt", "--out", str(tmp_path / "d.safetensors"), *TINY]
    assert cli.main(argv) == 2
    assert "--val and --val-split exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "d.safetensors").exists()
