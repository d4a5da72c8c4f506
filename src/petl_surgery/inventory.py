"""Reading the surgery a model carries from its module tree (the single source of truth)."""

from __future__ import annotations

from typing import Any, Dict, List, Set, Tuple

from torch import nn

from .methods import PetlModule

# requires_grad of every parameter before the first surgery, restored when the last method is removed.
ORIGINAL_FLAGS_ATTR = "_petl_surgery_original_requires_grad"


def inserted_modules(model: nn.Module) -> List[Tuple[str, PetlModule]]:
    """Every inserted module with its path, in the order of the calls that inserted them."""
    found = [(path, module) for path, module in model.named_modules() if isinstance(module, PetlModule)]
    return sorted(found, key=lambda item: item[1].order)


def delta_names(model: nn.Module) -> Set[str]:
    """state_dict keys that belong to inserted modules."""
    names: Set[str] = set()
    for path, module in inserted_modules(model):
        names.update(f"{path}.{key}" for key in module.state_dict())
    return names


def surgery_record(model: nn.Module) -> List[Dict[str, Any]]:
    """The surgery as applied: one entry per apply call, ``{"method", "options", "blocks"}``, in order."""
    calls: Dict[int, Dict[str, Any]] = {}
    for _, module in inserted_modules(model):
        call = calls.setdefault(module.order, {"method": module.method, "options": module.options, "blocks": []})
        if module.block not in call["blocks"]:
            call["blocks"].append(module.block)
    for call in calls.values():
        call["blocks"].sort()
    return [calls[order] for order in sorted(calls)]


def next_order(model: nn.Module) -> int:
    modules = inserted_modules(model)
    return modules[-1][1].order + 1 if modules else 0
