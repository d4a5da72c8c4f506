"""What every method shares: the mergeable-module protocol, option parsing, and hook plumbing (the
inserted-module base class lives in :mod:`petl_surgery.inserted`, below site discovery)."""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OptionError, UnsupportedBlockError  # UnsupportedBlockError: re-exported
from ..inserted import CHILD_PREFIX, OUTSIDE_BLOCKS, PetlModule  # re-exported: methods build on them
from ..patches import Patch, apply_patch
from ..selection import LayerSelection
from ..sites import AttentionSite, Block, Projection
from .planning import Hook, Insertion, PlanContext, choose_blocks, plan_each_block  # Hook, Insertion: re-exported


class MergeableModule(PetlModule, abc.ABC):
    """An inserted module that :func:`petl_surgery.merge` can fold into the base weights of the producers
    it hooks (modules of its host, the module it is a child of)."""

    # True when the module only adds a term computed from the producer's input (LoRA): it gives the same
    # output wherever its hook runs among other additive hooks. False when it transforms the producer's
    # output (SSF's scale), so every hook before it on a producer must be folded with it.
    additive: ClassVar[bool] = True
    # True when the module transforms its producers' input (a linear adapter re-parameterised into the
    # projection after it, RepAdapter's): the producer's weight then multiplies whatever the output-side
    # modules fold into it, so merge folds these after every output-side module, latest applied first.
    acts_on_input: ClassVar[bool] = False

    @abc.abstractmethod
    def producers(self) -> List[str]:
        """Paths, relative to the host, of the producers this module hooks (none for a module whose
        tensors other modules read, as FacT's shared factors, and fold for it)."""

    @abc.abstractmethod
    def merge_refusal(self, host: nn.Module) -> Optional[str]:
        """Why this module cannot be folded into ``host``'s producers, or None when it can."""

    def before_merge(self, host: nn.Module) -> None:
        """Read from the unmerged model what ``merge_into`` needs (DoRA's weight norm, taken on the
        weights its forward sees); ``merge`` calls it on every module it folds before folding any."""

    @abc.abstractmethod
    def merge_into(self, host: nn.Module) -> None:
        """Fold this module into ``host``'s producers (after ``merge_refusal`` gave None)."""


def layout_refusal(site: AttentionSite) -> Optional[str]:
    """Why the registry refuses ``site``'s attention (non-softmax attention, ...), or None."""
    return site.unsupported


def attention_of(
    block: Block, method: str, refusal: Optional[Callable[[AttentionSite], Optional[str]]] = layout_refusal
) -> AttentionSite:
    """The attention of ``block`` for ``method``; UnsupportedBlockError when the block has none or when
    ``refusal`` (by default the registry's own refusal) gives a reason against it."""
    where = f"block {block.index} ({block.path!r})"
    site = block.attention
    if site is None:
        raise UnsupportedBlockError(f"method {method!r} needs an attention in {where}; it has none")
    reason = refusal(site) if refusal is not None else None
    if reason is not None:
        raise UnsupportedBlockError(
            f"method {method!r} cannot operate on {where}: its attention {site.path!r} "
            f"({type(site.module).__name__}) {reason}"
        )
    return site


