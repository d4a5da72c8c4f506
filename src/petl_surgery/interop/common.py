"""What the importers share: planning the surgery, checking every tensor against it, and only then
changing the model; finding which block of the model a checkpoint's block belongs to; the head."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import CheckpointError, SurgeryError
from ..freezing import find_heads, set_trainable
from ..inventory import delta_names
from ..methods import Insertion
from ..methods.base import OUTSIDE_BLOCKS
from ..replay import RecordedCall, commit_calls, plan_calls
from ..sites import Block
from ..statistics import resolve_mode


@dataclass
class Call:
    """One ``apply`` the import makes: ``method`` with ``options`` on ``blocks``, and the tensors of its
    inserted modules per block, under their names inside the inserted module (``"down.weight"``,
    ``"q.lora_A"``)."""

    method: str
    blocks: List[int]
    options: Dict[str, Any]
    # per block, or per layer path for layers chosen by name (blocks ``[OUTSIDE_BLOCKS]``): see tensor_key
    tensors: Dict[Union[int, str], Dict[str, torch.Tensor]] = field(default_factory=dict)


def group_calls(method: str, items: Iterable[Tuple[int, Dict[str, Any], Dict[str, torch.Tensor]]]) -> List[Call]:
    """One Call per distinct option set, from ``(block, options, tensors)`` items: blocks whose options
    are equal share one ``apply``."""
    calls: Dict[str, Call] = {}
    for block, options, tensors in sorted(items, key=lambda item: item[0]):
        call = calls.setdefault(repr(sorted(options.items())), Call(method, [], dict(options)))
        if block in call.tensors:
            raise CheckpointError(f"method {method!r} is described twice for block {block} with the same options")
        call.blocks.append(block)
        call.tensors[block] = tensors
    return list(calls.values())


def install(model: nn.Module, calls: Sequence[Call], base: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Plan every call, check every tensor (names, shapes) against the plan and the model, then commit
    the surgery call by call (:mod:`petl_surgery.replay`, as ``load`` does) and copy the tensors; the
    model is untouched when anything does not fit.

    ``base`` holds tensors of the base model to overwrite (a head, biases), under state_dict names.
    Afterwards the inserted modules (all of the model's) and exactly the ``base`` tensors are trainable.
    """
    recorded = [RecordedCall(call.method, call.blocks, call.options) for call in calls]
    planned = list(zip(calls, plan_calls(model, recorded, source)))
    for call, insertions in planned:
        _check_tensors(call, insertions, source)
    state = model.state_dict()
    delta = delta_names(model)
    for name, tensor in base.items():
        if name not in state or name in delta:
            raise CheckpointError(f"{source} has tensor {name!r}, which this model ({type(model).__name__}) does not have")
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {list(tensor.shape)}, the model's {list(state[name].shape)}"
            )

    committed = commit_calls(model, recorded, resolve_mode(model, None), source)
    with torch.no_grad():
        for call, insertions in zip(calls, committed):
            for insertion in insertions:
                targets = insertion.module.state_dict(keep_vars=True)
                for key, tensor in call.tensors[tensor_key(insertion)].items():
                    if key in targets:
                        targets[key].copy_(tensor)
        targets = model.state_dict(keep_vars=True)
        for name, tensor in base.items():
            targets[name].copy_(tensor)
    set_trainable(model, set(base))
    return model


def tensor_key(insertion: Insertion) -> Union[int, str]:
    """Where a Call keeps an insertion's tensors: its block, or for a layer chosen by name (outside the
    blocks) the layer's path."""
    return insertion.host_path if insertion.block == OUTSIDE_BLOCKS else insertion.block


