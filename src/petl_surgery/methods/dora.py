"""DoRA, weight-decomposed low-rank adaptation (Liu et al., ICML 2024, arXiv 2402.09353), on LoRA's
targets and with LoRA's module.

Each target's weight rows are split into a magnitude and a direction, and LoRA adapts the direction::

    W' = m * (W0 + s B A) / n,    n = ||W0 + s B A|| per output row (L2 over the inputs), detached
    A: r x d_in (kaiming-uniform), B: d_out x r (zero), m: d_out, init ||W0|| per row, s = alpha / r

(the paper's column norm ``||.||_c`` in its ``x W`` notation is the row norm of nn.Linear's ``W``;
section 4.3 treats ``n`` as a constant in backward, as PEFT's ``weight_norm.detach()`` and NVlabs'
reference do). At init B = 0 and m = n, so ``W' = W0`` exactly. The bias is untouched.

Computed as PEFT's ``DoraLinearLayer`` (peft 0.21, ``tuners/lora/dora.py``), added to the target's
output channels by a forward hook::

    y = base(x) + (m/n - 1) * W0 x~ + (m/n) * s B A x~,    x~ = dropout(x)

where ``W0 x~`` is the producer's own output minus its bias when that output is the plain projection
(DoRA's hook runs first on it) and x~ = x (eval, or dropout 0), as PEFT does; otherwise ``W0 x~`` is
computed again. ``n`` always uses the producer's stored weight ``W0``: another method's update on the
same projection (a LoRA applied before) is added beside DoRA's, not normalised by it.

Targets are LoRA's ("q", "k", "v", "qkv", "proj", "fc1", "fc2"; see :mod:`.targets`); each needs a
plain Linear or 1x1 Conv2d producer (DoRA reads its weight). Rows are independent, so DoRA on q, k and
v slices of a fused qkv equals DoRA on the whole fused Linear with A copied and B, m split by rows.
Parameters per target: ``r (d_in + d_out) + d_out``; targets q and v of a ViT with L blocks of width
d: ``2 L (2 d r + d)`` (ViT-B/16, r = 8: 313,344).

Mergeable: ``W <- W + (m/n - 1) W0 + (m/n) s B A`` row-wise (= ``m/n (W0 + s B A)`` on the plain
projection), ``n`` and ``W0`` read before anything is folded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import hook_owner
from ..errors import UnsupportedModelError
from .base import UnsupportedBlockError, branch_input, replaced_slice
from .planning import PlanContext
from .lora import Lora, LoraOptions, LowRankAdapter, Target
from .targets import HostTargets, ResolvedTarget, add_to_rows, foldable_weight


@dataclass(frozen=True)
class DoraOptions(LoraOptions):
    """Options of ``"dora"``: LoRA's (rank r 8, alpha None = r, dropout 0.0, targets ("q", "v")).

    The DoRA paper adapts q, k, v (and the MLP) of LLaMA with r 8-32 and s = alpha / r; PEFT's
    ``LoraConfig(use_dora=True)`` takes the same options as its LoRA, which these mirror. ``dropout``
    acts on the input of both DoRA terms, as in PEFT.
    """

    method: ClassVar[str] = "dora"


def _rows(weight: torch.Tensor, target: Target, index: Optional[torch.Tensor]) -> torch.Tensor:
    """The target's rows of a producer's weight, as a matrix (out, in)."""
    matrix = weight.view(weight.shape[0], -1)
    if index is None:
        return matrix.narrow(0, target.write.output_start, target.write.width)
    return matrix.index_select(0, index)


class WeightDecomposedAdapter(LowRankAdapter):
    """The DoRA of one host: LoRA's pairs (``lora_A``, ``lora_B``) with a ``magnitude`` per target, and a
    forward hook on each producer that rescales its target rows (see the module docstring)."""

    component = "dora"

    def __init__(self, host: HostTargets, options: DoraOptions, block: int, context: PlanContext) -> None:
        super().__init__(host, options, block, context)
        for target, resolved in zip(self.targets, host.targets):
            weight = foldable_weight(resolved.producer, pointwise=True)
            assert weight is not None  # checked by Dora.check_target
            kwargs = context.factory_kwargs(resolved.producer, host.module)
            if kwargs["device"].type == "meta":  # planned for its sizes only (``SIZES_ONLY``)
                magnitude = torch.empty(target.write.width, **kwargs)
            else:
                with torch.no_grad():
                    magnitude = self._norm(_rows(weight, target, self._index(target)), target)
            self.pair(target.name).magnitude = nn.Parameter(magnitude)
        self._merge_deltas: Dict[str, torch.Tensor] = {}

    def _index(self, target: Target) -> Optional[torch.Tensor]:
        return getattr(self, f"index_{target.name}", None)

    def _norm(self, rows: torch.Tensor, target: Target) -> torch.Tensor:
        """``||W0 + s B A||`` per row, detached (the paper's 4.3), as PEFT's ``get_weight_norm``."""
        pair = self.pair(target.name)
        update = (pair.lora_B @ pair.lora_A).detach().to(rows.dtype)
        return torch.linalg.norm(rows + self.scaling * update, dim=1).detach()

    def _scales(self, producer: str, weight: torch.Tensor, channels: int) -> torch.Tensor:
        """``m / n`` over all ``channels`` of ``producer``'s output: 1 on channels no target covers."""
        stack = self._stacks[producer]
        targets = [t for t in self.targets if t.producer == producer]
        scales = [self.pair(t.name).magnitude / self._norm(_rows(weight, t, self._index(t)), t) for t in targets]
        if stack.tiles == channels:
            return scales[0] if len(scales) == 1 else torch.cat(scales)
        placed = scales[0].new_ones(channels)
        for target, scale in zip(targets, scales):
            index = self._index(target)
            if index is None:
                start = target.write.output_start
                placed = replaced_slice(placed, 0, start, scale)
            else:
                placed = placed.index_copy(0, index, scale)
        return placed

    def _first_on(self, module: nn.Module) -> bool:
        """Whether this module's hook is the first forward hook of ``module`` (its output is the plain
        projection's when the hook runs)."""
        first = next(iter(module._forward_hooks.values()), None)
        return first is not None and hook_owner(first) is self

    def add_weight_decomposed(self, producer: str, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """``output + (m/n - 1) W0 x~ + (m/n) s B A x~`` on the targets' channels of ``producer``."""
        dim = self.channel_dim
        stack = self._stacks[producer]
        out = output if dim == -1 else output.movedim(dim, -1)
        x = branch_input(args[0] if dim == -1 else args[0].movedim(dim, -1), self.pair(stack.names[0]).lora_A)
        dropped = self.training and self.dropout.p > 0
        if dropped:
            x = self.dropout(x)
        weight = module.weight
        if not isinstance(weight, torch.Tensor):  # a quantized projection packs its weight (weight() is a method)
            raise UnsupportedModelError(
                f"DoRA on {producer!r} reads the float weight of its projection, which "
                f"{type(module).__module__}.{type(module).__name__} does not hold (a quantized layer packs it): merge "
                "DoRA into the base first (petl_surgery.merge), then quantize"
            )
        channels = out.shape[-1]
        scale = self._scales(producer, weight, channels).to(out.dtype)
        update = F.linear(F.linear(x, self._stacked_a(stack)), self._placed_b(stack, channels)).to(out.dtype)
        if not dropped and self._first_on(module):
            # out = W0 x + b, so out + (m/n - 1)(out - b) + (m/n) U = (m/n)(out + U) - (m/n - 1) b: two passes
            if module.bias is None:
                result = (out + update) * scale
            else:
                result = torch.addcmul((1 - scale) * module.bias.to(out.dtype), scale, out + update)
        else:
            base = F.linear(x, weight.view(weight.shape[0], -1).to(x.dtype)).to(out.dtype)
            result = torch.addcmul(torch.addcmul(out, scale - 1, base), scale, update)
        return result if dim == -1 else result.movedim(-1, dim)

    def before_merge(self, host: nn.Module) -> None:
        """Each target's row update ``(m/n - 1) W0 + (m/n) s B A``, from the weights as they are now."""
        with torch.no_grad():
            for target in self.targets:
                weight = host.get_submodule(target.producer).weight
                rows = _rows(weight, target, self._index(target))
                pair = self.pair(target.name)
                scale = (pair.magnitude / self._norm(rows, target)).to(rows.dtype)[:, None]
                update = self.scaling * (pair.lora_B @ pair.lora_A).to(rows.dtype)
                self._merge_deltas[target.name] = (scale - 1) * rows + scale * update

    def merge_into(self, host: nn.Module) -> None:
        """Add the updates ``before_merge`` took to the targets' rows (checked mergeable)."""
        with torch.no_grad():
            for target in self.targets:
                weight = host.get_submodule(target.producer).weight
                add_to_rows(weight, target.write, self._index(target), self._merge_deltas.pop(target.name))


class Dora(Lora):
    name = "dora"
    Options = DoraOptions
    takes_branch_dtype = False  # its weight-norm forward reads the projection's weight: not offered
    adapter = WeightDecomposedAdapter
    hook = "add_weight_decomposed"

    @classmethod
    def check_target(cls, host: HostTargets, target: ResolvedTarget, method: str) -> None:
        super().check_target(host, target, method)
        if foldable_weight(target.producer, pointwise=True) is None:
            raise UnsupportedBlockError(
                f"method {method!r} needs the weight of target {target.name!r} in {host.path!r} to normalise its "
                f"rows, but its producer is a {type(target.producer).__name__}, not a plain Linear or 1x1 Conv2d"
            )


__all__: List[str] = ["Dora", "DoraOptions", "WeightDecomposedAdapter"]
