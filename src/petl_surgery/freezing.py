"""Which parameters train: the inserted modules, the classifier head, and base parameters the user names."""

from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Set, Union

from torch import nn

from .errors import OptionError
from .inventory import ORIGINAL_FLAGS_ATTR, delta_names


# Where models that are not timm's keep their classifier (torchvision: ViT ``heads.head``, Swin ``head``,
# ResNet ``fc``, others ``classifier``), tried in this order.
CONVENTIONAL_HEADS = ("heads.head", "head", "heads", "fc", "classifier")


def find_heads(model: nn.Module, head: Optional[Union[str, Sequence[str]]] = None) -> List[nn.Module]:
    """The classifier head module(s): the ones named by ``head`` (module paths), else timm's
    ``get_classifier()`` (both heads of a distilled model), else the first conventional name present."""
    if head is not None:
        names = [head] if isinstance(head, str) else list(head)
        modules = []
        for name in names:
            try:
                modules.append(model.get_submodule(name))
            except AttributeError:
                raise OptionError(f"head {name!r} is not a module of {type(model).__name__}") from None
        return modules
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        heads = getter()
        return [h for h in (heads if isinstance(heads, (tuple, list)) else (heads,)) if isinstance(h, nn.Module)]
    for name in CONVENTIONAL_HEADS:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if any(True for _ in module.parameters()):
            return [module]
    return []


def head_parameter_names(model: nn.Module, head: Optional[Union[str, Sequence[str]]] = None) -> Set[str]:
    """Names of the parameters of the classifier head(s) that :func:`find_heads` finds."""
    head_ids = {id(p) for module in find_heads(model, head) for p in module.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in head_ids}


def compile_patterns(patterns: Iterable[str]) -> List[re.Pattern[str]]:
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise OptionError(f"unfreeze patterns must be strings (regular expressions); got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise OptionError(f"unfreeze pattern {pattern!r} is not a valid regular expression: {error}") from None
    return compiled


def unfrozen_names(model: nn.Module, patterns: Sequence[re.Pattern[str]], exclude: Set[str]) -> Set[str]:
    """Base parameter names matched (``re.search``) by the patterns; a pattern that matches none raises."""
    names = [name for name, _ in model.named_parameters() if name not in exclude]
    chosen: Set[str] = set()
    for pattern in patterns:
        matched = {name for name in names if pattern.search(name)}
        if not matched:
            raise OptionError(f"unfreeze pattern {pattern.pattern!r} matches no base parameter of the model")
        chosen |= matched
    return chosen


def remember_original_flags(model: nn.Module) -> None:
    if not hasattr(model, ORIGINAL_FLAGS_ATTR):
        setattr(model, ORIGINAL_FLAGS_ATTR, {name: p.requires_grad for name, p in model.named_parameters()})


def restore_original_flags(model: nn.Module) -> None:
    flags = getattr(model, ORIGINAL_FLAGS_ATTR, None)
    if flags is None:
        return
    for name, parameter in model.named_parameters():
        if name in flags:
            parameter.requires_grad_(flags[name])
    delattr(model, ORIGINAL_FLAGS_ATTR)


def set_trainable(model: nn.Module, base_trainable: Set[str]) -> None:
    """Make the inserted modules and ``base_trainable`` trainable, and freeze everything else."""
    delta = delta_names(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in delta or name in base_trainable)
