"""Layouts of PyTorch's ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``, and of torchvision's
ViT (``EncoderBlock``), Swin (V1, V2) and Video Swin (``swin3d_*``).

None of these attentions calls a module to project q/k/v: ``nn.MultiheadAttention`` multiplies by its
``in_proj_weight`` inside ``F.multi_head_attention_forward`` (or a fused kernel), and torchvision's Swin
passes ``self.qkv.weight`` to a functional ``shifted_window_attention``, bypassing the ``qkv`` Linear. A hook
on a projection would never fire. So each layout describes a *patched* attention: while surgery is present
its instance ``forward`` is replaced (through ``AttentionSite.patches``, restored exactly on removal) by a
faithful copy of PyTorch's or torchvision's own forward in which the q/k/v projection is the one line that
changes: it goes through a module, where PATT's hooks apply. With the branch at zero, the copies give
bit-identical outputs to the standard (non-fused) paths of the versions they were copied from (torch 2.x
``F.multi_head_attention_forward``, torchvision 0.2x ``shifted_window_attention(_3d)``); the tests hold them
to that. Two cases are equal to float tolerance only: nn.MultiheadAttention's fused inference kernel
(eval, no grad, ``batch_first``), which the patched forward does not take, and unbatched (2-D) input,
where PyTorch projects q, k and v with three Linears and the copy keeps one fused projection.

- ``nn.MultiheadAttention``: a parameter-free :class:`FunctionalLinear` child ``petl_in_proj`` computes
  ``F.linear(x, in_proj_weight, in_proj_bias)``; q, k, v are its thirds. A :class:`FunctionalAttention`
  child ``petl_sdpa`` computes the attention product of both paths, where prefix tuning adds keys. Self-attention only (query, key
  and value the same tensor), as PATT is defined; anything else raises at forward time.
- torchvision Swin V1 and Video Swin: ``qkv`` itself is called (``self.qkv(x)`` is exactly the
  ``F.linear`` the functional computes).
- torchvision Swin V2: its functional zeroes the k part of the qkv bias on every call, so ``self.qkv(x)``
  would differ; a :class:`FunctionalLinear` child ``petl_qkv`` is called with that masked bias instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SurgeryRuntimeError, UnsupportedModelError
from .descriptors import ATTENTION_CALL, AttentionSite, Projection
from .registry import BlockLayout, register_attention, register_block, register_mlp
from .timm_layouts import fused_qkv_in_thirds

IN_PROJ = "petl_in_proj"
QKV_SHIM = "petl_qkv"


class FunctionalLinear(nn.Module):
    """``F.linear(x, weight, bias)`` as a module, so that forward hooks can change its output.

    It owns no tensors (the weights are passed in on each call), so adding it to an attention adds no
    state_dict key and no parameter, and holds no second reference to the attention's weights.
    """

    def forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.linear(x, weight, bias)


class FunctionalAttention(nn.Module):
    """The attention product of ``nn.MultiheadAttention``'s two paths as a module (the site's
    ``ATTENTION_CALL``), so that a forward-pre hook can give it more keys and values (prefix tuning).
    Owns no tensors. Called ``(q, k, v, attn_mask, dropout_p, is_causal, need_weights)`` on
    ``(N, heads, tokens, head_dim)`` q/k/v; returns the output in that layout, and with ``need_weights``
    the weights ``(N * heads, L, S)``.

    - ``need_weights=False``: ``F.scaled_dot_product_attention`` (a 4-d mask).
    - ``need_weights=True``: PyTorch's explicit path on ``(N * heads, tokens, head_dim)``, a mask of
      ``(N * heads or 1, L, S)``: ``softmax(q / sqrt(head_dim) k^T + mask)``, dropout, times v.
    """

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool, need_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if not need_weights:
            return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal), None
        q, k, v = (t.reshape(-1, t.shape[2], t.shape[3]) for t in (q, k, v))
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        output = torch.bmm(weights, v)
        return output, weights


class InstanceForward:
    """An instance ``forward`` for one module: calls ``function(module, *args, **kwargs)``.

    A plain object rather than a bound method, so that a deep copy or a pickle of the model carries a
    forward bound to its own copy of the module.
    """

    def __init__(self, module: nn.Module, function: Callable[..., Any], path: str) -> None:
        self.module = module
        self.function = function
        self.path = path

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.module, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------------------


def _mha_unsupported(mha: nn.MultiheadAttention) -> Optional[str]:
    """Why PATT cannot run on this ``nn.MultiheadAttention``, or None."""
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        return (
            "projects k and v from inputs of other widths (kdim/vdim differ from embed_dim), so it is "
            "cross-attention; PATT needs self-attention, where q, k and v read the same tokens"
        )
    if mha.bias_k is not None or mha.bias_v is not None:
        return "appends learned bias_k/bias_v tokens (add_bias_kv=True), which PATT's forward does not support"
    if mha.add_zero_attn:
        return "appends a zero key/value token (add_zero_attn=True), which PATT's forward does not support"
    return None


def describe_multihead_attention(path: str, mha: nn.Module) -> AttentionSite:
    """``nn.MultiheadAttention`` as self-attention: q, k, v are the thirds ``[q | k | v]`` of
    ``F.linear(x, in_proj_weight, in_proj_bias)``, computed by the patched-in ``petl_in_proj`` child that
    :func:`multihead_self_attention` (the patched forward) calls."""
    assert isinstance(mha, nn.MultiheadAttention)
    width = mha.embed_dim
    reason = _mha_unsupported(mha)
    if reason is not None:
        return AttentionSite(path, mha, width, {}, mha.in_proj_bias is not None, unsupported=reason)
    return AttentionSite(
        path=path,
        module=mha,
        in_features=width,
        projections={role: Projection(IN_PROJ, i * width, width) for i, role in enumerate("qkv")},
        has_bias=mha.in_proj_bias is not None,
        patches={
            IN_PROJ: FunctionalLinear(),
            ATTENTION_CALL: FunctionalAttention(),
            "forward": InstanceForward(mha, multihead_self_attention, path),
        },
    )


def _require_self_attention(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor) -> None:
    """Refuse, at forward time, the calls PATT's branch cannot serve: cross-attention, where the branch
    would have no single input, and NestedTensor batches, which only PyTorch's fused kernel accepts."""
    path = mha.forward.path if isinstance(mha.forward, InstanceForward) else type(mha).__name__
    if query is not key or key is not value:
        raise SurgeryRuntimeError(
            f"PATT on nn.MultiheadAttention {path!r} needs self-attention: query, key and value must be the "
            "same tensor, as PATT's branch reads the tokens that q, k and v are projected from. Remove PATT "
            "from this block (petl_surgery.remove) or apply it with layers= that leave it out"
        )
    if query.is_nested:
        raise SurgeryRuntimeError(
            f"PATT on nn.MultiheadAttention {path!r} got a NestedTensor (nn.TransformerEncoder with "
            "enable_nested_tensor=True and a src_key_padding_mask in eval mode); build the encoder with "
            "enable_nested_tensor=False"
        )


