"""Semantic projection targets of the methods that act on one projection's output channels at a time
(LoRA, SSF), resolved against a block's site descriptions.

- "q", "k", "v": the channels of the attention's input projection that produce them, whatever its
  layout (timm's fused ``qkv`` rows ``[q | k | v]``, separate Linears, per-head layouts).
- "qkv": the whole output of that projection as one target, available only where q, k and v come
  from one producer module and lie end to end over all of its output channels (timm's fused ``qkv``
  Linear), so that one update spans the fused weight as PEFT's LoRA on that Linear does. It overlaps
  "q", "k" and "v", so it cannot be named with them.
- "proj": the attention's output projection; "fc1", "fc2": the MLP's input and output layers.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import OptionError, SurgeryError
from ..patches import Patch, host_patches
from ..sites import AttentionSite, Block, Projection
from .base import CHILD_PREFIX, Hook, Insertion, UnsupportedBlockError, Write, attention_of

QKV_ROLES = ("q", "k", "v")
FUSED_QKV = "qkv"
# Targets whose producer reads the attention's input tokens (the site's ``in_features`` wide).
INPUT_PROJECTION_TARGETS = QKV_ROLES + (FUSED_QKV,)
ATTENTION_TARGETS = INPUT_PROJECTION_TARGETS + ("proj",)
MLP_TARGETS = ("fc1", "fc2")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS


def parse_targets(method: str, value: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """The targets option as a tuple; raises SurgeryError for unknown, repeated or no names, and for
    "qkv" named with any of "q", "k", "v" (their channels would get two updates)."""
    targets = (value,) if isinstance(value, str) else tuple(value)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
        raise OptionError(
            f"option 'targets' of method {method!r} must name distinct projections among "
            f"{', '.join(TARGETS)}; got {value!r}"
        )
    overlapping = [t for t in QKV_ROLES if t in targets] if FUSED_QKV in targets else []
    if overlapping:
        raise OptionError(
            f"option 'targets' of method {method!r} names 'qkv' together with {', '.join(map(repr, overlapping))}: "
            f"'qkv' holds the channels of q, k and v, so the targets would overlap; name 'qkv' alone or "
            f"q, k, v separately; got {value!r}"
        )
    return targets


def fused_qkv_refusal(site: AttentionSite) -> Optional[str]:
    """Why target "qkv" is not available at ``site`` (completing "qkv needs ..., but "), or None when
    q, k and v come from one producer and lie end to end as ``[q | k | v]`` over all its channels."""
    missing = [role for role in QKV_ROLES if role not in site.projections]
    if missing:
        return f"it has no {', '.join(missing)}"
    roles = [site.projections[role] for role in QKV_ROLES]
    modules = list(dict.fromkeys(p.module for p in roles))
    if len(modules) > 1:
        return f"q, k and v come from {len(modules)} modules ({', '.join(map(repr, modules))})"
    if any(p.index is not None for p in roles):
        return f"{modules[0]!r} lays q, k and v out per head, interleaved"
    if any(after.start != before.start + before.width for before, after in zip(roles, roles[1:])):
        return f"{modules[0]!r} does not lay q, k and v out end to end as [q | k | v]"
    producer = producer_module(site.module, modules[0])
    channels = out_features(producer) if producer is not None else None
    if channels is None:
        kind = type(producer if producer is not None else site.producer(modules[0])).__name__
        return f"the output width of {modules[0]!r} ({kind}) cannot be told"
    covered = sum(p.width for p in roles)
    if roles[0].start != 0 or channels != covered:
        return f"{modules[0]!r} also outputs {channels - covered} other channels"
    return None


def fused_qkv(site: AttentionSite) -> Optional[Projection]:
    """The projection of target "qkv" at ``site`` (all channels of the producer of q, k and v), or None
    where it is not available (see ``fused_qkv_refusal``)."""
    return _whole_qkv(site) if fused_qkv_refusal(site) is None else None


def _whole_qkv(site: AttentionSite) -> Projection:
    return Projection(site.projections["q"].module, 0, sum(site.projections[role].width for role in QKV_ROLES))


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
        why: Dict[str, str] = {}
        if FUSED_QKV in attention_names:
            reason = fused_qkv_refusal(site)
            if reason is None:
                available[FUSED_QKV] = _whole_qkv(site)
            else:
                why[FUSED_QKV] = f"qkv needs q, k and v to be the whole output of one module, but {reason}"
        if site.output is not None:
            available["proj"] = site.output
        if site.unsupported is not None:  # the registry's reason for an attention without q/k/v
            why.update({role: f"its attention {site.unsupported}" for role in QKV_ROLES if role not in available})
        targets = _resolve(
            method, where, site.path, site.module, attention_names, available, site.producer, site.in_features, why
        )
        hosts.append(HostTargets(site.path, site.module, site.channel_dim, targets, host_patches(site.module, dict(site.patches))))
    if mlp_names:
        mlp = block.mlp
        if mlp is None:
            raise UnsupportedBlockError(f"method {method!r} needs an MLP in {where}; it has none")
        host_path, host, available = mlp.path, mlp.module, dict(mlp.projections)
        if mlp.projections_on_block:
            # an inline MLP's layers are the block's children: the block holds the inserted module
            host_path, host = block.path, block.module
        elif isinstance(mlp.module, nn.Sequential):
            # a child of an nn.Sequential would run as one more layer of it: the block holds the module
            inside = mlp.path[len(block.path) + 1 :] if block.path else mlp.path
            host_path, host = block.path, block.module
            available = {name: dataclasses.replace(p, module=f"{inside}.{p.module}") for name, p in available.items()}
        targets = _resolve(method, where, host_path, host, mlp_names, available, host.get_submodule, None)
        hosts.append(HostTargets(host_path, host, mlp.channel_dim, targets, []))
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
    why: Optional[Dict[str, str]] = None,
) -> Tuple[ResolvedTarget, ...]:
    """The targets ``names`` among ``available``; raises UnsupportedBlockError naming the missing ones,
    with the reasons ``why`` gives for some of them."""
    missing = [name for name in names if name not in available]
    if missing:
        reasons = list(dict.fromkeys((why or {})[name] for name in missing if name in (why or {})))
        raise UnsupportedBlockError(
            f"targets {', '.join(missing)} of method {method!r} are not available in {where}: "
            f"{host_path!r} ({type(host).__name__}) offers {', '.join(available) or 'none'}"
            + "".join(f"; {reason}" for reason in reasons)
        )
    resolved = []
    for name in names:
        producer = producer_of(available[name].module)
        width = qkv_in_features if name in INPUT_PROJECTION_TARGETS else in_features(producer)
        resolved.append(ResolvedTarget(name, available[name], producer, width))
    return tuple(resolved)


def in_features(layer: nn.Module) -> Optional[int]:
    """The input width of a Linear or a Conv2d; None for anything else."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels
    return None


def out_features(layer: nn.Module) -> Optional[int]:
    """The output width of a Linear or a Conv2d; None for anything else."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
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


def add_to_rows(weight: torch.Tensor, write: Write, index: Optional[torch.Tensor], delta: torch.Tensor) -> None:
    """``weight``'s rows (as a matrix, out x in) of ``write`` (its scattered ``index`` when given) += ``delta``,
    in place."""
    rows = weight.view(weight.shape[0], -1)
    delta = delta.to(rows.dtype)
    if index is None:
        rows.narrow(0, write.output_start, write.width).add_(delta)
    else:
        rows.index_add_(0, index, delta)


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
            return f"{f'its target {producer!r}' if producer else 'its layer'} has no bias to fold the shift into"
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
