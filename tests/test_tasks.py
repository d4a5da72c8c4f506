"""Named tasks side by side and mixed-task batches (issue 21, items 1 and 2): every sample of a mixed batch
equals the same sample through a model carrying its task alone; what cannot be mixed is refused by name."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import pytest
import torch
import transformers as T
from conftest import make_swin, make_vit
from open_clip.transformer import VisionTransformer
from torch import nn

import petl_surgery as ps
from petl_surgery.checkpoints.files import read

# every method that inserts branches; the options keep the tiny models' widths (convpass needs a grid)
METHODS: Dict[str, dict] = {
    "patt": {"mid_dim": 8},
    "adapter": {"bottleneck": 8},
    "bapat": {},
    "lora": {"rank": 4},
    "dora": {"rank": 4},
    "ssf": {},
    "houlsby": {},
    "adapter_plus": {},
    "convpass": {},
    "repadapter": {},
    "fact": {},
}


def _with_classes(model: nn.Module, classes: int) -> nn.Module:
    """``model`` (one base: built with one seed and 5 classes) with a fresh head of ``classes`` outputs, so
    that every task shares the backbone's values, as fine-tunes of one pretrained model do."""
    torch.manual_seed(classes)
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(classes)
    else:
        model.classifier = nn.Linear(model.classifier.in_features, classes)
    return model.eval()


def _transformers_vit(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    config = T.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=5,
    )
    return _with_classes(T.ViTForImageClassification(config), classes)


def _open_clip_vit(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2.0, output_dim=32
    ).eval()


# family -> (build(classes), image size, logits of an output)
FAMILIES: Dict[str, Tuple[Callable[[int], nn.Module], int, Callable]] = {
    "timm vit": (lambda c: _with_classes(make_vit(), c), 64, lambda out: out),
    "timm swin": (lambda c: _with_classes(make_swin(), c), 64, lambda out: out),
    "transformers vit": (_transformers_vit, 32, lambda out: out.logits),
    "open_clip vit": (_open_clip_vit, 32, lambda out: out),
}


# methods a family's single-task model refuses (by name, in apply): not tasks there either
UNSUPPORTED = {
    "timm swin": ("convpass",),  # no flat token grid
    "transformers vit": ("convpass",),  # no fixed patch grid
    # nn.MultiheadAttention: its in-projection is no plain Linear (dora), its output projection no module
    # called as one (houlsby); open_clip's patch grid follows the input size (convpass)
    # (fact: no output projection as a module either)
    "open_clip vit": ("dora", "houlsby", "convpass", "fact"),
}


# options a family needs beyond METHODS' (open_clip's attention output is inside nn.MultiheadAttention)
QKV_MLP = ("q", "k", "v", "fc1", "fc2")
FAMILY_OPTIONS = {"open_clip vit": {"ssf": {"targets": QKV_MLP}}}


def _options(method: str, family: str) -> dict:
    return {**METHODS[method], **FAMILY_OPTIONS.get(family, {}).get(method, {})}