class Method:
    """A PETL method: a name, an options dataclass, and the insertions it plans (:meth:`plan`).

    Its capabilities are declared here, on the class, and read by ``apply``, ``merge``, the tests, the
    benchmarks and the coverage script; no list of method names is kept anywhere else. A new method sets
    the ones that differ from these defaults and registers itself in :mod:`petl_surgery.methods`.
    """

    name: ClassVar[str]
    Options: ClassVar[Type[Any]]

    # ``merge`` can fold it into the base weights: every module it inserts is a :class:`MergeableModule`.
    mergeable: ClassVar[bool] = False
    # It lengthens the token sequence (prefix keys and values, prompt tokens): the added tokens take part
    # in attention from the start, so no initialisation leaves the model's outputs exactly as they were.
    adds_tokens: ClassVar[bool] = False
    # Its default initialisation leaves the model's outputs exactly unchanged (a zero last layer).
    identity_at_init: ClassVar[bool] = True
    # Options that give an exactly unchanged model at init when the default does not (a paper's
    # near-identity init, e.g. Houlsby's truncated normal, has an exact-identity alternative); empty otherwise.
    identity_options: ClassVar[Mapping[str, Any]] = {}
    # ``apply(..., branch_dtype=...)`` can keep its branches in another floating dtype than the base's
    # (each branch casts its input to its own dtype and its result back).
    takes_branch_dtype: ClassVar[bool] = False
    # It needs the patch grid of the tokens (a convolution over them): refused on models whose image size
    # may change per forward.
    needs_token_grid: ClassVar[bool] = False

    @classmethod
    def parse_options(cls, given: Mapping[str, Any]) -> Any:
        return parse_options(cls.name, cls.Options, given)

    @classmethod
    def plan(cls, model: nn.Module, layers: LayerSelection, options: Any, context: PlanContext) -> List[Insertion]:
        """The one planning entry point: the insertions for the blocks ``layers`` chooses in ``model``
        (None: all), built with ``context`` and without touching the model; raises SurgeryError (before
        any change) for what the method cannot do.

        The default chooses the blocks (:func:`~petl_surgery.methods.planning.choose_blocks`) and plans
        each with :meth:`plan_block` (:func:`~petl_surgery.methods.planning.plan_each_block`). A method
        that needs the whole model (prompt tokens: where the prefix tokens end, which block is last)
        overrides it with the same two helpers around a per-block planner of its own; one that can choose
        layers by name pattern returns :func:`~petl_surgery.methods.planning.checked_by_name` of them.
        """
        blocks, chosen = choose_blocks(model, layers, context)
        return plan_each_block(blocks, chosen, lambda block: cls.plan_block(block, options, context), context)

    @classmethod
    def plan_block(cls, block: Block, options: Any, context: PlanContext) -> List[Insertion]:
        """The insertions for ``block``, built without touching the model, with
        ``context.factory_kwargs`` for the device and dtype of every module; raises UnsupportedBlockError
        if the block lacks what the method needs. Used by the default :meth:`plan`."""
        raise NotImplementedError(f"{cls.__name__} must implement plan_block or plan")


def parse_options(method: str, options_type: Type[Any], given: Mapping[str, Any]) -> Any:
    """Build ``options_type`` from user keywords, refusing unknown names with the list of valid ones."""
    valid = [f.name for f in dataclasses.fields(options_type)]
    unknown = [name for name in given if name not in valid]
    if unknown:
        raise OptionError(
            f"unknown option {unknown[0]!r} for method {method!r}; valid options: {', '.join(valid)}"
        )
    return options_type(**given)


def options_dict(options: Any) -> Dict[str, Any]:
    return dataclasses.asdict(options)


