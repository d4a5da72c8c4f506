"""The extension contract: capabilities declared on the method class, one method registry, and the
contributing page's toy method and toy model family, whose code blocks run here as the page shows them."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import sys
import types
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from conftest import make_vit
from family_checks import WORKS, assert_outcome, check_layout, check_method

import petl_surgery as ps
from petl_surgery.methods import Method, PetlModule, capable, register
from petl_surgery.api import plan_on_device
from petl_surgery.methods.base import MergeableModule
from petl_surgery.methods.planning import SIZES_ONLY
from petl_surgery.sites import registry

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "contributing.md"

# Constants that list method names for another reason than a capability, with that reason.
NOT_CAPABILITY_LISTS = {
    ("src/petl_surgery/methods/adapter.py", "INITS"): "initialisation schemes named after their papers",
    ("tests/test_timm_enumeration.py", "METHODS"): (
        "the enumeration's sample: one method per kind of site (q/k/v, MLP, projections) over every timm "
        "module; every method's outcome on them is docs/coverage.md's"
    ),
}


def method_name_lists(path: Path, names: set) -> List[str]:
    """The UPPER_CASE names in ``path`` bound to a tuple, list or set literal (or ``dict.fromkeys`` of one)
    of two or more registered method names: a list kept beside the registry."""
    found = []

    def literal(node: ast.AST) -> bool:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "fromkeys":
            return bool(node.args) and literal(node.args[0])
        if not isinstance(node, (ast.Tuple, ast.List, ast.Set)) or len(node.elts) < 2:
            return False
        return all(isinstance(e, ast.Constant) and e.value in names for e in node.elts)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id.isupper() and literal(node.value):
                    found.append(target.id)
    return found


def test_no_list_of_method_names_outside_the_registry() -> None:
    names = set(ps.METHODS)
    kept = []
    for folder in ("src", "tests", "benchmarks", "docs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            kept += [f"{relative}: {name}" for name in method_name_lists(path, names) if (relative, name) not in NOT_CAPABILITY_LISTS]
    assert not kept, f"lists of method names kept beside the registry (declare a capability on the Method class): {kept}"


def test_the_scan_finds_a_list_of_method_names(tmp_path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('ADDS = ("prefix", "vpt")\nSOME: tuple = ("lora", "ssf")\nNOT = ("lora", "resnet")\nlower = ("lora", "ssf")\n')
    assert method_name_lists(sample, set(ps.METHODS)) == ["ADDS", "SOME"]


ZOOS = ("timm", "torchvision", "transformers", "open_clip")


def test_methods_name_no_class_of_a_model_zoo() -> None:
    """Methods are written against site descriptions: what a zoo's class does (how its attention is called,
    for prefix tuning) is declared by that zoo's layouts in sites/."""
    found = []
    for path in sorted((ROOT / "src" / "petl_surgery" / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            found += [f"{path.name}: {name}" for name in names if name.split(".")[0] in ZOOS and "." in name]
    assert not found


@pytest.mark.parametrize("method", list(ps.METHODS))
def test_a_mergeable_method_inserts_mergeable_modules_only(method: str) -> None:
    model = ps.apply(make_vit(), method, **ps.METHODS[method].identity_options)
    inserted = [module for module in model.modules() if isinstance(module, PetlModule)]
    assert inserted
    assert {isinstance(module, MergeableModule) for module in inserted} == {ps.METHODS[method].mergeable}


def tensors(insertions: list) -> Dict[str, torch.Tensor]:
    return {f"{i.path}.{key}": t for i in insertions for key, t in i.module.state_dict().items()}


@pytest.mark.parametrize("method", list(ps.METHODS))
def test_the_planning_context_alone_decides_where_modules_are_built(method: str) -> None:
    model = make_vit()
    sized = plan_on_device(model, method, None, False, {}, SIZES_ONLY)
    planned = ps.plan(model, method)  # after a sizes-only plan: nothing carried over from it
    assert {name: t.device.type for name, t in tensors(sized).items()} == dict.fromkeys(tensors(planned), "meta")
    assert {name: t.shape for name, t in tensors(sized).items()} == {name: t.shape for name, t in tensors(planned).items()}
    assert {t.device.type for t in tensors(planned).values()} == {"cpu"}
    assert not any(isinstance(module, PetlModule) for module in model.modules())


def test_branch_dtype_is_refused_by_name_for_a_method_that_does_not_declare_it() -> None:
    assert "fact" not in capable("takes_branch_dtype") and "lora" in capable("takes_branch_dtype")
    with pytest.raises(ps.SurgeryError, match=r"branch_dtype is supported by methods patt, .*; not by 'fact'"):
        ps.apply(make_vit(), "fact", branch_dtype=torch.float32)


def test_capable_refuses_what_is_not_a_capability() -> None:
    with pytest.raises(ps.SurgeryError, match="'name' is not a capability"):
        capable("name")


@dataclasses.dataclass(frozen=True)
class _Options:
    init: str = "zero"


def _method(name: str, **declared) -> type:
    return type("Declared", (Method,), {"name": name, "Options": _Options, **declared})


@pytest.mark.parametrize(
    "method, message",
    [
        (_method("patt"), r"a method named 'patt' is registered already \(Patt\)"),
        (_method("two words"), r"needs a 'name' that is a Python identifier"),
        (type("NoOptions", (Method,), {"name": "no_options", "Options": dict}), r"needs an 'Options' dataclass"),
        (_method("tokens", adds_tokens=True), r"adds tokens, so no initialisation leaves the outputs unchanged"),
        (_method("unknown", identity_at_init=False, identity_options={"scale": 0}), r"names unknown options \['scale'\]"),
        (int, r"register takes a subclass of petl_surgery.methods.Method"),
    ],
)
def test_register_refuses_a_contradictory_or_duplicate_method(method: type, message: str) -> None:
    before = dict(ps.METHODS)
    with pytest.raises(ps.SurgeryError, match=message):
        register(method)
    assert ps.METHODS == before


# --------------------------------------------------------------------------- the contributing page


def page_code(section: str) -> List[str]:
    """The python code blocks of the page's ``## {section}`` section, in order."""
    text = PAGE.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end != -1 else None], re.S)


