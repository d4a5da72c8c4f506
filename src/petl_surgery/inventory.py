"""Reading the surgery a model carries from its module tree (the single source of truth)."""

from __future__ import annotations

from typing import Any, Dict, List, Set, Tuple

from torch import nn

from .inserted import SHARED_BLOCK
from .methods import PetlModule

# requires_grad of every parameter before the first surgery, restored when the last method is removed.
ORIGINAL_FLAGS_ATTR = "_petl_surgery_original_requires_grad"


def inserted_modules(model: nn.Module) -> List[Tuple[str, PetlModule]]:
    """Every inserted module with its path, in the order of the calls that inserted them."""
    found = [(path, module) for path, module in model.named_modules() if isinstance(module, PetlModule)]
    return sorted(found, key=lambda item: item[1].order)


def delta_names(model: nn.Module) -> Set[str]:
    """Names of the tensors of inserted modules, under every path that reaches them (a module shared
    under two names, as CoaT's ``mlp2``/``mlp3``/``mlp4``, carries its inserted module under both)."""
    inserted = {id(t) for _, module in inserted_modules(model) for t in (*module.parameters(), *module.buffers())}
    names = {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in inserted}
    return names | {name for name, b in model.named_buffers(remove_duplicate=False) if id(b) in inserted}


def surgery_record(model: nn.Module) -> List[Dict[str, Any]]:
    """The surgery as applied: one entry per apply call, ``{"method", "options", "blocks"}``, in order."""
    calls: Dict[int, Dict[str, Any]] = {}
    for _, module in inserted_modules(model):
        call = calls.setdefault(module.order, {"method": module.method, "options": module.options, "blocks": []})
        if module.block != SHARED_BLOCK and module.block not in call["blocks"]:
            call["blocks"].append(module.block)
    for call in calls.values():
        call["blocks"].sort()
    return [calls[order] for order in sorted(calls)]


def next_order(model: nn.Module) -> int:
    modules = inserted_modules(model)
    return modules[-1][1].order + 1 if modules else 0
