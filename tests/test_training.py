"""The training module the CLI calls: ImageFolder splits, fit and evaluate, on generated images."""

from __future__ import annotations

import pytest
import torch
from test_cli import TINY

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


def test_gradient_accumulation_equals_one_larger_batch(image_folder):
    data, _, _ = image_folder_splits(str(image_folder), None, 0.0, 0, **NORMAL)
    data = torch.utils.data.Subset(data, list(range(16)))
    models = []
    for batch, accum in ((8, 1), (4, 2)):
        model = ps.apply(tiny_vit(), "lora")
        fit(model, data, epochs=2, lr=1e-2, batch_size=batch, grad_accum=accum, seed=5)
        models.append(model)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_bfloat16_training_keeps_the_delta_in_float32(image_folder):
    data, val, _ = image_folder_splits(str(image_folder), None, 0.25, 0, **NORMAL)
    model = ps.apply(tiny_vit(), "patt", mid_dim=8)
    records = fit(model, data, val, epochs=1, batch_size=8, precision="bf16")
    assert records[0].train_loss == records[0].train_loss  # finite, not NaN
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.fixture
def no_accelerator(monkeypatch):
    """A machine without CUDA or MPS, whatever this one has: the errors for devices that are absent."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("name, message", [("tpu", "unknown device 'tpu'"), ("cuda", "not available"), ("mps", "not available")])
def test_an_unavailable_device_is_one_clear_error(image_folder, tmp_path, capsys, no_accelerator, name, message):
    argv = ["train", "vit_small_patch16_224", "--data", str(image_folder), "--method", "patt", "--device", name,
            "--out", str(tmp_path / "d.safetensors"), *TINY]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "d.safetensors").exists()


def test_auto_chooses_the_cpu_without_an_accelerator(no_accelerator):
    from petl_surgery.training import choose_device

    assert choose_device("auto") == torch.device("cpu")


def test_train_with_bf16_records_device_precision_and_versions(image_folder, tmp_path, capsys):
    import json

    out = tmp_path / "d.safetensors"
    argv = ["train", "vit_small_patch16_224", "--data", str(image_folder), "--method", "patt", "-o", "mid_dim=8",
            "--device", "cpu", "--amp", "bf16", "--grad-accum", "2", "--epochs", "1", "--batch-size", "4",
            "--image-size", "32", "--out", str(out), *TINY]
    assert cli.main(argv) == 0
    capsys.readouterr()
    log = json.loads(out.with_suffix(".json").read_text())
    assert (log["device"], log["precision"], log["grad_accum"]) == ("cpu", "bf16", 2)
    assert log["versions"]["torch"] == torch.__version__


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "petl_surgery", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "plan" in result.stdout and "train" in result.stdout


def test_evaluate_command_prints_and_writes_top1_top5_and_per_class(image_folder, tmp_path, capsys):
    import json

    delta = tmp_path / "d.safetensors"
    assert cli.main(["train", "vit_small_patch16_224", "--data", str(image_folder), "--method", "patt", "-o",
                     "mid_dim=8", "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--out", str(delta),
                     *TINY]) == 0
    capsys.readouterr()
    result = tmp_path / "result.json"
    assert cli.main(["evaluate", "vit_small_patch16_224", str(delta), "--data", str(image_folder),
                     "--image-size", "32", "--batch-size", "5", "--json", str(result), *TINY]) == 0
    out = capsys.readouterr().out
    report = json.loads(result.read_text())
    # an independent computation over the same images
    data, _, classes = image_folder_splits(str(image_folder), None, 0.0, 0, **NORMAL)
    model = ps.load(tiny_vit(), delta).eval()
    with torch.no_grad():
        logits = model(torch.stack([data[i][0] for i in range(len(data))]))
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    top1 = (logits.argmax(1) == labels)
    assert report["images"] == 18 and report["k"] == 3 and report["top5"] == 1.0
    assert report["top1"] == top1.sum().item() / 18
    assert report["per_class"] == {name: top1[labels == c].sum().item() / 6 for c, name in enumerate(classes)}
    assert f"top-1 {100 * report['top1']:.1f}%" in out