def _mha_masks(
    query: Tensor, key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor]
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Both masks as float masks of the query's dtype, as ``nn.MultiheadAttention.forward`` makes them."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype, check_other=False
    )
    return key_padding_mask, attn_mask


def _shaped_attn_mask(attn_mask: Tensor, tgt_len: int, src_len: int, bsz: int, num_heads: int) -> Tensor:
    """A 2-D ``(L, S)`` mask as ``(1, L, S)``, a 3-D one checked to be ``(N * heads, L, S)``."""
    if attn_mask.dim() == 2:
        if attn_mask.shape != (tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
            )
        return attn_mask.unsqueeze(0)
    if attn_mask.dim() == 3:
        if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                f"{(bsz * num_heads, tgt_len, src_len)}."
            )
        return attn_mask
    raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")


def multihead_self_attention(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    need_weights: bool = True,
    attn_mask: Optional[Tensor] = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """``nn.MultiheadAttention.forward`` for self-attention, with the in-projection through
    ``mha.petl_in_proj`` so that PATT's hook applies there.

    A copy of PyTorch's standard path (``MultiheadAttention.forward`` then
    ``F.multi_head_attention_forward`` with a packed in-projection): same masks (bool or float, key padding
    merged in), ``is_causal``, dropout in training, batched or unbatched input, ``batch_first``;
    ``need_weights=True`` returns the attention weights (averaged over heads unless
    ``average_attn_weights=False``) from the explicit softmax, ``need_weights=False`` runs
    ``F.scaled_dot_product_attention`` and returns ``(output, None)``. Not the fused inference fast path
    (``torch._native_multi_head_attention``), which computes the projection inside one kernel.
    """
    _require_self_attention(mha, query, key, value)
    key_padding_mask, attn_mask = _mha_masks(query, key_padding_mask, attn_mask)
    x = query.transpose(1, 0) if mha.batch_first and query.dim() == 3 else query
    num_heads = mha.num_heads
    is_batched = F._mha_shape_check(x, x, x, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        x = x.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = x.shape
    if embed_dim != mha.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {mha.embed_dim}, but got {embed_dim}")
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
            "`generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # SDPA's own causal masking
    elif key_padding_mask is not None:
        is_causal = False  # the merged mask is no longer causal
    head_dim = embed_dim // num_heads

    # the in-projection, through a module (the one change from PyTorch's code)
    proj = getattr(mha, IN_PROJ)(x, mha.in_proj_weight, mha.in_proj_bias)
    proj = proj.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    q, k, v = proj[0], proj[1], proj[2]

    if attn_mask is not None:
        attn_mask = _shaped_attn_mask(attn_mask, tgt_len, tgt_len, bsz, num_heads)
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    src_len = k.size(1)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, src_len):
            raise AssertionError(f"Expected key_padding_mask of shape {(bsz, src_len)}, got {tuple(key_padding_mask.shape)}")
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = mha.dropout if mha.training else 0.0
    if need_weights:
        output, weights = _attention_with_weights(mha, q, k, v, attn_mask, dropout_p, is_causal, (tgt_len, bsz, embed_dim))
        weights = weights.view(bsz, num_heads, tgt_len, -1)  # a prefix adds keys in front
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            weights = weights.squeeze(0)
    else:
        output = _attention_sdpa(mha, q, k, v, attn_mask, dropout_p, is_causal, (tgt_len, bsz, embed_dim))
        weights = None
    if not is_batched:
        output = output.squeeze(1)
    elif mha.batch_first:
        output = output.transpose(1, 0)
    return output, weights


def _attention_with_weights(
    mha: nn.MultiheadAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    shape: Tuple[int, int, int],
) -> Tuple[Tensor, Tensor]:
    """PyTorch's ``need_weights=True`` branch (the product by ``ATTENTION_CALL``, whose keys may be
    more than the tokens): the output ``(L, N, E)`` and the per-head weights ``(N * heads, L, S)``."""
    tgt_len, bsz, embed_dim = shape
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "nn.MultiheadAttention with need_weights=True needs an explicit attn_mask with is_causal=True "
            "(as in PyTorch)"
        )
    heads = mha.num_heads
    output, weights = getattr(mha, ATTENTION_CALL)(
        *(t.view(bsz, heads, t.shape[1], -1) for t in (q, k, v)), attn_mask, dropout_p, is_causal, True
    )
    output = output.view(bsz * heads, tgt_len, -1).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
    output = F.linear(output, mha.out_proj.weight, mha.out_proj.bias)
    return output.view(tgt_len, bsz, output.size(1)), weights


