"""Regenerate docs/coverage.md: every model family of the test sweeps against every method.

Each family test module in tests/ exports ``COVERAGE``: ``{name: (build, make_input)}``, the same small
configurations its tests use. For each family and method this runs the contract of
tests/family_checks.py (zero init unchanged, random weights change the output, gradients reach every
inserted tensor, exact checkpoint round trip, and after train-mode optimizer steps a frozen base and a
delta that reproduces the trained model, with adapted statistics too where the model keeps running
statistics) and records "works", the refusal's reason, or "FAILS" with the broken promise, then lists
the registry's attention, MLP and block classes.

Its timm section is the enumerated sweep (tests/timm_sweep.py): every model module timm registers,
through its smallest entrypoint in a tiny configuration (tests/timm_smallest.json), under the same
contract.

    python docs/make_coverage.py                          # writes docs/coverage.md
    python docs/make_coverage.py --timm-modules eva tnt   # prints those modules' rows only
    python docs/make_coverage.py --timm-table             # regenerates tests/timm_smallest.json
    python docs/make_coverage.py --timm-variants          # then tests/timm_variants.json
    python docs/make_coverage.py --jobs 2                 # the rows in 2 processes
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
# The families outside timm's enumerated sweep (which covers every timm model module): torch and
# torchvision, open_clip, layers chosen by name; transformers has a section of its own.
FAMILY_MODULES = ("test_torch_models", "test_families_open_clip", "test_patterns")


def test_module_coverage(name: str) -> Dict[str, tuple]:
    """The ``COVERAGE`` of test module ``name`` of tests/."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    spec = importlib.util.spec_from_file_location(name, TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses in the module look themselves up there
    spec.loader.exec_module(module)
    return getattr(module, "COVERAGE")


def load_families() -> Dict[str, tuple]:
    families: Dict[str, tuple] = {}
    for name in FAMILY_MODULES:
        families.update(test_module_coverage(name))
    return families


def timm_modules(modules: Optional[Sequence[str]] = None) -> Dict[str, tuple]:
    """The enumerated timm sweep as families: ``{name: (build, make_input)}`` for every model module the
    installed timm registers (or the ones named), through tests/timm_smallest.json."""
    sys.path.insert(0, str(TESTS))
    import timm_sweep

    table = timm_sweep.load_table()
    registered = timm_sweep.registered_modules()
    chosen = list(modules) if modules else sorted(registered)
    missing = [m for m in chosen if m not in registered or m not in table]
    if missing:
        raise SystemExit(
            f"not registered by this timm, or not in {timm_sweep.TABLE.name} (run --timm-table): {', '.join(missing)}"
        )
    return {
        f"timm module {m} (`{table[m]['model']}`)": (partial(timm_sweep.build, table[m]), partial(timm_sweep.images, table[m]))
        for m in chosen
    }


# Set by main() before worker processes fork: the families and methods every row is computed from.
_POOL_FAMILIES: Dict[str, tuple] = {}
_POOL_METHODS: tuple = ()
JOBS = 1


def _row(family: str) -> List[str]:
    build, make_input = _POOL_FAMILIES[family]
    return [outcome(build, make_input, method).replace("|", "\\|") for method in _POOL_METHODS]


def rows(families: Dict[str, tuple], methods: Sequence[str]) -> List[str]:
    """One markdown row per family, printing each as it is done; with ``JOBS`` > 1 the families run in
    that many forked processes (one torch thread each), in order."""
    global _POOL_FAMILIES, _POOL_METHODS
    _POOL_FAMILIES, _POOL_METHODS = dict(families), tuple(methods)
    if JOBS > 1:
        import multiprocessing

        _one_thread()  # no OpenMP pool in the parent to inherit across fork

        with multiprocessing.get_context("fork").Pool(JOBS, initializer=_one_thread) as pool:
            results = pool.imap(_row, list(families))
            return [_emit(family, cells) for family, cells in zip(families, results)]
    return [_emit(family, _row(family)) for family in families]


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _emit(family: str, cells: List[str]) -> str:
    print(family, *cells, sep="\n  ", flush=True)
    return f"| {family} | " + " | ".join(cells) + " |"


def outcome(build, make_input, method: str) -> str:
    """"works", or the refusal's reason followed by what ``skip_unsupported=True`` gives."""
    from family_checks import check_method

    with tempfile.TemporaryDirectory() as scratch:
        try:
            result = check_method(build, make_input, method, Path(scratch))
        except Exception as failure:  # a broken contract is reported, never hidden
            message = re.sub(r"\s+", " ", str(failure))[:200]
            return f"FAILS: {type(failure).__name__}: {message}"
        if result == "works":
            return "works"
        try:
            skipping = check_method(build, make_input, method, Path(scratch), skip_unsupported=True)
        except Exception as failure:
            message = re.sub(r"\s+", " ", str(failure))[:200]
            skipping = f"FAILS: {type(failure).__name__}: {message}"
    reason = re.sub(r"\s+", " ", result.removeprefix("refused: "))
    reason = reason if len(reason) < 200 else reason[:197] + "..."
    return f"refused: {reason} With `skip_unsupported=True`: {'works on the other blocks' if skipping == 'works' else skipping if skipping.startswith('FAILS') else 'refused'}."


