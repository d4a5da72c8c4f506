"""The timm sweep by enumeration: every model module timm registers, through its smallest entrypoint.

``timm_smallest.json`` (next to this file) holds, per timm model module, its smallest entrypoint (by
parameter count, counted on the meta device over the module's entrypoints, leaving out names that say
large, huge or giant where the module has others) and the first tiny
configuration from :data:`LADDER` that it builds with and forwards at one of :data:`SIZES` (or its own input size). Counting every
entrypoint takes minutes, so the table is generated, not computed per test run:
``python docs/make_coverage.py --timm-table`` (on each installed timm: an entry whose model this timm
lacks is replaced, others are kept, so that both timm versions run the same models). Nothing in it is
written by hand: the test fails, naming the command, when timm registers a module the table lacks.

:func:`classify` applies one method to a model and says what happened: "works" (and a forward after
apply runs and gives the shape it gave before), "refused: <reason>" (a SurgeryError, the model left
exactly as it was), or "FAILS: ..." (anything silent or broken: another exception, a refused apply that
changed the model, a forward that fails after apply, a remove that does not restore the model).
"""

from __future__ import annotations

import importlib.util

import json
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import petl_surgery as ps

TABLE = Path(__file__).with_name("timm_smallest.json")
# Tiny configurations, tried in order; the first that the entrypoint's constructor accepts and that
# forwards at one of SIZES is recorded. Keyword names are timm's own (ViT-like: depth/embed_dim/
# num_heads; Hiera: stages; staged models: depths); a constructor that does not take one raises TypeError.
LADDER: Tuple[Dict[str, Any], ...] = (
    dict(img_size=64, embed_dim=64, depth=2, num_heads=2),
    dict(embed_dim=32, num_heads=2, stages=(1, 1, 1, 1)),
    dict(img_size=64, depths=(1, 1, 1, 1)),
    dict(depths=(1, 1, 1, 1)),
    dict(img_size=64),
    dict(channel_multiplier=0.25),  # MobileNet-style builders (MobileNetV5: 10M parameters instead of 80M)
    {},
)
SIZES = (64, 128, 224)
NUM_CLASSES = 5
BIG = re.compile(r"large|huge|giant|gigantic|xlarge|so400m|so150m|_l2|_big|_h14|_g14", re.IGNORECASE)


def registered_modules() -> Dict[str, List[str]]:
    """timm model module -> its entrypoint names, as timm's registry lists them."""
    import timm
    from timm.models import _registry  # timm's own registry: module -> entrypoints (no public getter)

    # timm's own model modules only: a test that registers a model of its own (tests/test_dense.py, for
    # segmentation_models_pytorch's tu- encoders) adds its file's name to timm's registry
    ours = [module for module in timm.list_modules() if importlib.util.find_spec(f"timm.models.{module}") is not None]
    return {module: sorted(_registry._module_to_models[module]) for module in ours}


def parameter_count(name: str) -> Optional[int]:
    """Parameters of the entrypoint's default configuration, built on the meta device (no memory, no init
    cost); None when it does not build there."""
    import timm

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


def build(entry: Dict[str, Any], device: str = "cpu") -> nn.Module:
    """The entry's model with its recorded configuration, seeded, in eval mode (on the meta device: its
    structure only, built in a fraction of the time)."""
    import timm

    torch.manual_seed(0)
    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter("ignore")
        return timm.create_model(entry["model"], pretrained=False, **entry["kwargs"]).eval()


