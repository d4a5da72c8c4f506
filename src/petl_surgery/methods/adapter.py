"""Bottleneck adapter: AdaptFormer's AdaptMLP (NeurIPS 2022), V-PETL's "BA".

    z = s * up(dropout(relu(down(LN_in?(x)))))          then LN_out?(z)
    parallel  : the MLP's output becomes mlp(x) + z(x)
    sequential: y = mlp(x);  output y + z(y)

Init is the "lora" init of both reference codes: down kaiming-uniform (PyTorch's Linear default), up
weight and both biases zero, so the model's output is unchanged right after apply.

:class:`BottleneckAdapter` is the module of every bottleneck-adapter method (``"adapter"``, ``"bapat"``,
``"houlsby"``, ``"adapter_plus"``); a :class:`Bottleneck` says what it computes (activation, scaling,
init, drop-path), each method's options dataclass which one it builds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OptionError, SurgeryError, SurgeryRuntimeError
from ..sites import Block, MlpSite
from .base import (
    CHILD_PREFIX,
    Hook,
    Insertion,
    Method,
    PetlModule,
    UnsupportedBlockError,
    branch_input,
    check_choice,
    check_number,
    check_positive_int,
)
from .fused import adds_in_place
from .planning import PlanContext

POSITIONS = ("parallel", "sequential")
LAYERNORMS = (None, "in", "out")
INPUTS = ("mlp", "residual")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
INITS = ("lora", "houlsby")


@dataclass(frozen=True)
class AdapterOptions:
    """Options of ``"adapter"``. Defaults are AdaptFormer's and V-PETL's.

    Attributes:
        bottleneck: hidden width r (64).
        scale: s (0.1), or "learnable": one trainable scalar initialised to 1.0, as AdaptFormer's
            ``learnable_scalar``.
        position: "parallel" (default, AdaptFormer) beside the MLP, or "sequential" after it
            (Houlsby/Pfeiffer style).
        layernorm: None (default), "in" (LayerNorm before the down projection) or "out" (after the
            scaled up projection), AdaptFormer's ``adapter_layernorm_option``.
        dropout: dropout after the ReLU (0.0; AdaptFormer's ViT code uses 0.1).
        input: what a parallel adapter reads: "mlp" (default, V-PETL's Video Swin: the MLP's input,
            after the block's norm, the adapter's output added inside the MLP's residual branch) or
            "residual" (AdaptFormer's ViT code: the block's residual stream before that norm, the
            adapter's output added after the MLP's drop-path and layer scale).
    """

    bottleneck: int = 64
    scale: Union[float, str] = 0.1
    position: str = "parallel"
    layernorm: Optional[str] = None
    dropout: float = 0.0
    input: str = "mlp"

    def __post_init__(self) -> None:
        check_positive_int("adapter", "bottleneck", self.bottleneck)
        if self.scale != "learnable":
            check_number("adapter", "scale", self.scale)
        check_choice("adapter", "position", self.position, POSITIONS)
        check_choice("adapter", "layernorm", self.layernorm, LAYERNORMS)
        check_number("adapter", "dropout", self.dropout, low=0.0, high=1.0)
        check_choice("adapter", "input", self.input, INPUTS)
        if self.position == "sequential" and self.input != "mlp":
            raise OptionError(
                "option 'input' of method 'adapter' must be 'mlp' with position='sequential': a sequential "
                f"adapter reads the MLP's output; got input={self.input!r}"
            )


@dataclass(frozen=True)
class Bottleneck:
    """What one bottleneck adapter computes: ``z = s * DP(up(dropout(act(down(LN_in?(x))))))``, then LN_out?.

    Attributes:
        width_in, width_out: token widths it reads and writes.
        bottleneck: hidden width r.
        scale: a number s; "learnable": one trainable scalar, initialised to 1 (AdaptFormer); "channel":
            one trainable value per output channel, initialised to 1 (Adapter+'s channel-wise scaling).
        layernorm: None, "in" or "out" (see :class:`AdapterOptions`).
        dropout: dropout after the activation, in training only.
        activation: "relu" (AdaptFormer), "gelu" (exact, timm's ``nn.GELU``: the ViT's own activation,
            as visinf/adapter_plus uses it) or "gelu_tanh" (the tanh approximation of Houlsby's
            google-research/adapter-bert).
        init: "lora": down kaiming-uniform (a = sqrt 5), up weight and both biases zero (the output is
            unchanged at start); "houlsby": both weights truncated normal (std ``init_std``, cut at
            +-2 std), both biases zero (near-identity, not exact).
        init_std: the standard deviation of the "houlsby" init.
        drop_path: per-sample stochastic depth on z, in training only (Adapter+'s ``drop_path``).
    """

    width_in: int
    width_out: int
    bottleneck: int
    scale: Union[float, str] = 0.1
    layernorm: Optional[str] = None
    dropout: float = 0.0
    activation: str = "relu"
    init: str = "lora"
    init_std: float = 0.01
    drop_path: float = 0.0


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


# module-level functions, so that a model carrying an adapter still pickles
_ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "gelu_tanh": gelu_tanh}


def mlp_bottleneck(site: MlpSite, options: AdapterOptions) -> Bottleneck:
    """The bottleneck of ``"adapter"`` on ``site``: it reads the MLP's output when sequential."""
    width_in = site.out_features if options.position == "sequential" else site.in_features
    return Bottleneck(
        width_in, site.out_features, options.bottleneck, options.scale, options.layernorm, options.dropout
    )


class BottleneckAdapter(PetlModule):
    """One bottleneck adapter beside (or after) one MLP or one output projection; what it computes is
    a :class:`Bottleneck`, where it reads and adds is the hooks its method registers."""

    component = "adapter"

    def __init__(
        self,
        shape: Bottleneck,
        channel_dim: int,
        reference: nn.Module,
        block: int,
        context: PlanContext,
    ) -> None:
        super().__init__(context.method, context.recorded, block)
        kwargs = context.factory_kwargs(reference)
        self.channel_dim = channel_dim
        self.activation = _ACTIVATIONS[shape.activation]
        self.drop_path = float(shape.drop_path)
        self.layernorm_in = nn.LayerNorm(shape.width_in, **kwargs) if shape.layernorm == "in" else None
        self.down = nn.Linear(shape.width_in, shape.bottleneck, **kwargs)
        self.dropout = nn.Dropout(shape.dropout)
        self.up = nn.Linear(shape.bottleneck, shape.width_out, **kwargs)
        self.layernorm_out = nn.LayerNorm(shape.width_out, **kwargs) if shape.layernorm == "out" else None
        self.scale: Union[float, nn.Parameter]
        if shape.scale == "learnable":
            self.scale = nn.Parameter(torch.ones(1, **kwargs))
        elif shape.scale == "channel":
            self.scale = nn.Parameter(torch.ones(shape.width_out, **kwargs))
        else:
            self.scale = float(shape.scale)
        if shape.init == "houlsby":
            std = shape.init_std
            for layer in (self.down, self.up):
                nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        self._residual: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution z (scaled, and normalised if ``layernorm="out"``).

        The scale is folded into the up projection's weight and bias (a few thousand numbers) rather
        than multiplied into the tokens, and dropout and drop-path run only when they can change
        something (drop-path scales whole samples, so it commutes with the channel scale)."""
        x = branch_input(x, self.down.weight)
        if self.layernorm_in is not None:
            x = self.layernorm_in(x)
        h = self.activation(F.linear(x, self.down.weight, self.down.bias))
        if self.training and self.dropout.p > 0:
            h = self.dropout(h)
        scale = self.scale
        if isinstance(scale, nn.Parameter) and scale.numel() > 1:
            weight, bias = self.up.weight * scale[:, None], self.up.bias * scale
        else:
            weight, bias = self.up.weight * scale, self.up.bias * scale
        z = F.linear(h, weight, bias)
        if self.layernorm_out is not None:
            z = self.layernorm_out(z)
        if self.training and self.drop_path > 0:
            z = drop_path(z, self.drop_path)
        return z

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` along the site's channel dimension (channels first for 1x1-conv MLPs on NCHW)."""
        if self.channel_dim == -1:
            return self(x)
        return self(x.movedim(self.channel_dim, -1)).movedim(-1, self.channel_dim)

    def add_parallel(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return self._added(output, self.contribution(args[0]), args[0])

    def add_sequential(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return self._added(output, self.contribution(output), output)

    def _added(self, output: torch.Tensor, contribution: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``output + contribution``: in place without grad (no second tensor as large as the output; in a
        mixed-task batch, the task's rows written where they lie), out of place for autograd."""
        if adds_in_place(output, x, self.down.weight):
            return output.add_(contribution.to(output.dtype))
        return output + contribution.to(output.dtype)

    def read_residual(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        self._residual = self.contribution(args[0])

    def add_residual(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output + self._take_residual().to(output.dtype)

    def keep_stream(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        """Forward-pre hook where the MLP's residual branch starts: keep the residual stream x."""
        self._residual = args[0]

    def add_after_stream(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """Forward hook where the MLP's residual branch y ends: ``y + z(x + y)``, so that the block's
        residual add gives ``x' + z(x')`` with ``x' = x + y``, the adapter on the block's stream after
        the MLP (Adapter+'s "post" position)."""
        stream = self._take_residual() + output
        return output + self.contribution(stream).to(output.dtype)

    def _take_residual(self) -> torch.Tensor:
        z, self._residual = self._residual, None
        if z is None:
            raise SurgeryRuntimeError(
                f"{self.method} adapter of block {self.block}: the MLP's residual branch ended without having "
                "started; the block's forward does not follow its registered layout"
            )
        return z


def drop_path(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth: each sample (dimension 0) of ``x`` zeroed with probability ``rate``, the others
    divided by ``1 - rate`` (timm's ``drop_path``)."""
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def mlp_host(block: Block, site: MlpSite) -> Tuple[str, nn.Module]:
    """Path and module that host an adapter of ``site``: the MLP, or its block when the MLP is an
    ``nn.Sequential`` (a child of it would run as one more layer)."""
    if isinstance(site.module, nn.Sequential):
        return block.path, block.module
    return site.path, site.module


def mlp_of(block: Block, method: str) -> MlpSite:
    """The MLP of ``block``; UnsupportedBlockError when it has none."""
    if block.mlp is None:
        raise UnsupportedBlockError(
            f"method {method!r} needs an MLP in block {block.index} ({block.path!r}); it has none"
        )
    return block.mlp


class Adapter(Method):
    name = "adapter"
    Options = AdapterOptions
    takes_branch_dtype = True

    @classmethod
    def plan_block(cls, block: Block, options: AdapterOptions, context: PlanContext) -> List[Insertion]:
        method = context.method
        site = mlp_of(block, method)
        adapter = BottleneckAdapter(mlp_bottleneck(site, options), site.channel_dim, site.module, block.index, context)
        if options.position == "sequential":
            hooks = [Hook(site.module, "forward", adapter.add_sequential)]
        elif options.input == "mlp" and site.input_module is None:
            hooks = [Hook(site.module, "forward", adapter.add_parallel)]
        elif options.input == "mlp":
            # an MLP its block runs inline: read the input where the MLP starts, add where it ends
            hooks = [
                Hook(site.input_module, "forward_pre", adapter.read_residual),
                Hook(site.module, "forward", adapter.add_residual),
            ]
        else:
            if site.residual_input is None or site.residual_output is None:
                raise SurgeryError(
                    f"option input='residual' of method {method!r} needs to know where the MLP's residual "
                    f"branch starts and ends in block {block.index} ({type(block.module).__name__}), and "
                    "the layout of that block class names none; use input='mlp'"
                )
            hooks = [
                Hook(site.residual_input, "forward_pre", adapter.read_residual),
                Hook(site.residual_output, "forward", adapter.add_residual),
            ]
        host_path, host = mlp_host(block, site)
        return [Insertion(block.index, host_path, host, CHILD_PREFIX + method, adapter, hooks)]
