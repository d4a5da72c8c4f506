"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190; the "prefix" baseline of V-PETL, arXiv 2210.00788).

Per attention layer, L learned key tokens Pk and value tokens Pv (each L x d, split into heads as the
model splits k and v) are put in front of the attention's own keys and values::

    K' = [Pk ; K],   V' = [Pv ; V]      along the token axis; the queries stay N

Every query may attend to the prefix: relative-position biases and window/shift masks get zero columns
(True in a boolean mask) for the L prefix keys. Reparameterised (the reference's form), ``[Pk | Pv] =
up(tanh(down(E)))`` with E an L x d table, down = Linear(d, m), up = Linear(m, 2d). Parameters per
attention layer: ``2·L·d`` free, ``L·d + d·m + m + 2d·m + 2d`` reparameterised (d: the width of k and of
v, narrower than the tokens with grouped-query attention).

Mechanism: while the surgery is present, the attention's instance ``forward`` runs its own forward (as it
was before the surgery) under a ``TorchFunctionMode`` that catches its one
``F.scaled_dot_product_attention`` call and concatenates the prefix to k and v there (and pads
``attn_mask``); the prefix is computed once per call, however many windows the call batches. Those are
the keys and values the attention consumes, after any q/k norm and rotary embedding: the prefix is
learned directly in that space, as the reference's prefix is the attention's ``past_key_values`` (which
hold keys after k-norm and rotary in models that have them), and prefix tokens have no position to
rotate. Attention with a non-fused path is switched to SDPA (``fused_attn = True``): in every supported
class both paths compute softmax(q k^T * head_dim^-0.5 + mask) v (outputs of the tiny test models agree to
1e-14 in float64). A forward in which the attention made no SDPA call, or several, raises instead of
running without the prefix, and only attention whose site vouches for one such call
(``AttentionSite.one_sdpa_call``: each zoo's layouts declare it per class with
``sites.register_prefix_call``, or per instance) is operated on at all.

Attention whose site names a ``prefix_route`` (transformers' models, whose core attention is the function
their attention interface dispatches to, eager or sdpa) takes the prefix there instead: the route's
patches make that call pass its keys, values and mask through :meth:`PrefixTokens.extend`.

