"""The PETL methods, by name."""

import dataclasses
from typing import Dict, List, Type

from ..errors import OptionError, SurgeryError
from .adapter import Adapter, AdapterOptions, BottleneckAdapter
from .bapat import Bapat, BapatOptions
from .dora import Dora, DoraOptions, WeightDecomposedAdapter
from .fact import Fact, FactOptions, FactorTuning, SharedFactors
from .base import Insertion, Method, PetlModule
from .lora import Lora, LoraOptions, LowRankAdapter
from .patt import ParallelAttentionBranch, Patt, PattOptions
from .prefix import Prefix, PrefixOptions, PrefixTokens
from .ssf import FeatureScaleShift, Ssf, SsfOptions
from .vpt import Vpt, VptOptions
from .houlsby import Houlsby, HoulsbyOptions
from .adapter_plus import AdapterPlus, AdapterPlusOptions
from .convpass import ConvolutionalBypass, Convpass, ConvpassOptions
from .repadapter import RepAdapter, RepAdapterOptions, ReparameterisableAdapter

# The registry: every method, in the order the public tables list them. A method's capabilities are
# declared on its class (:class:`Method`); nothing else lists method names.
METHODS: Dict[str, Type[Method]] = {}


def register(method: Type[Method]) -> Type[Method]:
    """Add ``method`` to the registry under ``method.name`` and return it (usable as a class decorator).

    Raises SurgeryError, registering nothing, when the class is not a :class:`Method` with a ``name`` and
    an ``Options`` dataclass, when its declared capabilities contradict each other, or when another
    method has that name already."""
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise SurgeryError(f"register takes a subclass of petl_surgery.methods.Method; got {method!r}")
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise SurgeryError(f"method class {method.__name__} needs a 'name' that is a Python identifier; got {name!r}")
    if not dataclasses.is_dataclass(getattr(method, "Options", None)):
        raise SurgeryError(f"method {name!r} needs an 'Options' dataclass (its options, with their defaults)")
    if method.adds_tokens and (method.identity_at_init or method.identity_options):
        raise SurgeryError(f"method {name!r} adds tokens, so no initialisation leaves the outputs unchanged")
    unknown = set(method.identity_options) - {field.name for field in dataclasses.fields(method.Options)}
    if unknown:
        raise SurgeryError(f"method {name!r}: identity_options names unknown options {sorted(unknown)}")
    if METHODS.get(name, method) is not method:
        raise SurgeryError(f"a method named {name!r} is registered already ({METHODS[name].__name__})")
    METHODS[name] = method
    return method


for _method in (Patt, Adapter, Bapat, Lora, Prefix, Vpt, Ssf, Houlsby, AdapterPlus, Convpass, RepAdapter, Fact, Dora):
    register(_method)


def get_method(name: object) -> Type[Method]:
    """The method called ``name``; raises SurgeryError listing the known ones otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise OptionError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def capable(capability: str) -> List[str]:
    """The names of the registered methods whose ``capability`` (a boolean class attribute of
    :class:`Method`, e.g. ``"mergeable"``) is true, in registry order."""
    if not isinstance(getattr(Method, capability, None), bool):
        raise SurgeryError(f"{capability!r} is not a capability of petl_surgery.methods.Method")
    return [name for name, method in METHODS.items() if getattr(method, capability)]


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
    "VptOptions",
    "WeightDecomposedAdapter",
    "capable",
    "get_method",
    "register",
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
