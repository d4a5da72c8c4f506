"""FacT, factor-tuning (Jie & Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision
Transformer", AAAI 2023, arXiv 2212.03145; code github.com/JieShibo/PETL-ViT, ``FacT/fact_tt.py``,
``FacT/fact_tk.py``).

The weight increments of q, k, v, proj, fc1 and fc2 of every block are tensorised and factorised, with
two factors shared by all blocks::

    y = x W^T + b + s * V dropout(K U x)      dW = s V K U
    U: r x d (FacTu; nn.Linear's default init)    V: d x r (FacTv; zero)    K: the block's core

d is the block width. The MLP's weights count as d x d slices: fc1's output rows ``[jd, (j+1)d)`` and
fc2's input columns ``[jd, (j+1)d)`` are slice j (j < k = hidden / d, 4 in ViTs), each with its own
r x r core. The dropout (p 0.1 in the code) acts on the core's output.

- ``"tt"`` (tensor-train): every slice's core is its own parameter. q, k, v, proj: r x r; fc1: (k r) x r,
  rows ``[jr, (j+1)r)`` = slice j; fc2: r x (k r), columns ``[jr, (j+1)r)`` = slice j (the code's
  ``nn.Linear(r, r)``, ``nn.Linear(r, 4r)``, ``nn.Linear(4r, r)`` weights, default init, no bias).
- ``"tk"`` (Tucker): one core tensor C (r x r x r, xavier-uniform, shared) and per block 4 + 2k columns
  of P (r x (4 + 2k) L in all, xavier-uniform over the whole matrix): ``M = C x_3 P_b``, i.e.
  ``M[a, b, c] = sum_e C[a, b, e] P[e, c]``. Columns 0-3 give q, k, v, proj with ``K = M[:, :, c]^T``;
  the code's ``reshape(r, 4r)`` interleaves the MLP's: with m = jr + i, slice j of fc1 has
  ``K[i, :] = M[:, m // k, m % k]`` and slice j of fc2 ``K[:, i] = M[:, m // k, k + m % k]`` (not
  "column j = slice j"; followed here so that the code's checkpoints mean the same).

Defaults: variant "tt", r 8 and s 1 (the code's fallbacks ``set_FacT(dim=8, s=1)``; its per-task
configs use TT r in {4, 8, 16}, TK r in {16, 32}, s in {0.01, ..., 100}), dropout 0.1 (the code's).

Parameters, L blocks of width d (k = 4): TT ``2 d r + 12 L r^2``, TK ``2 d r + 12 L r + r^3``. ViT-B/16:
TT r 8 21,504, TT r 4 8,448 (the abstract's "8K"), TK r 32 86,528 (PETL_Vision's logged counts agree).
The code's per-task VTAB ranks (``configs/tt``, ``configs/tk``) average 39,734 (TT) and 68,985 (TK)
parameters, the 0.040M and 0.069M that tables quoting the paper give; the paper's own table was not
read here, so whether its text states other counts is unchecked.

Shared factors: U, V (and TK's C) belong to no block. They live in one module at the model's root,
``petl_fact`` (block index ``SHARED_BLOCK``), with one U, V pair per block width (``petl_fact.d768.u``;
ViTs have one width; Swin's stages have one each, our extension: the code covers the plain ViT only),
for the blocks of the apply call that uses them. The per-block modules (``petl_fact`` under each
attention and MLP) hold the cores and read the factors. ``summary`` counts the factors once, as
"shared"; ``save`` records the call's blocks as usual and writes the factors once; ``load`` with a
subset of blocks (``blocks=``, ``block_map=``) plans the factors for the widths of the blocks it takes
and leaves out the others' (shapes and presence are checked as for every tensor); ``remove("fact")``
takes the factors with the cores. FacT is applied once per model (the factors are those of one call).

Mergeable: ``merge`` adds each ``dW`` to its projection's rows (fc2's: columns) (exact in eval, where the
dropout is off).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SurgeryError
from ..inserted import SHARED_BLOCK
from ..sites import Block
from .base import (
    CHILD_PREFIX,
    Hook,
    Insertion,
    MergeableModule,
    Method,
    UnsupportedBlockError,
    Write,
    added_into_channels,
    block_diagonal,
    check_choice,
    check_number,
    check_positive_int,
)
from ..selection import LayerSelection
from .fused import adds_in_place
from .planning import PlanContext, choose_blocks, plan_each_block
from .targets import HostTargets, add_to_rows, fold_refusal, foldable_weight, resolve_targets

VARIANTS = ("tt", "tk")
ATTENTION_TARGETS = ("q", "k", "v", "proj")
MLP_TARGETS = ("fc1", "fc2")


@dataclass(frozen=True)
class FactOptions:
    """Options of ``"fact"``.

    Attributes:
        variant: "tt" (default; tensor-train, a core per slice) or "tk" (Tucker, a shared core tensor).
        rank: r (8, the code's fallback).
        scale: s, the factor on the increment (1.0, the code's ``set_FacT`` default).
        dropout: dropout on the core's output (0.1, the code's).
    """

    variant: str = "tt"
    rank: int = 8
    scale: float = 1.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        check_choice("fact", "variant", self.variant, VARIANTS)
        check_positive_int("fact", "rank", self.rank)
        check_number("fact", "scale", self.scale)
        check_number("fact", "dropout", self.dropout, low=0.0, high=1.0)


class FactorPair(nn.Module):
    """The factors of one block width: ``u`` (r x d, FacTu's weight) and ``v`` (d x r, FacTv's, zero)."""

    def __init__(self, width: int, rank: int, **kwargs: Any) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.empty(rank, width, **kwargs))
        self.v = nn.Parameter(torch.zeros(width, rank, **kwargs))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))  # nn.Linear's default, as FacTu's


class SharedFactors(MergeableModule):
    """FacT's factors shared by the blocks of one apply call: a :class:`FactorPair` per block width
    (children ``d<width>``) and, for "tk", the core tensor ``c`` (r x r x r). It hooks nothing: the
    per-block modules read it, and fold it into the weights when merged."""

    component = "fact_shared"

    def __init__(self, options: FactOptions, method: str, recorded: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(method, recorded, SHARED_BLOCK)
        self.rank = options.rank
        if options.variant == "tk":
            self.c = nn.Parameter(torch.empty(options.rank, options.rank, options.rank, **kwargs))
            nn.init.xavier_uniform_(self.c)

    def pair(self, width: int, **kwargs: Any) -> FactorPair:
        """The factors of ``width``, created on first use."""
        name = f"d{width}"
        if name not in self._modules:
            self.add_module(name, FactorPair(width, self.rank, **kwargs))
        return getattr(self, name)

    def producers(self) -> List[str]:
        return []

    def merge_refusal(self, host: nn.Module) -> Optional[str]:
        return None

    def merge_into(self, host: nn.Module) -> None:
        """Nothing of its own: the per-block modules fold ``s V K U`` with these factors."""


@dataclass(frozen=True)
class Increment:
    """One target: its producer (path relative to the host), the channels of the producer's output it
    writes, and how many d-wide slices it has (``columns``: fc2's slices split its input instead)."""

    name: str
    producer: str
    write: Write
    slices: int
    columns: bool = False


class FactorTuning(MergeableModule):
    """The FacT cores of one host (an attention: q, k, v, proj; or an MLP: fc1, fc2), added to its
    producers' outputs through forward hooks: ``out[channels] += s * V dropout(K U x)``."""

    component = "fact"

    def __init__(
        self,
        host: HostTargets,
        increments: Sequence[Increment],
        shared: SharedFactors,
        width: int,
        options: FactOptions,
        columns_in_all: int,
        block: int,
        context: PlanContext,
    ) -> None:
        super().__init__(context.method, context.recorded, block)
        kwargs = context.factory_kwargs(host.targets[0].producer, host.module)
        r = options.rank
        self.variant = options.variant
        self.scale = float(options.scale)
        self.channel_dim = host.channel_dim
        self.increments = tuple(increments)
        self.dropout = nn.Dropout(options.dropout)
        # read, not owned: the shared module is the model's child (a plain attribute is not registered)
        self.__dict__["_shared"] = shared
        self.__dict__["_pair"] = shared.pair(width, **kwargs)
        if options.variant == "tt":
            for inc in increments:
                shape = (r, inc.slices * r) if inc.columns else (inc.slices * r, r)
                core = nn.Parameter(torch.empty(*shape, **kwargs))
                nn.init.kaiming_uniform_(core, a=math.sqrt(5))  # nn.Linear's default, as the code's cores
                self.register_parameter(inc.name, core)
        else:
            columns = sum(1 if not inc.columns and inc.name != "fc1" else inc.slices for inc in increments)
            self.p = nn.Parameter(torch.empty(r, columns, **kwargs))
            bound = math.sqrt(6.0 / (r + columns_in_all))  # xavier-uniform over the whole r x 12L P
            nn.init.uniform_(self.p, -bound, bound)
        for inc in increments:
            if inc.write.index is not None:
                index = torch.tensor(inc.write.index, dtype=torch.long, device=kwargs["device"])
                self.register_buffer(f"index_{inc.name}", index, persistent=False)
        self._by_producer: Dict[str, Tuple[Increment, ...]] = {}
        for inc in increments:
            self._by_producer[inc.producer] = self._by_producer.get(inc.producer, ()) + (inc,)

    def producers(self) -> List[str]:
        return list(self._by_producer)

    def cores(self) -> Dict[str, torch.Tensor]:
        """Each target's core K, with ``z = K (U x)``: r x r (q, k, v, proj), (k r) x r (fc1), r x (k r) (fc2)."""
        if self.variant == "tt":
            return {inc.name: getattr(self, inc.name) for inc in self.increments}
        m = torch.einsum("abe,ec->abc", self._shared.c, self.p)
        if self.increments[0].name in ATTENTION_TARGETS:
            return {inc.name: m[:, :, column].t() for column, inc in enumerate(self.increments)}
        k = self.increments[0].slices
        r = m.shape[0]
        return {"fc1": m[:, :, :k].reshape(r, k * r).t(), "fc2": m[:, :, k:].reshape(r, k * r)}

    def _reduced(self, inc: Increment, x: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        """``s dropout(K U x)`` per slice, channels last (``(..., slices r)``; fc2: ``(..., r)``): all
        that precedes V, with s folded into the small core."""
        u = self._pair.u
        core = core if self.scale == 1.0 else core * self.scale
        if inc.columns:
            return self.dropout(F.linear(F.linear(x.unflatten(-1, (inc.slices, -1)), u).flatten(-2), core))
        return self.dropout(F.linear(F.linear(x, u), core))

    def _expansion(self, inc: Increment) -> torch.Tensor:
        """V for each slice of the target's output: block-diagonal ``(slices d) x (slices r)`` (fc2: V)."""
        v = self._pair.v
        return v if inc.columns or inc.slices == 1 else block_diagonal([v] * inc.slices)

    def add_increment(self, producer: str, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """``output + s * V dropout(K U x)`` on the channels of each target of ``producer``. Targets lying
        end to end over the whole output (timm's fused qkv, fc1, fc2) take one core product, and the
        expansion by V adds into the output in the same matmul (``addmm``, out of place)."""
        dim = self.channel_dim
        x = args[0] if dim == -1 else args[0].movedim(dim, -1)
        x = x.to(self._pair.u.dtype)
        cores = self.cores()
        mine = self._by_producer[producer]
        channels = output.shape[dim]
        starts = [sum(i.write.width for i in mine[:n]) for n in range(len(mine))]
        tiles = all(i.write.index is None and i.write.output_start == s for i, s in zip(mine, starts))
        if tiles and sum(i.write.width for i in mine) == channels and (len(mine) == 1 or not any(i.columns for i in mine)):
            whole = mine[0] if len(mine) == 1 else Increment("", producer, Write(0, 0, channels), sum(i.slices for i in mine))
            core = cores[mine[0].name] if len(mine) == 1 else torch.cat([cores[i.name] for i in mine])
            z = self._reduced(whole, x, core)
            if dim == -1 and adds_in_place(output, args[0], self._pair.u):
                return self._add_expansion_(whole, output, z)
            expansion = self._expansion(whole)
            if dim == -1 and output.is_contiguous() and output.dtype == z.dtype:
                flat = torch.addmm(output.reshape(-1, channels), z.reshape(-1, z.shape[-1]), expansion.t())
                return flat.view(output.shape)
            update = F.linear(z, expansion)
            return output + (update if dim == -1 else update.movedim(-1, dim)).to(output.dtype)
        for inc in mine:
            part = F.linear(self._reduced(inc, x, cores[inc.name]), self._expansion(inc))
            if dim != -1:
                part = part.movedim(-1, dim)
            output = added_into_channels(output, dim, inc.write, part, 1.0, getattr(self, f"index_{inc.name}", None))
        return output

    def _add_expansion_(self, inc: Increment, output: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The inference path (no grad): ``V`` expands each slice of ``z`` straight into that slice's
        channels of ``output``, in place (``addmm_`` into a strided view), instead of one product with the
        block-diagonal ``V`` (whose zero blocks cost as much as the rest) and a new output. Returns
        ``output``."""
        v = self._pair.v
        flat, z = output.view(-1, output.shape[-1]), z.reshape(-1, z.shape[-1])
        if inc.columns or inc.slices == 1:
            flat.addmm_(z, v.t())
            return output
        width, rank = v.shape
        for number in range(inc.slices):
            flat.narrow(1, number * width, width).addmm_(z.narrow(1, number * rank, rank), v.t())
        return output

    def delta_weight(self, inc: Increment, core: torch.Tensor) -> torch.Tensor:
        """``s V K U`` of one target, laid out as its rows of the producer's weight (fc2: all of them)."""
        u, v = self._pair.u, self._pair.v
        r = u.shape[0]
        if inc.columns:  # r x (k r): slice j's columns [jr, (j+1)r) map onto input columns [jd, (j+1)d)
            slices = core.unflatten(1, (inc.slices, r)).permute(1, 0, 2)  # (k, r, r)
            return self.scale * torch.cat(list(v @ slices @ u), dim=1)
        slices = core.unflatten(0, (inc.slices, r))  # (k, r, r): rows [jr, (j+1)r) are slice j
        return self.scale * (v @ slices @ u).flatten(0, 1)

    def merge_refusal(self, host: nn.Module) -> Optional[str]:
        return fold_refusal(host, self.producers(), pointwise=True)

    def merge_into(self, host: nn.Module) -> None:
        with torch.no_grad():
            cores = self.cores()
            for inc in self.increments:
                weight = foldable_weight(host.get_submodule(inc.producer), pointwise=True)
                assert weight is not None  # checked by merge() before anything changed
                add_to_rows(weight, inc.write, getattr(self, f"index_{inc.name}", None), self.delta_weight(inc, cores[inc.name]))


def _increments(host: HostTargets, width: int, method: str, where: str) -> List[Increment]:
    """The targets of ``host`` as increments; UnsupportedBlockError when a width does not fit the
    shared d x r factors."""
    found = []
    for target in host.targets:
        name, out, given = target.name, target.projection.width, target.in_features
        if given is None:
            raise UnsupportedBlockError(
                f"method {method!r} cannot tell the input width of target {name!r} in {where} "
                f"({type(target.producer).__name__})"
            )
        columns = name == "fc2"
        slices, rest = divmod(given if columns else out, width)
        fits = rest == 0 and slices > 0 and (given == width if not columns else out == width)
        if name in ATTENTION_TARGETS:
            fits = fits and slices == 1
        if not fits:
            raise UnsupportedBlockError(
                f"method {method!r} needs target {name!r} in {where} to map width {width} to width {width} "
                f"(fc1: to a multiple of it; fc2: from one), as its shared U ({width} -> r) and V (r -> {width}) "
                f"do; it maps {given} to {out}"
            )
        found.append(Increment(name, target.projection.module, target.write, slices, columns))
    return found


class _FactPlanner:
    """Plans the blocks of one apply call and the factors they share (one module, returned with the
    first block planned)."""

    def __init__(self, model: nn.Module, options: FactOptions, chosen: int) -> None:
        self.model = model
        self.options = options
        self.chosen = chosen
        self.shared: Optional[SharedFactors] = None

    def plan_block(self, block: Block, options: FactOptions, context: PlanContext) -> List[Insertion]:
        method = context.method
        where = f"block {block.index} ({block.path!r})"
        hosts = resolve_targets(block, ATTENTION_TARGETS + MLP_TARGETS, method)
        attention, mlp = hosts
        width = block.attention.in_features  # type: ignore[union-attr]  # resolve_targets found it
        planned = [_increments(attention, width, method, where), _increments(mlp, width, method, where)]
        if block.mlp is not None and block.mlp.in_features != width:
            raise UnsupportedBlockError(f"method {method!r} needs the MLP of {where} to read width {width}")
        insertions: List[Insertion] = []
        if self.shared is None:
            kwargs = context.factory_kwargs(attention.targets[0].producer, attention.module)
            self.shared = SharedFactors(options, method, context.recorded, **kwargs)
            insertions.append(Insertion(SHARED_BLOCK, "", self.model, CHILD_PREFIX + method, self.shared, []))
        slices = planned[1][0].slices
        columns_in_all = self.chosen * (4 + 2 * slices)
        for host, increments in zip(hosts, planned):
            module = FactorTuning(
                host, increments, self.shared, width, options, columns_in_all, block.index, context
            )
            hooks = [
                Hook(host.producers()[producer], "forward", functools.partial(module.add_increment, producer))
                for producer in module.producers()
            ]
            insertions.append(Insertion(block.index, host.path, host.module, CHILD_PREFIX + method, module, hooks, host.patches))
        return insertions


class Fact(Method):
    name = "fact"
    Options = FactOptions
    mergeable = True

    @classmethod
    def plan(cls, model: nn.Module, layers: LayerSelection, options: FactOptions, context: PlanContext) -> List[Insertion]:
        """The chosen blocks, planned with the factors they share (one module, a child of ``model``)."""
        blocks, chosen = choose_blocks(model, layers, context)
        if any(isinstance(module, SharedFactors) for module in model.modules()):
            raise SurgeryError(
                f"method 'fact' is already applied to {type(model).__name__}: its factors are shared by the blocks "
                "of one apply call; remove it first, or apply it once with all the layers"
            )
        if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            raise SurgeryError(
                f"method 'fact' keeps its shared factors as a child of the model, and {type(model).__name__} "
                "runs (or lists) all of its children; wrap the model in a module of its own first"
            )
        planner = _FactPlanner(model, options, len(chosen))
        return plan_each_block(blocks, chosen, lambda block: planner.plan_block(block, options, context), context)


__all__ = ["Fact", "FactOptions", "FactorTuning", "SharedFactors"]
