"""The documentation site's contract: every public name has a reference entry, every method a page that
renders its options class, every page is in the navigation, and the README stays short."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import petl_surgery as ps

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _directives(text: str) -> set:
    """The objects a page renders with mkdocstrings (``::: dotted.path``), by their last name."""
    return {match.rsplit(".", 1)[-1] for match in re.findall(r"^::: ([\w.]+)", text, flags=re.MULTILINE)}


def test_every_public_function_and_class_has_a_reference_entry():
    rendered = _directives((DOCS / "api.md").read_text())
    public = [name for name in ps.__all__ if inspect.isfunction(getattr(ps, name)) or inspect.isclass(getattr(ps, name))]
    missing = [name for name in public if name not in rendered]
    assert not missing, f"docs/api.md renders no entry for {missing}"


def test_every_method_has_a_page_rendering_its_options_class():
    for name, method in ps.METHODS.items():
        page = DOCS / "methods" / f"{name}.md"
        assert page.exists(), f"no page for method {name!r}"
        options = method.parse_options({}).__class__.__name__
        assert options in _directives(page.read_text()), f"{page.name} does not render {options}"


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md"))
    orphans = [page for page in pages if page not in nav]
    assert not orphans, f"pages missing from mkdocs.yml's nav: {orphans}"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