Sites whose replacement forward makes its attention product through a module (``ATTENTION_CALL`` in the
site's patches: ``nn.MultiheadAttention``, whose own forward runs fused kernels) take the prefix there
instead: a forward-pre hook on that module prepends it to k and v (:meth:`PrefixTokens.into_call`), and
the replacement forward is shared with the other methods on the attention (PATT, LoRA), so they compose.
With ``need_weights=True`` the attention weights it returns cover the prefix keys too (the first L columns).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import OptionError, SurgeryRuntimeError
from ..patches import Patch, host_patches, installed
from ..sites import AttentionSite, Block
from ..sites.descriptors import ATTENTION_CALL
from .base import (
    CHILD_PREFIX,
    Hook,
    Insertion,
    Method,
    PetlModule,
    attention_of,
    check_choice,
    check_positive_int,
)
from .planning import PlanContext

INITS = ("reference", "zero")
# Why an attention whose layout declares no way in (no one-SDPA call, no route, no module call) takes no prefix.
NO_CALL = (
    "does not compute its attention with one F.scaled_dot_product_attention call on (batch, heads, tokens, "
    "head_dim) q/k/v (it computes attention inline, or it is not a softmax over tokens), so there is no "
    "call to put prefix keys and values into"
)
# Where the attention's SDPA call keeps its arguments, for calls that pass them by position.
SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

@dataclass(frozen=True)
class PrefixOptions:
    """Options of ``"prefix"``.

    Attributes:
        length: L, the number of prefix tokens per attention layer (16, V-PETL's prefix run).
        reparam: True (default, the reference's form): ``[Pk | Pv] = up(tanh(down(E)))`` with an L x d
            table E, down = Linear(d, mid_dim), up = Linear(mid_dim, 2d); False: Pk and Pv are free
            L x d tensors.
        mid_dim: m, the reparameterisation's hidden width (512, the ``mid_dim`` default of Li & Liang's
            and P-tuning v2's code; the methods doc fixes none). Ignored when ``reparam`` is False.
        init: "reference" (default): PyTorch's defaults as in the reference code: E ~ N(0, 1) (an
            ``nn.Embedding``), both Linears PyTorch's Linear init; free Pk, Pv ~ N(0, 1) (P-tuning v2's
            un-projected prefix is an ``nn.Embedding`` too). "zero": Pk = Pv = 0 (free tensors zero; the up
            projection zero). A zero prefix still changes the output: its zero logits take softmax mass.
    """

    length: int = 16
    reparam: bool = True
    mid_dim: int = 512
    init: str = "reference"

    def __post_init__(self) -> None:
        check_positive_int("prefix", "length", self.length)
        if not isinstance(self.reparam, bool):
            raise OptionError(f"option 'reparam' of method 'prefix' must be True or False; got {self.reparam!r}")
        check_positive_int("prefix", "mid_dim", self.mid_dim)
        check_choice("prefix", "init", self.init, INITS)


class PrefixTokens(PetlModule):
    """The prefix of one attention layer: ``forward()`` gives (Pk, Pv), L x d_k and L x d_v.

    It runs the attention's forward with the prefix put into the attention's SDPA call
    (:meth:`run_prefixed`, installed as the attention's instance ``forward``)."""

    component = "prefix"

    def __init__(
        self, site: AttentionSite, options: PrefixOptions, block: int, context: PlanContext
    ) -> None:
        super().__init__(context.method, context.recorded, block)
        kwargs = context.factory_kwargs(site.module)
        self.key_width = site.projections["k"].width
        self.value_width = site.projections["v"].width
        self.where = f"block {block} ({type(site.module).__name__} {site.path!r})"
        self.ran = False
        # in a mixed-task batch (petl_surgery.tasks): the prefix module of each task's run of samples at
        # this block, and the run's length; this module's call then gives every sample its own task's prefix
        self.mixed: Optional[List[Tuple["PrefixTokens", int]]] = None

        length, width = options.length, self.key_width + self.value_width
        if options.reparam:
            self.embedding = nn.Parameter(torch.empty(length, self.key_width, **kwargs))
            self.down = nn.Linear(self.key_width, options.mid_dim, **kwargs)
            self.up = nn.Linear(options.mid_dim, width, **kwargs)
            nn.init.normal_(self.embedding)
            if options.init == "zero":
                nn.init.zeros_(self.up.weight)
                nn.init.zeros_(self.up.bias)
        else:
            self.keys = nn.Parameter(torch.empty(length, self.key_width, **kwargs))
            self.values = nn.Parameter(torch.empty(length, self.value_width, **kwargs))
            for tensor in (self.keys, self.values):
                nn.init.zeros_(tensor) if options.init == "zero" else nn.init.normal_(tensor)

    def forward(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(Pk, Pv): the prefix keys and values (L x width), heads laid out contiguously along the channels;
        in a mixed-task batch, per sample (batch x L x width), each sample's from its own task's module."""
        if self.mixed is None:
            return self.own()
        keys, values = [], []
        for module, count in self.mixed:
            key, value = module.own()
            keys.append(key.expand(count, -1, -1))
            values.append(value.expand(count, -1, -1))
            module.ran = True  # its task's rows took its prefix here
        return torch.cat(keys), torch.cat(values)

    def own(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """This module's own (Pk, Pv)."""
        if hasattr(self, "embedding"):
            prefix = self.up(torch.tanh(self.down(self.embedding)))
            return prefix[:, : self.key_width], prefix[:, self.key_width :]
        return self.keys, self.values

    def run_prefixed(self, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``inner(*args, **kwargs)`` (the attention's own forward) with the prefix in its SDPA call; the
        prefix is computed once per call, however many windows the call batches."""
        keys, values = self()
        mode = PrefixIntoAttention(keys, values, self.where)
        with mode:
            output = inner(*args, **kwargs)
        if mode.calls == 0:
            raise SurgeryRuntimeError(
                f"the attention of {self.where} made no F.scaled_dot_product_attention call, so its prefix "
                "could not be used; remove the surgery and report the model"
            )
        self.ran = True
        return output

    def extend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The keys and values of one attention call with the prefix in front, and its mask padded
        (the ``extend`` of a site's ``prefix_route``)."""
        keys, values = self()
        tokens = key.shape[-2]
        key = prepend(key, keys, "key", self.where)
        value = prepend(value, values, "value", self.where)
        if mask is not None:
            mask = pad_mask(mask, tokens, keys.shape[-2])
        self.ran = True
        return key, value, mask

    def into_call(self, module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        """Forward-pre hook on a site's ``ATTENTION_CALL`` module, called ``(q, k, v, attn_mask,
        dropout_p, is_causal, ...)``: the prefix in front of k and v, the mask padded for it."""
        query, key, value, attn_mask, dropout_p, is_causal, *rest = args
        if is_causal:
            raise SurgeryRuntimeError(f"the attention of {self.where} is causal; a prefix for causal attention is not defined")
        key, value, attn_mask = self.extend(query, key, value, attn_mask)
        return (query, key, value, attn_mask, dropout_p, is_causal, *rest)

    def check_ran(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        """Forward hook on the attention: its call went through :meth:`run_prefixed`, :meth:`extend` or
        :meth:`into_call`."""
        ran, self.ran = self.ran, False
        if not ran:
            raise SurgeryRuntimeError(
                f"the attention of {self.where} ran without its prefix: its forward was replaced after the surgery"
            )


class PrefixIntoAttention(TorchFunctionMode):
    """Active during one attention forward: puts the prefix in front of the keys and values of the
    forward's ``F.scaled_dot_product_attention`` call and lets every other call through unchanged."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, where: str) -> None:
        super().__init__()
        self.keys = keys
        self.values = values
        self.where = where
        self.calls = 0

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        if self.calls > 1:
            raise SurgeryRuntimeError(
                f"the attention of {self.where} called F.scaled_dot_product_attention more than once in one "
                "forward; prefix tuning is defined for one attention call"
            )
        call = {**dict(zip(SDPA_PARAMETERS, args)), **kwargs}
        query, key, value = call.pop("query"), call.pop("key"), call.pop("value")
        if call.get("is_causal"):
            raise SurgeryRuntimeError(f"the attention of {self.where} is causal; a prefix for causal attention is not defined")
        tokens = key.shape[-2]
        key = prepend(key, self.keys, "key", self.where)
        value = prepend(value, self.values, "value", self.where)
        if call.get("attn_mask") is not None:
            call["attn_mask"] = pad_mask(call["attn_mask"], tokens, self.keys.shape[-2])
        return func(query, key, value, **call)


def prepend(tokens: torch.Tensor, prefix: torch.Tensor, role: str, where: str) -> torch.Tensor:
    """``[prefix ; tokens]`` along the token axis: ``prefix`` (L x kv_heads*head_dim) split into heads
    and expanded over the batch of ``tokens`` (batch, heads, S, head_dim) as a view. With grouped-query
    attention whose k/v heads the model repeats before SDPA, each prefix head serves its query group
    as the model's own k/v head does (``repeat_interleave``, the grouping of timm and of SDPA's
    ``enable_gqa``). A per-sample prefix (samples x L x width, a mixed-task batch) is repeated over each
    sample's rows when the call batches several per sample (Swin's windows, a sample's together)."""
    width = prefix.shape[-1]
    rows = tokens.shape[0] if tokens.dim() else 0
    if (
        tokens.dim() != 4 or width % tokens.shape[3] or tokens.shape[1] % (width // tokens.shape[3])
        or (prefix.dim() == 3 and rows % prefix.shape[0])
    ):
        raise SurgeryRuntimeError(
            f"the attention of {where} computes its attention on {role} of shape "
            f"{tuple(tokens.shape)}; the prefix needs (batch, heads, tokens, head_dim) with heads * head_dim "
            f"a multiple of its width {width}" + (f" and rows a multiple of its {prefix.shape[0]} samples"
                                                  if prefix.dim() == 3 else "")
        )
    batch, heads, _, head_dim = tokens.shape
    per_head = prefix.to(tokens.dtype).unflatten(-1, (width // head_dim, head_dim)).transpose(-3, -2)
    if per_head.shape[-3] != heads:
        per_head = per_head.repeat_interleave(heads // per_head.shape[-3], dim=-3)
    if per_head.dim() == 3:
        per_head = per_head.expand(batch, -1, -1, -1)
    elif per_head.shape[0] != batch:
        per_head = per_head.repeat_interleave(batch // per_head.shape[0], dim=0)
    return torch.cat([per_head, tokens], dim=2)


def pad_mask(mask: torch.Tensor, tokens: int, length: int) -> torch.Tensor:
    """``mask`` over (..., queries, tokens) with ``length`` columns in front that let every query attend
    to the prefix: additive 0 in a float mask, True in a boolean one."""
    leading = mask.shape[:-1] if mask.dim() else ()
    if mask.dim() == 0 or mask.shape[-1] == 1:
        mask = mask.expand(*leading, tokens)  # a mask broadcast over the keys must not reach the prefix
    fill = mask.new_ones(()) if mask.dtype == torch.bool else mask.new_zeros(())
    return torch.cat([fill.expand(*leading, length), mask], dim=-1)


def _owner(module: nn.Module, name: str) -> Tuple[nn.Module, str]:
    """The module and attribute a route's patch name means: ``"config"`` of ``module`` itself, or
    ``"attention.config"`` of its submodule ``attention``."""
    path, _, attribute = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attribute


def prefix_refusal(site: AttentionSite) -> Optional[str]:
    """Why a prefix cannot be put into ``site``'s attention, or None when it can."""
    if ATTENTION_CALL in site.patches:  # the site's own replacement forward, shared with other methods
        reason = site.unsupported
        if reason is None and not {"k", "v"} <= set(site.projections):
            reason = f"projects only {', '.join(site.projections)}, and a prefix needs k and v"
        return reason
    reason = site.unsupported or site.prefix_refusal or (None if site.prefix_route is not None or site.one_sdpa_call else NO_CALL)
    if reason is None and not {"k", "v"} <= set(site.projections):
        reason = f"projects only {', '.join(site.projections)}, and a prefix needs k and v"
    if reason is None and installed(site.module, "forward") is not None:
        reason = "has its forward replaced by another surgery already"
    return reason


class Prefix(Method):
    name = "prefix"
    Options = PrefixOptions
    adds_tokens = True
    identity_at_init = False

    @classmethod
    def plan_block(
        cls, block: Block, options: PrefixOptions, context: PlanContext
    ) -> List[Insertion]:
        method = context.method
        site = attention_of(block, method, prefix_refusal)
        prefix = PrefixTokens(site, options, block.index, context)
        if ATTENTION_CALL in site.patches:
            hooks = [
                Hook(site.producer(ATTENTION_CALL), "forward_pre", prefix.into_call),
                Hook(site.module, "forward", prefix.check_ran),
            ]
            patches = host_patches(site.module, dict(site.patches))
            return [Insertion(block.index, site.path, site.module, CHILD_PREFIX + method, prefix, hooks, patches)]
        if site.prefix_route is not None:
            # the function the attention dispatches to takes the prefix (a layer of its own, removed with it)
            routed = site.prefix_route(prefix.extend)
            patches = [Patch(*_owner(site.module, name), value, shared=False) for name, value in routed.items()]
        else:
            # the prefix's own forward wraps the attention's: a layer of its own, removed with it
            patches = [Patch(site.module, "forward", functools.partial(prefix.run_prefixed, site.module.forward), shared=False)]
        if site.prefix_route is None and hasattr(site.module, "fused_attn"):
            patches.append(Patch(site.module, "fused_attn", True))  # the non-fused path is the same attention
        hooks = [Hook(site.module, "forward", prefix.check_ran)]
        return [Insertion(block.index, site.path, site.module, CHILD_PREFIX + method, prefix, hooks, patches)]
