"""A model's tensors as its plain modules name them.

``torch.nn.utils.parametrize`` keeps a parametrized tensor as ``<module>.parametrizations.<name>.original``
(``original0``, ``original1``, ... when its right inverse gives several) and computes ``<module>.<name>``
from it. A delta file holds such a tensor under the plain name ``<module>.<name>``, with the value the
parametrization computes now, so that it loads into the same model without the parametrization (and,
through the parametrization's right inverse, into one that has it).
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, Set

import torch
from torch import nn

_PARAMETRIZED = re.compile(r"^(?:(?P<owner>.*)\.)?parametrizations\.(?P<name>[^.]+)\.original\d*$")


def plain_name(name: str) -> str:
    """``name`` with a parametrization's storage (``parametrizations.<name>.original``) read as ``<name>``."""
    match = _PARAMETRIZED.match(name)
    if match is None:
        return name
    return f"{match['owner']}.{match['name']}" if match["owner"] else match["name"]


def plain_names(names: Iterable[str]) -> Set[str]:
    return {plain_name(name) for name in names}


def plain_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=True)`` with every parametrized tensor once, under its plain name, as
    the value its parametrization computes."""
    state: Dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        match = _PARAMETRIZED.match(name)
        if match is None:
            state[name] = tensor
            continue
        plain = plain_name(name)
        if plain not in state:
            state[plain] = getattr(model.get_submodule(match["owner"] or ""), match["name"])
    return state


def assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Write ``value`` into the tensor ``name`` (a plain name) of ``model``, in place: a parametrized
    tensor through its parametrization's right inverse."""
    owner_path, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_path)
    if torch.nn.utils.parametrize.is_parametrized(owner, attribute):
        setattr(owner, attribute, value.to(getattr(owner, attribute).dtype))
    else:
        getattr(owner, attribute).copy_(value)
