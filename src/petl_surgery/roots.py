"""Where surgery sits in the module the user holds: at its root (``apply(model)``) or in a submodule
(``apply(net.backbone)``, the LightningModule pattern of a backbone held by a larger module).

The module ``apply`` was called on is the surgery's *root*: it carries the statistics setting, the guard of
the first training forward and the original requires_grad flags, and its blocks are the ones ``layers``
counts. ``save``, ``load``, ``summary``, ``merge`` and ``remove`` accept the module the user holds and find
the root(s) below it here.
"""

from __future__ import annotations

from typing import List, Set, Tuple

from torch import nn

from .errors import UnsupportedModelError
from .inventory import inserted_modules
from .statistics import adapted_names, state_of, statistics_names


def join(prefix: str, name: str) -> str:
    """``name`` of a submodule at ``prefix`` as a name of the module holding it."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def surgery_roots(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(path, module)`` of every module under ``model`` (``model`` itself at path ``""``) that carries
    surgery applied to it, outermost first."""
    return [(path, module) for path, module in model.named_modules() if state_of(module) is not None]


def check_apply_target(model: nn.Module) -> None:
    """Refuse ``apply`` on a module whose surgery sits elsewhere: in one of its submodules (apply there, so
    that one root holds one setting and one set of original flags), or in a module enclosing it."""
    below = [path for path, _ in surgery_roots(model) if path]
    if below:
        raise UnsupportedModelError(
            f"{type(model).__name__} holds surgery applied to its submodule {below[0]!r}: apply further methods to "
            f"that submodule (model.get_submodule({below[0]!r})), or remove its surgery first"
        )
    if state_of(model) is None and inserted_modules(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} carries surgery applied to a module that encloses it: apply further methods "
            "to that module"
        )


def check_not_nested(model: nn.Module, roots: List[Tuple[str, nn.Module]], action: str) -> None:
    """Refuse two roots of which one holds the other (``apply(net, ...)`` then ``apply(net.backbone, ...)``
    on a backbone the first left untouched): their settings and flags would overlap."""
    paths = [path for path, _ in roots]
    for outer in paths:
        for path in paths:
            if path != outer and (outer == "" or path.startswith(outer + ".")):
                raise UnsupportedModelError(
                    f"cannot {action} {type(model).__name__}: it holds surgery applied to {outer or 'itself'!r} "
                    f"and, separately, to its submodule {path!r}; remove one of them"
                )


def sole_root(model: nn.Module, action: str) -> Tuple[str, nn.Module]:
    """The one root of the surgery under ``model``; refused naming the submodules when there are several
    (``action`` is the verb of the refusal), or when the surgery was applied to an enclosing module."""
    roots = surgery_roots(model)
    check_not_nested(model, roots, action)
    if len(roots) > 1:
        listed = ", ".join(repr(path or "(the model itself)") for path, _ in roots)
        raise UnsupportedModelError(
            f"cannot {action} {type(model).__name__}: it holds separate surgeries applied to the submodules "
            f"{listed}, each with its own statistics setting and blocks. {action.capitalize()} each submodule on "
            "its own (model.get_submodule(path)), or apply every method to one module that holds them all"
        )
    if not roots:
        if inserted_modules(model):
            raise UnsupportedModelError(
                f"cannot {action} {type(model).__name__}: its surgery was applied to a module that encloses it; "
                f"{action} that module"
            )
        raise UnsupportedModelError(f"{type(model).__name__} carries no petl_surgery method")
    return roots[0]


def adapted_names_under(model: nn.Module) -> Set[str]:
    """state_dict names (as ``model`` names them) of the running statistics that belong to the delta of
    each root under ``model`` (see ``apply``'s ``statistics``)."""
    return {join(path, name) for path, root in surgery_roots(model) for name in adapted_names(root)}


def statistics_outside(model: nn.Module, root_path: str) -> Set[str]:
    """state_dict names of the running statistics of ``model`` outside the root at ``root_path``: those of
    a wrapper's own parts (a segmentation decoder's BatchNorm), which train as the user trains them and
    belong to the delta with the wrapper's trainable parameters. None when the surgery sits at the root."""
    if not root_path:
        return set()
    return {name for name in statistics_names(model) if not name.startswith(root_path + ".")}
