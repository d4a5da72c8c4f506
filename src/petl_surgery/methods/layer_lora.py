"""LoRA on one layer chosen by name pattern (LoRA's ``modules`` option): an ``nn.Linear`` or an ``nn.Conv1d``,
``nn.Conv2d``, ``nn.Conv3d`` of one group, anywhere in a model.

    Linear:  y = W x + b + (alpha / r) B A x          A: r x d_in, B: d_out x r
    Conv:    y = conv(x; W) + b + (alpha / r) B conv(x; A)

For a convolution, A is a convolution to r channels with the layer's own kernel size, stride, padding,
dilation and padding mode (the layer computes it with its weight replaced by A), and B is a 1x1
convolution from r channels back (a d_out x r matrix over the channel dimension): PEFT's conv LoRA
(``peft.tuners.lora.layer._ConvNd``: A the layer's kernel, stride and padding, B a 1x1 convolution), whose
adapter files import and export as these tensors. Both are linear in x with the same geometry as W, so
``merge`` folds ``(alpha / r) B A`` (B times A flattened over its input channels and kernel, reshaped to
W's shape) into W exactly. Init as LoRA's: A kaiming-uniform (as the layer's own weight init), B zero.
Grouped convolutions are refused: their weight holds only ``d_in / groups`` input channels per output.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import CHILD_PREFIX, OUTSIDE_BLOCKS, Hook, Insertion, MergeableModule, branch_input
from .planning import PlanContext
from .patterns import LAYER, match_layers


def grouped_refusal(layer: nn.Module) -> Optional[str]:
    """Why LoRA cannot take ``layer`` (a grouped convolution), or None."""
    groups = getattr(layer, "groups", 1)
    if groups != 1:
        return f"is a grouped convolution (groups={groups}); LoRA here takes convolutions of one group"
    return None


class LayerPair(nn.Module):
    """``lora_A`` (r x d_in, or r x d_in x kernel for a convolution) and ``lora_B`` (d_out x r)."""

    def __init__(self, layer: nn.Module, rank: int, **kwargs: Any) -> None:
        super().__init__()
        weight = layer.weight
        self.lora_A = nn.Parameter(torch.empty(rank, *weight.shape[1:], **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], rank, **kwargs))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, nn.ConvNd, LoRA's code and PEFT


class LayerLowRank(MergeableModule):
    """The LoRA update of one layer, hosted by the layer itself (``<layer>.petl_lora``) and added to its
    output by a forward hook: ``out + scaling * B A dropout(x)``."""

    component = "lora"

    def __init__(self, layer: nn.Module, rank: int, alpha: float, dropout: float, context: PlanContext) -> None:
        super().__init__(context.method, context.recorded, OUTSIDE_BLOCKS)
        self.scaling = float(alpha) / rank
        self.convolution = not isinstance(layer, nn.Linear)
        self.dropout = nn.Dropout(dropout)
        self.add_module(LAYER, LayerPair(layer, rank, **context.factory_kwargs(layer)))

    def pair(self) -> LayerPair:
        return getattr(self, LAYER)

    def add_low_rank(self, layer: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        pair = self.pair()
        x = branch_input(args[0], pair.lora_A)
        if self.training and self.dropout.p > 0:
            x = self.dropout(x)
        a = pair.lora_A if self.scaling == 1.0 else pair.lora_A * self.scaling
        if self.convolution:
            hidden = layer._conv_forward(x, a, None)  # the layer's stride, padding, dilation and padding mode
            update = F.linear(hidden.movedim(1, -1), pair.lora_B).movedim(-1, 1)
        else:
            update = F.linear(F.linear(x, a), pair.lora_B)
        return output + update.to(output.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` in the shape of the layer's weight."""
        pair = self.pair()
        return (pair.lora_B @ pair.lora_A.flatten(1)).view(pair.lora_B.shape[0], *pair.lora_A.shape[1:]) * self.scaling

    def producers(self) -> List[str]:
        return [""]  # the host, the layer itself

    def merge_refusal(self, host: nn.Module) -> Optional[str]:
        return None  # match_layers admitted only plain layers of one group

    def merge_into(self, host: nn.Module) -> None:
        with torch.no_grad():
            host.weight.add_(self.delta_weight().to(host.weight.dtype))


def plan_layers(model: nn.Module, patterns: Tuple[str, ...], options: Any, context: PlanContext) -> List[Insertion]:
    """One :class:`LayerLowRank` per layer the patterns match (see :mod:`.patterns`)."""
    insertions = []
    method = context.method
    for path, layer in match_layers(model, patterns, method, grouped_refusal):
        module = LayerLowRank(layer, options.rank, options.alpha, options.dropout, context)
        hooks = [Hook(layer, "forward", module.add_low_rank)]
        insertions.append(Insertion(OUTSIDE_BLOCKS, path, layer, CHILD_PREFIX + method, module, hooks))
    return insertions
