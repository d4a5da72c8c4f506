"""VPT, visual prompt tuning (Jia et al., ECCV 2022, arXiv 2203.12119).

L learned prompt tokens of width d join the token sequence after the prefix tokens (class,
distillation, registers) and before the patch tokens::

    [prefix | P | patches]  ->  block_i  ->  ...  ->  last block  ->  drop P  ->  norm, pool, head

Shallow: P is inserted once, before the first chosen block, and then travels through the blocks. Deep:
before every chosen block i, the prompt slots are overwritten with that block's own P_i. The prompts
leave the sequence after the model's last block, so neither a class-token head nor a global-average-pool
head ever sees them. RoPE attention (EVA02, RoPE ViT, DINOv3) rotates only the tokens after its
``num_prefix_tokens``: while the surgery is present, that count grows by L in every block the prompts
pass through, so the prompts are not rotated and the rotary embedding stays aligned with the patch
tokens. Models whose attention adds a relative-position bias sized to their own tokens (BEiT, the
relative-position ViT) get that bias padded with zero rows and columns for the prompts, in every block the
prompts pass through: a prompt has no position, so no query gets a positional bias towards it and it gets
none towards any key (as these models' biases already treat a class token without a position: the
relative-position ViT pads its bias with zeros for it).

Init is VPT's "random" init: uniform(-v, v), v = sqrt(6 / (3 * patch_h * patch_w + d)) (Xavier-uniform
over the patch embedding's fan-in 3 * patch_h * patch_w and fan-out d).
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from ..errors import OptionError, SurgeryError, SurgeryRuntimeError
from ..patches import Patch
from ..sites import Block
from ..sites.tokens import PREFIX_COUNTER, TokenLayout, token_layout
from .base import CHILD_PREFIX, Hook, Insertion, Method, PetlModule, check_number, check_positive_int
from ..selection import LayerSelection
from .planning import PlanContext, choose_blocks, plan_each_block


@dataclass(frozen=True)
class VptOptions:
    """Options of ``"vpt"``.

    Attributes:
        num_tokens: prompt length L (10). VPT tunes it per task over {1, 5, 10, 50, 100, 200} (paper,
            Sec. 4.1); 10 is the middle of that range and a common choice of VPT's follow-ups (the
            official code's config falls back to 5, its demo VTAB run uses 100).
        deep: True (default, VPT-deep, the paper's main method): every chosen block gets its own prompts;
            False (VPT-shallow): prompts are inserted once, before the first chosen block.
        dropout: dropout on the prompt tokens, in training only (0.1, the official code's VPT-deep runs:
            ``MODEL.PROMPT.DROPOUT 0.1``; its config falls back to 0.0).
    """

    num_tokens: int = 10
    deep: bool = True
    dropout: float = 0.1

    def __post_init__(self) -> None:
        check_positive_int("vpt", "num_tokens", self.num_tokens)
        if not isinstance(self.deep, bool):
            raise OptionError(f"option 'deep' of method 'vpt' must be True or False; got {self.deep!r}")
        check_number("vpt", "dropout", self.dropout, low=0.0, high=1.0)


def prompt_init_bound(patch_size: Tuple[int, int], width: int) -> float:
    """VPT's uniform init bound v = sqrt(6 / (3 * patch_h * patch_w + d))."""
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + width))


