"""The hot path of a tanh bottleneck branch added in place into a slice of a producer's output.

``output[..., start:start + width] += scale * (tanh(x A^T + a) B^T + b)``, for channels-last outputs
(a Linear's), written without materialising the branch output: the up projection accumulates straight
into the output's channels (one ``addmm_`` into a strided view). In training, an autograd Function does
the backward by hand: the output's gradient passes through untouched (no copy of the producer's whole
gradient, which autograd's in-place-on-a-view bookkeeping makes), the branch reads its slice of it as a
strided view, and the only tensor it keeps is the bottleneck activation h (the input x is the
producer's own input, already kept by the producer).

The general path (PATT's ``add_to_projection``) serves every other case: scattered channels, channels
first, several writes per producer, autocast, a branch dtype other than the output's, and code being
traced by torch.compile, whose compiler fuses the plain ops itself.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .base import autocast_enabled

# (down weight, down bias, up weight, up bias); biases may be None
Weights = Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]


def fused_path_applies(output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether an in-place add into ``output`` can serve (``add_tanh_bottleneck_``, LoRA's no-grad path): a
    contiguous output that is no leaf requiring grad and, while autograd records, no view (the in-place
    write must own it; without grad, a view is a task's rows of a mixed batch, written where they lie),
    input and weight of one floating dtype, no autocast, an output that shares no memory with the input (a
    module that hands its input back), and not being traced by torch.compile, torch.export or an ONNX
    exporter."""
    return (
        not torch.compiler.is_compiling()  # first: what follows is not for the compiler to trace
        and not torch.jit.is_tracing()
        and output.is_contiguous()
        and output.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        and (output._base is None or not torch.is_grad_enabled())
        and not (output.requires_grad and output.is_leaf)
        and output.dtype == x.dtype == weight.dtype
        and output.is_floating_point()
        and not autocast_enabled(output.device.type)
    )


def adds_in_place(output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a branch's no-grad path may add into ``output`` in place (LoRA, the adapter, FacT): no
    autograd recording and :func:`fused_path_applies`."""
    return not torch.is_grad_enabled() and fused_path_applies(output, x, weight)


def add_tanh_bottleneck_(output: torch.Tensor, start: int, x: torch.Tensor, weights: Weights, scale: float) -> torch.Tensor:
    """``output[..., start:start + width] += scale * up(tanh(down(x)))`` in place, ``width`` the up
    projection's rows; returns ``output`` (the same tensor). Callers check ``fused_path_applies`` first."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (output, x, *weights)):
        return _TanhBottleneckAdd.apply(output, x, *weights, start, scale)
    _forward_(output, start, x, weights, scale)
    return output


def _forward_(output: torch.Tensor, start: int, x: torch.Tensor, weights: Weights, scale: float) -> torch.Tensor:
    """The in-place update; returns h, the bottleneck activation."""
    down_weight, down_bias, up_weight, up_bias = weights
    x2 = x.reshape(-1, x.shape[-1])
    if down_bias is None:
        h = torch.mm(x2, down_weight.t())
    else:
        h = torch.addmm(down_bias, x2, down_weight.t())
    h.tanh_()
    target = output.view(-1, output.shape[-1]).narrow(1, start, up_weight.shape[0])
    target.addmm_(h, up_weight.t(), alpha=scale)
    if up_bias is not None:
        target.add_(up_bias, alpha=scale)
    return h


class _TanhBottleneckAdd(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        output: torch.Tensor,
        x: torch.Tensor,
        down_weight: torch.Tensor,
        down_bias: Optional[torch.Tensor],
        up_weight: torch.Tensor,
        up_bias: Optional[torch.Tensor],
        start: int,
        scale: float,
    ) -> torch.Tensor:
        h = _forward_(output, start, x, (down_weight, down_bias, up_weight, up_bias), scale)
        ctx.mark_dirty(output)
        ctx.save_for_backward(x, h, down_weight, up_weight)
        ctx.start, ctx.scale = start, scale
        ctx.has_bias = (down_bias is not None, up_bias is not None)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, h, down_weight, up_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        grad2 = grad.reshape(-1, grad.shape[-1]).narrow(1, ctx.start, up_weight.shape[0])
        grad_up_weight = torch.mm(grad2.t(), h).mul_(ctx.scale) if needs[4] else None
        grad_up_bias = grad2.sum(0).mul_(ctx.scale) if needs[5] and ctx.has_bias[1] else None
        grad_x = grad_down_weight = grad_down_bias = None
        if needs[1] or needs[2] or needs[3]:
            grad_h = torch.mm(grad2, up_weight).mul_(ctx.scale)
            grad_z = torch.ops.aten.tanh_backward(grad_h, h)
            if needs[2]:
                grad_down_weight = torch.mm(grad_z.t(), x2)
            if needs[3] and ctx.has_bias[0]:
                grad_down_bias = grad_z.sum(0)
            if needs[1]:
                grad_x = torch.mm(grad_z, down_weight).view(x.shape)
        # the output's gradient passes through: the update added to it does not depend on it
        return grad, grad_x, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias, None, None
