"""Starting a new task from pre-trained PETL modules (PVP): the head left out, a choice of methods and
blocks, and models of another depth."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_snapshot, images, make_vit, snapshot

import petl_surgery as ps
from petl_surgery.methods import PetlModule
from test_checkpoints import trained


def inserted_state(model):
    return {name: t for name, t in model.state_dict().items() if ".petl_" in name}


@pytest.fixture
def source(tmp_path):
    """A source task's checkpoint: PATT on every block, an adapter on the last two, a 5-class head."""
    model = trained(make_vit(), "patt")
    trained(model, "adapter", layers=[-2, -1])
    path = tmp_path / "source.safetensors"
    ps.save(model, path)
    return model, path


def test_head_excluded_transfer_loads_the_modules_and_keeps_the_new_head(source):
    model, path = source
    target = make_vit(num_classes=9)
    new_head = target.head.weight.clone()
    ps.load(target, path, load_head=False)
    assert torch.equal(target.head.weight, new_head)
    assert target.head.weight.requires_grad and target.head.bias.requires_grad
    loaded, saved = inserted_state(target), inserted_state(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert {n for n, p in target.named_parameters() if p.requires_grad} == set(loaded) | {"head.weight", "head.bias"}


def test_a_head_that_does_not_fit_is_refused_with_the_way_out(source):
    target = make_vit(num_classes=9)
    before = snapshot(target)
    with pytest.raises(ps.SurgeryError, match="head.*does not fit.*pass load_head=False"):
        ps.load(target, source[1])
    assert_same_snapshot(before, snapshot(target))


def test_a_choice_of_methods(source):
    target = ps.load(make_vit(num_classes=9), source[1], load_head=False, methods=["adapter"])
    assert list(ps.summary(target).per_method) == ["adapter"]
    assert sorted(ps.summary(target).per_block) == [2, 3]


def test_a_choice_of_blocks(source):
    target = ps.load(make_vit(num_classes=9), source[1], load_head=False, layers=[0, 3])
    assert [(row.method, row.block) for row in ps.summary(target).rows] == [
        ("patt", 0), ("patt", 3), ("adapter", 3)
    ]
    assert torch.equal(target.blocks[3].mlp.petl_adapter.up.weight, source[0].blocks[3].mlp.petl_adapter.up.weight)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"methods": ["lora"]}, "holds no method 'lora'; it holds patt, adapter"),
        ({"layers": [7]}, "no surgery on block 7"),
    ],
)
def test_choices_that_do_not_exist_are_refused(source, options, message):
    target = make_vit(num_classes=9)
    before = snapshot(target)
    with pytest.raises(ps.SurgeryError, match=message):
        ps.load(target, source[1], load_head=False, **options)
    assert_same_snapshot(before, snapshot(target))


def test_another_depth_is_refused_without_a_block_map(source):
    shallow = make_vit(depth=2, num_classes=9)
    before = snapshot(shallow)
    with pytest.raises(ps.SurgeryError, match="saved from a model with 4 blocks and this model has 2; pass block_map"):
        ps.load(shallow, source[1], load_head=False)
    assert_same_snapshot(before, snapshot(shallow))


def test_a_block_map_moves_modules_to_a_model_of_another_depth(source):
    model, path = source
    shallow = ps.load(make_vit(depth=2, num_classes=9), path, load_head=False, block_map={2: 0, 3: 1})
    assert [(row.method, row.block) for row in ps.summary(shallow).rows] == [
        ("patt", 0), ("adapter", 0), ("patt", 1), ("adapter", 1)
    ]
    assert torch.equal(shallow.blocks[0].attn.petl_patt.down.weight, model.blocks[2].attn.petl_patt.down.weight)
    assert torch.equal(shallow.blocks[1].mlp.petl_adapter.up.bias, model.blocks[3].mlp.petl_adapter.up.bias)
    shallow(images())  # runs, every branch included


@pytest.mark.parametrize(
    "block_map, message",
    [({9: 0}, "saved block 9 is out of range"), ({0: 5}, "block 5 is out of range"), ({0: 1, 1: 1}, "same block")],
)
def test_bad_block_maps_are_refused(source, block_map, message):
    shallow = make_vit(depth=2, num_classes=9)
    before = snapshot(shallow)
    with pytest.raises(ps.SurgeryError, match=message):
        ps.load(shallow, source[1], load_head=False, block_map=block_map)
    assert_same_snapshot(before, snapshot(shallow))


def test_transferred_modules_train_on_the_new_task(source):
    target = ps.load(make_vit(num_classes=9), source[1], load_head=False)
    optimizer = torch.optim.SGD([p for p in target.parameters() if p.requires_grad], lr=0.1)
    before = target.blocks[0].attn.petl_patt.up.weight.clone()
    loss = torch.nn.functional.cross_entropy(target(images()), torch.tensor([1, 8]))
    loss.backward()
    optimizer.step()
    assert not torch.equal(target.blocks[0].attn.petl_patt.up.weight, before)
    assert all(isinstance(m, PetlModule) for n, m in target.named_modules() if n.endswith("petl_patt"))
