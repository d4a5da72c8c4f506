"""Inserted tensors keep their gradients under reentrant activation checkpointing.

Reentrant checkpointing (``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)``: timm with
``timm.layers.set_reentrant_ckpt(True)`` or ``TIMM_REENTRANT_CKPT=1``, transformers with
``gradient_checkpointing_kwargs={"use_reentrant": True}``) runs each checkpointed block as an autograd
Function whose output requires grad only when one of its *input tensors* does. In a frozen backbone no
activation requires grad, so the blocks' outputs come out detached and every module inserted inside a
checkpointed block gets no gradient at all: training runs, only the head learns, torch merely warns.
Non-reentrant checkpointing (both libraries' default) tracks parameters and needs nothing.

The fix is PEFT's ``enable_input_require_grads``, placed by the module tree rather than per model
family: a forward hook on the *feeders* of the first block that carries an inserted module (the modules
registered before it at the nearest level of the tree that has any that hold no block: a ViT's
``patch_embed``, ``pos_drop``, ``patch_drop``, ``norm_pre``; a Swin stage's ``downsample``; a
transformers model's ``embeddings``) gives their output as a tensor that requires grad. Feeders run
outside any checkpointed block, so every block after them receives an input that requires grad and its
recomputation in the backward pass reaches the inserted tensors. Where the block has no such feeder, the
model's own positional tensor inputs are fed instead (a hook on the model itself). Parameter gradients
are unchanged; the cost is the backward through the frozen blocks before the first inserted one (their
activation gradients), which the uncheckpointed run also pays whenever an earlier tensor trains.

Feeding happens only with gradients enabled and, on models whose modules carry timm's
``grad_checkpointing`` or transformers' ``gradient_checkpointing`` flag, only while one of those flags is
on, so a model without checkpointing runs (and compiles) exactly as before.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .hooks import owned_hooks, remove_hooks_of
from .inserted import PetlModule
from .sites import Block, discover

# attributes through which timm (``set_grad_checkpointing``) and transformers (``gradient_checkpointing_enable``)
# switch checkpointing on, on the model and on the modules that run the checkpointed blocks
CHECKPOINT_FLAGS = ("grad_checkpointing", "gradient_checkpointing")


class InputGradients:
    """The hooks of one model that make its first inserted block's input require grad (see the module
    docstring); found again by owner, so a deep copy of the model carries a working copy."""

    def __init__(self, flag_holders: Sequence[Tuple[nn.Module, str]]) -> None:
        self.flag_holders = list(flag_holders)

    def checkpointing(self) -> bool:
        if not self.flag_holders:  # a model that says nothing: checkpointing may be the user's own
            return True
        return any(getattr(module, flag, False) is True for module, flag in self.flag_holders)

    def feed_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not torch.is_grad_enabled() or not self.checkpointing():
            return None
        if isinstance(output, tuple) and output:
            return (_requiring_grad(output[0]), *output[1:])
        return _requiring_grad(output)

    def feed_inputs(self, module: nn.Module, args: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
        if not torch.is_grad_enabled() or not self.checkpointing():
            return None
        return tuple(_requiring_grad(arg) for arg in args)


def _requiring_grad(value: Any) -> Any:
    """``value`` as a tensor that requires grad when it is a floating tensor that does not (a new tensor
    on the same memory: the caller's tensor keeps its own flag); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
        return value.detach().requires_grad_(True)
    return value


def _holds_block(module: nn.Module, block_ids: set) -> bool:
    return any(id(inner) in block_ids for inner in module.modules())


def feeders(model: nn.Module, start: str, blocks: Sequence[Block]) -> List[nn.Module]:
    """The modules registered before ``start`` (a path) at the nearest level of ``model``'s tree, from
    ``start`` upwards, that has any holding no block and no inserted module; empty when no level has."""
    block_ids = {id(block.module) for block in blocks}
    path = start
    while path:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        names = list(parent._modules)
        found = [
            parent._modules[sibling]
            for sibling in names[: names.index(name)]
            if parent._modules[sibling] is not None
            and not isinstance(parent._modules[sibling], PetlModule)
            and not _holds_block(parent._modules[sibling], block_ids)
        ]
        if found:
            return found
        path = parent_path
    return []


def _first_carrier(model: nn.Module, blocks: Sequence[Block]) -> Optional[str]:
    """The path of the first block (depth order) that carries an inserted module, else the host of the
    first inserted module (surgery on layers chosen by name); None without surgery."""
    inserted = [path for path, module in model.named_modules() if isinstance(module, PetlModule)]
    for block in blocks:
        if any(path.startswith(block.path + ".") for path in inserted):
            return block.path
    hosts = [path.rpartition(".")[0] for path in inserted]
    return next((host for host in hosts if host), None)


def guard_checkpointing(model: nn.Module) -> None:
    """(Re)install the hooks for the surgery ``model`` carries now; remove them when it carries none."""
    for _, guard in list(owned_hooks(model, InputGradients)):
        remove_hooks_of(model, guard)
    if not any(isinstance(module, PetlModule) for module in model.modules()):
        return
    blocks = discover(model).blocks
    start = _first_carrier(model, blocks)
    if start is None:
        return
    holders = [
        (module, flag)
        for module in model.modules()
        if not isinstance(module, PetlModule)
        for flag in CHECKPOINT_FLAGS
        if isinstance(getattr(type(module), flag, None), bool) or isinstance(module.__dict__.get(flag), bool)
    ]
    guard = InputGradients(holders)
    fed = feeders(model, start, blocks)
    for module in fed:
        module.register_forward_hook(guard.feed_output)
    if not fed:
        model.register_forward_pre_hook(guard.feed_inputs)