def _attention_sdpa(
    mha: nn.MultiheadAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    shape: Tuple[int, int, int],
) -> Tensor:
    """PyTorch's ``need_weights=False`` branch: ``F.scaled_dot_product_attention`` (by ``ATTENTION_CALL``);
    the output ``(L, N, E)``."""
    tgt_len, bsz, embed_dim = shape
    num_heads = mha.num_heads
    src_len = k.size(1)
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, -1)
    k = k.view(bsz, num_heads, src_len, -1)
    v = v.view(bsz, num_heads, src_len, -1)
    output, _ = getattr(mha, ATTENTION_CALL)(q, k, v, attn_mask, dropout_p, is_causal, False)
    output = output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    output = F.linear(output, mha.out_proj.weight, mha.out_proj.bias)
    return output.view(tgt_len, bsz, output.size(1))


def transformer_encoder_layer_layout(layer: nn.Module) -> BlockLayout:
    """``nn.TransformerEncoderLayer``: attention ``self_attn``; the MLP runs inline
    (``linear2(dropout(activation(linear1(x))))``, then ``dropout2`` before the residual add), so the MLP
    site starts at ``linear1``'s input and ends at ``linear2``'s output. The residual stream before the MLP
    is ``norm2``'s input with ``norm_first=True`` and ``linear1``'s input (the MLP reads it directly) with
    ``norm_first=False``."""
    return BlockLayout(
        attention="self_attn",
        mlp="linear2",
        mlp_input="linear1",
        residual_input="norm2" if layer.norm_first else "linear1",
        residual_output="dropout2",
    )


