"""LoRA, low-rank adaptation (Hu et al. 2021), on the projections the site layer names.

    W' = W + (alpha / r) * B A        A: r x d_in (kaiming-uniform), B: d_out x r (zero)

Targets are semantic: "q", "k", "v" (the slices of the attention's input projection that produce them,
whatever its layout: a fused ``qkv``, separate projections, per-head layouts), "proj" (the attention's
output projection), "fc1" and "fc2" (the MLP's input and output layers). Each target gets its own A and
B, as Wq and Wv each get a rank-r update in the LoRA paper; on a fused qkv, B spans only its slice, so
the other rows stay untouched. LoRA is mergeable: :func:`petl_surgery.merge` folds ``(alpha / r) B A``
into the base weights.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SurgeryError
from ..patches import Patch, host_patches
from ..sites import Block, Projection
from .base import (
    CHILD_PREFIX,
    Hook,
    Insertion,
    Method,
    PetlModule,
    UnsupportedBlockError,
    Write,
    attention_of,
    branch_input,
    check_number,
    check_positive_int,
    factory_kwargs,
)

ATTENTION_TARGETS = ("q", "k", "v", "proj")
MLP_TARGETS = ("fc1", "fc2")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS


@dataclass(frozen=True)
class LoraOptions:
    """Options of ``"lora"``.

    Attributes:
        rank: r (8).
        alpha: the scale numerator, ``scaling = alpha / rank``; None (default) means alpha = rank, so
            the update is ``B A`` unscaled (recorded resolved).
        dropout: dropout on the input of A (0.0), as in the LoRA code and PEFT.
        targets: which projections get an update, among "q", "k", "v", "proj", "fc1", "fc2"
            (default ("q", "v"), the LoRA paper's choice for attention).
    """

    rank: int = 8
    alpha: Optional[float] = None
    dropout: float = 0.0
    targets: Union[str, Sequence[str]] = ("q", "v")

    def __post_init__(self) -> None:
        check_positive_int("lora", "rank", self.rank)
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        check_number("lora", "alpha", self.alpha)
        check_number("lora", "dropout", self.dropout, low=0.0, high=1.0)
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise SurgeryError(
                f"option 'targets' of method 'lora' must name distinct projections among "
                f"{', '.join(TARGETS)}; got {self.targets!r}"
            )
        object.__setattr__(self, "targets", targets)


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


class LowRankAdapter(PetlModule):
    """The LoRA updates of one host (an attention or an MLP), one :class:`LowRankPair` per target, added
    to their producers' outputs through forward hooks: ``out[channels] += scaling * B A dropout(x)``."""

    component = "lora"

    def __init__(
        self,
        host: nn.Module,
        targets: Sequence[Tuple[str, Projection, nn.Module, int]],
        channel_dim: int,
        options: LoraOptions,
        method: str,
        block: int,
        recorded: Mapping[str, Any],
    ) -> None:
        super().__init__(method, recorded, block)
        self.scaling = float(options.alpha) / options.rank
        self.channel_dim = channel_dim
        self.dropout = nn.Dropout(options.dropout)
        self.targets: Tuple[Target, ...] = tuple(
            Target(name, projection.module, Write(0, projection.start, projection.width, projection.index))
            for name, projection, _, _ in targets
        )
        for name, projection, producer, in_features in targets:
            kwargs = factory_kwargs(producer, host)
            self.add_module(name, LowRankPair(in_features, projection.width, options.rank, **kwargs))
            if projection.index is not None:
                index = torch.tensor(projection.index, dtype=torch.long, device=kwargs.get("device"))
                self.register_buffer(f"index_{name}", index, persistent=False)
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
        """``output += B_all (A_all dropout(x))`` in place, for every target of ``producer`` at once.

        The targets' A matrices (scaled) are stacked into one ``(k r) x d_in`` matrix and their B matrices
        placed in one ``C x (k r)`` matrix over the producer's ``C`` output channels (block-diagonal when
        the targets tile the output, zero rows for channels no target updates): two matmuls and one add
        into the output itself, however many targets share the producer, and no view of the output for
        autograd to copy in backward. Dropout runs only when it can change something."""
        dim = self.channel_dim
        x = branch_input(args[0] if dim == -1 else args[0].movedim(dim, -1), self.pair(self._stacks[producer].names[0]).lora_A)
        if self.training and self.dropout.p > 0:
            x = self.dropout(x)
        stack = self._stacks[producer]
        update = F.linear(F.linear(x, self._stacked_a(stack)), self._placed_b(stack, output.shape[dim]))
        output.add_(update if dim == -1 else update.movedim(-1, dim))
        return output

    def _stacked_a(self, stack: "_Stack") -> torch.Tensor:
        pairs = [self.pair(name) for name in stack.names]
        a = pairs[0].lora_A if len(pairs) == 1 else torch.cat([pair.lora_A for pair in pairs])
        return a if self.scaling == 1.0 else a * self.scaling

    def _placed_b(self, stack: "_Stack", channels: int) -> torch.Tensor:
        pairs = [self.pair(name) for name in stack.names]
        if stack.tiles == channels:  # the targets lie end to end over the whole output, in order
            return pairs[0].lora_B if len(pairs) == 1 else torch.block_diag(*[pair.lora_B for pair in pairs])
        first = pairs[0].lora_B
        rank = first.shape[1]
        placed = first.new_zeros(channels, rank * len(pairs))
        for number, (pair, write) in enumerate(zip(pairs, stack.writes)):
            columns = slice(number * rank, (number + 1) * rank)
            if write.index is None:
                placed[write.output_start : write.output_start + write.width, columns] = pair.lora_B
            else:
                placed[getattr(self, f"index_{stack.names[number]}"), columns] = pair.lora_B
        return placed

    def producers(self) -> List[str]:
        return list(dict.fromkeys(target.producer for target in self.targets))

    def merge_into(self, host: nn.Module) -> None:
        """Fold ``scaling * B A`` into the weights of the producers under ``host`` (checked mergeable)."""
        with torch.no_grad():
            for target in self.targets:
                weight = mergeable_weight(host.get_submodule(target.producer))
                assert weight is not None  # checked by merge() before anything changed
                rows = weight.view(weight.shape[0], -1)
                delta = (self.pair(target.name).delta_weight() * self.scaling).to(rows.dtype)
                index = getattr(self, f"index_{target.name}", None)
                if index is None:
                    rows.narrow(0, target.write.output_start, target.write.width).add_(delta)
                else:
                    rows.index_add_(0, index, delta)


def mergeable_weight(producer: nn.Module) -> Optional[torch.Tensor]:
    """The weight a low-rank update can be folded into: that of a plain Linear or 1x1 Conv2d whose output
    is the hooked output itself (not, say, a Linear followed by a BatchNorm)."""
    if type(producer) is nn.Linear:
        return producer.weight
    if type(producer) is nn.Conv2d and producer.kernel_size == (1, 1) and producer.groups == 1:
        return producer.weight
    return None


class Lora(Method):
    name = "lora"
    Options = LoraOptions

    @classmethod
    def plan_block(cls, block: Block, options: LoraOptions, method: str, recorded: Mapping[str, Any]) -> List[Insertion]:
        where = f"block {block.index} ({block.path!r})"
        insertions = []
        attention_targets = [t for t in options.targets if t in ATTENTION_TARGETS]
        mlp_targets = [t for t in options.targets if t in MLP_TARGETS]
        if attention_targets:
            site = attention_of(block, method, refusal=None)  # a LoRA on a projection needs no softmax
            available: Dict[str, Projection] = dict(site.projections)
            if site.output is not None:
                available["proj"] = site.output
            targets = cls._targets(
                method, where, site.path, site.module, attention_targets, available, site.producer, site.in_features
            )
            insertions.append(
                cls._insertion(
                    block, site.path, site.module, targets, site.channel_dim, options, method, recorded,
                    host_patches(site.module, dict(site.patches)),
                )
            )
        if mlp_targets:
            mlp = block.mlp
            if mlp is None:
                raise UnsupportedBlockError(f"method {method!r} needs an MLP in {where}; it has none")
            targets = cls._targets(
                method, where, mlp.path, mlp.module, mlp_targets, dict(mlp.projections), mlp.module.get_submodule, None
            )
            insertions.append(cls._insertion(block, mlp.path, mlp.module, targets, mlp.channel_dim, options, method, recorded, []))
        return insertions

    @staticmethod
    def _targets(
        method: str,
        where: str,
        host_path: str,
        host: nn.Module,
        names: Sequence[str],
        available: Mapping[str, Projection],
        producer_of: Callable[[str], nn.Module],
        qkv_in_features: Optional[int],
    ) -> List[Tuple[str, Projection, nn.Module, int]]:
        """(name, projection, producer, input width) of each target; q/k/v read the attention's tokens,
        the other targets whatever their own layer reads."""
        missing = [name for name in names if name not in available]
        if missing:
            raise UnsupportedBlockError(
                f"targets {', '.join(missing)} of method {method!r} are not available in {where}: "
                f"{host_path!r} ({type(host).__name__}) offers {', '.join(available) or 'none'}"
            )
        targets = []
        for name in names:
            producer = producer_of(available[name].module)
            width = qkv_in_features if name in ("q", "k", "v") else _in_features(producer)
            if width is None:
                raise UnsupportedBlockError(
                    f"method {method!r} cannot tell the input width of target {name!r} in {host_path!r} "
                    f"({type(producer).__name__})"
                )
            targets.append((name, available[name], producer, width))
        return targets

    @staticmethod
    def _insertion(
        block: Block,
        host_path: str,
        host: nn.Module,
        targets: List[Tuple[str, Projection, nn.Module, int]],
        channel_dim: int,
        options: LoraOptions,
        method: str,
        recorded: Mapping[str, Any],
        patches: Sequence[Patch],
    ) -> Insertion:
        module = LowRankAdapter(host, targets, channel_dim, options, method, block.index, recorded)
        producers = {projection.module: producer for _, projection, producer, _ in targets}
        hooks = [
            Hook(producer, "forward", functools.partial(module.add_low_rank, name)) for name, producer in producers.items()
        ]
        return Insertion(block.index, host_path, host, CHILD_PREFIX + method, module, hooks, patches)


def _in_features(layer: nn.Module) -> Optional[int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels
    return None