def _randomized_task(family: str, method: str, classes: int, seed: int, path) -> nn.Module:
    """A single-task model: ``method`` applied, its delta and head set to random values, saved to ``path``."""
    model = FAMILIES[family][0](classes)
    ps.apply(model, method, **_options(method, family))
    ps.save(_perturbed(model, seed), path)
    return model


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with seeded noise added to every trainable tensor (its delta and head)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _prepared(family: str, tmp_path, methods: List[str]):
    build, size, logits_of = FAMILIES[family]
    singles, files = {}, {}
    for position, method in enumerate(methods):
        classes = 3 + position % 4  # tasks of different class counts
        files[method] = tmp_path / f"{method}.safetensors"
        singles[method] = _randomized_task(family, method, classes, position, files[method])
    base = build(5)
    for method in methods:
        ps.load(base, files[method], name=method)
    return base, singles, files, size, logits_of


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_sample_of_a_mixed_batch_equals_its_task_alone(family, tmp_path):
    methods = [m for m in METHODS if m not in UNSUPPORTED.get(family, ())]
    base, singles, _, size, logits_of = _prepared(family, tmp_path, methods)
    tasks = [methods[i % len(methods)] for i in range(2 * len(methods))][::-1]  # every task twice, unsorted
    x = torch.randn(len(tasks), 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mixed = logits_of(ps.forward_tasks(base, x, tasks))
        for row, task in enumerate(tasks):
            alone = logits_of(singles[task](x[row : row + 1]))[0]
            width = alone.shape[-1]
            torch.testing.assert_close(mixed[row, :width], alone, rtol=1e-4, atol=1e-5, msg=f"{family}, {task}, row {row}")
            if family != "open_clip vit":  # open_clip's visual tower has no head: one width for all
                assert torch.isinf(mixed[row, width:]).all() and (mixed[row, width:] < 0).all()
        pieces = ps.task_logits(base, mixed, tasks) if family != "open_clip vit" else None
    if pieces is not None:
        assert [len(p) for p in pieces] == [ps.task_classes(base)[t] for t in tasks]


def test_a_selected_task_runs_alone_and_the_base_runs_with_none(tmp_path):
    base, singles, _, size, _ = _prepared("timm vit", tmp_path, ["patt", "lora"])
    plain = _with_classes(make_vit(), 5)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(base(x), plain(x))  # nothing selected: the base and its own head
        with ps.using_task(base, "lora"):
            torch.testing.assert_close(base(x), singles["lora"](x))
            assert ps.active_task(base) == "lora"
        assert ps.active_task(base) is None
        ps.select_task(base, "patt")
        torch.testing.assert_close(base(x), singles["patt"](x))
        ps.select_task(base, None)
        torch.testing.assert_close(base(x), plain(x))
    assert ps.task_names(base) == ["patt", "lora"]
    assert ps.task_classes(base) == {"patt": 3, "lora": 4}


def test_saving_a_named_task_writes_what_save_writes_for_that_task_alone(tmp_path):
    base, singles, files, _, _ = _prepared("timm vit", tmp_path, ["patt", "fact", "lora"])
    alone = _with_classes(make_vit(), 4)
    ps.load(alone, files["fact"])
    ps.save(alone, tmp_path / "alone.safetensors")
    ps.save(base, tmp_path / "named.safetensors", name="fact")
    tensors_alone, meta_alone = read(tmp_path / "alone.safetensors")
    tensors_named, meta_named = read(tmp_path / "named.safetensors")
    assert meta_named == meta_alone
    assert sorted(tensors_named) == sorted(tensors_alone)
    for key in tensors_alone:
        assert tensors_named[key].dtype == tensors_alone[key].dtype
        assert tensors_named[key].numpy().tobytes() == tensors_alone[key].numpy().tobytes(), key


def test_removing_tasks_gives_back_the_base(tmp_path):
    plain = _with_classes(make_vit(), 5)
    keys = sorted(plain.state_dict())
    flags = {n: p.requires_grad for n, p in plain.named_parameters()}
    base, singles, _, size, _ = _prepared("timm vit", tmp_path, ["adapter", "ssf"])
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    ps.remove_task(base, "adapter")
    with torch.no_grad(), ps.using_task(base, "ssf"):
        torch.testing.assert_close(base(x), singles["ssf"](x))
    with pytest.raises(ps.TaskError, match="no task 'adapter'"):
        ps.select_task(base, "adapter")
    ps.remove_task(base, "ssf")
    assert sorted(base.state_dict()) == keys
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    with torch.no_grad():
        torch.testing.assert_close(base(x), plain(x))


def test_a_taken_name_and_another_base_are_refused_before_anything_changes(tmp_path):
    base, _, files, _, _ = _prepared("timm vit", tmp_path, ["patt"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ps.TaskError, match="already carries a task named 'patt'"):
        ps.load(base, files["patt"], name="patt")
    swin_file = tmp_path / "swin.safetensors"
    _randomized_task("timm swin", "lora", 3, 0, swin_file)
    with pytest.raises(ps.SurgeryError, match="saved from another base architecture"):
        ps.load(base, swin_file, name="swin")
    assert ps.task_names(base) == ["patt"]
    after = base.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_unnamed_surgery_and_merge_are_refused_on_a_model_with_tasks(tmp_path):
    base, _, files, _, _ = _prepared("timm vit", tmp_path, ["lora"])
    with pytest.raises(ps.TaskError, match="name="):
        ps.apply(base, "patt")
    with pytest.raises(ps.SurgeryError, match="load with name="):
        ps.load(base, files["lora"])
    with pytest.raises(ps.TaskError, match="every task shares"):
        ps.merge(base)
    with pytest.raises(ps.TaskError, match="name="):
        ps.save(base, tmp_path / "x.safetensors")


TOKEN_TASKS = {  # task -> (method, options): "deep" and "deep_too" put the same token sequence through
    "deep": ("vpt", {"num_tokens": 3}),
    "deep_too": ("vpt", {"num_tokens": 3}),
    "shallow": ("vpt", {"num_tokens": 3, "deep": False}),
    "five": ("vpt", {"num_tokens": 5}),
    "prefix": ("prefix", {"length": 4, "mid_dim": 16}),
    "lora": ("lora", {"rank": 4}),
}


def _token_tasks(family: str, tmp_path, tasks: Dict[str, Tuple[str, dict]] = TOKEN_TASKS):
    """A base carrying ``tasks`` (name -> method and options) by name, and each task's model alone."""
    build, size, logits_of = FAMILIES[family]
    singles = {}
    base = build(5)
    for seed, (name, (method, options)) in enumerate(tasks.items()):
        model = build(3 + seed)
        ps.apply(model, method, **options)
        ps.save(_perturbed(model, seed), tmp_path / f"{name}.safetensors")
        singles[name] = model
        ps.load(base, tmp_path / f"{name}.safetensors", name=name)
    return base, singles, size, logits_of


def _assert_mixed_equals_alone(base, singles, tasks: List[str], size: int, logits_of) -> torch.Tensor:
    """Every sample of a mixed batch of ``tasks`` equals it through its task's model alone; returns the batch."""
    x = torch.randn(len(tasks), 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mixed = logits_of(ps.forward_tasks(base, x, tasks))
        for row, task in enumerate(tasks):
            alone = logits_of(singles[task](x[row : row + 1]))[0]
            torch.testing.assert_close(mixed[row, : alone.shape[-1]], alone, rtol=1e-4, atol=1e-5)
    return x


@pytest.mark.parametrize("family", ["timm vit", "transformers vit", "open_clip vit"])
def test_prompt_tasks_of_one_token_count_mix_and_every_token_task_runs_alone(family, tmp_path):
    base, singles, size, logits_of = _token_tasks(family, tmp_path)
    tasks = ["deep_too", "deep", "deep", "deep_too", "deep"]
    x = _assert_mixed_equals_alone(base, singles, tasks, size, logits_of)
    with torch.no_grad():
        for task in ["five", "prefix", "shallow", "lora", "deep", "lora"]:  # one task's patches never stay for the next
            with ps.using_task(base, task):
                torch.testing.assert_close(logits_of(base(x)), logits_of(singles[task](x)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "tasks, message",
    [
        (["deep", "five"], r"tasks 'deep' \(3 prompt tokens from block 0, deep\) and 'five' \(5 prompt tokens from block 0, deep\)"),
        (["lora", "deep"], r"'deep' \(3 prompt tokens from block 0, deep\) and 'lora' \(no prompt or prefix tokens\)"),
        (["deep", "shallow"], r"'deep' \(3 prompt tokens from block 0, deep\) and 'shallow' \(3 prompt tokens from block 0, shallow\)"),
        (["deep", "prefix"], r"'deep' \(3 prompt tokens from block 0, deep\) and 'prefix' \(4 prefix keys and values in blocks 0, 1, 2, 3\)"),
        (["prefix", "lora"], r"'prefix' \(4 prefix keys and values in blocks 0, 1, 2, 3\) and 'lora' \(no prompt or prefix tokens\)"),
    ],
)
def test_tasks_that_change_tokens_differently_are_refused_in_one_batch(tasks, message, tmp_path):
    base, _, size, _ = _token_tasks("timm vit", tmp_path)
    with pytest.raises(ps.TaskError, match=message):
        ps.forward_tasks(base, torch.randn(2, 3, size, size), tasks)
    assert ps.active_task(base) is None


# prefix tasks of one length, one reparameterised differently and one without the reparameterisation
PREFIX_TASKS = {
    "p1": ("prefix", {"length": 4, "mid_dim": 16}),
    "p2": ("prefix", {"length": 4, "mid_dim": 8}),
    "p3": ("prefix", {"length": 4, "reparam": False}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefix_tasks_of_one_length_mix_per_sample(family, tmp_path):
    base, singles, size, logits_of = _token_tasks(family, tmp_path, PREFIX_TASKS)
    x = _assert_mixed_equals_alone(base, singles, ["p2", "p1", "p3", "p1", "p2", "p3"], size, logits_of)
    with torch.no_grad():
        for task in ["p1", "p3"]:  # the mixture leaves nothing behind for a task run alone afterwards
            with ps.using_task(base, task):
                torch.testing.assert_close(logits_of(base(x)), logits_of(singles[task](x)), rtol=1e-4, atol=1e-5)


def test_prefix_tasks_of_different_lengths_are_refused_in_one_batch(tmp_path):
    base, _, size, _ = _token_tasks("timm swin", tmp_path, {"four": ("prefix", {"length": 4}), "two": ("prefix", {"length": 2})})
    with pytest.raises(ps.TaskError, match=r"'four' \(4 prefix keys and values in blocks .*\) and 'two' \(2 prefix"):
        ps.forward_tasks(base, torch.randn(2, 3, size, size), ["four", "two"])


class TokensFirst(nn.Module):
    """A transformer layer on (tokens, batch, width) input, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(0))


def test_a_model_whose_layers_run_tokens_first_is_refused_in_mixed_batches():
    torch.manual_seed(0)
    model = TokensFirst().eval()
    ps.apply(model, "patt", name="a", mid_dim=4)
    ps.apply(model, "patt", name="b", mid_dim=4)
    with pytest.raises(ps.TaskError, match=r"runs tokens first \(batch_first=False\)"):
        ps.forward_tasks(model, torch.randn(2, 5, 16), ["a", "b"])


def test_unknown_tasks_and_wrong_counts_are_refused(tmp_path):
    base, _, _, size, _ = _prepared("timm vit", tmp_path, ["patt", "lora"])
    x = torch.randn(2, 3, size, size)
    with pytest.raises(ps.TaskError, match="no task 'cars'"):
        ps.forward_tasks(base, x, ["patt", "cars"])
    with pytest.raises(ps.TaskError, match="3 task"):
        ps.forward_tasks(base, x, ["patt", "lora", "lora"])
    with pytest.raises(ps.TaskError, match="task id 2 is out of range"):
        ps.forward_tasks(base, x, [0, 2])
    with torch.no_grad():
        by_id = ps.forward_tasks(base, x, [1, 0])
        by_name = ps.forward_tasks(base, x, ["lora", "patt"])
    torch.testing.assert_close(by_id, by_name)


def test_a_task_applied_by_name_trains_and_saves_as_a_task_alone(tmp_path):
    base = make_vit(num_classes=4)
    ps.apply(base, "adapter", name="a", bottleneck=8)
    ps.apply(base, "lora", name="b", rank=4)
    head_before = base.head.weight.clone()
    optimizer = torch.optim.SGD([p for p in base.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    base.train()
    with ps.using_task(base, "a"):
        for _ in range(2):
            optimizer.zero_grad()
            base(x).logsumexp(-1).mean().backward()
            optimizer.step()
    base.eval()
    assert torch.equal(base.head.weight, head_before)  # the base head is not the task's
    ps.save(base, tmp_path / "a.safetensors", name="a")
    alone = make_vit(num_classes=4)
    ps.load(alone, tmp_path / "a.safetensors")
    with torch.no_grad(), ps.using_task(base, "a"):
        torch.testing.assert_close(base(x), alone(x))


def test_a_copied_model_keeps_its_tasks_and_their_routing(tmp_path):
    import copy

    base, singles, _, size, _ = _prepared("timm vit", tmp_path, ["patt", "ssf"])
    twin = copy.deepcopy(base)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ps.forward_tasks(twin, x, ["ssf", "patt", "ssf"]), ps.forward_tasks(base, x, ["ssf", "patt", "ssf"]))
        ps.select_task(twin, "patt")
        torch.testing.assert_close(twin(x), singles["patt"](x))
    assert ps.active_task(base) is None


def test_adding_and_removing_a_task_at_run_time_leaves_the_others_as_they_are(tmp_path):
    base, singles, files, size, _ = _prepared("timm vit", tmp_path, ["patt", "lora", "adapter"])
    ps.remove_task(base, "lora")
    kept = {name: [id(m) for m in ps.tasks.task_modules(base, name)] for name in ("patt", "adapter")}
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = ps.forward_tasks(base, x, ["patt", "adapter", "adapter", "patt"])
        ps.load(base, files["lora"], name="lora")  # back, beside the others
        after = ps.forward_tasks(base, x, ["patt", "adapter", "adapter", "patt"])
        torch.testing.assert_close(after, before, rtol=0, atol=0)
        with ps.using_task(base, "lora"):
            torch.testing.assert_close(base(x), singles["lora"](x))
    assert {name: [id(m) for m in ps.tasks.task_modules(base, name)] for name in ("patt", "adapter")} == kept
