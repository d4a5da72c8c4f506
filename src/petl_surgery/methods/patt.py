"""PATT, parallel attention (V-PETL, arXiv 2210.00788).

A small tanh bottleneck runs beside the attention's q/k/v projection on the same input and is added to
two (or three) of q, k and v::

    h       = tanh(x A + a)          A: d x m
    [D1|D2] = h B + b                B: m x 2d      (m x 3d in mode "qkv")
    mode kv:  k' = k + s * D1,  v' = v + s * D2

Everything after that (head split, scaling, relative-position bias, window masks, softmax, output
projection) is the model's own attention, untouched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..patches import host_patches
from ..sites import AttentionSite, Block
from .base import (
    CHILD_PREFIX,
    Hook,
    Insertion,
    Method,
    PetlModule,
    UnsupportedBlockError,
    added_into_channels,
    attention_of,
    branch_input,
    check_choice,
    check_number,
    check_positive_int,
    writes_for,
)
from .planning import PlanContext
from .fused import add_tanh_bottleneck_, fused_path_applies

MODES = {"kv": ("k", "v"), "qv": ("q", "v"), "qk": ("q", "k"), "qkv": ("q", "k", "v")}
INITS = ("zero", "reference")


@dataclass(frozen=True)
class PattOptions:
    """Options of ``"patt"``. Defaults are those of V-PETL's published Video Swin run.

    Attributes:
        mode: which of q, k, v get the branch: "kv" (default, the reference's "patt_kv"), "qv", "qk",
            "qkv".
        mid_dim: bottleneck width m (128, the reference's ``att_mid_dim``).
        scale: s, the factor on the branch output (0.8, the reference's ``att_prefix_scale``).
        init: "zero" (default): up projection zero, so the model's output is unchanged right after
            apply; "reference": PyTorch's default Linear init for both layers, as in the V-PETL code.
    """

    mode: str = "kv"
    mid_dim: int = 128
    scale: float = 0.8
    init: str = "zero"

    def __post_init__(self) -> None:
        check_choice("patt", "mode", self.mode, tuple(MODES))
        check_positive_int("patt", "mid_dim", self.mid_dim)
        check_number("patt", "scale", self.scale)
        check_choice("patt", "init", self.init, INITS)


class ParallelAttentionBranch(PetlModule):
    """The PATT branch of one attention layer; it adds ``scale * up(tanh(down(x)))`` into the outputs
    of the attention's q/k/v producers, through forward hooks on those producers (each producer's own
    input is the branch's input there)."""

    component = "patt"

    def __init__(
        self,
        site: AttentionSite,
        options: PattOptions,
        block: int,
        context: PlanContext,
    ) -> None:
        super().__init__(context.method, context.recorded, block)
        targets = [site.projections[role] for role in MODES[options.mode]]
        kwargs = context.factory_kwargs(site.producer(targets[0].module), site.module)
        self.scale = float(options.scale)
        self.channel_dim = site.channel_dim
        self.down = nn.Linear(site.in_features, options.mid_dim, bias=site.has_bias, **kwargs)
        self.up = nn.Linear(options.mid_dim, sum(t.width for t in targets), bias=site.has_bias, **kwargs)
        if options.init == "zero":
            nn.init.zeros_(self.up.weight)
            if self.up.bias is not None:
                nn.init.zeros_(self.up.bias)
        # producer path (relative to the attention) -> its writes; scattered channels as index buffers
        self.writes = writes_for(targets)
        # producer -> the rows [low, high) of ``up`` that its writes read
        self._rows = {
            producer: (min(w.branch_start for w in writes), max(w.branch_start + w.width for w in writes))
            for producer, writes in self.writes.items()
        }
        # producers whose writes are one contiguous run of channels take the fused path (see .fused)
        self._single_write = {
            producer: writes[0] for producer, writes in self.writes.items() if len(writes) == 1 and writes[0].index is None
        }
        for producer, writes in self.writes.items():
            for number, write in enumerate(writes):
                if write.index is not None:
                    index = torch.tensor(write.index, dtype=torch.long, device=kwargs["device"])
                    self.register_buffer(_index_name(producer, number), index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled branch output ``up(tanh(down(x)))``, channels last."""
        return self.up(torch.tanh(self.down(x)))

    def add_to_projection(self, producer: str, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """``output[channels of producer] += scale * up(tanh(down(x)))`` in place; with several producers
        (separate k and v projections), each computes only its own rows of ``up``. One contiguous run of
        channels in a channels-last output takes the fused path (``.fused``); anything else two linears,
        a tanh and one out-of-place add (a concatenation or ``index_add``) per run of channels."""
        dim = self.channel_dim
        low, high = self._rows[producer]
        up_weight, up_bias = self.up.weight, self.up.bias
        if high - low != up_weight.shape[0]:
            up_weight = up_weight.narrow(0, low, high - low)
            up_bias = None if up_bias is None else up_bias.narrow(0, low, high - low)
        single = self._single_write.get(producer)
        if single is not None and dim == -1 and fused_path_applies(output, args[0], self.down.weight):
            weights = (self.down.weight, self.down.bias, up_weight, up_bias)
            return add_tanh_bottleneck_(output, single.output_start, args[0], weights, self.scale)
        x = branch_input(args[0] if dim == -1 else args[0].movedim(dim, -1), self.down.weight)
        branch = F.linear(torch.tanh(F.linear(x, self.down.weight, self.down.bias)), up_weight, up_bias)
        if dim != -1:
            branch = branch.movedim(-1, dim)
        for number, write in enumerate(self.writes[producer]):
            part = branch.narrow(dim, write.branch_start - low, write.width)
            index = getattr(self, _index_name(producer, number)) if write.index is not None else None
            output = added_into_channels(output, dim, write, part, self.scale, index)
        return output


def _index_name(producer: str, number: int) -> str:
    return f"index_{producer.replace('.', '_')}_{number}"


class Patt(Method):
    name = "patt"
    Options = PattOptions
    takes_branch_dtype = True

    @classmethod
    def plan_block(
        cls, block: Block, options: PattOptions, context: PlanContext
    ) -> List[Insertion]:
        method = context.method
        site = attention_of(block, method)
        where = f"block {block.index} ({block.path!r})"
        missing = [role for role in MODES[options.mode] if role not in site.projections]
        if missing:
            raise UnsupportedBlockError(
                f"mode {options.mode!r} of method {method!r} needs {', '.join(missing)} from {where}, but its "
                f"attention {site.path!r} ({type(site.module).__name__}) only projects "
                f"{', '.join(site.projections)}; choose a mode among those"
            )
        branch = ParallelAttentionBranch(site, options, block.index, context)
        hooks = [
            Hook(site.producer(producer), "forward", functools.partial(branch.add_to_projection, producer))
            for producer in branch.writes
        ]
        patches = host_patches(site.module, dict(site.patches))
        return [Insertion(block.index, site.path, site.module, CHILD_PREFIX + method, branch, hooks, patches)]