def registry_lines() -> List[str]:
    from petl_surgery.sites import registry

    def names(classes) -> str:
        return ", ".join(sorted(f"`{c.__module__}.{c.__qualname__}`" for c in classes))

    return [
        f"- attention ({len(registry.ATTENTION_LAYOUTS)}): {names(registry.ATTENTION_LAYOUTS)}",
        f"- MLP ({len(registry.MLP_LAYOUTS)}): {names(registry.MLP_LAYOUTS)}",
        f"- block ({len(registry.BLOCK_LAYOUTS)}): {names(registry.BLOCK_LAYOUTS)}",
    ]


def capability_lines() -> List[str]:
    """The methods' declared capabilities (the boolean class attributes of petl_surgery.methods.Method), one
    row per registered method: read from the classes, so a new method or capability needs no edit here."""
    from petl_surgery import METHODS
    from petl_surgery.methods import Method

    capabilities = [name for name, value in vars(Method).items() if isinstance(value, bool)]

    lines = ["| method | " + " | ".join(capabilities) + " | exact identity at init with |", "|---|" + "---|" * (len(capabilities) + 1)]
    for name, method in METHODS.items():
        marks = ["yes" if getattr(method, capability) else "" for capability in capabilities]
        identity = ", ".join(f"`{key}={value!r}`" for key, value in method.identity_options.items())
        lines.append(f"| {name} | " + " | ".join(marks) + f" | {identity} |")
    return lines


def transformers_lines(methods: tuple) -> List[str]:
    """The transformers section: each model class of tests/test_families_transformers.py (its
    ``COVERAGE``) under attn_implementation "eager" and "sdpa", against every method; empty when
    transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return []
    import transformers

    lines = [
        "",
        f"## transformers {transformers.__version__}",
        "",
        "| model (attn_implementation) | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    return lines + rows(
        {**test_module_coverage("test_families_transformers"), **test_module_coverage("test_families_transformers_legacy")},
        methods,
    )


def main() -> None:
    import timm
    import torch

    import petl_surgery

    # PyTorch's fused MHA inference kernel differs from its standard path in the last bit; the contract
    # compares bit for bit, as the test suite does with the same switch.
    torch.backends.mha.set_fastpath_enabled(False)
    families = load_families()
    methods = tuple(petl_surgery.METHODS)
    lines = [
        "# Coverage: model families against methods",
        "",
        f"Generated by `python docs/make_coverage.py` with petl_surgery {petl_surgery.__version__}, "
        f"timm {timm.__version__}, torch {torch.__version__}. \"works\" means the whole contract of "
        "tests/family_checks.py held: output unchanged at zero init, changed with random branch weights, "
        "a gradient in every inserted tensor, an exact checkpoint round trip, and after optimizer steps in "
        "train mode the base's buffers unchanged and a saved delta that reproduces the trained model in a "
        "fresh one (on models with BatchNorm, also with statistics=\"adapt\", the statistics saved). "
        "Anything else is refused with a SurgeryError before the model is changed; the reason is quoted.",
        "",
        "## What each method declares",
        "",
        "Read from the method classes (`petl_surgery.methods.Method`); the contract runs methods that add "
        "tokens without the unchanged-at-init check, and the others with the options listed in the last "
        "column.",
        "",
        *capability_lines(),
        "",
        "## timm, every registered model module",
        "",
        "By enumeration (tests/timm_sweep.py): each model module the installed timm registers, through its "
        "smallest entrypoint (by parameter count) in the first tiny configuration it builds with "
        "(tests/timm_smallest.json). The variants of each family (fused and unfused projections, relative "
        "positions, registers) are held to the same contract by tests/test_families_vit_like.py and "
        "tests/test_families_hierarchical.py.",
        "",
        "| module (entrypoint) | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    lines += rows(timm_modules(), methods)
    lines += [
        "",
        "## torch and torchvision, open_clip, layers chosen by name",
        "",
        "| family | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    lines += rows(families, methods)
    lines += transformers_lines(methods)
    lines += ["", "## Registered classes", ""] + registry_lines() + [""]
    (ROOT / "docs" / "coverage.md").write_text("\n".join(lines))


def cli(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--timm-table", action="store_true", help="regenerate tests/timm_smallest.json")
    group.add_argument("--timm-variants", action="store_true", help="regenerate tests/timm_variants.json (after --timm-table)")
    group.add_argument("--timm-modules", nargs="+", metavar="MODULE", help="print these timm modules' rows only")
    group.add_argument("--capabilities", action="store_true", help="print the methods' declared capabilities only")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes for the rows (default 1)")
    parser.add_argument("--census-cache", type=Path, help="with --timm-variants: keep the entrypoint census in this file")
    args = parser.parse_args(argv)
    global JOBS
    JOBS = max(1, args.jobs)
    if args.timm_table:
        sys.path.insert(0, str(TESTS))
        import timm_sweep

        timm_sweep.make_table()
    elif args.capabilities:
        print("\n".join(capability_lines()))
    elif args.timm_variants:
        sys.path.insert(0, str(TESTS))
        import timm_variants

        timm_variants.make_variants(args.census_cache)
    elif args.timm_modules:
        import petl_surgery
        import torch

        torch.backends.mha.set_fastpath_enabled(False)
        rows(timm_modules(args.timm_modules), tuple(petl_surgery.METHODS))
    else:
        main()


if __name__ == "__main__":
    cli()
