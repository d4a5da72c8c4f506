"""The layout self-check and the family contract on the families of the core (ViT family and Swin)."""

from __future__ import annotations

import pytest
from conftest import VIT_FAMILY, images, make_family
from family_checks import check_layout, check_method

FAMILY_NAMES = list(VIT_FAMILY) + ["swin"]
# name -> (build, make_input), read by docs/make_coverage.py
COVERAGE = {
    f"timm {name}": (lambda name=name: make_family(name), lambda name=name: images(name)) for name in FAMILY_NAMES
}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_layout_self_check(family):
    model = make_family(family)
    assert check_layout(model, images(family)) == len(__import__("petl_surgery").blocks(model))


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