class PromptTokens(PetlModule):
    """The L prompt tokens of one block, hosted on that block (``blocks.i.petl_vpt``).

    The module of the first chosen block inserts its prompts after the prefix tokens, drops them after
    the model's last block, and owns the patches that grow the RoPE prefix counts by L; each further
    module (deep) overwrites the prompt slots before its block.
    """

    component = "vpt"

    def __init__(
        self,
        layout: TokenLayout,
        options: VptOptions,
        block: int,
        context: PlanContext,
        factory: Mapping[str, Any],
    ) -> None:
        super().__init__(context.method, context.recorded, block)
        self.num_tokens = options.num_tokens
        self.num_prefix_tokens = layout.num_prefix_tokens
        self.prompts = nn.Parameter(torch.empty(options.num_tokens, layout.width, **factory))
        bound = prompt_init_bound(layout.patch_size, layout.width)
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(options.dropout)

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        """The prompts for a batch shaped like ``like`` (B, N, d): (B, L, d), with dropout per sample
        (VPT applies it after expanding to the batch)."""
        return self.dropout(self.prompts.to(like.dtype).expand(like.shape[0], -1, -1))

    def insert(self, module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        x, p = args[0], self.num_prefix_tokens
        return (torch.cat([x[:, :p], self(x), x[:, p:]], dim=1), *args[1:])

    def overwrite(self, module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        x, p = args[0], self.num_prefix_tokens
        return (torch.cat([x[:, :p], self(x), x[:, p + self.num_tokens :]], dim=1), *args[1:])

    def drop(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
        """The last block's output without the prompt tokens: a tensor, or a tuple whose first item is
        the tokens (transformers' layers return ``(hidden_states, ...)``)."""
        if isinstance(output, tuple):
            return (self.drop(module, args, output[0]), *output[1:])
        p = self.num_prefix_tokens
        return torch.cat([output[:, :p], output[:, p + self.num_tokens :]], dim=1)

    def padded_bias(self, make_bias: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``make_bias(...)`` (a relative-position bias over the model's own tokens) with zero rows and
        columns for the prompts (installed in place of the method that makes the bias)."""
        return pad_token_bias(make_bias(*args, **kwargs), self.num_prefix_tokens, self.num_tokens)

    def pad_keyword(
        self, keyword: str, key_mask: bool, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        """Forward-pre hook: the bias passed as ``keyword`` (shared between blocks), padded likewise; with
        ``key_mask``, a key-padding mask there, padded for the prompts (``pad_key_mask``)."""
        bias = kwargs.get(keyword)
        if bias is None:
            return args, kwargs
        pad = pad_key_mask if key_mask else pad_token_bias
        return args, {**kwargs, keyword: pad(bias, self.num_prefix_tokens, self.num_tokens)}


def pad_token_bias(bias: torch.Tensor, at: int, count: int) -> torch.Tensor:
    """``bias`` (..., N, N) with ``count`` zero rows and columns inserted before token ``at``."""
    rows = bias.new_zeros(*bias.shape[:-2], count, bias.shape[-1])
    bias = torch.cat([bias[..., :at, :], rows, bias[..., at:, :]], dim=-2)
    columns = bias.new_zeros(*bias.shape[:-1], count)
    return torch.cat([bias[..., :at], columns, bias[..., at:]], dim=-1)


def pad_key_mask(mask: torch.Tensor, at: int, count: int) -> torch.Tensor:
    """A key-padding mask (..., queries, N) with ``count`` open keys (True, or additive 0) inserted
    before key ``at``, and, unless its queries are broadcast (size 1), ``count`` query rows there that
    copy the first row (a prompt masks the keys every query masks)."""
    if not isinstance(mask, torch.Tensor):
        raise SurgeryRuntimeError(
            f"prompt tokens need the attention mask as a tensor to pad it; got {type(mask).__name__} (use "
            "attn_implementation='eager' or 'sdpa')"
        )
    columns = (mask.new_ones(()) if mask.dtype == torch.bool else mask.new_zeros(())).expand(*mask.shape[:-1], count)
    mask = torch.cat([mask[..., :at], columns, mask[..., at:]], dim=-1)
    if mask.shape[-2] == 1:
        return mask
    rows = mask[..., :1, :].expand(*mask.shape[:-2], count, mask.shape[-1])
    return torch.cat([mask[..., :at, :], rows, mask[..., at:, :]], dim=-2)


def refuse_intermediates(message: str, *args: Any, **kwargs: Any) -> Any:
    """Installed in place of a model's ``forward_intermediates`` while prompts travel between blocks."""
    raise SurgeryError(message)


INTERMEDIATES = ("forward_intermediates", "get_intermediate_layers")


class PromptPlanner:
    """Plans VPT on one model: the token layout and the chosen blocks are known to every block's plan.

    Where every block from the first chosen one to the model's last is chosen (deep), each block's
    prompts are inserted before it and dropped after it: no tensor between blocks carries them, so
    timm's ``forward_intermediates`` (dense prediction, ``features_only``) sees the plain model's
    tokens. Otherwise prompts travel from one block to the next (VPT-shallow, or blocks after the last
    chosen one) and the model's ``forward_intermediates``/``get_intermediate_layers`` are refused by name
    while the surgery is present."""

    def __init__(self, model: nn.Module, blocks: Sequence[Block], chosen: Sequence[int], deep: bool) -> None:
        self.layout = token_layout(model, blocks)
        self.first = chosen[0]
        self.chosen = frozenset(chosen) if deep else frozenset(chosen[:1])
        positions = [index for index, block in enumerate(blocks) if block.module is self.layout.last_block]
        self.last = positions[0] if positions else None
        end = self.last if self.last is not None else len(blocks)
        # the blocks after which the prompts travel on to the next block (no block drops them there)
        self.travelling = tuple(index for index in range(self.first, end) if index + 1 not in self.chosen)
        self.intermediates = [
            module
            for module in model.modules()
            if isinstance(getattr(module, "blocks", None), (nn.Sequential, nn.ModuleList))
            and any(block is self.layout.last_block for block in module.blocks)
        ]
        self.counters = tuple(
            (path, model.get_submodule(path))
            for counters in self.layout.prefix_counters[self.first :]
            for path in counters
        )
        # the relative-position biases of the blocks the prompts pass through
        self.biases = tuple(
            (bias, model.get_submodule(bias.module))
            for biases in self.layout.token_biases[self.first :]
            for bias in biases
        )

    def plan_block(self, block: Block, options: VptOptions, context: PlanContext) -> List[Insertion]:
        method = context.method
        index = block.index
        first = index == self.first
        if index not in self.chosen:
            return []  # shallow: the prompts inserted before the first chosen block travel on
        prompts = PromptTokens(self.layout, options, index, context, context.factory_kwargs(block.module))
        arrive = prompts.insert if first or index - 1 in self.chosen else prompts.overwrite
        hooks = [Hook(block.module, "forward_pre", arrive)]
        if index == self.last or index + 1 in self.chosen:  # no block after it reads its prompts
            hooks.append(Hook(block.module, "forward", prompts.drop))
        if not first:
            return [Insertion(index, block.path, block.module, CHILD_PREFIX + method, prompts, hooks)]
        if self.last not in self.chosen:  # the prompts travel on and leave after the model's last block
            hooks.append(Hook(self.layout.last_block, "forward", prompts.drop))
        grow = functools.partial(operator.add, options.num_tokens)
        patches = [Patch(module, PREFIX_COUNTER, update=grow, shared=False) for _, module in self.counters]
        if self.travelling:
            message = (
                f"VPT's prompt tokens travel on from block {self.travelling[0]} to the next one (deep={options.deep}, "
                f"blocks {sorted(self.chosen)} with prompts of their own), so the intermediate features would "
                "carry them; apply vpt with deep=True on every block from the first chosen one to the model's "
                "last for forward_intermediates, features_only and dense prediction"
            )
            refusal = functools.partial(refuse_intermediates, message)
            patches += [
                Patch(module, name, refusal, shared=False)
                for module in self.intermediates
                for name in INTERMEDIATES
                if callable(getattr(module, name, None))
            ]
        for bias, module in self.biases:
            if bias.method is not None:
                pad = functools.partial(functools.partial, prompts.padded_bias)  # of the method it replaces
                patches.append(Patch(module, bias.method, update=pad, shared=False))
            else:
                pad = functools.partial(prompts.pad_keyword, bias.keyword, bias.key_mask)
                hooks.append(Hook(module, "forward_pre_kwargs", pad))
        return [Insertion(block.index, block.path, block.module, CHILD_PREFIX + method, prompts, hooks, patches)]


class Vpt(Method):
    name = "vpt"
    Options = VptOptions
    adds_tokens = True
    identity_at_init = False

    @classmethod
    def plan(cls, model: nn.Module, layers: LayerSelection, options: VptOptions, context: PlanContext) -> List[Insertion]:
        """The chosen blocks, planned with the token layout of the whole model and the blocks chosen."""
        blocks, chosen = choose_blocks(model, layers, context)
        applied = [path for path, module in model.named_modules() if isinstance(module, PromptTokens)]
        if applied:
            raise SurgeryError(
                f"prompt tokens are already inserted into {type(model).__name__} ({applied[0]!r}); a second "
                "set would shift the first one's slots: remove it first"
            )
        planner = PromptPlanner(model, blocks, chosen, options.deep)
        return plan_each_block(blocks, chosen, lambda block: planner.plan_block(block, options, context), context)
