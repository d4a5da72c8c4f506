"""LoRA, low-rank adaptation (Hu et al. 2021), on the projections the site layer names.

    W' = W + (alpha / r) * B A        A: r x d_in (kaiming-uniform), B: d_out x r (zero)

Targets are semantic: "q", "k", "v" (the slices of the attention's input projection that produce them,
whatever its layout: a fused ``qkv``, separate projections, per-head layouts), "qkv" (the whole output
of a fused ``[q | k | v]`` projection such as timm's ``qkv`` Linear, as one target), "proj" (the
attention's output projection), "fc1" and "fc2" (the MLP's input and output layers). Each target gets
its own A and B, as Wq and Wv each get a rank-r update in the LoRA paper; on a fused qkv, B spans only
its slice, so the other rows stay untouched. Target "qkv" gets one A (r x d) and one B (3d x r) over the
whole fused weight: exactly PEFT's LoRA on that Linear. LoRA is mergeable: :func:`petl_surgery.merge`
folds ``(alpha / r) B A`` into the base weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..sites import Block
from .base import (
    Insertion,
    MergeableModule,
    Method,
    UnsupportedBlockError,
    Write,
    block_diagonal,
    branch_input,
    check_number,
    check_positive_int,
)
from ..selection import LayerSelection
from ..wrappers import inner
from .planning import PlanContext, checked_by_name
from .fused import adds_in_place
from .layer_lora import plan_layers
from .patterns import exclusive_targets, parse_patterns
from .targets import (
    HostTargets,
    ResolvedTarget,
    add_to_rows,
    fold_refusal,
    foldable_weight,
    insertions_per_host,
    parse_targets,
    resolve_targets,
)


@dataclass(frozen=True)
class LoraOptions:
    """Options of ``"lora"``.

    Attributes:
        rank: r (8).
        alpha: the scale numerator, ``scaling = alpha / rank``; None (default) means alpha = rank, so
            the update is ``B A`` unscaled (recorded resolved).
        dropout: dropout on the input of A (0.0), as in the LoRA code and PEFT.
        targets: which projections get an update, among "q", "k", "v", "qkv", "proj", "fc1", "fc2"
            (default ("q", "v"), the LoRA paper's choice for attention). "qkv" is the whole fused
            ``[q | k | v]`` projection with one A and one B (PEFT's LoRA on timm's ``qkv`` Linear),
            available only where one module produces exactly q, k and v, end to end (not with
            separate or per-head projections); it cannot be named with "q", "k" or "v". None (the
            default) means ("q", "v"), or nothing when ``modules`` chooses the layers.
        modules: instead of ``targets``, regular expressions matched against whole module paths
            (``re.fullmatch``, as PEFT's ``target_modules`` string): every ``nn.Linear``, ``nn.Conv1d``,
            ``nn.Conv2d`` or ``nn.Conv3d`` (of one group) they match gets an update, in blocks or not
            (a CNN's convolutions); convolutions get PEFT's conv LoRA (see :mod:`.layer_lora`). None
            (default): the blocks' ``targets``. ``layers`` cannot be given with it.
    """

    rank: int = 8
    alpha: Optional[float] = None
    dropout: float = 0.0
    targets: Union[None, str, Sequence[str]] = None
    modules: Union[None, str, Sequence[str]] = None

    method: ClassVar[str] = "lora"  # the name in error messages (DoRA's options derive from these)

    def __post_init__(self) -> None:
        check_positive_int(self.method, "rank", self.rank)
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        check_number(self.method, "alpha", self.alpha)
        check_number(self.method, "dropout", self.dropout, low=0.0, high=1.0)
        object.__setattr__(self, "modules", parse_patterns(self.method, self.modules))
        targets = exclusive_targets(self.method, self.targets, self.modules, ("q", "v"))
        object.__setattr__(self, "targets", None if targets is None else parse_targets(self.method, targets))


class LowRankPair(nn.Module):
    """One target's update ``B A``: ``lora_A`` (r x d_in), ``lora_B`` (d_out x r)."""

    def __init__(self, in_features: int, out_features: int, rank: int, **kwargs: Any) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kwargs))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, LoRA's code and PEFT

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A


@dataclass(frozen=True)
class Target:
    """A target's producer (path relative to the host) and where its update goes in that output."""

    name: str
    producer: str
    write: Write


@dataclass(frozen=True)
class _Stack:
    """The targets sharing one producer, in order, and the output width they tile end to end from
    channel 0 (-1 when they do not)."""

    names: Tuple[str, ...]
    writes: Tuple[Write, ...]
    tiles: int


class LowRankAdapter(MergeableModule):
    """The LoRA updates of one host (an attention or an MLP), one :class:`LowRankPair` per target, added
    to their producers' outputs through forward hooks: ``out[channels] += scaling * B A dropout(x)``."""

    component = "lora"

    def __init__(
        self,
        host: HostTargets,
        options: LoraOptions,
        block: int,
        context: PlanContext,
    ) -> None:
        super().__init__(context.method, context.recorded, block)
        self.scaling = float(options.alpha) / options.rank
        self.channel_dim = host.channel_dim
        self.dropout = nn.Dropout(options.dropout)
        self.targets: Tuple[Target, ...] = tuple(Target(t.name, t.projection.module, t.write) for t in host.targets)
        for target in host.targets:
            kwargs = context.factory_kwargs(target.producer, host.module)
            assert target.in_features is not None  # checked by Lora.plan_block
            self.add_module(target.name, LowRankPair(target.in_features, target.projection.width, options.rank, **kwargs))
            if target.projection.index is not None:
                index = torch.tensor(target.projection.index, dtype=torch.long, device=kwargs.get("device"))
                self.register_buffer(f"index_{target.name}", index, persistent=False)
        self._stacks: Dict[str, _Stack] = {}
        for producer in dict.fromkeys(target.producer for target in self.targets):
            mine = [target for target in self.targets if target.producer == producer]
            starts = [sum(t.write.width for t in mine[:number]) for number in range(len(mine))]
            tiles = all(t.write.index is None and t.write.output_start == start for t, start in zip(mine, starts))
            self._stacks[producer] = _Stack(
                tuple(t.name for t in mine), tuple(t.write for t in mine), sum(t.write.width for t in mine) if tiles else -1
            )

    def pair(self, target: str) -> LowRankPair:
        return getattr(self, target)

    def add_low_rank(self, producer: str, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """``output + B_all (A_all dropout(x))``, for every target of ``producer`` at once.

        The targets' A matrices (scaled) are stacked into one ``(k r) x d_in`` matrix and their B matrices
        placed in one ``C x (k r)`` matrix over the producer's ``C`` output channels (block-diagonal when
        the targets tile the output, zero rows for channels no target updates): two matmuls and one add,
        however many targets share the producer, and no view of the output for autograd to copy in
        backward. The add is out of place, as PEFT's: an in-place add into a producer's output is refused
        under autocast and by torch.compile's functionalisation on some torch versions. Dropout runs only when it can change something."""
        dim = self.channel_dim
        x = branch_input(args[0] if dim == -1 else args[0].movedim(dim, -1), self.pair(self._stacks[producer].names[0]).lora_A)
        if self.training and self.dropout.p > 0:
            x = self.dropout(x)
        stack = self._stacks[producer]
        if dim == -1 and adds_in_place(output, x, self._first_a(stack)):
            return self._add_low_rank_(stack, output, F.linear(x, self._stacked_a(stack)))
        update = F.linear(F.linear(x, self._stacked_a(stack)), self._placed_b(stack, output.shape[dim]))
        return output + (update if dim == -1 else update.movedim(-1, dim)).to(output.dtype)

    def _first_a(self, stack: "_Stack") -> torch.Tensor:
        return self.pair(stack.names[0]).lora_A

    def _add_low_rank_(self, stack: "_Stack", output: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """The inference path (no grad): each target's ``B`` accumulates its slice of ``low`` (the stacked
        ``A x``) straight into its channels of ``output``, in place: no zero-padded ``B``, no update as
        wide as the output and no second pass over it. Returns ``output``."""
        flat = output.view(-1, output.shape[-1])
        low = low.reshape(-1, low.shape[-1])
        start = 0
        for name, write in zip(stack.names, stack.writes):
            pair = self.pair(name)
            rank = pair.lora_A.shape[0]
            part = low.narrow(1, start, rank)
            start += rank
            if write.index is None:
                flat.narrow(1, write.output_start, pair.lora_B.shape[0]).addmm_(part, pair.lora_B.t())
            else:
                flat.index_add_(1, getattr(self, f"index_{name}"), torch.mm(part, pair.lora_B.t()))
        return output

    def _stacked_a(self, stack: "_Stack") -> torch.Tensor:
        pairs = [self.pair(name) for name in stack.names]
        a = pairs[0].lora_A if len(pairs) == 1 else torch.cat([pair.lora_A for pair in pairs])
        return a if self.scaling == 1.0 else a * self.scaling

    def _placed_b(self, stack: "_Stack", channels: int) -> torch.Tensor:
        pairs = [self.pair(name) for name in stack.names]
        if stack.tiles == channels:  # the targets lie end to end over the whole output, in order
            return pairs[0].lora_B if len(pairs) == 1 else block_diagonal([pair.lora_B for pair in pairs])
        # each target's B zero-padded to the output's channels, out of place (an in-place write into a
        # new tensor gives the dynamo ONNX exporter of torch 2.6 a parameter it cannot name)
        columns = []
        for number, (pair, write) in enumerate(zip(pairs, stack.writes)):
            if write.index is None:
                below = channels - write.output_start - write.width
                columns.append(F.pad(pair.lora_B, (0, 0, write.output_start, below)))
            else:
                index = getattr(self, f"index_{stack.names[number]}")
                columns.append(pair.lora_B.new_zeros(channels, pair.lora_B.shape[1]).index_copy(0, index, pair.lora_B))
        return torch.cat(columns, 1)

    def producers(self) -> List[str]:
        return list(dict.fromkeys(target.producer for target in self.targets))

    def merge_refusal(self, host: nn.Module) -> Optional[str]:
        return fold_refusal(host, self.producers(), pointwise=True)

    def merge_into(self, host: nn.Module) -> None:
        """Fold ``scaling * B A`` into the weights of the producers under ``host`` (checked mergeable)."""
        with torch.no_grad():
            for target in self.targets:
                weight = foldable_weight(host.get_submodule(target.producer), pointwise=True)
                assert weight is not None  # checked by merge() before anything changed
                delta = self.pair(target.name).delta_weight() * self.scaling
                add_to_rows(weight, target.write, getattr(self, f"index_{target.name}", None), delta)


class Lora(Method):
    name = "lora"
    Options = LoraOptions
    mergeable = True
    takes_branch_dtype = True
    adapter: ClassVar[type] = LowRankAdapter  # the inserted module and its forward hook (DoRA: its own)
    hook: ClassVar[str] = "add_low_rank"

    @classmethod
    def check_target(cls, host: HostTargets, target: ResolvedTarget, method: str) -> None:
        """Raise UnsupportedBlockError when ``target`` cannot take the update."""
        if target.in_features is None:
            raise UnsupportedBlockError(
                f"method {method!r} cannot tell the input width of target {target.name!r} in "
                f"{host.path!r} ({type(target.producer).__name__})"
            )

    @classmethod
    def plan(cls, model: nn.Module, layers: LayerSelection, options: LoraOptions, context: PlanContext) -> List[Insertion]:
        """The blocks' projections (``targets``), or the layers the ``modules`` patterns choose by name."""
        if options.modules is None:
            return super().plan(model, layers, options, context)
        return checked_by_name(plan_layers(inner(model), options.modules, options, context), layers, context)

    @classmethod
    def plan_block(cls, block: Block, options: LoraOptions, context: PlanContext) -> List[Insertion]:
        method = context.method
        hosts = resolve_targets(block, options.targets, method)
        for host in hosts:
            for target in host.targets:
                cls.check_target(host, target, method)

        def build(host: HostTargets) -> LowRankAdapter:
            return cls.adapter(host, options, block.index, context)

        return insertions_per_host(block, hosts, method, build, cls.hook)