def check_choice(method: str, option: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise OptionError(
            f"option {option!r} of method {method!r} must be one of {', '.join(map(repr, choices))}; got {value!r}"
        )


SUBLAYERS = ("attention", "mlp")


def parse_sublayers(method: str, option: str, value: Any) -> Tuple[str, ...]:
    """An option naming sublayers of a block (a name or a sequence of distinct names among
    ``SUBLAYERS``), as a tuple in ``SUBLAYERS``'s order."""
    names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if not names or len(set(names)) != len(names) or any(name not in SUBLAYERS for name in names):
        raise OptionError(
            f"option {option!r} of method {method!r} must name distinct sublayers among "
            f"{', '.join(map(repr, SUBLAYERS))}; got {value!r}"
        )
    return tuple(name for name in SUBLAYERS if name in names)


def check_positive_int(method: str, option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise OptionError(f"option {option!r} of method {method!r} must be a positive int; got {value!r}")


def check_number(method: str, option: str, value: Any, *, low: float = float("-inf"), high: float = float("inf")) -> None:
    """A finite int or float (not a bool) in ``[low, high]``; infinity and NaN are refused."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise OptionError(
            f"option {option!r} of method {method!r} must be a finite number in [{low}, {high}]; got {value!r}"
        )


@dataclass(frozen=True)
class Write:
    """Branch channels ``[branch_start, branch_start + width)`` go to the producer's output channels
    ``[output_start, output_start + width)``, or to its scattered channels ``index``."""

    branch_start: int
    output_start: int
    width: int
    index: Optional[Tuple[int, ...]] = None


def added_into_channels(
    output: torch.Tensor, dim: int, write: Write, part: torch.Tensor, alpha: float, index: Optional[torch.Tensor]
) -> torch.Tensor:
    """A new tensor: ``output`` with ``alpha * part`` added to the channels of ``write`` along ``dim``
    (:func:`replaced_slice` for a contiguous slice, ``index_add`` for scattered channels ``index``).

    Out of place on purpose: a producer's output may be a view, an autocast or inference-mode tensor, or
    a tensor being functionalised by torch.compile, and an in-place add into it is refused (or silently
    wrong) on some torch versions. Only the fused path (``.fused``), which checks that none of this
    holds, writes into the output itself."""
    part = part.to(output.dtype)  # a float32 branch (branch_dtype) on a half model adds in the model's dtype
    if index is None:
        start = write.output_start
        updated = output.narrow(dim, start, write.width) + alpha * part
        return replaced_slice(output, dim, start, updated)
    return output.index_add(dim, index, part, alpha=alpha)


def replaced_slice(tensor: torch.Tensor, dim: int, start: int, new: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``tensor`` with ``new`` in place of its slice ``[start, start + new.shape[dim])``
    along ``dim`` (what ``slice_scatter`` computes), by concatenation: an op every exporter knows (the
    legacy ONNX exporter has no ``slice_scatter``)."""
    dim = dim % tensor.dim()
    end = start + new.shape[dim]
    pieces = [tensor.narrow(dim, 0, start)] if start else []
    pieces.append(new)
    if end < tensor.shape[dim]:
        pieces.append(tensor.narrow(dim, end, tensor.shape[dim] - end))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def block_diagonal(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.block_diag(*blocks)`` of 2-D tensors, each zero-padded to the full width and stacked: ops
    every exporter knows (the legacy ONNX exporter has no ``block_diag``)."""
    if len(blocks) == 1:
        return blocks[0]
    total = sum(block.shape[1] for block in blocks)
    rows, left = [], 0
    for block in blocks:
        rows.append(F.pad(block, (left, total - left - block.shape[1])))
        left += block.shape[1]
    return torch.cat(rows, 0)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch >= 2.4 takes the device type)."""
    return torch.is_autocast_enabled(device_type)


def branch_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype of a branch's ``weight`` when they differ (branches kept in float32 on a
    bfloat16 model, ``apply(..., branch_dtype=torch.float32)``), unless autocast chooses the dtype."""
    if x.dtype == weight.dtype or not x.is_floating_point() or autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


def writes_for(targets: Sequence[Projection]) -> Dict[str, Tuple[Write, ...]]:
    """Lay the targets end to end along the branch's output and group them by producer, merging
    neighbouring contiguous slices so that, e.g., k and v of a ``[q | k | v]`` output take one add."""
    writes: Dict[str, List[Write]] = {}
    offset = 0
    for target in targets:
        producer_writes = writes.setdefault(target.module, [])
        last = producer_writes[-1] if producer_writes else None
        if (
            target.index is None
            and last is not None
            and last.index is None
            and last.branch_start + last.width == offset
            and last.output_start + last.width == target.start
        ):
            producer_writes[-1] = Write(last.branch_start, last.output_start, last.width + target.width)
        else:
            producer_writes.append(Write(offset, target.start, target.width, target.index))
        offset += target.width
    return {producer: tuple(items) for producer, items in writes.items()}
