"""Frozen means frozen: a training forward under surgery leaves the base's running statistics alone, or,
with statistics="adapt", moves them and saves them with the delta. (The family sweeps hold every family
to the same contract through family_checks.check_trained_delta.)"""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from conftest import assert_same_snapshot, images, make_vit, snapshot
from family_checks import buffers_of, first_output, revive, train_steps
from safetensors import safe_open
from torch import nn

import petl_surgery as ps
from petl_surgery.statistics import statistics_names

MAXXVIT = dict(img_size=64, embed_dim=(32, 64, 128, 256), depths=(1, 1, 1, 1), transformer_dim_head=16)


def coatnet() -> nn.Module:
    """CoAtNet with one block a stage: BatchNorm in the stem and the MBConv stages, attention after."""
    torch.manual_seed(0)
    return revive(timm.create_model("coatnet_nano_rw_224", num_classes=5, drop_rate=0.5, **MAXXVIT)).eval()


def batchnorms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_train_mode_keeps_the_base_statistics_modules_in_eval_and_everything_else_in_train():
    model = ps.apply(coatnet(), "patt").train()
    assert batchnorms(model) and not any(bn.training for bn in batchnorms(model))
    others = [m for m in model.modules() if not isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.training for m in others)  # dropout, drop-path, the inserted modules, the model itself
    assert model.head.drop.training


def test_a_training_step_leaves_running_mean_var_and_batch_count_as_they_were():
    model = ps.apply(coatnet(), "patt")
    before = buffers_of(model)
    train_steps(model, images(), steps=3)
    after = buffers_of(model)
    names = statistics_names(model)
    assert any(name.endswith("num_batches_tracked") for name in names)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_frozen_statistics_normalise_with_the_stored_statistics_in_train_mode():
    reference = coatnet()
    model = ps.apply(coatnet(), "patt")
    x = images()
    with torch.no_grad():
        expected = reference.forward_features(x)
        got = model.train().forward_features(x)  # dropout sits in the head only
    assert torch.equal(got, expected)


def test_remove_releases_the_statistics_modules_in_the_mode_last_asked_for():
    model = ps.apply(coatnet(), "patt")
    model.train()
    ps.remove(model)
    assert all(bn.training for bn in batchnorms(model))
    assert "train" not in vars(batchnorms(model)[0])
    model.eval()
    assert not any(bn.training for bn in batchnorms(model))


def test_the_hold_survives_deepcopy_and_pickle():
    model = ps.apply(coatnet(), "patt")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        assert not any(bn.training for bn in batchnorms(clone))
        assert not any(bn.training for bn in batchnorms(model.eval()))
        ps.remove(clone.train())
        assert all(bn.training for bn in batchnorms(clone))


def test_adapt_moves_the_statistics_and_the_delta_carries_them(tmp_path):
    model = ps.apply(coatnet(), "patt", statistics="adapt")
    assert all(bn.training for bn in batchnorms(model.train()))
    original = buffers_of(model)
    train_steps(model, images(), steps=2)
    moved = [name for name, buffer in buffers_of(model).items() if not torch.equal(buffer, original[name])]
    assert moved and set(moved) <= statistics_names(model)
    path = tmp_path / "adapted.safetensors"
    ps.save(model, path)
    with safe_open(str(path), "pt") as file:
        saved = set(file.keys())
    assert statistics_names(model) <= saved
    fresh = ps.load(coatnet(), path)
    with torch.no_grad():
        assert torch.equal(first_output(fresh(images())), first_output(model.eval()(images())))
    assert ps.summary(fresh).statistics == "adapt"


def test_summary_counts_adapted_statistics_apart_from_trainable_parameters():
    frozen = ps.summary(ps.apply(coatnet(), "patt"))
    adapted = ps.summary(ps.apply(coatnet(), "patt", statistics="adapt"))
    model = coatnet()
    expected = sum(b.numel() for n, b in model.named_buffers() if n in statistics_names(model))
    assert frozen.adapted_statistics == {} and frozen.statistics == "frozen"
    assert sum(adapted.adapted_statistics.values()) == expected
    assert adapted.trainable == frozen.trainable
    assert "adapted running statistics" in str(adapted)


def test_remove_gives_back_the_statistics_from_before_the_first_apply():
    model = ps.apply(coatnet(), "patt", statistics="adapt")
    original = buffers_of(coatnet())
    train_steps(model, images(), steps=2)
    ps.remove(model)
    assert all(torch.equal(buffer, original[name]) for name, buffer in buffers_of(model).items())


def test_merge_keeps_adapted_statistics_in_the_merged_model():
    model = ps.apply(coatnet(), "lora", targets=["q", "v"], statistics="adapt")
    train_steps(model, images(), steps=2)
    with torch.no_grad():
        expected = model(images())
    ps.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images()), expected, rtol=1e-5, atol=1e-5)


def test_a_second_apply_with_another_statistics_setting_is_refused_unchanged():
    model = ps.apply(coatnet(), "patt", statistics="adapt")
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=r"statistics='adapt'.*statistics='frozen'"):
        ps.apply(model, "adapter", statistics="frozen")
    assert_same_snapshot(before, snapshot(model))
    ps.apply(model, "adapter")  # None: joins the present setting
    assert ps.summary(model).statistics == "adapt"


@pytest.mark.parametrize("value", ["freeze", True, 1])
def test_an_unknown_statistics_setting_is_refused_before_any_change(value):
    model = coatnet()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="statistics must be one of 'frozen', 'adapt'"):
        ps.apply(model, "patt", statistics=value)
    assert_same_snapshot(before, snapshot(model))


def test_loading_an_adapted_delta_into_a_model_with_frozen_surgery_is_refused(tmp_path):
    path = tmp_path / "adapted.safetensors"
    ps.save(ps.apply(coatnet(), "patt", statistics="adapt"), path)
    model = ps.apply(coatnet(), "patt")
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match="statistics='frozen'"):
        ps.load(model, path)
    assert_same_snapshot(before, snapshot(model))


class CountingNorm(nn.Module):
    """A base module that updates a buffer petl_surgery knows nothing of in every training forward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += 1
        return self.norm(x)


def test_a_training_forward_that_changes_an_unknown_base_buffer_is_refused_and_undone():
    model = make_vit()
    model.fc_norm = CountingNorm(64)
    ps.apply(model.eval(), "patt")
    model(images())  # eval forwards pass
    with pytest.raises(ps.StatefulBaseError, match=r"fc_norm\.seen.*put back"):
        model.train()(images())
    assert model.fc_norm.seen.item() == 0
