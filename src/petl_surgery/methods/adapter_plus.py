"""Adapter+ (Steitz & Roth, "Adapters Strike Back", CVPR 2024, arXiv 2406.06820; code
visinf/adapter_plus ``adapter_plus/vit_adapter.py``, ``conf/adapter/adapter_plus.yaml``).

One bottleneck adapter per block, on the block's residual stream after the MLP's residual add (the
paper's "Post-Adapter" position), with a learnable scale per channel and no LayerNorm::

    x = x + attn(norm1 x);  x = x + mlp(norm2 x)
    x = x + c * DP(W_u GELU(W_d x + b_d) + b_u)          W_d: r x d, W_u: d x r, c: d (init 1)

DP is stochastic depth on the adapter's output (rate 0.1, training only). The site descriptions name
where the MLP's residual branch starts (the residual stream x before it) and ends (its last module, y):
the adapter adds ``z(x + y)`` to y there, so the block's residual add gives ``x' + z(x')``.

- Defaults (``conf/adapter/base_adapter.yaml`` + ``adapter_plus.yaml``): r = 8 (``adapter_plus_dim8``;
  "Adapter+ opt." tunes r per task in 1..32), ``scaling: channel``, ``norm_layer: false``, bias on,
  dropout 0, ``drop_path: 0.1``, the ViT's activation (``nn.GELU``), init ``houlsby``: both weights
  truncated normal (std 0.01, cut at +-0.02), biases zero. That init is near-identity, not exact; init
  "lora" (up zero) keeps the output exactly unchanged at start. AdapterHub's ``AdapterPlusConfig``
  agrees (output adapter only, Houlsby init, channel scaling, stochastic depth 0.1).

Trainable parameters per block: ``2 d r + r + 2 d`` (down, up and the channel scale); ViT-B/16 (L 12,
d 768), r 8: 165,984. The paper's own table count is not checked here (its code logs include the head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from ..sites import Block
from .adapter import ACTIVATIONS, INITS, Bottleneck, BottleneckAdapter, mlp_host, mlp_of
from .base import (
    CHILD_PREFIX,
    Hook,
    Insertion,
    Method,
    UnsupportedBlockError,
    check_choice,
    check_number,
    check_positive_int,
)
from .planning import PlanContext


@dataclass(frozen=True)
class AdapterPlusOptions:
    """Options of ``"adapter_plus"``. Defaults are visinf/adapter_plus's ``adapter_plus`` config.

    Attributes:
        bottleneck: hidden width r (8).
        drop_path: stochastic depth on the adapter's output, in training only (0.1).
        init: "houlsby" (default: truncated normal weights of std ``init_std``, zero biases) or "lora"
            (down kaiming-uniform, up zero: exactly the identity at start).
        init_std: std of the "houlsby" init (0.01).
        activation: "gelu" (default, the ViT's), "gelu_tanh" or "relu".
        dropout: dropout after the activation, in training only (0.0).
    """

    bottleneck: int = 8
    drop_path: float = 0.1
    init: str = "houlsby"
    init_std: float = 0.01
    activation: str = "gelu"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int("adapter_plus", "bottleneck", self.bottleneck)
        check_number("adapter_plus", "drop_path", self.drop_path, low=0.0, high=0.999)
        check_choice("adapter_plus", "init", self.init, INITS)
        check_number("adapter_plus", "init_std", self.init_std, low=0.0)
        check_choice("adapter_plus", "activation", self.activation, ACTIVATIONS)
        check_number("adapter_plus", "dropout", self.dropout, low=0.0, high=1.0)


class AdapterPlus(Method):
    name = "adapter_plus"
    Options = AdapterPlusOptions
    identity_at_init = False  # truncated normal, std 0.01 (Houlsby's near-identity init)
    identity_options = {"init": "lora"}
    takes_branch_dtype = True

    @classmethod
    def plan_block(cls, block: Block, options: AdapterPlusOptions, context: PlanContext) -> List[Insertion]:
        method = context.method
        site = mlp_of(block, method)
        if site.residual_input is None or site.residual_output is None:
            raise UnsupportedBlockError(
                f"method {method!r} adds to the residual stream after the MLP, and block {block.index} "
                f"({block.path!r}, {type(block.module).__name__}) has no registered layout of where the MLP's "
                "residual branch starts and ends"
            )
        shape = Bottleneck(
            site.out_features, site.out_features, options.bottleneck, "channel", None, options.dropout,
            options.activation, options.init, options.init_std, options.drop_path,
        )
        adapter = BottleneckAdapter(shape, site.channel_dim, site.module, block.index, context)
        hooks = [
            Hook(site.residual_input, "forward_pre", adapter.keep_stream),
            Hook(site.residual_output, "forward", adapter.add_after_stream),
        ]
        host_path, host = mlp_host(block, site)
        return [Insertion(block.index, host_path, host, CHILD_PREFIX + method, adapter, hooks)]
