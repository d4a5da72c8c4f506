"""Bottleneck adapter: AdaptFormer's AdaptMLP (NeurIPS 2022), V-PETL's "BA".

    z = s * up(dropout(relu(down(LN_in?(x)))))          then LN_out?(z)
    parallel  : the MLP's output becomes mlp(x) + z(x)
    sequential: y = mlp(x);  output y + z(y)

Init is the "lora" init of both reference codes: down kaiming-uniform (PyTorch's Linear default), up
weight and both biases zero, so the model's output is unchanged right after apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SurgeryError
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
    factory_kwargs,
)

POSITIONS = ("parallel", "sequential")
LAYERNORMS = (None, "in", "out")
INPUTS = ("mlp", "residual")


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
            raise SurgeryError(
                "option 'input' of method 'adapter' must be 'mlp' with position='sequential': a sequential "
                f"adapter reads the MLP's output; got input={self.input!r}"
            )


class BottleneckAdapter(PetlModule):
    """One bottleneck adapter beside (or after) one MLP."""

    component = "adapter"

    def __init__(self, site: MlpSite, options: AdapterOptions, method: str, block: int, recorded: Mapping[str, Any]) -> None:
        super().__init__(method, recorded, block)
        kwargs = factory_kwargs(site.module)
        self.channel_dim = site.channel_dim
        width_in = site.out_features if options.position == "sequential" else site.in_features
        self.layernorm_in = nn.LayerNorm(width_in, **kwargs) if options.layernorm == "in" else None
        self.down = nn.Linear(width_in, options.bottleneck, **kwargs)
        self.dropout = nn.Dropout(options.dropout)
        self.up = nn.Linear(options.bottleneck, site.out_features, **kwargs)
        self.layernorm_out = nn.LayerNorm(site.out_features, **kwargs) if options.layernorm == "out" else None
        self.scale: Union[float, nn.Parameter]
        if options.scale == "learnable":
            self.scale = nn.Parameter(torch.ones(1, **kwargs))
        else:
            self.scale = float(options.scale)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self._residual: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution z (scaled, and normalised if ``layernorm="out"``).

        The scale is folded into the up projection's weight and bias (a few thousand numbers) rather
        than multiplied into the tokens, and dropout runs only when it can change something."""
        x = branch_input(x, self.down.weight)
        if self.layernorm_in is not None:
            x = self.layernorm_in(x)
        h = torch.relu(F.linear(x, self.down.weight, self.down.bias))
        if self.training and self.dropout.p > 0:
            h = self.dropout(h)
        z = F.linear(h, self.up.weight * self.scale, self.up.bias * self.scale)
        if self.layernorm_out is not None:
            z = self.layernorm_out(z)
        return z

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` along the site's channel dimension (channels first for 1x1-conv MLPs on NCHW)."""
        if self.channel_dim == -1:
            return self(x)
        return self(x.movedim(self.channel_dim, -1)).movedim(-1, self.channel_dim)

    def add_parallel(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output + self.contribution(args[0]).to(output.dtype)

    def add_sequential(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output + self.contribution(output).to(output.dtype)

    def read_residual(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        self._residual = self.contribution(args[0])

    def add_residual(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        z, self._residual = self._residual, None
        if z is None:
            raise RuntimeError(
                f"adapter of block {self.block}: the MLP's residual branch ended without having started; "
                "the block's forward does not follow its registered layout"
            )
        return output + z.to(output.dtype)


class Adapter(Method):
    name = "adapter"
    Options = AdapterOptions

    @classmethod
    def plan_block(cls, block: Block, options: AdapterOptions, method: str, recorded: Mapping[str, Any]) -> List[Insertion]:
        site = block.mlp
        if site is None:
            raise UnsupportedBlockError(
                f"method {method!r} needs an MLP in block {block.index} ({block.path!r}); it has none"
            )
        adapter = BottleneckAdapter(site, options, method, block.index, recorded)
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
        if isinstance(site.module, nn.Sequential):
            # a child of an nn.Sequential would run as one more layer of it: the block holds the adapter
            return [Insertion(block.index, block.path, block.module, CHILD_PREFIX + method, adapter, hooks)]
        return [Insertion(block.index, site.path, site.module, CHILD_PREFIX + method, adapter, hooks)]
