"""PEFT LoRA on layers outside the blocks' semantic targets (a CNN's convolutions, a stem, a downsample),
both ways, as LoRA's ``modules`` option (:mod:`petl_surgery.methods.layer_lora`).

PEFT's conv LoRA (``peft.tuners.lora.layer._ConvNd``) is ``lora_A``: a convolution to r channels with the
layer's kernel size, stride and padding (``lora_A.weight``: r x d_in x kernel), and ``lora_B``: a 1x1
convolution (``lora_B.weight``: d_out x r x 1 ...); on a Linear, the two matrices. Ours holds the same
tensors (B as the d_out x r matrix), so an import is a copy and outputs are equal. PEFT's A takes neither
the layer's dilation nor its padding mode, where ours takes both (so that merging is exact): a layer with
dilation other than 1 or a padding mode other than zeros is refused both ways, naming it.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import CheckpointError, SurgeryError, UnsupportedModelError
from ..methods.base import OUTSIDE_BLOCKS
from ..methods.layer_lora import LayerLowRank, grouped_refusal
from ..methods.patterns import LAYER, LAYER_TYPES
from .common import Call


def geometry_refusal(layer: nn.Module) -> Optional[str]:
    """Why PEFT's LoRA on ``layer`` would not compute what ours does (see the module docstring), or None."""
    if type(layer) not in LAYER_TYPES:
        return f"is a {type(layer).__name__}, not an nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d"
    reason = grouped_refusal(layer)
    if reason is not None:
        return reason
    if isinstance(layer, nn.Linear):
        return None
    if any(d != 1 for d in layer.dilation):
        return f"is dilated (dilation={tuple(layer.dilation)}), which PEFT's conv LoRA leaves out of its lora_A"
    if layer.padding_mode != "zeros":
        return f"pads with mode {layer.padding_mode!r}, which PEFT's conv LoRA leaves out of its lora_A (zeros)"
    return None


def layer_calls(
    model: nn.Module,
    pairs: Mapping[str, Mapping[str, torch.Tensor]],
    scaling_of: Callable[[str, int], Tuple[int, float]],
    dropout: float,
    source: str,
) -> List[Call]:
    """The LoRA calls (``modules`` option, one per rank and scaling) that reproduce PEFT's LoRA on the
    layers ``pairs`` holds (path -> {"A", "B"}); ``scaling_of(path, rank)`` gives the config's rank for
    the path and the scaling. Raises SurgeryError naming a layer that does not fit."""
    groups: Dict[Tuple[int, float], Dict[str, Dict[str, torch.Tensor]]] = {}
    for path, pair in sorted(pairs.items()):
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"{source}: a LoRA on {path!r}, which is not a module of {type(model).__name__}") from None
        reason = geometry_refusal(layer)
        if reason is not None:
            raise CheckpointError(f"{source}: a LoRA on {path!r}, which {reason}")
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{source}: module {path!r} has lora_{'A' if 'A' not in pair else 'B'} missing")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        expected, scaling = scaling_of(path, rank)
        if rank != expected:
            raise CheckpointError(f"{source}: {path}: its tensors have rank {rank}, its config says r = {expected}")
        if b.dim() != 2 and (b.dim() != a.dim() or any(size != 1 for size in b.shape[2:])):
            raise CheckpointError(f"{source}: {path}.lora_B has shape {list(b.shape)}, not PEFT's d_out x r (x 1 ...)")
        groups.setdefault((rank, scaling), {})[path] = {f"{LAYER}.lora_A": a, f"{LAYER}.lora_B": b.flatten(1)}
    calls = []
    for (rank, scaling), tensors in groups.items():
        options: Dict[str, Any] = {
            "rank": rank, "alpha": scaling * rank, "dropout": dropout, "targets": None,
            "modules": tuple(re.escape(path) for path in tensors),
        }
        calls.append(Call("lora", [OUTSIDE_BLOCKS], options, dict(tensors)))
    return calls


def layer_entry(path: str, adapter: LayerLowRank, layer: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """PEFT's (lora_A.weight, lora_B.weight, scaling) for the LoRA ``adapter`` on the layer at ``path``."""
    reason = geometry_refusal(layer)
    if reason is not None:
        raise UnsupportedModelError(f"the LoRA on {path!r} cannot be written for PEFT: the layer {reason}")
    pair = adapter.pair()
    a, b = pair.lora_A.detach(), pair.lora_B.detach()
    return a, b.view(*b.shape, *([1] * (a.dim() - 2))), adapter.scaling
