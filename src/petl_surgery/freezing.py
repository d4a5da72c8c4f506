"""Which parameters train: the inserted modules, the classifier head, and base parameters the user names."""

from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Set, Tuple, Union

from torch import nn

from .errors import OptionError
from .inventory import ORIGINAL_FLAGS_ATTR, delta_names


# Where models that are not timm's keep their classifier (torchvision: ViT ``heads.head``, Swin ``head``,
# ResNet ``fc``, others ``classifier``), tried in this order.
CONVENTIONAL_HEADS = ("heads.head", "head", "heads", "fc", "classifier")


def find_heads(model: nn.Module, head: Optional[Union[str, Sequence[str]]] = None) -> List[nn.Module]:
    """The classifier head module(s): the ones named by ``head`` (module paths), else the model's own
    (timm's ``get_classifier()``, both heads of a distilled model; else the first conventional name
    present), else those of the outermost models it holds (a LightningModule-like wrapper holding a timm
    or transformers classifier as ``self.backbone``). A timm model built with ``num_classes=0`` gives its
    ``nn.Identity``: a head without parameters. Several nested models give the heads of all of them."""
    if head is not None:
        names = [head] if isinstance(head, str) else list(head)
        modules = []
        for name in names:
            try:
                modules.append(model.get_submodule(name))
            except AttributeError:
                raise OptionError(f"head {name!r} is not a module of {type(model).__name__}") from None
        return modules
    own = _own_heads(model)
    if own is not None:
        return own
    return [head for _, nested in _nested_models(model) for head in _own_heads(nested) or ()]


def _own_heads(model: nn.Module) -> Optional[List[nn.Module]]:
    """The heads ``model`` names itself (timm's ``get_classifier()``, or a conventional name holding
    parameters), None when it names none."""
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
    return None


def _is_model(module: nn.Module) -> bool:
    """A module that is a whole model of a zoo: timm's (``get_classifier``), a transformers
    ``PreTrainedModel`` or open_clip's vision tower."""
    if callable(getattr(module, "get_classifier", None)):
        return True
    classes = type(module).__mro__
    return any(c.__name__ == "PreTrainedModel" for c in classes) or type(module).__module__.startswith("open_clip.")


def _nested_models(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The outermost zoo models held below ``model`` (not ``model`` itself), with their paths."""
    found: List[Tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if path and _is_model(module) and not any(path.startswith(outer + ".") for outer, _ in found):
            found.append((path, module))
    return found


def _declares_no_head(model: nn.Module) -> bool:
    """Whether ``model`` is a model without a classifier by construction: a timm model built with
    ``num_classes=0``, a transformers base model (``ViTModel``, not a ``*ForTask`` class), open_clip's
    vision tower, or a module holding nothing but such models (no parameter outside them)."""
    if _is_model(model):  # timm's get_classifier() has answered: a head without parameters means none
        return (
            callable(getattr(model, "get_classifier", None))
            or getattr(model, "base_model", None) is model
            or not re.search(r"For[A-Z]", type(model).__name__)  # transformers' heads are *ForTask classes
            or type(model).__module__.startswith("open_clip.")
        )
    nested = _nested_models(model)
    inside = {id(p) for _, module in nested for p in module.parameters()}
    return bool(nested) and all(id(p) in inside for p in model.parameters()) and all(
        _declares_no_head(module) for _, module in nested
    )


def trained_head_names(model: nn.Module, head: Optional[Union[str, Sequence[str]]] = None) -> Set[str]:
    """The parameter names of the head ``apply(..., train_head=True)`` trains.

    Where a head is expected and none is found, this raises naming ``head=``: the model is a zoo model
    (timm, transformers, open_clip) or holds one, and neither it nor a conventional name gives a head with
    parameters, unless it has none by construction (:func:`_declares_no_head`). So a timm model built
    with ``num_classes=0`` trains none without a word, while a wrapper holding one beside parameters of
    its own (its own classifier under an unconventional name) raises. A plain torch model from no zoo
    gives no such evidence: without a conventional name it trains no head (name it with ``head=``)."""
    modules = find_heads(model, head)
    found = any(True for module in modules for _ in module.parameters())
    expected = _is_model(model) or bool(_nested_models(model))
    if head is None and not found and expected and not _declares_no_head(model):
        nested = ", ".join(repr(path) for path, _ in _nested_models(model))
        holding = f" (it holds the models {nested}, and parameters outside them)" if nested else ""
        raise OptionError(
            f"found no classifier head in {type(model).__name__}{holding}: name it with head='module.path' (or a "
            f"list of paths), or pass train_head=False to train none"
        )
    return head_parameter_names(model, head)


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