def _check_tensors(call: Call, insertions: Sequence[Insertion], source: str) -> None:
    expected: Dict[Union[int, str], Dict[str, Tuple[int, ...]]] = {}
    for insertion in insertions:
        shapes = expected.setdefault(tensor_key(insertion), {})
        shapes.update({key: tuple(t.shape) for key, t in insertion.module.state_dict().items()})
    for block, shapes in expected.items():
        given = call.tensors.get(block, {})
        missing = sorted(set(shapes) - set(given))
        extra = sorted(set(given) - set(shapes))
        if missing or extra:
            raise CheckpointError(
                f"{source}: the {call.method} tensors of block {block} do not fit: "
                + (f"missing {', '.join(missing)}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unexpected {', '.join(extra)}" if extra else "")
            )
        wrong = [
            f"{key}: file {list(given[key].shape)}, model {list(shape)}"
            for key, shape in shapes.items()
            if tuple(given[key].shape) != shape
        ]
        if wrong:
            raise CheckpointError(
                f"{source}: the {call.method} tensors of block {block} have other shapes: {', '.join(wrong[:4])}"
            )


_CANONICAL = re.compile(r"^(?P<prefix>.*?)(?:layers\.(?P<stage>\d+)\.blocks\.(?P<inner>\d+)|blocks\.(?P<flat>\d+))$")


def map_blocks(blocks: Sequence[Block], keys: Sequence[str], source: str) -> Tuple[Dict[str, Block], str]:
    """The model's block for each checkpoint block path in ``keys``, and the prefix the file puts in
    front of them (``"backbone."``, ``""``).

    By name first: every key is the path of one of the model's blocks behind one common prefix
    (``blocks.3`` in a ViT, ``layers.1.blocks.0`` in a Swin). Otherwise, by depth order, only when the
    keys are canonical block paths (``blocks.N`` or ``layers.I.blocks.J``, as in the reference codes),
    there is one for every block of the model, and so the order is unambiguous (Video Swin's
    ``layers.I.blocks.J`` onto torchvision's ``features.K.J``). Anything else raises.
    """
    keys = list(dict.fromkeys(keys))
    paths = {block.path: block for block in blocks}
    candidates = {keys[0][: len(keys[0]) - len(path)] for path in paths if keys[0] == path or keys[0].endswith("." + path)}
    for prefix in sorted(candidates, key=len):
        if all(key.startswith(prefix) and key[len(prefix) :] in paths for key in keys):
            mapping = {key: paths[key[len(prefix) :]] for key in keys}
            if len({id(block) for block in mapping.values()}) == len(keys):
                return mapping, prefix
    parsed = [_CANONICAL.match(key) for key in keys]
    prefixes = {match.group("prefix") for match in parsed if match}
    if all(parsed) and len(prefixes) == 1 and len(keys) == len(blocks):
        numbers = {
            key: tuple(int(part) for part in match.group("stage", "inner", "flat") if part is not None)
            for key, match in zip(keys, parsed)
            if match is not None
        }
        order = sorted(keys, key=numbers.__getitem__)
        return {key: block for key, block in zip(order, blocks)}, prefixes.pop()
    raise CheckpointError(
        f"{source}: cannot tell which blocks of this model its {len(keys)} blocks ({', '.join(keys[:3])}, ...) are: "
        f"the model's blocks are {', '.join(list(paths)[:3])}, ... ({len(blocks)} in all), and the names neither "
        "match behind one prefix nor are canonical block paths of the same count"
    )


def linear_head(model: nn.Module, source: str) -> Tuple[str, nn.Linear]:
    """The path and module of the model's single Linear classifier head."""
    heads = find_heads(model)
    names = {id(module): name for name, module in model.named_modules()}
    if len(heads) != 1 or not isinstance(heads[0], nn.Linear):
        found = ", ".join(f"{names.get(id(h))} ({type(h).__name__})" for h in heads) or "none"
        raise CheckpointError(f"{source}: taking the head needs one Linear classifier head in the model; found {found}")
    return names[id(heads[0])], heads[0]


def head_tensors(
    model: nn.Module, weight: torch.Tensor, bias: torch.Tensor, source: str
) -> Dict[str, torch.Tensor]:
    """The file's head weight and bias under the model's head parameter names, shape-checked."""
    path, head = linear_head(model, source)
    if tuple(weight.shape) != tuple(head.weight.shape) or head.bias is None or tuple(bias.shape) != tuple(head.bias.shape):
        raise CheckpointError(
            f"{source}: its head ({list(weight.shape)}) does not fit the model's head {path!r} "
            f"({list(head.weight.shape)}); leave it out with load_head=False"
        )
    return {f"{path}.weight": weight, f"{path}.bias": bias}
