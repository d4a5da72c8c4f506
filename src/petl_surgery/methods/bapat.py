"""BAPAT: a parallel bottleneck adapter on every MLP plus PATT on every attention (V-PETL's best scheme,
"Swin-BAPAT"), with the published settings: adapter r 64, s 0.1; PATT kv, m 128, s 0.8.

Both halves have a ``scale``, so BAPAT names them ``adapter_scale`` and ``patt_scale``; every other
option of the adapter and of PATT is accepted under its own name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Union

from ..errors import OptionError
from ..sites import Block
from .adapter import Adapter, AdapterOptions
from .base import Insertion, Method
from .planning import PlanContext
from .patt import Patt, PattOptions


@dataclass(frozen=True)
class BapatOptions:
    """Options of ``"bapat"``: PATT's (``mode``, ``mid_dim``, ``patt_scale``, ``init``) and the
    adapter's (``bottleneck``, ``adapter_scale``, ``position``, ``layernorm``, ``dropout``, ``input``),
    with V-PETL's defaults."""

    mode: str = "kv"
    mid_dim: int = 128
    patt_scale: float = 0.8
    init: str = "zero"
    bottleneck: int = 64
    adapter_scale: Union[float, str] = 0.1
    position: str = "parallel"
    layernorm: Optional[str] = None
    dropout: float = 0.0
    input: str = "mlp"

    def __post_init__(self) -> None:
        self.patt_options()
        self.adapter_options()

    def patt_options(self) -> PattOptions:
        return PattOptions(mode=self.mode, mid_dim=self.mid_dim, scale=self.patt_scale, init=self.init)

    def adapter_options(self) -> AdapterOptions:
        return AdapterOptions(
            bottleneck=self.bottleneck,
            scale=self.adapter_scale,
            position=self.position,
            layernorm=self.layernorm,
            dropout=self.dropout,
            input=self.input,
        )


class Bapat(Method):
    name = "bapat"
    Options = BapatOptions
    takes_branch_dtype = True

    @classmethod
    def parse_options(cls, given: Mapping[str, Any]) -> Any:
        if "scale" in given:
            raise OptionError(
                "option 'scale' of method 'bapat' is ambiguous: give 'patt_scale' (PATT's, default 0.8) "
                "or 'adapter_scale' (the adapter's, default 0.1)"
            )
        return super().parse_options(given)

    @classmethod
    def plan_block(cls, block: Block, options: BapatOptions, context: PlanContext) -> List[Insertion]:
        return Patt.plan_block(block, options.patt_options(), context) + Adapter.plan_block(
            block, options.adapter_options(), context
        )
