"""How a method's plan is made: the explicit planning context (the method's recorded name and options,
where inserted modules are built) and the steps every ``Method.plan`` shares (choosing the blocks,
planning them one by one, checking layers chosen by name). Nothing here changes the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ..errors import OptionError, SurgeryError, UnsupportedBlockError, UnsupportedModelError
from ..inserted import PetlModule
from ..patches import Patch, apply_patch
from ..selection import LayerSelection, select_layers
from ..sites import Block, discover
from ..wrappers import inner


# The device of a plan made for its sizes only: ``load`` checks the sizes a file records before it
# allocates them, so the modules it plans hold shapes without memory.
SIZES_ONLY = torch.device("meta")



@dataclass(frozen=True)
class Hook:
    """A hook to register on ``target`` when an insertion is committed."""

    target: nn.Module
    kind: str  # "forward", "forward_pre", or "forward_pre_kwargs" (fn(module, args, kwargs) -> (args, kwargs))
    fn: Callable[..., Any]


@dataclass
class Insertion:
    """One planned change: ``module`` becomes child ``name`` of ``host`` and its hooks are registered.

    Planning builds insertions without touching the model, so every check runs before any change.
    """

    block: int
    host_path: str
    host: nn.Module
    name: str
    module: PetlModule
    hooks: List[Hook]
    patches: Sequence[Patch] = ()

    @property
    def path(self) -> str:
        return f"{self.host_path}.{self.name}" if self.host_path else self.name

    def commit(self) -> None:
        self.module.train(self.host.training)  # a model in eval mode stays in eval mode
        self.module.keep_out_of_quantization()
        for patch in self.patches:
            apply_patch(patch, self.module.uid)
        self.host.add_module(self.name, self.module)
        for hook in self.hooks:
            if hook.kind == "forward":
                hook.target.register_forward_hook(hook.fn)
            else:
                hook.target.register_forward_pre_hook(hook.fn, with_kwargs=hook.kind == "forward_pre_kwargs")


@dataclass(frozen=True)
class PlanContext:
    """What one plan is made with, passed explicitly from ``plan``, replay and ``load`` down to every
    inserted module a method builds.

    ``method`` and ``recorded`` are the user-facing method name and its resolved options, recorded on the
    inserted modules (a composite method passes its own context to the methods it is made of).
    ``skip_unsupported`` (default False, ``apply``'s) skips chosen blocks the method cannot operate on
    instead of refusing them. ``device`` (default None) is where inserted modules are built: None builds
    each beside the layer it extends (that layer's device); :data:`SIZES_ONLY` builds them on the meta
    device. Their dtype is always that of the layer they extend (``branch_dtype`` casts after planning).
    """

    method: str
    recorded: Mapping[str, Any]
    skip_unsupported: bool = False
    device: Optional[torch.device] = None

    def factory_kwargs(self, *references: nn.Module) -> Dict[str, Any]:
        """``device`` and ``dtype`` for building a layer beside the first of ``references`` that holds a
        parameter (a producer added by a site's patches holds none: the attention behind it does): that
        parameter's dtype, and this context's device or else that parameter's."""
        for reference in references:
            parameter = next(reference.parameters(), None)
            if parameter is not None:
                device = self.device if self.device is not None else parameter.device
                return {"device": device, "dtype": parameter.dtype}
        raise SurgeryError(f"{type(references[0]).__name__} has no parameters to take a device and dtype from")


def choose_blocks(model: nn.Module, layers: LayerSelection, context: PlanContext) -> Tuple[List[Block], List[int]]:
    """The blocks ``model`` has and the indices ``layers`` chooses among them (None: all); refuses a model
    with attention the registry does not understand (unless ``context.skip_unsupported``) or no block."""
    found = discover(inner(model))
    if found.unsupported and not context.skip_unsupported:
        listed = "; ".join(f"{u.path!r} ({u.class_name}): {u.reason}" for u in found.unsupported[:5])
        raise UnsupportedModelError(
            f"{type(model).__name__} has attention modules petl_surgery cannot operate on: {listed}. "
            "Pass skip_unsupported=True to operate on the supported blocks only"
        )
    if not found.blocks:
        raise UnsupportedModelError(
            f"found no transformer block that petl_surgery can operate on in {type(model).__name__}"
        )
    return found.blocks, select_layers(layers, len(found.blocks))


def plan_each_block(
    blocks: Sequence[Block], chosen: Sequence[int], plan_block: Callable[[Block], List[Insertion]], context: PlanContext
) -> List[Insertion]:
    """The insertions ``plan_block`` gives for each chosen block, in order: a block it refuses with
    UnsupportedBlockError is skipped under ``context.skip_unsupported`` and refused otherwise; a module
    shared by several blocks takes its branch once; a host already carrying the method, or a branch of
    the same kind from another method, is refused."""
    method = context.method
    insertions: List[Insertion] = []
    skipped: List[str] = []
    planned_hosts: Set[Tuple[int, str]] = set()
    for index in chosen:
        try:
            planned = plan_block(blocks[index])
        except UnsupportedBlockError as error:
            if not context.skip_unsupported:
                raise UnsupportedBlockError(f"{error}; pass skip_unsupported=True to skip such blocks") from None
            skipped.append(str(error))
            continue
        for insertion in planned:
            if (id(insertion.host), insertion.name) in planned_hosts:
                continue  # a module shared by several blocks (CoaT's MLPs) takes its branch once
            planned_hosts.add((id(insertion.host), insertion.name))
            if hasattr(insertion.host, insertion.name):
                raise SurgeryError(
                    f"method {method!r} is already applied to block {index} ({insertion.host_path!r}); "
                    f"remove it first or choose other layers"
                )
            twin = _same_component(insertion)
            if twin is not None:
                raise SurgeryError(
                    f"block {index} ({insertion.host_path!r}) already carries a {twin.component} branch from method "
                    f"{twin.method!r}; a {method!r} one would stack a second {twin.component} on the same "
                    "projections. Remove it first or choose other layers"
                )
            insertions.append(insertion)
    if not insertions:
        raise UnsupportedModelError(f"method {method!r} can operate on none of the chosen blocks: {skipped[0]}")
    return insertions


def checked_by_name(insertions: List[Insertion], layers: LayerSelection, context: PlanContext) -> List[Insertion]:
    """``insertions`` on layers chosen by name pattern (an option such as LoRA's ``modules``), refused
    when ``layers`` also chooses blocks or when one of those layers carries the method already."""
    if layers is not None:
        raise OptionError(
            f"method {context.method!r}: option 'modules' chooses layers by name pattern, and layers= chooses "
            "blocks; give one of them"
        )
    for insertion in insertions:
        if hasattr(insertion.host, insertion.name):
            raise SurgeryError(
                f"method {context.method!r} is already applied to {insertion.host_path!r}; remove it first"
            )
    return insertions


def _same_component(insertion: Insertion) -> Optional[PetlModule]:
    """An inserted module of the host that is of the same kind as the planned one (BAPAT's PATT half
    beside a PATT), if any."""
    component = insertion.module.component
    for child in insertion.host.children():
        if isinstance(child, PetlModule) and component and child.component == component:
            return child
    return None
