"""The PETL methods, by name."""

from typing import Dict, Type

from ..errors import SurgeryError
from .adapter import Adapter, AdapterOptions, BottleneckAdapter
from .bapat import Bapat, BapatOptions
from .dora import Dora, DoraOptions, WeightDecomposedAdapter
from .fact import Fact, FactOptions, FactorTuning, SharedFactors
from .base import Insertion, Method, PetlModule
from .lora import Lora, LoraOptions, LowRankAdapter
from .patt import ParallelAttentionBranch, Patt, PattOptions
from .prefix import Prefix, PrefixOptions, PrefixTokens
from .ssf import FeatureScaleShift, Ssf, SsfOptions
from .vpt import Vpt
from .houlsby import Houlsby, HoulsbyOptions
from .adapter_plus import AdapterPlus, AdapterPlusOptions
from .convpass import ConvolutionalBypass, Convpass, ConvpassOptions
from .repadapter import RepAdapter, RepAdapterOptions, ReparameterisableAdapter

METHODS: Dict[str, Type[Method]] = {method.name: method for method in (Patt, Adapter, Bapat, Lora, Prefix, Vpt, Ssf)}
METHODS.update({method.name: method for method in (Houlsby, AdapterPlus, Convpass, RepAdapter, Fact, Dora)})


def get_method(name: object) -> Type[Method]:
    """The method called ``name``; raises SurgeryError listing the known ones otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise SurgeryError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "Adapter",
    "AdapterOptions",
    "Bapat",
    "Fact",
    "FactOptions",
    "FactorTuning",
    "FeatureScaleShift",
    "BapatOptions",
    "BottleneckAdapter",
    "Dora",
    "DoraOptions",
    "Insertion",
    "Lora",
    "LoraOptions",
    "LowRankAdapter",
    "Method",
    "ParallelAttentionBranch",
    "Patt",
    "PattOptions",
    "PetlModule",
    "Prefix",
    "PrefixOptions",
    "PrefixTokens",
    "Ssf",
    "SharedFactors",
    "SsfOptions",
    "Vpt",
    "WeightDecomposedAdapter",
    "get_method",
    "Houlsby",
    "HoulsbyOptions",
    "AdapterPlus",
    "AdapterPlusOptions",
    "Convpass",
    "ConvpassOptions",
    "ConvolutionalBypass",
    "RepAdapter",
    "RepAdapterOptions",
    "ReparameterisableAdapter",
]