@pytest.fixture
def registries():
    """The method and layout registries as they were, after the test (the page registers its examples)."""
    saved = {
        "methods": dict(ps.METHODS),
        **{
            name: dict(getattr(registry, name))
            for name in ("ATTENTION_LAYOUTS", "MLP_LAYOUTS", "BLOCK_LAYOUTS", "MLP_PROJECTIONS", "PREFIX_CALLS")
        },
    }
    yield
    ps.METHODS.clear()
    ps.METHODS.update(saved.pop("methods"))
    for name, table in saved.items():
        getattr(registry, name).clear()
        getattr(registry, name).update(table)


def run_page(section: str) -> types.ModuleType:
    """Run the section's code blocks one after another in one module, as a reader pasting them would."""
    module = types.ModuleType(f"contributing_{section.lower().replace(' ', '_')}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    try:
        for block in page_code(section):
            exec(compile(block, f"{PAGE}:{section}", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module


def load_script(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_page_names_the_files_of_each_extension() -> None:
    text = PAGE.read_text()
    for named in ("src/petl_surgery/methods/<name>.py", "src/petl_surgery/methods/__init__.py", "src/petl_surgery/__init__.py",
                  "tests/test_<name>.py", "src/petl_surgery/sites/<zoo>_layouts.py", "src/petl_surgery/sites/__init__.py"):
        assert f"`{named}`" in text
    assert len(page_code("Add a method")) == 3 and len(page_code("Add a model family")) == 3


def test_the_toy_method_of_the_page_is_a_method_like_any_other(registries, tmp_path) -> None:
    page = run_page("Add a method")
    assert ps.METHODS["mlp_scale"] is page.MlpScale
    # the whole family contract: unchanged at init, gradients, train-mode steps, save, fresh load, remove
    assert check_method(make_vit, lambda: torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), "mlp_scale", tmp_path) == WORKS
    with pytest.raises(ps.SurgeryError, match=r"unknown option 'scale' for method 'mlp_scale'; valid options: init"):
        ps.apply(make_vit(), "mlp_scale", scale=2.0)
    with pytest.raises(ps.SurgeryError, match=r"not by 'mlp_scale'"):
        ps.apply(make_vit(), "mlp_scale", branch_dtype=torch.float32)
    # what reads the registry picks it up with no edit of its own
    assert load_script(ROOT / "benchmarks" / "run.py").METHODS["mlp_scale"] == ("mlp_scale", {})
    assert "| mlp_scale |  |  | yes |  |  |  |" in load_script(ROOT / "docs" / "make_coverage.py").capability_lines()


# Every registered method on the page's toy family: "works", or the refusal's reason (what the family
# does not declare: a token layout for prompts, a patch grid).
TOY_REFUSALS: Dict[str, str] = {
    "vpt": r"prompt tokens cannot be added to ToyTransformer",
    "convpass": r"method 'convpass' .*ToyTransformer",
}


def test_the_toy_family_of_the_page_takes_every_method(registries, tmp_path) -> None:
    page = run_page("Add a model family")

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return page.ToyTransformer().eval()

    def images() -> torch.Tensor:
        return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    assert check_layout(build(), images()[:1]) == 2  # the layout's q/k/v are where the attention reads them
    for method in ps.METHODS:
        assert_outcome(check_method(build, images, method, tmp_path), TOY_REFUSALS.get(method, WORKS))
