"""Hot-swapping a named task (issue 21, item 3): ``swap_task`` writes another delta of the same surgery into a
task in place, so the task then equals a model carrying the new delta alone, the other tasks are untouched,
and a ``torch.compile``-d model runs the swapped task without recompiling. What does not fit is refused
before anything changes."""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from conftest import make_vit
from test_tasks import METHODS, _perturbed, _with_classes
from torch import nn

import petl_surgery as ps

SIZE = 64


def _single(method: str, seed: int, path, classes: int = 4, **options) -> nn.Module:
    """A model carrying ``method`` alone with seeded random delta and head, saved to ``path``."""
    model = _with_classes(make_vit(), classes)
    ps.apply(model, method, **{**METHODS[method], **options})
    ps.save(_perturbed(model, seed), path)
    return model.eval()


def _with_tasks(files: Dict[str, object]) -> nn.Module:
    base = _with_classes(make_vit(), 5)
    for name, path in files.items():
        ps.load(base, path, name=name)
    return base.eval()


def _images() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def _state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_swapped_task_equals_the_new_delta_alone_and_leaves_the_other_task(method, tmp_path):
    files = {"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors"}
    _single(method, 1, files["a"])
    only_b = _single(method, 2, files["b"])
    only_c = _single(method, 3, tmp_path / "c.safetensors")
    model = _with_tasks(files)
    identities = [id(p) for p in model.parameters()]
    ps.swap_task(model, tmp_path / "c.safetensors", "a")
    x = _images()
    with torch.no_grad(), ps.using_task(model, "a"):
        torch.testing.assert_close(model(x), only_c(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), ps.using_task(model, "b"):
        torch.testing.assert_close(model(x), only_b(x), rtol=1e-5, atol=1e-5)
    assert [id(p) for p in model.parameters()] == identities


def test_a_swapped_task_saves_the_new_file(tmp_path):
    files = {"a": tmp_path / "a.safetensors"}
    _single("patt", 1, files["a"])
    _single("patt", 3, tmp_path / "c.safetensors")
    model = _with_tasks(files)
    ps.swap_task(model, tmp_path / "c.safetensors", "a")
    ps.save(model, tmp_path / "again.safetensors", name="a")
    from petl_surgery.checkpoints.files import read

    saved, new = read(tmp_path / "again.safetensors")[0], read(tmp_path / "c.safetensors")[0]
    assert saved.keys() == new.keys()
    for key in saved:
        assert torch.equal(saved[key], new[key]), key


def _counting_backend(compiles: List[int]):
    def backend(graph_module, example_inputs):
        compiles.append(1)
        return graph_module.forward

    return backend


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_a_compiled_model_runs_a_swapped_task_without_recompiling(method, tmp_path):
    torch._dynamo.reset()
    files = {"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors"}
    _single(method, 1, files["a"])
    _single(method, 2, files["b"])
    only_c = _single(method, 3, tmp_path / "c.safetensors")
    model = _with_tasks(files)
    ps.select_task(model, "a")
    compiles: List[int] = []
    compiled = torch.compile(model, backend=_counting_backend(compiles))
    x = _images()
    with torch.no_grad():
        compiled(x)
        compiled(x)  # steady state: the first forward's one-time branch check is gone
        compiled_before = len(compiles)
        ps.swap_task(model, tmp_path / "c.safetensors", "a")
        swapped = compiled(x)
    torch._dynamo.reset()
    assert compiled_before > 0
    assert len(compiles) == compiled_before, "the swap recompiled"
    with torch.no_grad():
        torch.testing.assert_close(swapped, only_c(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "other, message",
    [
        (("patt", {"mid_dim": 4}), "differs"),  # the same method, another size
        (("adapter", {}), "differs"),  # another method
        (("patt", {"layers": [0]}), "differs"),  # other blocks
    ],
)
def test_a_file_of_another_surgery_is_refused_before_anything_changes(other, message, tmp_path):
    files = {"a": tmp_path / "a.safetensors"}
    _single("patt", 1, files["a"])
    method, options = other
    _single(method, 3, tmp_path / "c.safetensors", **options)
    model = _with_tasks(files)
    before = _state(model)
    with pytest.raises(ps.CheckpointError, match=message):
        ps.swap_task(model, tmp_path / "c.safetensors", "a")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_head_of_another_width_is_refused_and_load_head_false_swaps_the_delta_alone(tmp_path):
    files = {"a": tmp_path / "a.safetensors"}
    only_a = _single("patt", 1, files["a"], classes=4)
    _single("patt", 3, tmp_path / "c.safetensors", classes=6)
    model = _with_tasks(files)
    before = _state(model)
    with pytest.raises(ps.CheckpointError, match="cannot take .* in place.*does not fit"):
        ps.swap_task(model, tmp_path / "c.safetensors", "a")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ps.swap_task(model, tmp_path / "c.safetensors", "a", load_head=False)
    head = {k: v for k, v in model.state_dict().items() if k.startswith("petl_tasks.heads.a.")}
    assert head and all(torch.equal(before[k], v) for k, v in head.items())
    assert ps.task_classes(model)["a"] == 4
    with torch.no_grad(), ps.using_task(model, "a"):
        assert not torch.allclose(model(_images()), only_a(_images()))


def test_a_task_on_the_base_head_refuses_a_files_head(tmp_path):
    _single("patt", 1, tmp_path / "a.safetensors")
    _single("patt", 3, tmp_path / "c.safetensors")
    model = _with_classes(make_vit(), 4)
    ps.load(model, tmp_path / "a.safetensors", name="a", load_head=False)
    before = _state(model)
    with pytest.raises(ps.TaskError, match="load_head=False"):
        ps.swap_task(model, tmp_path / "c.safetensors", "a")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_unknown_task_is_refused(tmp_path):
    _single("patt", 1, tmp_path / "a.safetensors")
    model = _with_tasks({"a": tmp_path / "a.safetensors"})
    with pytest.raises(ps.TaskError, match="no task 'z'"):
        ps.swap_task(model, tmp_path / "a.safetensors", "z")
