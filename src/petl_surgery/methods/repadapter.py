"""RepAdapter (Luo et al., "Towards Efficient Visual Adaption via Structural Re-parameterization",
arXiv 2302.08106; code luogen1996/RepAdapter ``repadapter.py``).

A linear adapter on the input of the attention's q/k/v projection and of the MLP's first layer::

    R(x) = x + s * (B_g dropout(A x + a) + b)       A: h x d (dense), B_g: d x h, g groups
    x = x + attn(R1(norm1 x));  x = x + mlp(R2(norm2 x))          (the code's ``repblock``)

B_g is a grouped 1x1 convolution (``Conv1d(h, d, 1, groups=g)``): output channels
``[i d/g, (i+1) d/g)`` read hidden channels ``[i h/g, (i+1) h/g)``, i.e. a block-diagonal d x h matrix
(the code's ``sparse2dense``). There is no activation, so ``merge`` folds R into the projection that
follows it (the code's ``set_RepWeight``), and inference costs nothing::

    W' = W (I + s B A),   b' = b + s W (B a + b)

- Placement: R runs as a forward-pre hook on each producer of q, k, v and on the MLP's ``fc1`` (the first
  Linear of an MLP its block runs inline, as ``nn.TransformerEncoderLayer``'s ``linear1``), i.e. on
  exactly the input those layers read; MLPs whose input layer the site layer does not name are refused. On timm's Swin that input is the attention's padded windows:
  padded tokens then give ``b`` unmerged and ``b'`` merged alike, so merge stays exact (the code's Swin
  path adapts before the padding; the two agree whenever nothing is padded).
- Init (code): A xavier-uniform, a = 0, B and b zero: exactly the identity at start.
- Defaults (code): h = 8, g = 2, dropout 0.1 on ``A x + a``; s = 1 (the class default; the per-task
  configs ``configs/repblock/*.yaml`` choose it in 0.1..10). ``positions=("attention",)`` is the code's
  ``repattn``.
- Parameters are held in the code's layout: ``down`` = ``conv_A`` (``Conv1d(d, h, 1)``), ``up`` =
  ``conv_B`` (``Conv1d(h, d, 1, groups=g)``).
- Merge needs the projection to be a plain Linear or 1x1 Conv2d with a bias (the shift goes there), and
  no other branch reading that projection's input unless it is folded first (a LoRA applied before it);
  otherwise it is refused, naming why.

Trainable parameters per adapter: ``d h + h + d h / g + d``; two per block: ViT-B/16 (L 12, d 768),
h 8, g 2: 239,808; h 16: 461,184 (PETL_Vision's logged counts). The "0.22M" that tables quote is the
weights alone (24 (d h + d h / g) = 221,184): the paper's counting rule is not checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OptionError
from ..hooks import hook_owner
from ..sites import Block, Projection
from .base import (
    CHILD_PREFIX,
    SUBLAYERS,
    Hook,
    Insertion,
    MergeableModule,
    Method,
    PetlModule,
    UnsupportedBlockError,
    attention_of,
    block_diagonal,
    branch_input,
    check_number,
    check_positive_int,
    parse_sublayers,
)
from .planning import PlanContext
from .targets import HostTargets, ResolvedTarget, fold_refusal, foldable_weight, in_features, out_features, resolve_targets


@dataclass(frozen=True)
class RepAdapterOptions:
    """Options of ``"repadapter"``. Defaults are the code's (``RepAdapter``, ``set_RepAdapter``).

    Attributes:
        bottleneck: hidden width h (8).
        groups: g, the groups of B (2); h and the token width must be multiples of it.
        scale: s (1.0; tuned per task in the code's configs).
        dropout: dropout on ``A x + a``, in training only (0.1).
        positions: before which sublayers, among "attention" and "mlp" (default both, the code's
            ``repblock``; ("attention",) is its ``repattn``).
    """

    bottleneck: int = 8
    groups: int = 2
    scale: float = 1.0
    dropout: float = 0.1
    positions: Union[str, Sequence[str]] = SUBLAYERS

    def __post_init__(self) -> None:
        check_positive_int("repadapter", "bottleneck", self.bottleneck)
        check_positive_int("repadapter", "groups", self.groups)
        if self.bottleneck % self.groups:
            raise OptionError(
                f"option 'bottleneck' of method 'repadapter' must be a multiple of 'groups'; got "
                f"bottleneck={self.bottleneck}, groups={self.groups}"
            )
        check_number("repadapter", "scale", self.scale)
        check_number("repadapter", "dropout", self.dropout, low=0.0, high=1.0)
        object.__setattr__(self, "positions", parse_sublayers("repadapter", "positions", self.positions))


class ReparameterisableAdapter(MergeableModule):
    """One RepAdapter on the input of one host's producers (an attention's q/k/v projections, or an
    MLP's ``fc1``), applied by forward-pre hooks: ``x -> x + s (B dropout(A x + a) + b)``."""

    component = "repadapter"
    # W (x + delta(x)) + b_W adds a term computed from the producer's input, whatever forward hooks run
    # after it; branches that read the same input are checked by ``merge_refusal``.
    additive = True

    def __init__(
        self,
        host: HostTargets,
        width: int,
        options: RepAdapterOptions,
        block: int,
        context: PlanContext,
    ) -> None:
        super().__init__(context.method, context.recorded, block)
        kwargs = context.factory_kwargs(*host.producers().values(), host.module)
        self.channel_dim = host.channel_dim
        self.scale = float(options.scale)
        self.groups = options.groups
        self._producers = list(host.producers())
        self.down = nn.Conv1d(width, options.bottleneck, 1, **kwargs)
        self.up = nn.Conv1d(options.bottleneck, width, 1, groups=options.groups, **kwargs)
        self.dropout = nn.Dropout(options.dropout)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def dense_up(self) -> torch.Tensor:
        """B as a dense d x h matrix: block-diagonal over the groups."""
        weight = self.up.weight[:, :, 0]
        if self.groups == 1:
            return weight
        width, per_group = weight.shape
        return block_diagonal(weight.view(self.groups, width // self.groups, per_group).unbind(0))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s (B dropout(A x + a) + b)`` for channels-last ``x``."""
        x = branch_input(x, self.down.weight)
        h = F.linear(x, self.down.weight[:, :, 0], self.down.bias)
        if self.training and self.dropout.p > 0:
            h = self.dropout(h)
        return F.linear(h, self.dense_up() * self.scale, self.up.bias * self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``R(x)`` along the host's channel dimension."""
        if self.channel_dim == -1:
            return x + self.delta(x).to(x.dtype)
        return x + self.delta(x.movedim(self.channel_dim, -1)).movedim(-1, self.channel_dim).to(x.dtype)

    def adapt_input(self, module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        return (self(args[0]), *args[1:])

    def producers(self) -> List[str]:
        return list(self._producers)

    def merge_refusal(self, host: nn.Module) -> Optional[str]:
        reason = fold_refusal(host, self._producers, pointwise=True, needs_bias=True)
        if reason is not None:
            return reason
        for producer in self._producers:
            layer = host.get_submodule(producer)
            for hooks in (layer._forward_pre_hooks, layer._forward_hooks):
                for hook in hooks.values():
                    owner = hook_owner(hook)
                    if not isinstance(owner, PetlModule) or owner is self:
                        continue
                    if isinstance(owner, MergeableModule) and (not owner.additive or owner.order < self.order):
                        continue  # folded into the same weight in a way that commutes, or before this one
                    later = " and was applied after it (merge folds in apply order)" if isinstance(owner, MergeableModule) else ""
                    return (
                        f"the {owner.method} branch on {producer!r} reads the input this RepAdapter changes{later}; "
                        "remove that method first"
                    )
        return None

    def merge_into(self, host: nn.Module) -> None:
        """``W <- W (I + s B A)`` and ``b <- b + s W (B a + b_B)`` on each producer (checked mergeable)."""
        with torch.no_grad():
            dense_up = self.dense_up()
            mixing = (dense_up @ self.down.weight[:, :, 0]) * self.scale
            shift = (dense_up @ self.down.bias + self.up.bias) * self.scale
            for producer in self._producers:
                layer = host.get_submodule(producer)
                weight = foldable_weight(layer, pointwise=True)
                assert weight is not None and layer.bias is not None  # checked by merge_refusal
                rows = weight.view(weight.shape[0], -1)
                layer.bias.add_((rows @ shift.to(rows.dtype)).to(layer.bias.dtype))
                rows.add_(rows @ mixing.to(rows.dtype))


class RepAdapter(Method):
    name = "repadapter"
    Options = RepAdapterOptions
    mergeable = True
    takes_branch_dtype = True

    @classmethod
    def plan_block(cls, block: Block, options: RepAdapterOptions, context: PlanContext) -> List[Insertion]:
        method = context.method
        names: List[str] = []
        if "attention" in options.positions:
            attention = attention_of(block, method, refusal=None)
            names += [role for role in ("q", "k", "v") if role in attention.projections]
        inline = None
        if "mlp" in options.positions:
            mlp = block.mlp
            if mlp is not None and "fc1" not in mlp.projections and mlp.input_module is not None:
                inline = _inline_mlp_input(block, mlp.input_module)
            else:
                names.append("fc1")
        hosts = resolve_targets(block, names, method) if names else []
        if inline is not None:
            hosts.append(inline)
        seen: Dict[int, str] = {}
        insertions = []
        for host in hosts:
            widths = {target.in_features for target in host.targets}
            width = widths.pop() if len(widths) == 1 else None
            if width is None:
                raise UnsupportedBlockError(
                    f"method {method!r} cannot tell one input width for the projections of {host.path!r} in "
                    f"block {block.index}"
                )
            if width % options.groups:
                raise UnsupportedBlockError(
                    f"method {method!r} with groups={options.groups} needs a token width divisible by it; "
                    f"{host.path!r} in block {block.index} reads {width} channels"
                )
            for name, producer in host.producers().items():
                if id(producer) in seen:
                    raise UnsupportedBlockError(
                        f"method {method!r} would adapt the input of {name!r} in block {block.index} twice: "
                        f"the attention and the MLP read it through one projection ({seen[id(producer)]!r})"
                    )
                seen[id(producer)] = name
            adapter = ReparameterisableAdapter(host, width, options, block.index, context)
            hooks = [Hook(producer, "forward_pre", adapter.adapt_input) for producer in host.producers().values()]
            insertions.append(Insertion(block.index, host.path, host.module, CHILD_PREFIX + method, adapter, hooks, host.patches))
        return insertions


def _inline_mlp_input(block: Block, layer: nn.Module) -> HostTargets:
    """The input layer of an MLP its block runs inline (``nn.TransformerEncoderLayer``'s ``linear1``) as
    the one target of a host that is the block itself."""
    path = next(name for name, module in block.module.named_modules() if module is layer)
    width = in_features(layer)
    channels = out_features(layer)
    if width is None or channels is None:
        raise UnsupportedBlockError(
            f"the input layer {path!r} of the MLP in block {block.index} is a {type(layer).__name__}, not a Linear or Conv2d"
        )
    target = ResolvedTarget("fc1", Projection(path, 0, channels), layer, width)
    return HostTargets(block.path, block.module, -1, (target,), [])
