"""Convpass, convolutional bypasses (Jie & Deng, "Convolutional Bypasses Are Better Vision Transformer
Adapters", arXiv 2207.07039; code JieShibo/PETL-ViT ``convpass/vtab/convpass.py``).

A small convolutional branch runs beside the attention and beside the MLP, on the same input, and its
output is added to theirs (paper 3.2, the code's ``forward_block``)::

    x = x + attn(n1) + s * C1(n1)          n1 = norm1(x)
    x = x + mlp(n2)  + s * C2(n2)          n2 = norm2(x)

    C(x): z = QuickGELU(W_d x + b_d)                        W_d: h x d        QuickGELU(u) = u sigmoid(1.702 u)
          patch tokens of z -> (B, h, rows, cols), row by row; Conv2d(h, h, 3, padding 1)
          each token in front of the patches (class, distillation, register tokens) convolved as its own
          1x1 image: z_t W[:, :, 1, 1]^T + b_conv (the centre tap; the code does this for the class token)
          z = Dropout(QuickGELU([front; patches])) ;  C(x) = W_u z + b_u        W_u: d x h

- Flat-token models only, with the token layout prompt tuning uses (:mod:`petl_surgery.sites.tokens`):
  the grid is read at every forward from the image the model's patch embedding receives (so it follows
  timm's ``set_input_size`` and ``dynamic_img_size``), and the patch tokens are the last rows x cols
  tokens; the
  code hard-codes ViT-B's 768 channels, 14 x 14 grid and one class token. Every token in front of the
  patches is treated as the class token is (registers, and prompt tokens VPT inserts, are our
  extension). Hierarchical models (Swin: the code's ``Convpass_swin`` convolves all tokens on the
  stage's grid) are refused by name. The bypass's output joins the attention's (MLP's) output, so the
  block's layer scale and drop-path apply to both; the code draws a separate drop-path mask for it.
- Init (code defaults): W_d xavier-uniform, conv weight zero with its centre tap the identity
  (``xavier_init=False``; "xavier": xavier-uniform, chosen per task in the code's configs), W_u and all
  biases zero, so the output is exactly unchanged at start.
- h = 8; s is tuned per task over {0.01, 0.1, 1, 10, 100} (paper B.4, ``configs/convpass/*.yaml``); the
  default 1 is ``set_Convpass``'s. Dropout 0.1 (the code's). ``positions=("attention",)`` is the
  code's ``convpass_attn`` variant.

Trainable parameters: ``2 L ((2 h + 1) d + 9 h^2 + 2 h)`` (paper 3.2); ViT-B/16 (L 12, d 768), h 8:
327,552, the paper's 0.33M (PETL_Vision logs the same count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SurgeryError, SurgeryRuntimeError, UnsupportedModelError
from ..sites import Block
from ..sites.tokens import GridSource, token_layout
from .adapter import mlp_host, mlp_of
from .base import (
    CHILD_PREFIX,
    Hook,
    Insertion,
    SUBLAYERS,
    Method,
    PetlModule,
    UnsupportedBlockError,
    attention_of,
    branch_input,
    check_choice,
    check_number,
    check_positive_int,
    parse_sublayers,
)
from ..selection import LayerSelection
from .planning import PlanContext, choose_blocks, plan_each_block

CONV_INITS = ("identity", "xavier")


@dataclass(frozen=True)
class ConvpassOptions:
    """Options of ``"convpass"``. Defaults are the code's (``set_Convpass``, ``Convpass``).

    Attributes:
        bottleneck: hidden width h (8).
        scale: s, the factor on the bypass's output (1.0; tuned per task in the paper).
        conv_init: "identity" (default: the 3x3 kernel zero with its centre the identity) or "xavier".
        dropout: dropout before the up projection, in training only (0.1).
        positions: beside which sublayers, among "attention" and "mlp" (default both; ("attention",)
            is the code's ``convpass_attn``).
    """

    bottleneck: int = 8
    scale: float = 1.0
    conv_init: str = "identity"
    dropout: float = 0.1
    positions: Union[str, Sequence[str]] = SUBLAYERS

    def __post_init__(self) -> None:
        check_positive_int("convpass", "bottleneck", self.bottleneck)
        check_number("convpass", "scale", self.scale)
        check_choice("convpass", "conv_init", self.conv_init, CONV_INITS)
        check_number("convpass", "dropout", self.dropout, low=0.0, high=1.0)
        object.__setattr__(self, "positions", parse_sublayers("convpass", "positions", self.positions))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ConvolutionalBypass(PetlModule):
    """One Convpass branch beside one attention or one MLP of a flat-token model."""

    component = "convpass"

    def __init__(
        self,
        width: int,
        source: GridSource,
        prefix: int,
        options: ConvpassOptions,
        reference: nn.Module,
        block: int,
        context: PlanContext,
    ) -> None:
        super().__init__(context.method, context.recorded, block)
        kwargs = context.factory_kwargs(reference)
        hidden = options.bottleneck
        self.grid_of = source.grid_of
        self.grid: Optional[Tuple[int, int]] = None  # of the current forward, set by ``read_grid``
        self.prefix = prefix
        self.scale = float(options.scale)
        self.down = nn.Linear(width, hidden, **kwargs)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, **kwargs)
        self.up = nn.Linear(hidden, width, **kwargs)
        self.dropout = nn.Dropout(options.dropout)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.up.weight)
        if options.conv_init == "xavier":
            nn.init.xavier_uniform_(self.conv.weight)
        else:
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:, :, 1, 1] = torch.eye(hidden, **kwargs)
        for bias in (self.down.bias, self.conv.bias, self.up.bias):
            nn.init.zeros_(bias)
        self._input: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``s * C(x)`` for tokens ``x`` (B, N, d): the patch tokens are the last rows x cols of them."""
        if self.grid is None:
            raise RuntimeError(
                f"convpass of block {self.block}: the patch grid of this forward is unknown, because the model's "
                "patch embedding did not run before this block (convpass reads the grid from the image it embeds)"
            )
        rows, columns = self.grid
        batch, tokens, _ = x.shape
        front = tokens - rows * columns
        if front < self.prefix:
            raise SurgeryRuntimeError(
                f"convpass of block {self.block}: got {tokens} tokens, but the model's {rows} x {columns} patch "
                f"grid (of this forward's image) and its {self.prefix} prefix tokens need at least "
                f"{rows * columns + self.prefix}"
            )
        z = quick_gelu(F.linear(branch_input(x, self.down.weight), self.down.weight, self.down.bias))
        patches = z[:, front:].reshape(batch, rows, columns, -1).permute(0, 3, 1, 2)
        patches = self.conv(patches).permute(0, 2, 3, 1).reshape(batch, rows * columns, -1)
        # a 1x1 image under a 3x3 kernel with padding 1 meets only the kernel's centre
        alone = F.linear(z[:, :front], self.conv.weight[:, :, 1, 1], self.conv.bias)
        z = quick_gelu(torch.cat([alone, patches], dim=1))
        if self.training and self.dropout.p > 0:
            z = self.dropout(z)
        return F.linear(z, self.up.weight * self.scale, self.up.bias * self.scale)

    def read_grid(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        """Forward-pre hook on the patch embedding: the grid of the image it is about to embed."""
        height, width = args[0].shape[-2:]
        self.grid = tuple(int(size) for size in self.grid_of((int(height), int(width))))

    def add_beside(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output + self._checked(args[0]).to(output.dtype)

    def read_input(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        self._input = self._checked(args[0])

    def add_read(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        z, self._input = self._input, None
        if z is None:
            raise SurgeryRuntimeError(f"convpass of block {self.block}: the MLP ended without having started")
        return output + z.to(output.dtype)

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise SurgeryRuntimeError(f"convpass of block {self.block}: expected tokens (B, N, d), got shape {tuple(x.shape)}")
        return self(x)


class ConvpassPlanner:
    """Plans Convpass on one flat-token model: its patch grid and prefix count are known to every block."""

    def __init__(self, model: nn.Module, blocks: Sequence[Block]) -> None:
        try:
            layout = token_layout(model, blocks)
        except SurgeryError as error:
            raise UnsupportedModelError(
                f"method 'convpass' lays the patch tokens out on their grid and needs the flat token layout "
                f"prompt tuning uses; {error}"
            ) from None
        if layout.grid_source is None:
            raise UnsupportedModelError(
                f"method 'convpass' reads the patch grid of each forward from the patch embedding of "
                f"{type(model).__name__}, and petl_surgery does not know where it is (it knows timm's flat-token "
                "models)"
            )
        self.source = layout.grid_source
        self.prefix = layout.num_prefix_tokens

    def plan_block(self, block: Block, options: ConvpassOptions, context: PlanContext) -> List[Insertion]:
        method = context.method
        def bypass(width: int, reference: nn.Module) -> ConvolutionalBypass:
            return ConvolutionalBypass(width, self.source, self.prefix, options, reference, block.index, context)

        def grid_hook(inserted: ConvolutionalBypass) -> Hook:
            return Hook(self.source.module, "forward_pre", inserted.read_grid)

        insertions = []
        if "attention" in options.positions:
            attention = attention_of(block, method, refusal=None)
            if attention.module is block.module:
                raise UnsupportedBlockError(
                    f"method {method!r} runs beside the attention on its input, and in block {block.index} "
                    f"({block.path!r}, {type(block.module).__name__}) the attention is the whole block"
                )
            if attention.output is not None and attention.output.width != attention.in_features:
                raise UnsupportedBlockError(
                    f"method {method!r} adds its bypass of the attention's input to its output, and in block "
                    f"{block.index} the attention {attention.path!r} maps {attention.in_features} channels to "
                    f"{attention.output.width}"
                )
            first = bypass(attention.in_features, attention.module)
            hooks = [grid_hook(first), Hook(attention.module, "forward", first.add_beside)]
            insertions.append(Insertion(block.index, attention.path, attention.module, CHILD_PREFIX + method, first, hooks))
        if "mlp" in options.positions:
            mlp = mlp_of(block, method)
            if mlp.in_features != mlp.out_features:
                raise UnsupportedBlockError(
                    f"method {method!r} needs an MLP whose input and output widths agree in block {block.index}; "
                    f"{mlp.path!r} maps {mlp.in_features} to {mlp.out_features}"
                )
            second = bypass(mlp.in_features, mlp.module)
            if mlp.input_module is None:
                hooks = [Hook(mlp.module, "forward", second.add_beside)]
            else:  # an MLP its block runs inline: read where it starts, add where it ends
                hooks = [Hook(mlp.input_module, "forward_pre", second.read_input), Hook(mlp.module, "forward", second.add_read)]
            hooks.insert(0, grid_hook(second))
            host_path, host = mlp_host(block, mlp)
            insertions.append(Insertion(block.index, host_path, host, CHILD_PREFIX + method, second, hooks))
        return insertions


class Convpass(Method):
    name = "convpass"
    Options = ConvpassOptions
    takes_branch_dtype = True
    needs_token_grid = True

    @classmethod
    def plan(cls, model: nn.Module, layers: LayerSelection, options: ConvpassOptions, context: PlanContext) -> List[Insertion]:
        """The chosen blocks, planned with the patch grid and prefix count of the whole model."""
        blocks, chosen = choose_blocks(model, layers, context)
        planner = ConvpassPlanner(model, blocks)
        return plan_each_block(blocks, chosen, lambda block: planner.plan_block(block, options, context), context)