# ----------------------------------------------------------------------------------------------------------
# torchvision Swin (V1, V2) and Video Swin
# ----------------------------------------------------------------------------------------------------------


def _swin_qkv(attention: nn.Module, x: Tensor, logit_scale: Optional[Tensor]) -> Tensor:
    """The qkv projection of torchvision's functional, through a module: ``attention.qkv`` (V1), or for
    V2 (``logit_scale`` given) ``petl_qkv`` with the bias whose k part the functional zeroes."""
    if logit_scale is None:
        return attention.qkv(x)
    bias = attention.qkv.bias
    if bias is not None:
        bias = bias.clone()
        length = bias.numel() // 3
        bias[length : 2 * length].zero_()
    return getattr(attention, QKV_SHIM)(x, attention.qkv.weight, bias)


def _shift_mask_2d(x: Tensor, padded: Tuple[int, int], window: List[int], shift: List[int], num_windows: int) -> Tensor:
    """torchvision's shifted-window mask: 0 within a region, -100 across regions, ``(nW, Ws*Ws, Ws*Ws)``."""
    pad_H, pad_W = padded
    attn_mask = x.new_zeros((pad_H, pad_W))
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            attn_mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    attn_mask = attn_mask.view(pad_H // window[0], window[0], pad_W // window[1], window[1])
    attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window[0] * window[1])
    attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))


def _windowed_attention(
    attention: nn.Module,
    x: Tensor,
    relative_position_bias: Tensor,
    logit_scale: Optional[Tensor],
    mask: Optional[Tensor],
    num_windows: int,
) -> Tensor:
    """The attention inside windows ``x`` of shape ``(B * nW, tokens, C)``, as torchvision's functionals
    compute it after the window partition (cosine attention when ``logit_scale`` is given), through the
    output projection and its dropout."""
    num_heads = attention.num_heads
    C = x.shape[-1]
    qkv = _swin_qkv(attention, x, logit_scale)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * (C // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if mask is not None:
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention.attention_dropout, training=attention.training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = F.linear(x, attention.proj.weight, attention.proj.bias)
    return F.dropout(x, p=attention.dropout, training=attention.training)


def swin_window_attention(attention: nn.Module, input: Tensor) -> Tensor:
    """``ShiftedWindowAttention.forward`` with torchvision's ``shifted_window_attention`` on ``(B, H, W, C)``."""
    return _swin_2d(attention, input, None)


def swin_v2_window_attention(attention: nn.Module, input: Tensor) -> Tensor:
    """``ShiftedWindowAttentionV2.forward``: the same functional with ``logit_scale`` (cosine attention)."""
    return _swin_2d(attention, input, attention.logit_scale)


def _swin_2d(attention: nn.Module, input: Tensor, logit_scale: Optional[Tensor]) -> Tensor:
    """torchvision's ``shifted_window_attention``: pad, cyclic shift, window partition, attention (with the
    qkv projection through :func:`_swin_qkv`), reverse the partition and the shift, unpad."""
    relative_position_bias = attention.get_relative_position_bias()
    window_size = attention.window_size
    B, H, W, C = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = list(attention.shift_size)
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    mask = _shift_mask_2d(x, (pad_H, pad_W), window_size, shift_size, num_windows) if sum(shift_size) > 0 else None
    x = _windowed_attention(attention, x, relative_position_bias, logit_scale, mask, num_windows)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def swin3d_window_attention(attention: nn.Module, input: Tensor) -> Tensor:
    """``ShiftedWindowAttention3d.forward`` and torchvision's ``shifted_window_attention_3d`` on
    ``(B, T, H, W, C)``, with torchvision's own window, padding and mask helpers; only the qkv projection
    goes through ``attention.qkv``."""
    from torchvision.models.video import swin_transformer as video_swin

    b, t, h, w, c = input.shape
    window_size, shift_size = video_swin._get_window_and_shift_size(
        list(attention.shift_size), [t, h, w], list(attention.window_size)
    )
    relative_position_bias = attention.get_relative_position_bias(window_size)
    pad_size = video_swin._compute_pad_size_3d((t, h, w), (window_size[0], window_size[1], window_size[2]))
    x = F.pad(input, (0, 0, 0, pad_size[2], 0, pad_size[1], 0, pad_size[0]))
    _, tp, hp, wp, _ = x.shape
    padded = (tp, hp, wp)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1], -shift_size[2]), dims=(1, 2, 3))
    grid = [padded[i] // window_size[i] for i in range(3)]
    num_windows = grid[0] * grid[1] * grid[2]
    x = x.view(b, grid[0], window_size[0], grid[1], window_size[1], grid[2], window_size[2], c)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b * num_windows, window_size[0] * window_size[1] * window_size[2], c)
    mask = None
    if sum(shift_size) > 0:
        mask = video_swin._compute_attention_mask_3d(x, padded, tuple(window_size), tuple(shift_size))
    x = _windowed_attention(attention, x, relative_position_bias, None, mask, num_windows)
    x = x.view(b, grid[0], grid[1], grid[2], window_size[0], window_size[1], window_size[2], c)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, tp, hp, wp, c)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1], shift_size[2]), dims=(1, 2, 3))
    return x[:, :t, :h, :w, :].contiguous()


