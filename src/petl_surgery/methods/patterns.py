"""Layers chosen by name pattern, for the methods that act on one layer's output at a time (LoRA, SSF)
anywhere in a model, blocks or not (a plain CNN, a ResNet's or ConvNeXt's convolutions, a user's module).

The ``modules`` option of those methods takes regular expressions, each matched against the whole path
of a module in ``model.named_modules()`` (``re.fullmatch``, as PEFT matches a ``target_modules`` string):
``r"stages\\.\\d+\\.downsample\\.1"``, ``r".*\\.fc[12]"``. It is a separate keyword from ``targets``, whose
names ("q", "v", "fc1", ...) are semantic roles inside the blocks site discovery finds; a call gives one
of them. Every pattern must match at least one module, and every module matched must be a layer the
method can take: an ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (exactly these classes: a
subclass may compute something else, as timm's weight-standardised convolutions do), not inside a
module surgery inserted; anything else raises SurgeryError naming the module and the pattern, before
the model changes.
"""

from __future__ import annotations

import re
from typing import Callable, List, Optional, Sequence, Tuple, Union

from torch import nn

from ..errors import OptionError, SurgeryError, UnsupportedModelError
from .base import PetlModule

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER = "layer"  # the name of a layer's own part inside the module inserted on it (``petl_lora.layer``)


def parse_patterns(method: str, value: Union[None, str, Sequence[str]]) -> Optional[Tuple[str, ...]]:
    """The ``modules`` option as a tuple of regular expressions (None stays None); raises SurgeryError
    for an empty list, a repeated pattern, a non-string or an invalid expression."""
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if not patterns or not all(isinstance(p, str) and p for p in patterns) or len(set(patterns)) != len(patterns):
        raise OptionError(
            f"option 'modules' of method {method!r} must be a regular expression or a list of distinct ones "
            f"(matched against whole module paths); got {value!r}"
        )
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise OptionError(f"option 'modules' of method {method!r}: {pattern!r} is not a regular expression: {error}") from None
    return patterns


def exclusive_targets(method: str, targets: object, modules: Optional[Tuple[str, ...]], default: Tuple[str, ...]) -> object:
    """``targets`` resolved against ``modules``: the default when neither is given, None when the
    patterns choose the layers; both given raises (they choose layers in two different ways)."""
    if modules is None:
        return default if targets is None else targets
    if targets is not None:
        raise OptionError(
            f"method {method!r} takes either 'targets' (projections of the blocks: q, v, fc1, ...) or 'modules' "
            f"(layers by name pattern), not both; got targets={targets!r}, modules={list(modules)!r}"
        )
    return None


def match_layers(
    model: nn.Module, patterns: Sequence[str], method: str, refusal: Callable[[nn.Module], Optional[str]]
) -> List[Tuple[str, nn.Module]]:
    """The ``(path, layer)`` pairs whose path one of ``patterns`` matches whole, in module order; raises
    SurgeryError for a pattern that matches nothing, a match inside an inserted module, a match that is
    not one of ``LAYER_TYPES``, and one ``refusal`` gives a reason against (a grouped convolution)."""
    inserted: List[str] = []
    found: List[Tuple[str, nn.Module]] = []
    used = set()
    for path, module in model.named_modules():
        inside = next((p for p in inserted if path.startswith(p + ".")), None)
        if isinstance(module, PetlModule) and inside is None:
            inserted.append(path)
        matched = [pattern for pattern in patterns if re.fullmatch(pattern, path)]
        if not matched:
            continue
        used.update(matched)
        where = f"option 'modules' of method {method!r}: pattern {matched[0]!r} matches {path!r}"
        if inside is not None or isinstance(module, PetlModule):
            raise SurgeryError(f"{where}, which is inside the module surgery inserted at {inside or path!r}")
        if type(module) not in LAYER_TYPES:
            raise UnsupportedModelError(
                f"{where} ({type(module).__name__}), which is not an nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d"
            )
        reason = refusal(module)
        if reason is not None:
            raise UnsupportedModelError(f"{where} ({type(module).__name__}), which {reason}")
        found.append((path, module))
    unused = [pattern for pattern in patterns if pattern not in used]
    if unused:
        raise OptionError(
            f"option 'modules' of method {method!r}: pattern {unused[0]!r} matches no module of "
            f"{type(model).__name__} (patterns match whole module paths, as model.named_modules() names them)"
        )
    return found


def channel_dim(layer: nn.Module) -> int:
    """The channel dimension of a layer's output: last for a Linear, 1 for a convolution."""
    return -1 if isinstance(layer, nn.Linear) else 1
