"""Layouts of open_clip's transformers (``open_clip.transformer``), registered once open_clip is imported
(``registry.register_when_imported``: importing it takes seconds, so petl_surgery does not import it itself).

- ``ResidualAttentionBlock`` (the default ``block_type``)::

      x = x + ls_1(attn(ln_1(x)))             attn: nn.MultiheadAttention(batch_first=True)
      x = x + ls_2(mlp(ln_2(x)))              mlp: Sequential(c_fc, gelu, c_proj)

  Its attention is PyTorch's ``nn.MultiheadAttention``, described by :mod:`.torch_layouts` (a
  replacement forward routes the in-projection and the SDPA call through hookable modules, so PATT,
  LoRA, SSF on q/k/v and prefix tuning apply; the output projection is not called as a module, so there
  is no "proj" target). Its MLP is ``mlp`` with ``c_fc`` and ``c_proj`` as "fc1" and "fc2". The MLP's
  residual branch runs from ``ln_2``'s input to ``ls_2``'s output: layer scale (``ls_2``, a LayerScale
  or an Identity without ``ls_init_value``) scales the MLP's output and an adapter added to it (input
  "mlp"), and an adapter with input "residual" is added after it.
- ``CustomResidualAttentionBlock`` (``block_type='custom'``, or any of qk_norm, scaled cosine attention,
  head scaling, inner norms): the same MLP and residual branch; its attention, open_clip's ``Attention``,
  computes q/k/v by ``F.linear`` on ``in_proj_weight`` inline, so it offers no q/k/v projection (PATT,
  q/k/v targets and prefix tuning are refused, naming it) and only its ``out_proj`` (target "proj").
- ``VisionTransformer``: a flat token layout for VPT, ``[class | patches]``: the class token comes from
  ``class_embedding`` (one prefix token), ``positional_embedding`` is added before the blocks (so prompt
  tokens, inserted before the first chosen block, get no position, as in VPT), the blocks are
  ``transformer.resblocks``, and the prompts leave after the last one, before ``ln_post``, the pooling
  (``tok``, ``avg`` over tokens 1:, or the attentional pooler) and ``proj``.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .descriptors import AttentionSite, Block, Projection
from .registry import BlockLayout, register_attention, register_block
from .tokens import TokenLayout, refuse, register_token_layout

# x = x + ls_2(mlp(ln_2(x))), mlp = Sequential(c_fc, act, [ln,] c_proj)
RESIDUAL_BLOCK = BlockLayout(
    "attn", "mlp", residual_input="ln_2", residual_output="ls_2", mlp_layers=("c_fc", "c_proj")
)

CUSTOM_ATTENTION = (
    "is open_clip's Attention (block_type='custom'), which computes q, k and v with F.linear on its "
    "in_proj_weight inside its forward: there is no q/k/v projection module to operate on (its MLP and "
    "its out_proj, target 'proj', can be)"
)


def describe_custom_attention(path: str, attention: nn.Module) -> AttentionSite:
    """open_clip's ``Attention``: no q/k/v projection (refused for the methods that need one, naming
    why); its ``out_proj`` Linear, which its forward calls, is the output projection."""
    width = attention.out_proj.out_features
    return AttentionSite(
        path,
        attention,
        attention.out_proj.in_features,
        {},
        attention.in_proj_bias is not None,
        unsupported=CUSTOM_ATTENTION,
        output=Projection("out_proj", 0, width),
    )


def vision_token_layout(model: nn.Module, blocks: Sequence[Block]) -> TokenLayout:
    """The token layout of open_clip's ``VisionTransformer``: one prefix token (``class_embedding``),
    width ``conv1.out_channels``, patch size ``model.patch_size``, blocks ``transformer.resblocks``
    running batch first (tokens along dim 1)."""
    resblocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    if not isinstance(resblocks, nn.ModuleList) or [id(b) for b in resblocks] != [id(b.module) for b in blocks]:
        raise refuse(model, "its discovered blocks are not the sequence 'transformer.resblocks' its forward runs")
    if not getattr(model.transformer, "batch_first", False):
        raise refuse(model, "its transformer runs sequence first (batch_first=False), so tokens are not along dim 1")
    patch = tuple(model.patch_size)
    return TokenLayout(
        num_prefix_tokens=1,
        width=model.conv1.out_channels,
        patch_size=(int(patch[0]), int(patch[1])),
        last_block=resblocks[-1],
        prefix_counters=tuple(() for _ in blocks),
    )


def register() -> None:
    """Add open_clip's classes to the registry (called once ``open_clip.transformer`` is imported)."""
    from open_clip import transformer

    register_block(transformer.ResidualAttentionBlock, RESIDUAL_BLOCK)
    register_block(transformer.CustomResidualAttentionBlock, RESIDUAL_BLOCK)
    register_attention(transformer.Attention, describe_custom_attention)
    register_token_layout(transformer.VisionTransformer, vision_token_layout)
