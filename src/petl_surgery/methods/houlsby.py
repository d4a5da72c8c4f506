"""The Houlsby adapter (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019,
arXiv 1902.00751; code google-research/adapter-bert ``modeling.py`` ``feedforward_adapter``).

Two sequential bottleneck adapters per block, each on a sublayer's output before its residual add::

    A(y) = y + W_u act(W_d y + b_d) + b_u          W_d: h x d, W_u: d x h
    pre-norm block:  x = x + A1(attn(norm1 x));  x = x + A2(mlp(norm2 x))

A1 acts on the output of the attention's output projection (``proj`` in timm), A2 on the MLP's output
(after its last dropout, as adapter-bert places it after the output dense layer and its dropout).

- Placement: the site descriptions name the attention's output projection, so A1 runs on its output,
  before the attention's output dropout (``proj_drop``, 0 in timm's models; adapter-bert runs it after
  its dropout); A2 on the MLP's output. Both run before the block's layer scale and drop-path, where
  BERT has none; visinf/adapter_plus's ViT code (``forward_houlsby``) runs them after both, which is the
  same in eval mode for models without layer scale (ViT-B/16) and differs where a layer scale exists
  (DeiT3, DINOv2: here ``ls(A(y))``, there ``A(ls(y))``).
- Init "houlsby" (default): near-identity, not exact: both weights truncated normal (std 0.01, cut at
  +-2 std), biases zero. 0.01 is the paper's value as visinf/adapter_plus (the VTAB-1k reproduction of
  the Adapter+ paper) uses it; adapter-bert's code uses 1e-3 (``init_std=0.001``). Init "lora": up
  projection zero, so the output is exactly unchanged at start.
- Activation: "gelu" (default, the ViT's own ``nn.GELU``, as in visinf/adapter_plus); adapter-bert uses
  the tanh approximation ("gelu_tanh"); OSU-MLB/PETL_Vision's variant ReLU ("relu").
- h = 8 on VTAB-1k (the Convpass paper's baseline, 4.1; adapter_plus ``houlsby_dim8``).
- The paper also trains the LayerNorms; here they stay frozen unless ``apply(..., unfreeze=r"norm")``.

Trainable parameters: ``2 L (2 d h + h + d)``; ViT-B/16 (L 12, d 768), h 8: 313,536; h 32: 1,198,848
(the count PETL_Vision logs). Tables quoting "Adapter 0.16M" (Convpass, Table 1) count one adapter per
block after the MLP (Pfeiffer's placement): 156,768 at h 8, half of Houlsby's.
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
    attention_of,
    check_choice,
    check_number,
    check_positive_int,
)
from .planning import PlanContext


@dataclass(frozen=True)
class HoulsbyOptions:
    """Options of ``"houlsby"``.

    Attributes:
        bottleneck: hidden width h (8, the VTAB-1k setting).
        activation: "gelu" (default), "gelu_tanh" (adapter-bert) or "relu".
        init: "houlsby" (default, near-identity: truncated normal weights of std ``init_std``, zero
            biases) or "lora" (down kaiming-uniform, up zero: exactly the identity at start).
        init_std: std of the "houlsby" init (0.01; adapter-bert's code 0.001).
        dropout: dropout after the activation, in training only (0.0).
    """

    bottleneck: int = 8
    activation: str = "gelu"
    init: str = "houlsby"
    init_std: float = 0.01
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int("houlsby", "bottleneck", self.bottleneck)
        check_choice("houlsby", "activation", self.activation, ACTIVATIONS)
        check_choice("houlsby", "init", self.init, INITS)
        check_number("houlsby", "init_std", self.init_std, low=0.0)
        check_number("houlsby", "dropout", self.dropout, low=0.0, high=1.0)

    def bottleneck_of(self, width: int) -> Bottleneck:
        return Bottleneck(
            width, width, self.bottleneck, 1.0, None, self.dropout, self.activation, self.init, self.init_std
        )


class Houlsby(Method):
    name = "houlsby"
    Options = HoulsbyOptions
    identity_at_init = False  # truncated normal, std 0.01 (the paper's near-identity init)
    identity_options = {"init": "lora"}
    takes_branch_dtype = True

    @classmethod
    def plan_block(cls, block: Block, options: HoulsbyOptions, context: PlanContext) -> List[Insertion]:
        method = context.method
        where = f"block {block.index} ({block.path!r})"
        # the adapter reads the attention's output, whatever its q/k/v do: no refusal of the layout
        attention = attention_of(block, method, refusal=None)
        if attention.output is None:
            raise UnsupportedBlockError(
                f"method {method!r} needs the output projection of the attention {attention.path!r} "
                f"({type(attention.module).__name__}) in {where}, and its layout names none"
            )
        mlp = mlp_of(block, method)
        mlp_path, mlp_module = mlp_host(block, mlp)
        if mlp_module is attention.module:
            raise UnsupportedBlockError(
                f"method {method!r} cannot host two adapters on {where}: its attention and its MLP are one module"
            )
        projection = attention.producer(attention.output.module)
        first = BottleneckAdapter(
            options.bottleneck_of(attention.output.width), attention.channel_dim, projection, block.index, context
        )
        second = BottleneckAdapter(
            options.bottleneck_of(mlp.out_features), mlp.channel_dim, mlp.module, block.index, context
        )
        return [
            Insertion(
                block.index, attention.path, attention.module, CHILD_PREFIX + method, first,
                [Hook(projection, "forward", first.add_sequential)],
            ),
            Insertion(
                block.index, mlp_path, mlp_module, CHILD_PREFIX + method, second,
                [Hook(mlp.module, "forward", second.add_sequential)],
            ),
        ]
