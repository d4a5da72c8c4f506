"""The timm sweep's variants: entrypoints beyond each module's smallest, chosen so that the sweep builds every
distinct attention, rotary-embedding and MLP class that timm's entrypoints reach.

A module's smallest entrypoint (timm_smallest.json) does not hold every class its module can build: a
variant may use other attention (``vit_*_dwee_*``'s differential attention in ``vision_transformer``),
other rotary embeddings (``vit_*_rope_mixed_*``'s RotaryEmbeddingMixed in ``eva``) or other MLPs. ``timm_variants.json``
(next to this file) holds:

- ``classes``: every swept class (:func:`swept_classes`) of every entrypoint, built in its default
  configuration on the meta device, as ``module.QualName`` -> the entrypoint that covers it in the sweep;
- ``variants``: the entrypoints added to the smallest ones so that every class is covered, each with its
  tiny configuration (as timm_smallest.json's, one that still builds the classes it was chosen for) and
  those classes; chosen greedily, most uncovered classes first, then fewest parameters;
- ``unbuilt``: entrypoints that do not build on the meta device (not counted).

Generated, never written by hand: ``python docs/make_coverage.py --timm-variants`` (every entrypoint is
built once on the meta device: about 20 minutes on a busy 2-core machine; ``--census-cache FILE`` keeps
that census, and ``python tests/timm_variants.py SHARD SHARDS OUT.json`` computes a share of it in a
process of its own, the shares merged into the cache file). ``timm`` in the JSON lists the versions it
was generated on (1.0.31). Run on another timm, it keeps the entrypoints and classes of entrypoints
that timm does not register; the test skips a variant the installed timm does not register, naming the
version (timm 1.0.30 lacks ``test_coatnet``, whose ``maxxvit.Attention2d`` the family tests build).
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

import torch
from torch import nn
from timm_sweep import build, load_table, registered_modules, tiny_entry

VARIANTS = Path(__file__).with_name("timm_variants.json")
# Class names that say attention, rotary embedding or MLP (timm's own names: Attention, WindowAttention,
# ClassAttn, RotaryEmbeddingCat, AttentionRope, Mlp, SwiGLU's GluMlp, ConvMlp, LevitMlp, FeedForward, Ffn).
SWEPT_NAME = re.compile(r"attn|attention|rope|rotary|mlp|ffn|feedforward|swiglu|glu", re.IGNORECASE)


def swept_classes(model: nn.Module) -> Set[str]:
    """``module.QualName`` of every class in ``model`` that the sweep must reach: registered attention and
    MLP classes, classes registered as not attention, classes with ``num_heads`` (what site discovery
    takes for attention) and classes whose name says attention, rotary embedding or MLP."""
    from petl_surgery.sites.registry import ATTENTION_LAYOUTS, MLP_LAYOUTS, NOT_ATTENTION, run_deferred

    run_deferred()
    found = set()
    for module in model.modules():
        cls = type(module)
        registered = cls in ATTENTION_LAYOUTS or cls in MLP_LAYOUTS or cls in NOT_ATTENTION
        if registered or hasattr(module, "num_heads") or SWEPT_NAME.search(cls.__name__):
            found.add(f"{cls.__module__}.{cls.__qualname__}")
    return found


def census(log=print, shard: int = 0, shards: int = 1) -> Dict[str, Optional[Dict[str, Any]]]:
    """Every entrypoint of the installed timm (every ``shards``-th from the ``shard``-th, for a census in
    several processes) -> its parameter count and swept classes in its default configuration on the meta
    device, or None when it does not build there."""
    import timm

    found: Dict[str, Optional[Dict[str, Any]]] = {}
    started = time.perf_counter()
    for index, name in enumerate(sorted(timm.list_models())[shard::shards]):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception:
            found[name] = None
            continue
        found[name] = {"params": sum(p.numel() for p in model.parameters()), "classes": sorted(swept_classes(model))}
        if index % 100 == 0:
            log(f"census: {index} entrypoints ({time.perf_counter() - started:.0f} s)", flush=True)
    return found


def cover(found: Dict[str, Optional[Dict[str, Any]]], held: Set[str]) -> List[str]:
    """Entrypoints that together hold every class ``found`` lists besides the classes ``held`` already:
    greedily, the one with the most classes not yet held, then the one with fewest parameters, then by
    name."""
    built = {name: entry for name, entry in found.items() if entry is not None}
    remaining = set().union(*(entry["classes"] for entry in built.values())) - held
    chosen: List[str] = []
    while remaining:
        name = min(
            (name for name in built if name not in chosen),
            key=lambda n: (-len(remaining & set(built[n]["classes"])), built[n]["params"], n),
        )
        chosen.append(name)
        remaining -= set(built[name]["classes"])
    return chosen


def load_variants() -> Dict[str, Any]:
    return json.loads(VARIANTS.read_text()) if VARIANTS.exists() else {"classes": {}, "variants": [], "unbuilt": []}


def make_variants(census_cache: Optional[Path] = None, log=print) -> Dict[str, Any]:
    """Regenerate VARIANTS for the installed timm, keeping what only another timm version registers. The
    smallest entrypoints hold the classes of their tiny configurations (what the sweep builds);
    ``census_cache``: a file that keeps the census (the minutes of this) between runs."""
    import timm

    old = load_variants()
    registered = {name for names in registered_modules().values() for name in names}
    if census_cache is not None and census_cache.exists():
        found = json.loads(census_cache.read_text())
        missing = sorted(set(timm.list_models()) - set(found))
        if missing:
            raise SystemExit(f"{census_cache} lacks {len(missing)} entrypoints of this timm ({missing[:3]}...)")
    else:
        found = census(log)
        if census_cache is not None:
            census_cache.write_text(json.dumps(found))
    owner: Dict[str, str] = {c: m for c, m in old["classes"].items() if m not in registered}  # another timm's
    for entry in load_table().values():
        if entry["model"] in registered:
            for cls in sorted(swept_classes(build(entry, device="meta"))):
                owner.setdefault(cls, entry["model"])
    previous = {entry["model"]: entry for entry in old["variants"]}
    variants = {name: entry for name, entry in previous.items() if name not in registered}
    for name in cover(found, set(owner)):
        classes = sorted(set(found[name]["classes"]) - set(owner))
        for cls in classes:
            owner[cls] = name
        reused = previous.get(name)
        if reused is not None and reused["classes"] == classes:
            variants[name] = reused
            continue
        started = time.perf_counter()
        entry = tiny_entry(name, holds=lambda model, need=set(classes): need <= swept_classes(model))
        variants[name] = dict(entry, classes=classes)
        log(f"variant {name}: {entry} for {classes} ({time.perf_counter() - started:.1f} s)", flush=True)
    result = {
        "timm": sorted(set(old.get("timm", [])) | {timm.__version__}),
        "classes": dict(sorted(owner.items())),
        "variants": sorted(variants.values(), key=lambda entry: entry["model"]),
        "unbuilt": sorted((set(old.get("unbuilt", [])) - registered) | {n for n, e in found.items() if e is None}),
    }
    VARIANTS.write_text(json.dumps(result, indent=1) + "\n")
    return result


def variant_entries() -> List[Dict[str, Any]]:
    return load_variants()["variants"]


def module_of(name: str) -> Optional[str]:
    """The timm model module that registers entrypoint ``name`` in the installed timm, or None."""
    for module, names in registered_modules().items():
        if name in names:
            return module
    return None


def check_holds(entry: Dict[str, Any]) -> Set[str]:
    """The classes an entry was chosen for that its tiny configuration (built on the meta device) lacks."""
    return set(entry["classes"]) - swept_classes(build(entry, device="meta"))


if __name__ == "__main__":
    # A census shard, for a census in several processes: python tests/timm_variants.py SHARD SHARDS OUT.json;
    # then merge the shards' dicts into one file and pass it as --census-cache to docs/make_coverage.py.
    import sys

    shard, shards, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    out.write_text(json.dumps(census(shard=shard, shards=shards)))
