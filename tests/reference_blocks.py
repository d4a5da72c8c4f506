"""timm's pre-norm blocks written out from their equations, with a method's equations inserted where its
paper puts them, for the parity tests of the adapter methods (Houlsby, Adapter+, Convpass, RepAdapter).

The reference runs on an untouched copy of each block (no surgery, no hooks) in float64; what a method
adds is written with plain tensor operations on the weights of the modules the library inserted.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Optional

import torch
from torch import nn

import petl_surgery as ps

Branch = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]


def pre_norm_block(
    block: nn.Module,
    x: torch.Tensor,
    attention: Optional[Branch] = None,
    mlp: Optional[Branch] = None,
    after: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """A timm pre-norm block (ViT's ``Block`` or Swin's ``SwinTransformerBlock``) in eval mode::

        x1  = x + ls1(attention(attn, norm1 x))       (plain: attention(attn, n) = attn(n))
        out = x1 + ls2(mlp(mlp, norm2 x1))
        out = after(out)

    Swin's ``_attn`` (windows, shifts, padding) is the attention call: a per-token map of its input or
    output commutes with them."""
    swin = hasattr(block, "_attn")
    shape = x.shape
    call = block._attn if swin else block.attn
    normed = block.norm1(x)
    y = call(normed) if attention is None else attention(call, normed)
    x1 = x + (y if swin else block.ls1(y))
    if swin:
        x1 = x1.reshape(shape[0], -1, shape[-1])
    normed = block.norm2(x1)
    y = block.mlp(normed) if mlp is None else mlp(block.mlp, normed)
    out = x1 + getattr(block, "ls2", nn.Identity())(y)
    if after is not None:
        out = after(out)
    return out.reshape(shape)


def assert_blocks_follow(
    model: nn.Module, x: torch.Tensor, apply: Callable[[nn.Module], None], reference: Callable[[nn.Module], Dict]
) -> int:
    """Apply the method to ``model`` (float64, ``apply(model)``; it randomises what it inserts), run it
    once, and check every block's output against :func:`pre_norm_block` on an untouched copy with the
    branches ``reference(block_module)`` gives. Returns the number of blocks compared."""
    model = model.double().eval()
    base = copy.deepcopy(model)
    apply(model)
    calls = []
    handles = [
        block.module.register_forward_hook(lambda m, args, out: calls.append((m, args[0], out)))
        for block in ps.blocks(model)
    ]
    with torch.no_grad():
        model(x.double())
    for handle in handles:
        handle.remove()
    twins = {id(b.module): twin.module for b, twin in zip(ps.blocks(model), ps.blocks(base))}
    assert len(calls) == len(twins)
    with torch.no_grad():
        for block, inputs, output in calls:
            expected = pre_norm_block(twins[id(block)], inputs, **reference(block))
            torch.testing.assert_close(output, expected, rtol=0, atol=1e-10)
    return len(calls)


def tiny_coatnet() -> nn.Module:
    """CoAtNet with one block a stage (seeded): BatchNorm in the stem and the MBConv stages, then
    attention with 1x1-convolution projections on NCHW maps."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "coatnet_nano_rw_224", img_size=64, embed_dim=(32, 64, 128, 256), depths=(1, 1, 1, 1), transformer_dim_head=16
    ).eval()
