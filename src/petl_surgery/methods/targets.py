"""Semantic projection targets ("q", "k", "v", "proj", "fc1", "fc2") of the methods that act on one
projection's output channels at a time (LoRA, SSF), resolved against a block's site descriptions."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from ..errors import SurgeryError
from ..patches import Patch, host_patches
from ..sites import Block, Projection
from .base import CHILD_PREFIX, Hook, Insertion, UnsupportedBlockError, Write, attention_of

ATTENTION_TARGETS = ("q", "k", "v", "proj")
MLP_TARGETS = ("fc1", "fc2")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS


def parse_targets(method: str, value: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """The targets option as a tuple; raises SurgeryError for unknown, repeated or no names."""
    targets = (value,) if isinstance(value, str) else tuple(value)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
        raise SurgeryError(
            f"option 'targets' of method {method!r} must name distinct projections among "
            f"{', '.join(TARGETS)}; got {value!r}"
        )
    return targets


@dataclass(frozen=True)
class ResolvedTarget:
    """One target: its producer module (and path relative to the host), the channels of the producer's
    output it covers, and the width of the producer's input (None when it cannot be told)."""

    name: str
    projection: Projection
    producer: nn.Module
    in_features: Optional[int]

    @property
    def write(self) -> Write:
        p = self.projection
        return Write(0, p.start, p.width, p.index)


@dataclass(frozen=True)
class HostTargets:
    """The targets of one host (a block's attention or its MLP), in the order asked."""

    path: str
    module: nn.Module
    channel_dim: int
    targets: Tuple[ResolvedTarget, ...]
    patches: Sequence[Patch]

    def producers(self) -> Dict[str, nn.Module]:
        """Producer path (relative to the host) -> producer module, in target order."""
        return {t.projection.module: t.producer for t in self.targets}


def resolve_targets(block: Block, names: Sequence[str], method: str) -> List[HostTargets]:
    """The hosts and targets of ``names`` in ``block``; raises UnsupportedBlockError naming what is
    missing. Attention targets need no softmax attention: a projection is a projection."""
    where = f"block {block.index} ({block.path!r})"
    hosts = []
    attention_names = [t for t in names if t in ATTENTION_TARGETS]
    mlp_names = [t for t in names if t in MLP_TARGETS]
    if attention_names:
        site = attention_of(block, method, refusal=None)
        available: Dict[str, Projection] = dict(site.projections)
        if site.output is not None:
            available["proj"] = site.output
        targets = _resolve(method, where, site.path, site.module, attention_names, available, site.producer, site.in_features)
        hosts.append(HostTargets(site.path, site.module, site.channel_dim, targets, host_patches(site.module, dict(site.patches))))
    if mlp_names:
        mlp = block.mlp
        if mlp is None:
            raise UnsupportedBlockError(f"method {method!r} needs an MLP in {where}; it has none")
        targets = _resolve(method, where, mlp.path, mlp.module, mlp_names, dict(mlp.projections), mlp.module.get_submodule, None)
        hosts.append(HostTargets(mlp.path, mlp.module, mlp.channel_dim, targets, []))
    return hosts


def _resolve(
    method: str,
    where: str,
    host_path: str,
    host: nn.Module,
    names: Sequence[str],
    available: Dict[str, Projection],
    producer_of,
    qkv_in_features: Optional[int],
) -> Tuple[ResolvedTarget, ...]:
    missing = [name for name in names if name not in available]
    if missing:
        raise UnsupportedBlockError(
            f"targets {', '.join(missing)} of method {method!r} are not available in {where}: "
            f"{host_path!r} ({type(host).__name__}) offers {', '.join(available) or 'none'}"
        )
    resolved = []
    for name in names:
        producer = producer_of(available[name].module)
        width = qkv_in_features if name in ("q", "k", "v") else in_features(producer)
        resolved.append(ResolvedTarget(name, available[name], producer, width))
    return tuple(resolved)


def in_features(layer: nn.Module) -> Optional[int]:
    """The input width of a Linear or a Conv2d; None for anything else."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels
    return None


def foldable_weight(producer: nn.Module, *, pointwise: bool) -> Optional[nn.Parameter]:
    """The weight a per-output-channel change can be folded into: that of a plain Linear or convolution
    whose output is the hooked output itself (not, say, a Linear followed by a BatchNorm); with
    ``pointwise`` (a low-rank update of the input features), only a Linear or a 1x1 Conv2d of one
    group."""
    if type(producer) is nn.Linear:
        return producer.weight
    if pointwise:
        if type(producer) is nn.Conv2d and producer.kernel_size == (1, 1) and producer.groups == 1:
            return producer.weight
        return None
    if type(producer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return producer.weight
    return None


def fold_refusal(host: nn.Module, producers: Sequence[str], *, pointwise: bool, needs_bias: bool = False) -> Optional[str]:
    """Why a per-channel change of ``producers`` (paths under ``host``) cannot be folded into their
    weights (see ``foldable_weight``; ``needs_bias``: and biases), or None when it can."""
    kinds = "a plain Linear or 1x1 Conv2d" if pointwise else "a plain Linear or convolution"
    for producer in producers:
        layer = producer_module(host, producer)
        if layer is None:
            return f"its target {producer!r} is projection math the model does inline; there is no weight to fold into"
        if foldable_weight(layer, pointwise=pointwise) is None:
            return f"its target {producer!r} is a {type(layer).__name__}, not {kinds}"
        if needs_bias and getattr(layer, "bias", None) is None:
            return f"its target {producer!r} has no bias to fold the shift into"
    return None


def insertions_per_host(
    block: Block,
    hosts: Sequence[HostTargets],
    method: str,
    build: Callable[[HostTargets], Any],
    hook: str,
) -> List[Insertion]:
    """One inserted module per host (``build(host)``, a child of the host), whose method ``hook``
    (called with the producer's path first) is a forward hook on each of the host's producers."""
    insertions = []
    for host in hosts:
        module = build(host)
        hooks = [
            Hook(producer, "forward", functools.partial(getattr(module, hook), name))
            for name, producer in host.producers().items()
        ]
        insertions.append(Insertion(block.index, host.path, host.module, CHILD_PREFIX + method, module, hooks, host.patches))
    return insertions


def producer_module(host: nn.Module, producer: str) -> Optional[nn.Module]:
    """The producer at ``producer`` under ``host``, or None when it is not a submodule of the model (a
    stand-in that a site's patches add for projection math the host does inline)."""
    try:
        return host.get_submodule(producer)
    except AttributeError:
        return None
