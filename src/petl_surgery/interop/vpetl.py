"""V-PETL checkpoints (Yu et al., arXiv 2210.00788; github.com/bruceyo/V-PETL): PATT branches and, in its
BAPAT runs (``--ffn_adapt --att_prefix``), bottleneck adapters, onto a model's blocks.

Key layout. V-PETL's public repository does not include its Video Swin model file, so the names below are
an assumption, documented here: its PATT branch is an ``nn.Sequential(Linear(d, m), Tanh(), Linear(m, 2d))``
attribute ``qkv_adapter`` of each block's attention ``attn`` (indices 0 and 2 hold the Linears; index 1,
the Tanh, has no tensors), under the Video Swin block paths ``layers.I.blocks.J`` behind any prefix
(``backbone.``, ``module.``), and its adapter is AdaptFormer's ``adaptmlp`` (V-PETL builds on AdaptFormer's
code). The training scripts save ``{"model": state_dict, ...}`` like AdaptFormer's.

Mapping, per block::

    <block>.attn.qkv_adapter.0.{weight,bias}   -> <attn>.petl_patt.down.{weight,bias}   (A, a: m x d)
    <block>.attn.qkv_adapter.2.{weight,bias}   -> <attn>.petl_patt.up.{weight,bias}     (B, b: 2d x m)
    <block>.adaptmlp.*                          -> <mlp>.petl_adapter.*  (input="mlp", V-PETL's placement)

with ``[D1|D2] = up(tanh(down(x)))`` added to two of q, k, v (``mode``, default "kv": V-PETL's published
``patt_kv``; an up projection of 3d means mode "qkv") times ``scale`` (0.8, ``att_prefix_scale`` of the
published run). The mid width m comes from the tensors. V-PETL's adapter reads the MLP's input (after
the block's second norm) and adds inside the MLP's branch, with scale 0.1.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from ..checkpoints.files import PathLike
from ..errors import CheckpointError, SurgeryError
from ..sites import discover
from .adaptformer import adapter_calls, adapter_groups
from .common import Call, group_calls, install, map_blocks
from .files import read_state

PATT_KEY = re.compile(r"^(?P<block>.+)\.attn\.qkv_adapter\.(?P<layer>\d+)\.(?P<kind>weight|bias)$")
LAYERS = {"0": "down", "2": "up"}


def patt_groups(state: Mapping[str, torch.Tensor], source: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """The ``qkv_adapter`` tensors per checkpoint block path, under our PATT branch's names."""
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = PATT_KEY.match(key)
        if not match:
            continue
        if match.group("layer") not in LAYERS:
            raise CheckpointError(f"{source}: tensor {key!r}: a qkv_adapter holds Linears at indices 0 and 2 only")
        groups.setdefault(match.group("block"), {})[f"{LAYERS[match.group('layer')]}.{match.group('kind')}"] = tensor
    return groups


def from_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    *,
    mode: str = "kv",
    scale: float = 0.8,
    adapter_scale: float = 0.1,
    adapter_dropout: float = 0.0,
    layernorm: Optional[str] = None,
) -> nn.Module:
    """:func:`import_vpetl` on an already read state dict."""
    patt = patt_groups(state, source)
    adapters = adapter_groups(state, layernorm, source)
    if not patt:
        raise CheckpointError(f"{source} holds no V-PETL PATT branch (no '<block>.attn.qkv_adapter.0.weight')")
    mapping, _ = map_blocks(discover(model).blocks, list(patt) + [k for k in adapters if k not in patt], source)
    items = []
    for key, tensors in patt.items():
        if "down.weight" not in tensors or "up.weight" not in tensors:
            raise CheckpointError(f"{source}: the qkv_adapter of {key!r} lacks its weights (indices 0 and 2)")
        width, mid = tensors["down.weight"].shape[1], tensors["down.weight"].shape[0]
        block_mode = "qkv" if tensors["up.weight"].shape[0] == 3 * width else mode
        items.append((mapping[key].index, {"mode": block_mode, "mid_dim": int(mid), "scale": scale}, tensors))
    calls: List[Call] = group_calls("patt", items)
    if adapters:
        options = {
            "scale": adapter_scale,
            "dropout": adapter_dropout,
            "position": "parallel",
            "layernorm": layernorm,
            "input": "mlp",
        }
        calls += adapter_calls(model, adapters, mapping, options, source)
    return install(model, calls, {}, source)


def import_vpetl(
    model: nn.Module,
    path: PathLike,
    *,
    mode: str = "kv",
    scale: float = 0.8,
    adapter_scale: float = 0.1,
    adapter_dropout: float = 0.0,
    layernorm: Optional[str] = None,
) -> nn.Module:
    """Apply V-PETL's PATT branches (and adapters, when the file has ``adaptmlp`` tensors) from a
    checkpoint to ``model`` in place; return the model.

    Args:
        mode: which two of q, k, v a 2d-wide up projection feeds ("kv", V-PETL's ``patt_kv``; "qv",
            "qk"); a 3d-wide one is mode "qkv".
        scale: PATT's s (0.8, V-PETL's ``att_prefix_scale``).
        adapter_scale, adapter_dropout: the adapters' scale (0.1) and dropout.
        layernorm: the adapters' LayerNorm position ("in", "out"), needed when the file holds
            ``adaptmlp.adapter_layer_norm_before`` tensors.

    The head and the base weights in the file are not taken. Anything that does not fit raises
    SurgeryError before the model changes.
    """
    return from_state(
        model,
        read_state(path),
        str(path),
        mode=mode,
        scale=scale,
        adapter_scale=adapter_scale,
        adapter_dropout=adapter_dropout,
        layernorm=layernorm,
    )