def images(entry: Dict[str, Any], batch: int = 2) -> torch.Tensor:
    size = entry["size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def tiny_entry(name: str, holds: Callable[[nn.Module], bool] = lambda model: True) -> Dict[str, Any]:
    """The first configuration of LADDER (with NUM_CLASSES, else without) that ``name`` builds with, whose
    model ``holds`` (timm_variants.py asks for the classes an entry was chosen for) and that forwards at one
    of SIZES or at its own input size; its default configuration at its own input size when none does (the
    sweep then reports the failure)."""
    import timm

    config = timm.models.get_pretrained_cfg(name)
    native = int(config.input_size[-1]) if config is not None and config.input_size else 224
    sizes = tuple(dict.fromkeys(SIZES + (native,)))
    for overrides in LADDER:
        for kwargs in (dict(overrides, num_classes=NUM_CLASSES), overrides):
            for size in sizes:
                entry = {"model": name, "kwargs": kwargs, "size": size}
                try:
                    model = build(entry)
                    if not holds(model):
                        break  # another size builds the same modules
                    with torch.no_grad():
                        model(images(entry, batch=1))
                except Exception:
                    continue
                return entry
    return {"model": name, "kwargs": {}, "size": native}


def make_table(log=print) -> Dict[str, Dict[str, Any]]:
    """Regenerate TABLE for the installed timm (see the module docstring); returns it."""
    table: Dict[str, Dict[str, Any]] = json.loads(TABLE.read_text()) if TABLE.exists() else {}
    for module, names in registered_modules().items():
        kept = table.get(module)
        if kept is not None and kept["model"] in names:
            continue
        started = time.perf_counter()
        # a name that says large, huge or giant is never a module's smallest when the module has others
        small = [name for name in names if not BIG.search(name)] or names
        counts = {name: parameter_count(name) for name in small}
        counted = sorted((count, name) for name, count in counts.items() if count is not None)
        smallest = counted[0][1] if counted else names[0]
        table[module] = tiny_entry(smallest)
        log(f"{module}: {table[module]} ({time.perf_counter() - started:.1f} s)", flush=True)
        TABLE.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")  # a module at a time
    return table


def load_table() -> Dict[str, Dict[str, Any]]:
    return json.loads(TABLE.read_text())


def _state(model: nn.Module) -> tuple:
    """What a refused apply must leave as it was: the module tree (names and objects), every tensor
    (object, version counter, so any in-place write shows), flags, modes and hooks."""
    modules = tuple(
        (name, id(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks), _attributes(m))
        for name, m in model.named_modules()
    )
    tensors = tuple(
        (name, id(t), t._version, t.requires_grad) for name, t in model.state_dict(keep_vars=True).items()
    )
    return modules, tensors, tuple(sorted(k for k in vars(model) if not k.startswith("_")))


def _unversioned(tensors: tuple) -> tuple:
    return tuple((name, identity, requires_grad) for name, identity, _, requires_grad in tensors)


def _sums(state: Dict[str, torch.Tensor]) -> Dict[str, Tuple[float, float]]:
    """A cheap exact-enough fingerprint of every tensor's values (float64 sums of values and squares)."""
    fingerprints = {}
    for name, tensor in state.items():
        values = tensor.detach().double()
        fingerprints[name] = (values.sum().item(), values.square().sum().item())
    return fingerprints


def _attributes(module: nn.Module) -> tuple:
    """The module's plain attributes (switches a surgery may patch, such as ``qkv_bias_separate``) and
    whether it has an instance ``forward``."""
    plain = (bool, int, float, str, type(None))
    values = sorted((k, v) for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, plain))
    return tuple(values) + ("forward" in vars(module),)


def _short(text: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def refusal(model: nn.Module, method: str) -> Optional[str]:
    """The outcome of applying ``method`` to ``model`` when it is refused (or fails), else None (the
    surgery is then removed again). Refusals come from site discovery and planning, which read the
    module tree only, so a model built on the meta device gives them without the cost of a real one."""
    before = _state(model)
    try:
        ps.apply(model, method)
    except ps.SurgeryError as refused:
        if _state(model) != before:
            return f"FAILS: the refused apply changed the model ({_short(str(refused))})"
        return f"refused: {_short(str(refused))}" if str(refused) else "FAILS: a refusal without a reason"
    except Exception as error:
        return f"FAILS: apply raised {type(error).__name__}: {_short(str(error))}"
    ps.remove(model)
    return None


def sweep(entry: Dict[str, Any], methods: Sequence[str]) -> Dict[str, str]:
    """The outcome of each method on the entry's model: refusals from its structure (a meta-device
    build), then :func:`classify` on a real build for the methods it takes."""
    outline = build(entry, device="meta")
    outcomes = {method: refusal(outline, method) for method in methods}
    taken = [method for method, outcome in outcomes.items() if outcome is None]
    if taken:
        model, x = build(entry), images(entry)
        with torch.no_grad():
            reference = _first(model(x))
        outcomes.update({method: classify(model, x, method, reference) for method in taken})
    return outcomes


def classify(model: nn.Module, x: torch.Tensor, method: str, reference: torch.Tensor) -> str:
    """Apply ``method`` to ``model`` (which gave ``reference`` on ``x``) and say what happened (see the
    module docstring); the model is given back as it was (the surgery removed)."""
    before = _state(model)
    sums = _sums(model.state_dict())
    try:
        ps.apply(model, method)
    except ps.SurgeryError as refusal:
        if _state(model) != before:
            return f"FAILS: the refused apply changed the model ({_short(str(refusal))})"
        return f"refused: {_short(str(refusal))}" if str(refusal) else "FAILS: a refusal without a reason"
    except Exception as error:  # anything but SurgeryError is a bug, never an answer
        return f"FAILS: apply raised {type(error).__name__}: {_short(str(error))}"
    try:
        with torch.no_grad():
            output = _first(model(x))
    except Exception as error:
        return f"FAILS: the forward after apply raised {type(error).__name__}: {_short(str(error))}"
    ps.remove(model)
    after = _state(model)
    # remove writes the running statistics back in place (their version counters move): compare values
    values = {name: t for name, t in model.state_dict().items()}
    if after[0] != before[0] or _unversioned(after[1]) != _unversioned(before[1]) or _sums(values) != sums:
        return "FAILS: remove did not give back the model as it was"
    if output.shape != reference.shape or not torch.isfinite(output).all():
        return f"FAILS: after apply the output is {tuple(output.shape)} (finite: {bool(torch.isfinite(output).all())}), without surgery {tuple(reference.shape)}"
    return "works"
