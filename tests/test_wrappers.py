"""Wrappers users put around a model: surgery on one is refused naming the fix; save, export, blocks and
summary look through torch.compile, DistributedDataParallel and DataParallel, so a file's tensor names are
the model's own and load into a plain model."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_snapshot, images, make_vit, snapshot
from safetensors import safe_open

import petl_surgery as ps


def one_process_group(tmp_path):
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
        )


@pytest.fixture
def ddp(tmp_path):
    one_process_group(tmp_path)
    yield lambda model: torch.nn.parallel.DistributedDataParallel(model)
    torch.distributed.destroy_process_group()


def keys(path):
    with safe_open(str(path), "pt") as file:
        return set(file.keys())


WRAPPERS = {
    "compile": lambda model: torch.compile(model, backend="aot_eager"),
    "data_parallel": torch.nn.DataParallel,
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_save_through_a_wrapper_writes_the_models_own_names(tmp_path, wrapper):
    model = ps.apply(make_vit(), "lora")
    path = tmp_path / "delta.safetensors"
    ps.save(WRAPPERS[wrapper](model), path)
    ps.save(model, tmp_path / "plain.safetensors")
    assert keys(path) == keys(tmp_path / "plain.safetensors")
    assert not any(name.startswith(("_orig_mod.", "module.")) for name in keys(path))
    fresh = ps.load(make_vit(), path)
    with torch.no_grad():
        assert torch.equal(fresh(images()), model(images()))


def test_save_and_export_through_ddp(tmp_path, ddp):
    model = ps.apply(make_vit(), "lora")
    wrapped = ddp(model)
    ps.save(wrapped, tmp_path / "delta.safetensors")
    assert not any(name.startswith("module.") for name in keys(tmp_path / "delta.safetensors"))
    folder = ps.export(wrapped, tmp_path / "peft")
    names = keys(folder / "adapter_model.safetensors")
    assert names and not any(name.startswith("base_model.model.module.") for name in names)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("call", ["apply", "remove", "merge", "load"])
def test_surgery_on_a_wrapper_is_refused_naming_the_fix(tmp_path, wrapper, call):
    model = ps.apply(make_vit(), "lora")
    path = tmp_path / "delta.safetensors"
    ps.save(model, path)
    target = make_vit() if call in ("apply", "load") else model
    wrapped = WRAPPERS[wrapper](target)
    before = snapshot(target)
    actions = {
        "apply": lambda: ps.apply(wrapped, "patt"),
        "remove": lambda: ps.remove(wrapped),
        "merge": lambda: ps.merge(wrapped),
        "load": lambda: ps.load(wrapped, path),
    }
    with pytest.raises(ps.SurgeryError, match=r"torch.compile wrapper|before wrapping"):
        actions[call]()
    assert_same_snapshot(before, snapshot(target))


def test_apply_on_a_ddp_wrapper_is_refused_naming_the_order(ddp):
    wrapped = ddp(make_vit())
    with pytest.raises(ps.SurgeryError, match=r"DistributedDataParallel.*apply, then DistributedDataParallel"):
        ps.apply(wrapped, "patt")


def test_reading_looks_through_wrappers():
    model = ps.apply(make_vit(), "patt")
    for wrapper in WRAPPERS.values():
        wrapped = wrapper(model)
        assert len(ps.blocks(wrapped)) == 4
        assert ps.summary(wrapped).trainable == ps.summary(model).trainable