def describe_swin_attention(path: str, attention: nn.Module) -> AttentionSite:
    """torchvision ``ShiftedWindowAttention`` (2-D) and ``ShiftedWindowAttention3d``: ``[q | k | v]`` thirds
    of ``qkv``, which the patched forward calls as a module (torchvision's functional bypasses it)."""
    site = fused_qkv_in_thirds(path, attention)
    function = swin3d_window_attention if len(attention.window_size) == 3 else swin_window_attention
    return dataclasses.replace(site, patches={"forward": InstanceForward(attention, function, path)})


def describe_swin_v2_attention(path: str, attention: nn.Module) -> AttentionSite:
    """torchvision ``ShiftedWindowAttentionV2``: ``[q | k | v]`` thirds of the projection by ``qkv.weight``
    and ``qkv.bias`` with its k part zeroed (as the functional computes it), produced by the patched-in
    ``petl_qkv`` child. Cosine attention: q and k are normalised per head before the scores."""
    site = fused_qkv_in_thirds(path, attention)
    width = attention.qkv.out_features // 3
    return dataclasses.replace(
        site,
        projections={role: Projection(QKV_SHIM, i * width, width) for i, role in enumerate("qkv")},
        patches={QKV_SHIM: FunctionalLinear(), "forward": InstanceForward(attention, swin_v2_window_attention, path)},
    )


def torchvision_mlp_features(mlp: nn.Module) -> Tuple[int, int, int]:
    """torchvision's ``MLP`` (and ViT's ``MLPBlock``): a Sequential of Linear, activation, dropout, ...;
    in from the first Linear, out from the last."""
    linears = [child for child in mlp.children() if type(child) is nn.Linear]
    if not linears:
        raise UnsupportedModelError(f"MLP {type(mlp).__name__} holds no nn.Linear layer")
    return linears[0].in_features, linears[-1].out_features, -1


def _register_torchvision() -> None:
    """torchvision's ViT, Swin and Video Swin (skipped when torchvision is not installed)."""
    try:
        from torchvision.models import swin_transformer as swin
        from torchvision.models import vision_transformer as vit
        from torchvision.models.video import swin_transformer as video_swin
        from torchvision.ops import MLP
    except ImportError:
        return
    register_mlp(MLP, torchvision_mlp_features)
    register_mlp(vit.MLPBlock, torchvision_mlp_features)
    # EncoderBlock: x = x + dropout(self_attention(ln_1(x))); return x + mlp(ln_2(x)) (no drop path).
    register_block(vit.EncoderBlock, BlockLayout("self_attention", "mlp", residual_input="ln_2", residual_output="mlp"))
    register_attention(swin.ShiftedWindowAttention, describe_swin_attention)
    register_attention(video_swin.ShiftedWindowAttention3d, describe_swin_attention)
    register_attention(swin.ShiftedWindowAttentionV2, describe_swin_v2_attention)
    # Swin blocks are found by their attention child; their MLP residual branch cannot be named: one
    # StochasticDepth module ends both residual branches, so adapter input="residual" is refused there.


def register() -> None:
    """Add this module's classes to the registry."""
    register_attention(nn.MultiheadAttention, describe_multihead_attention)
    register_block(nn.TransformerEncoderLayer, transformer_encoder_layer_layout)
    _register_torchvision()
