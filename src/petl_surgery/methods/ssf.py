"""SSF, scaling and shifting features (Lian et al., NeurIPS 2022, arXiv 2210.08823).

After each target projection, its output channels are scaled and shifted::

    y = gamma * x + beta        gamma, beta: one value per output channel of the target

Targets are the semantic projections of LoRA: "q", "k", "v" (their channels of the attention's input
projection, whatever its layout), "qkv" (all channels of a fused ``[q | k | v]`` projection, as one
target), "proj", "fc1" (before the activation, as in the reference), "fc2".
The reference code (github.com/dongzelian/SSF) also scales and shifts the patch embedding and every
LayerNorm; here SSF covers the projections inside the blocks. SSF is mergeable: ``merge`` folds gamma
into the producer's weight rows and ``gamma * b + beta`` into its bias, leaving the plain model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..sites import Block, Projection
from .base import (
    CHILD_PREFIX,
    OUTSIDE_BLOCKS,
    Hook,
    Insertion,
    MergeableModule,
    Method,
    branch_input,
    check_choice,
    check_number,
)
from ..selection import LayerSelection
from ..wrappers import inner
from .planning import PlanContext, checked_by_name
from .patterns import LAYER, channel_dim, exclusive_targets, match_layers, parse_patterns
from .targets import HostTargets, ResolvedTarget, fold_refusal, insertions_per_host, parse_targets, resolve_targets

INITS = ("identity", "reference")


@dataclass(frozen=True)
class SsfOptions:
    """Options of ``"ssf"``.

    Attributes:
        targets: which projections get a scale and shift, among "q", "k", "v", "qkv", "proj", "fc1",
            "fc2" (default ("q", "k", "v", "proj", "fc1", "fc2"): the reference's ``qkv``, ``proj``,
            ``fc1`` and ``fc2``). "qkv" is one gamma and one beta over all 3d channels of a fused
            ``[q | k | v]`` projection (where one module produces exactly q, k and v, end to end); it
            cannot be named with "q", "k" or "v".
        init: "identity" (default): gamma = 1, beta = 0, so the output is unchanged right after apply
            (as with every method here that can be); "reference": gamma ~ N(1, std), beta ~ N(0, std),
            the reference's ``init_ssf_scale_shift``.
        std: the standard deviation of the reference init (0.02, the reference's); ignored with
            init "identity".
        modules: instead of ``targets``, regular expressions matched against whole module paths
            (``re.fullmatch``): every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` they
            match (grouped and depthwise convolutions too) gets a gamma and a beta per output channel,
            in blocks or not. None (default): the blocks' ``targets``, whose default is then the six
            above. ``layers`` cannot be given with it.
    """

    targets: Union[None, str, Sequence[str]] = None
    init: str = "identity"
    std: float = 0.02
    modules: Union[None, str, Sequence[str]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", parse_patterns("ssf", self.modules))
        targets = exclusive_targets("ssf", self.targets, self.modules, ("q", "k", "v", "proj", "fc1", "fc2"))
        object.__setattr__(self, "targets", None if targets is None else parse_targets("ssf", targets))
        check_choice("ssf", "init", self.init, INITS)
        check_number("ssf", "std", self.std, low=0.0)


class ScaleShift(nn.Module):
    """One target's ``scale`` (gamma) and ``shift`` (beta), one value per channel."""

    def __init__(self, width: int, options: SsfOptions, **kwargs: Any) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width, **kwargs))
        self.shift = nn.Parameter(torch.zeros(width, **kwargs))
        if options.init == "reference":
            nn.init.normal_(self.scale, mean=1.0, std=options.std)
            nn.init.normal_(self.shift, std=options.std)


class FeatureScaleShift(MergeableModule):
    """The SSF of one host (an attention or an MLP), one :class:`ScaleShift` per target, applied to its
    producers' outputs through forward hooks: ``out[channels] = gamma * out[channels] + beta``."""

    component = "ssf"
    additive = False

    def __init__(self, host: HostTargets, options: SsfOptions, block: int, context: PlanContext) -> None:
        super().__init__(context.method, context.recorded, block)
        self.channel_dim = host.channel_dim
        # producer -> its targets' names, in order
        self._targets: Dict[str, Tuple[str, ...]] = {}
        # producer -> the width its targets cover when they lie end to end from channel 0, in order; -1 if not
        self._tiles: Dict[str, int] = {}
        for target in host.targets:
            kwargs = context.factory_kwargs(target.producer, host.module)
            projection = target.projection
            self.add_module(target.name, ScaleShift(projection.width, options, **kwargs))
            channels = projection.index or range(projection.start, projection.start + projection.width)
            index = torch.tensor(list(channels), dtype=torch.long, device=kwargs["device"])
            self.register_buffer(f"index_{target.name}", index, persistent=False)
            covered = self._tiles.get(projection.module, 0)
            tiles = covered >= 0 and projection.index is None and projection.start == covered
            self._tiles[projection.module] = covered + projection.width if tiles else -1
            self._targets[projection.module] = self._targets.get(projection.module, ()) + (target.name,)

    def producers(self) -> List[str]:
        return list(self._targets)

    def vectors(self, producer: str, channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta) over all ``channels`` of ``producer``'s output: the targets' values on their
        channels, 1 and 0 on channels no target covers."""
        names = self._targets[producer]
        pairs = [getattr(self, name) for name in names]
        if self._tiles[producer] == channels:  # the targets lie end to end over the whole output
            if len(pairs) == 1:
                return pairs[0].scale, pairs[0].shift
            return torch.cat([p.scale for p in pairs]), torch.cat([p.shift for p in pairs])
        scale, shift = pairs[0].scale.new_ones(channels), pairs[0].shift.new_zeros(channels)
        for name, pair in zip(names, pairs):
            index = getattr(self, f"index_{name}")
            scale = scale.index_copy(0, index, pair.scale)
            shift = shift.index_copy(0, index, pair.shift)
        return scale, shift

    def scale_shift(self, producer: str, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """``beta + output * gamma`` along the channel dimension: one ``addcmul``, a new tensor (the
        producer's output stays as autograd saw it), computed in the dtype of gamma when it differs from
        the output's (``branch_dtype``) and cast back."""
        scale, shift = self.vectors(producer, output.shape[self.channel_dim])
        if self.channel_dim != -1:
            trailing = output.dim() - 1 - (self.channel_dim % output.dim())
            scale = scale.view(-1, *([1] * trailing))
            shift = shift.view(-1, *([1] * trailing))
        return torch.addcmul(shift, branch_input(output, scale), scale).to(output.dtype)

    def merge_refusal(self, host: nn.Module) -> Optional[str]:
        return fold_refusal(host, self.producers(), pointwise=False, needs_bias=True)

    def merge_into(self, host: nn.Module) -> None:
        """``W <- diag(gamma) W`` and ``b <- gamma * b + beta`` on each producer (checked mergeable)."""
        with torch.no_grad():
            for producer in self.producers():
                layer = host.get_submodule(producer)
                scale, shift = self.vectors(producer, layer.weight.shape[0])
                rows = layer.weight.view(layer.weight.shape[0], -1)
                rows.mul_(scale.to(rows.dtype)[:, None])
                layer.bias.mul_(scale.to(layer.bias.dtype)).add_(shift.to(layer.bias.dtype))


class Ssf(Method):
    name = "ssf"
    Options = SsfOptions
    mergeable = True
    takes_branch_dtype = True

    @classmethod
    def plan(cls, model: nn.Module, layers: LayerSelection, options: SsfOptions, context: PlanContext) -> List[Insertion]:
        """The blocks' projections (``targets``), or one :class:`FeatureScaleShift` per layer the
        ``modules`` patterns match, hosted by the layer."""
        if options.modules is None:
            return super().plan(model, layers, options, context)
        method = context.method
        insertions = []
        for path, layer in match_layers(inner(model), options.modules, method, lambda layer: None):
            width = layer.weight.shape[0]
            target = ResolvedTarget(LAYER, Projection("", 0, width), layer, layer.weight.shape[1])
            module = FeatureScaleShift(HostTargets(path, layer, channel_dim(layer), (target,), []), options, OUTSIDE_BLOCKS, context)
            hooks = [Hook(layer, "forward", functools.partial(module.scale_shift, ""))]
            insertions.append(Insertion(OUTSIDE_BLOCKS, path, layer, CHILD_PREFIX + method, module, hooks))
        return checked_by_name(insertions, layers, context)

    @classmethod
    def plan_block(cls, block: Block, options: SsfOptions, context: PlanContext) -> List[Insertion]:
        method = context.method
        def build(host: HostTargets) -> FeatureScaleShift:
            return FeatureScaleShift(host, options, block.index, context)

        return insertions_per_host(block, resolve_targets(block, options.targets, method), method, build, "scale_shift")
