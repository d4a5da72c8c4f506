"""VPT checkpoints (Jia et al., ECCV 2022; github.com/KMnP/vpt) onto a model's blocks, as our "vpt" method.

VPT's ``PromptedTransformer`` (``src/models/vit_prompt/vit.py``) holds ``prompt_embeddings`` (1, L, p),
inserted after the class token before the first block, and, for VPT-deep, ``deep_prompt_embeddings``
(k, L, p) with k = depth - 1: before block i (1 <= i <= k) the prompt slots are overwritten with row i - 1.
An optional ``prompt_proj`` Linear(p, d) (``PROMPT.PROJECT > -1``) maps them to the width d; dropout
(``PROMPT.DROPOUT``) acts after it. In the official model they sit under ``enc.transformer.``; any
prefix is accepted, with exactly one ``prompt_embeddings`` tensor.

Mapping onto the "vpt" method (prompts after the model's prefix tokens, dropped after its last block,
so a class-token head sees what VPT's head sees)::

    prompt_embeddings[0]         -> blocks[0].petl_vpt.prompts          (L x d)
    deep_prompt_embeddings[i-1]  -> blocks[i].petl_vpt.prompts          (i = 1..k; deep=True)

With ``prompt_proj`` tensors, the projection is applied once to the prompts at import (``P W^T + b``),
which is what VPT computes from them; the imported prompts are then trained directly. The head in the
file is not taken.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.files import PathLike
from ..errors import CheckpointError, SurgeryError
from .common import Call, install
from .files import read_state

SHALLOW = "prompt_embeddings"
DEEP = "deep_prompt_embeddings"


def _named(state: Mapping[str, torch.Tensor], last: str, source: str) -> Optional[str]:
    found = [name for name in state if name.rpartition(".")[2] == last]
    if len(found) > 1:
        raise CheckpointError(f"{source} holds several {last!r} tensors ({', '.join(found[:3])}); pass a file with one model")
    return found[0] if found else None


def prompts_of(state: Mapping[str, torch.Tensor], source: str) -> List[torch.Tensor]:
    """The prompts of blocks 0, 1, ..., k as (L, d) tensors, projected when the file has ``prompt_proj``."""
    shallow = _named(state, SHALLOW, source)
    if shallow is None:
        raise CheckpointError(f"{source} holds no VPT prompts (no 'prompt_embeddings' tensor)")
    prefix = shallow[: -len(SHALLOW)]
    first = state[shallow]
    if first.dim() != 3 or first.shape[0] != 1:
        raise CheckpointError(f"{source}: {shallow} has shape {list(first.shape)}; VPT's is (1, L, d)")
    prompts = [first[0]]
    deep = state.get(prefix + DEEP)
    if deep is not None:
        if deep.dim() != 3 or deep.shape[1:] != first.shape[1:]:
            raise CheckpointError(
                f"{source}: {prefix + DEEP} has shape {list(deep.shape)}; "
                f"VPT's is (depth - 1, {first.shape[1]}, {first.shape[2]})"
            )
        prompts += list(deep.unbind(0))
    weight, bias = state.get(prefix + "prompt_proj.weight"), state.get(prefix + "prompt_proj.bias")
    if weight is not None:
        if weight.dim() != 2 or weight.shape[1] != first.shape[2]:
            raise CheckpointError(
                f"{source}: prompt_proj.weight has shape {list(weight.shape)}, the prompts width {first.shape[2]}"
            )
        shift = None if bias is None else bias.double()
        prompts = [F.linear(p.double(), weight.double(), shift).to(p.dtype) for p in prompts]
    return prompts


def from_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, *, dropout: Optional[float] = None
) -> nn.Module:
    """:func:`import_vpt` on an already read state dict."""
    prompts = prompts_of(state, source)
    options: Dict[str, object] = {"num_tokens": int(prompts[0].shape[0]), "deep": len(prompts) > 1}
    if dropout is not None:
        options["dropout"] = dropout
    tensors = {block: {"prompts": p} for block, p in enumerate(prompts)}
    return install(model, [Call("vpt", list(range(len(prompts))), options, tensors)], {}, source)


def import_vpt(model: nn.Module, path: PathLike, *, dropout: Optional[float] = None) -> nn.Module:
    """Apply VPT's prompts from a checkpoint to ``model`` in place, as the "vpt" method; return it.

    Shallow (only ``prompt_embeddings``): prompts before block 0. Deep: block 0 takes
    ``prompt_embeddings``, block i takes ``deep_prompt_embeddings[i - 1]``. ``dropout`` is the prompt
    dropout in training (None: the method's default). Anything that does not fit (width, more prompt
    rows than blocks) raises SurgeryError before the model changes.
    """
    return from_state(model, read_state(path), str(path), dropout=dropout)
