"""One name per notion in the public API: ``layers`` selects blocks in apply and load, ``methods`` names
methods in load and remove, ``head`` is apply's module path only (load takes ``load_head``); ``plan`` and the
Options classes are public. The old spellings work and warn for one release."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import images, make_vit

import petl_surgery as ps


@pytest.fixture
def saved(tmp_path):
    model = ps.apply(ps.apply(make_vit(), "patt"), "adapter")
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.02)
    path = tmp_path / "delta.safetensors"
    ps.save(model, path)
    return path


def test_load_selects_saved_blocks_with_layers(saved) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spellings do not warn
        model = ps.load(make_vit(num_classes=7), saved, load_head=False, layers=[1, 3], methods=["patt"])
    assert [(row.method, row.block) for row in ps.summary(model).rows] == [("patt", 1), ("patt", 3)]
    assert model.head.out_features == 7


def test_the_deprecated_spellings_of_load_warn_and_do_the_same(saved) -> None:
    expected = ps.load(make_vit(num_classes=7), saved, load_head=False, layers=[0, 2])
    with pytest.warns(FutureWarning, match=r"load\(blocks=\.\.\.\) is deprecated .* use load\(layers=\.\.\.\)"):
        with pytest.warns(FutureWarning, match=r"load\(head=\.\.\.\) is deprecated .* use load\(load_head=\.\.\.\)"):
            old = ps.load(make_vit(num_classes=7), saved, head=False, blocks=[0, 2])
    assert ps.summary(old).rows == ps.summary(expected).rows
    x = images()
    with torch.no_grad():
        assert torch.equal(old.blocks[2](old.patch_embed(x)), expected.blocks[2](expected.patch_embed(x)))


@pytest.mark.parametrize("new, old", [("layers", "blocks"), ("load_head", "head")])
def test_load_refuses_a_name_and_its_old_spelling_together(saved, new: str, old: str) -> None:
    value = [0] if new == "layers" else False
    with pytest.warns(FutureWarning), pytest.raises(ps.OptionError, match=f"give {new}= alone"):
        ps.load(make_vit(), saved, **{new: value, old: value})


def test_remove_takes_methods_as_load_does() -> None:
    model = ps.apply(ps.apply(ps.apply(make_vit(), "patt"), "adapter"), "lora")
    ps.remove(model, methods=["patt", "lora"])
    assert list(ps.summary(model).per_method) == ["adapter"]
    ps.remove(model, "adapter")  # one name
    assert not ps.summary(model).rows


def test_remove_method_is_deprecated_and_works() -> None:
    model = ps.apply(ps.apply(make_vit(), "patt"), "adapter")
    with pytest.warns(FutureWarning, match=r"remove\(method=\.\.\.\) is deprecated .* use remove\(methods=\.\.\.\)"):
        ps.remove(model, method="patt")
    assert list(ps.summary(model).per_method) == ["adapter"]


def test_remove_refuses_an_empty_list_and_names_an_absent_method() -> None:
    model = ps.apply(make_vit(), "patt")
    with pytest.raises(ps.OptionError, match="methods must be a method name or a non-empty list"):
        ps.remove(model, methods=[])
    with pytest.raises(ps.SurgeryError, match="method 'lora' is not applied to this model; applied: patt"):
        ps.remove(model, methods=["patt", "lora"])
    assert list(ps.summary(model).per_method) == ["patt"]  # nothing removed


def test_plan_is_the_dry_run_of_apply() -> None:
    model = make_vit()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    planned = ps.plan(model, "lora", layers=[1, 2], rank=2)
    assert model.state_dict().keys() == before.keys() and not any(isinstance(m, ps.methods.PetlModule) for m in model.modules())
    ps.apply(model, "lora", layers=[1, 2], rank=2)
    assert [(insertion.block, insertion.path) for insertion in planned] == [(row.block, row.path) for row in ps.summary(model).rows]
    assert sum(p.numel() for insertion in planned for p in insertion.module.parameters()) == ps.summary(model).per_method["lora"]


def test_every_registered_method_has_its_options_class_exported() -> None:
    for method in ps.METHODS.values():
        assert getattr(ps, method.Options.__name__) is method.Options and method.Options.__name__ in ps.__all__
