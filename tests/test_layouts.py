"""The layout self-check and the family contract on the families of the core (ViT family and Swin) and
on variants that use the rarer registered classes; and a check that the sweeps reach every registered
class."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
from conftest import VARIANTS, VIT_FAMILY, images, make_family
from family_checks import check_layout, check_method

import petl_surgery as ps
from petl_surgery.sites import registry

FAMILY_NAMES = list(VIT_FAMILY) + ["swin"] + list(VARIANTS)
# name -> (build, make_input), read by docs/make_coverage.py
COVERAGE = {
    f"timm {name}": (lambda name=name: make_family(name), lambda name=name: images(name)) for name in FAMILY_NAMES
}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_layout_self_check(family):
    model = make_family(family)
    assert check_layout(model, images(family)) == len(ps.blocks(model))


@pytest.mark.parametrize("method", ["patt", "adapter"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_contract(family, method, tmp_path):
    outcome = check_method(lambda: make_family(family), lambda: images(family), method, tmp_path)
    assert outcome == "works"


@pytest.mark.parametrize("mode", ["kv", "qkv"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_patt_parity_through_the_layout(family, mode):
    from family_checks import check_patt_parity

    assert check_patt_parity(lambda: make_family(family), lambda: images(family), mode) > 0


SWEEPS = (
    "test_layouts", "test_families_vit_like", "test_families_hierarchical", "test_torch_models", "test_families_open_clip",
    "test_patterns", "test_reach_holes",
)
if importlib.util.find_spec("transformers") is not None:
    SWEEPS += ("test_families_transformers", "test_families_transformers_legacy")


def test_the_sweeps_reach_every_registered_class():
    """Every registered attention, MLP and block class is met by at least one model of the sweeps, so
    that the layout self-check and the contract above run over every registered layout."""
    attentions, mlps, block_classes = set(), set(), set()
    for name in SWEEPS:
        for build, _ in importlib.import_module(name).COVERAGE.values():
            for block in ps.blocks(build()):
                block_classes.add(type(block.module))
                attentions.add(type(block.attention.module) if block.attention else None)
                mlps.add(type(block.mlp.module) if block.mlp else None)
    assert [c.__qualname__ for c in registry.ATTENTION_LAYOUTS if c not in attentions] == []
    assert [c.__qualname__ for c in registry.MLP_LAYOUTS if c not in mlps] == []
    assert [c.__qualname__ for c in registry.BLOCK_LAYOUTS if c not in block_classes] == []
