"""Surgery inside a larger module (the LightningModule pattern, a segmentation model on a backbone):
apply, save, load, summary, merge and remove take the module the user holds, wherever the surgery sits;
the file records the submodule; what cannot work is refused naming it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_snapshot, images, make_vit, perturb_inserted, snapshot
from family_checks import train_steps
from safetensors import safe_open
from torch import nn

import petl_surgery as ps


class Classifier(nn.Module):
    """A LightningModule-like wrapper: the timm ViT, with its own classifier, is ``self.backbone``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = make_vit()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


class Decoded(nn.Module):
    """A headless backbone (``num_classes=0``) under a decoder of the wrapper's own, with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = make_vit(num_classes=0)
        torch.manual_seed(1)
        self.decoder = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone(x))


class Twin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = make_vit()
        self.b = make_vit()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as file:
        return json.loads(file.metadata()["petl_surgery"])


def trainable(model: nn.Module) -> set:
    return {name for name, p in model.named_parameters() if p.requires_grad and ".petl_" not in name}


def test_surgery_on_a_backbone_saves_from_the_wrapper_and_loads_into_a_fresh_wrapper(tmp_path):
    net = Classifier()
    ps.apply(net.backbone, "patt")
    perturb_inserted(net)
    train_steps(net, images())
    path = tmp_path / "delta.safetensors"
    ps.save(net, path)
    assert metadata(path)["root"] == "backbone"
    assert metadata(path)["statistics"] == "frozen"
    with safe_open(str(path), "pt") as file:
        assert all(name.startswith("backbone.") for name in file.keys())
    fresh = ps.load(Classifier().eval(), path)
    with torch.no_grad():
        assert torch.equal(fresh(images()), net(images()))
    assert trainable(fresh) == trainable(net) == {"backbone.head.weight", "backbone.head.bias"}


def test_a_wrappers_own_decoder_and_its_running_statistics_are_saved_with_the_delta(tmp_path):
    net = Decoded()
    ps.apply(net.backbone, "adapter")  # a timm model built without classifier: no head to train
    perturb_inserted(net)
    before = net.decoder[1].running_mean.clone()
    train_steps(net, images())
    assert not torch.equal(net.decoder[1].running_mean, before)  # the user's BatchNorm trained
    path = tmp_path / "delta.safetensors"
    ps.save(net, path)
    fresh = ps.load(Decoded().eval(), path)
    with torch.no_grad():
        assert torch.equal(fresh(images()), net(images()))
    assert {n for n in trainable(fresh) if not n.startswith("decoder.")} == set()


def test_apply_on_the_wrapper_finds_and_trains_the_nested_classifier(tmp_path):
    net = ps.apply(Classifier(), "patt")
    assert ps.summary(net).head == 5 * 64 + 5
    assert trainable(net) == {"backbone.head.weight", "backbone.head.bias"}
    perturb_inserted(net)
    train_steps(net, images())
    ps.save(net, tmp_path / "delta.safetensors")
    assert metadata(tmp_path / "delta.safetensors")["root"] == ""
    assert metadata(tmp_path / "delta.safetensors")["head"] == ["backbone.head.bias", "backbone.head.weight"]
    fresh = ps.load(Classifier().eval(), tmp_path / "delta.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(images()), net(images()))


def test_a_head_expected_but_not_found_raises_naming_head_before_any_change():
    net = Decoded()  # the backbone has no classifier; the wrapper's own is called "decoder"
    before = snapshot(net)
    with pytest.raises(ps.SurgeryError, match=r"no classifier head in Decoded.*'backbone'.*head=.*train_head=False"):
        ps.apply(net, "patt")
    assert_same_snapshot(before, snapshot(net))
    ps.apply(net, "patt", head="decoder")
    assert trainable(net) == {n for n, _ in net.named_parameters() if n.startswith("decoder.")}


def test_train_head_false_on_a_wrapper_without_a_found_head_trains_only_the_delta():
    net = ps.apply(Decoded(), "patt", train_head=False)
    assert trainable(net) == set()


@pytest.mark.parametrize("build", [lambda: make_vit(num_classes=0), lambda: Decoded().backbone], ids=["timm", "held"])
def test_a_timm_model_built_without_classifier_trains_no_head_without_a_word(build):
    model = ps.apply(build(), "patt")
    assert ps.summary(model).head == 0
    assert trainable(model) == set()


def test_a_wrapper_holding_only_a_headless_timm_model_trains_no_head():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_vit(num_classes=0)

        def forward(self, x):
            return self.model(x)

    net = ps.apply(Holder(), "lora")
    assert trainable(net) == set()


def test_summary_merge_and_remove_through_the_wrapper():
    net = Classifier()
    plain = snapshot(net)
    ps.apply(net.backbone, "lora", statistics="adapt")
    perturb_inserted(net)
    table = ps.summary(net)
    assert table.rows and all(row.path.startswith("backbone.blocks.") for row in table.rows)
    assert table.statistics == "adapt" and table.head == 5 * 64 + 5
    x = images()
    with torch.no_grad():
        unmerged = net(x)
        ps.merge(net)
        torch.testing.assert_close(net(x), unmerged, rtol=1e-5, atol=1e-5)
    assert list(net.state_dict()) == list(Classifier().state_dict())
    assert not hasattr(net.backbone, "_petl_surgery_statistics")

    again = Classifier()
    ps.apply(again.backbone, "adapter")
    ps.remove(again)
    assert_same_snapshot(plain, snapshot(again))


def test_separate_surgeries_in_two_submodules_are_refused_at_save_naming_both(tmp_path):
    twin = Twin()
    plain = snapshot(twin)
    ps.apply(twin.a, "patt")
    ps.apply(twin.b, "lora", statistics="adapt")
    assert ps.summary(twin).statistics == "adapt, frozen"
    path = tmp_path / "delta.safetensors"
    with pytest.raises(ps.SurgeryError, match=r"cannot save Twin.*'a', 'b'"):
        ps.save(twin, path)
    assert not path.exists()
    with pytest.raises(ps.SurgeryError, match=r"cannot merge Twin.*'a', 'b'"):
        ps.merge(twin)
    ps.save(twin.b, path)  # each submodule on its own
    assert metadata(path)["statistics"] == "adapt"
    ps.remove(twin, "lora")
    assert [row.method for row in ps.summary(twin).rows] and {row.method for row in ps.summary(twin).rows} == {"patt"}
    ps.remove(twin)
    assert_same_snapshot(plain, snapshot(twin))


def test_apply_where_surgery_sits_in_another_module_is_refused_before_any_change():
    net = Classifier()
    ps.apply(net.backbone, "patt")
    before = snapshot(net)
    with pytest.raises(ps.SurgeryError, match=r"submodule 'backbone'"):
        ps.apply(net, "lora")
    assert_same_snapshot(before, snapshot(net))

    outer = ps.apply(Classifier(), "patt")
    before = snapshot(outer)
    with pytest.raises(ps.SurgeryError, match="encloses it"):
        ps.apply(outer.backbone, "lora")
    with pytest.raises(ps.SurgeryError, match="encloses it"):
        ps.save(outer.backbone, "unused.safetensors")
    assert_same_snapshot(before, snapshot(outer))


def test_load_into_a_model_without_the_recorded_submodule_is_refused(tmp_path):
    net = Classifier()
    ps.apply(net.backbone, "patt")
    ps.save(net, tmp_path / "delta.safetensors")
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=r"submodule 'backbone', which VisionTransformer does not have"):
        ps.load(model, tmp_path / "delta.safetensors")
    assert_same_snapshot(before, snapshot(model))


def test_load_into_a_wrapper_carrying_surgery_elsewhere_is_refused(tmp_path):
    net = Classifier()
    ps.apply(net.backbone, "patt")
    ps.save(net, tmp_path / "delta.safetensors")
    other = ps.apply(Classifier(), "patt")
    with pytest.raises(ps.SurgeryError, match=r"Classifier carries surgery applied to the model itself, .* applied to 'backbone'"):
        ps.load(other, tmp_path / "delta.safetensors")


def _tiny_vit_config(transformers):
    return transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
        num_labels=3,
    )


def test_a_transformers_classifier_held_by_a_wrapper_is_found_and_trained():
    import transformers

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = transformers.ViTForImageClassification(_tiny_vit_config(transformers))

    net = ps.apply(Net(), "lora")
    assert trainable(net) == {"vit.classifier.weight", "vit.classifier.bias"}


def test_a_transformers_base_model_trains_no_head_and_a_task_model_without_one_raises():
    import transformers

    config = _tiny_vit_config(transformers)
    assert trainable(ps.apply(transformers.ViTModel(config), "lora")) == set()
    with pytest.raises(ps.SurgeryError, match="no classifier head in ViTForMaskedImageModeling.*head="):
        ps.apply(transformers.ViTForMaskedImageModeling(config), "lora")
