"""Every ```python block of docs/*.md runs, in page order, in the session of the frameworks it needs.

The README's blocks marked ``<!-- runs in the torch session -->`` run too, as a page of their own
(its other blocks are fragments: ``model`` stands for yours).

A page names the frameworks its code imports in a comment, ``<!-- docs: needs torch -->``; a
page without one runs in the NumPy-only core session. A block whose first line is
``# raises: anycam.SomeError`` must raise that error (the troubleshooting page shows each
error this way). Blocks of one page share one namespace and run in a fresh folder, so files
they write do not leak.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import anycam
from tests.conftest import FRAMEWORK, requested_backends

DOCS = Path(__file__).resolve().parents[2] / "docs"
NEEDS = re.compile(r"^<!-- docs: needs ([a-z, ]+) -->$", re.M)
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```\s*$", re.M | re.S)
RAISES = re.compile(r"^# raises: (anycam(?:\.\w+)+)\s*$")


@dataclass(frozen=True)
class Page:
    path: Path
    needs: frozenset[str]
    blocks: tuple[str, ...]


def read_page(path: Path) -> Page:
    text = path.read_text()
    found = NEEDS.findall(text)
    needs = frozenset(name.strip() for spec in found for name in spec.split(",") if name.strip())
    return Page(path, needs, tuple(BLOCK.findall(text)))


README = DOCS.parent / "README.md"
RUNS = re.compile(r"^<!-- runs in the (\w+) session -->\n```python[^\n]*\n(.*?)^```\s*$", re.M | re.S)


def read_readme() -> list[Page]:
    """The README's runnable blocks, one page per framework that runs them."""
    found = RUNS.findall(README.read_text())
    frameworks = sorted({framework for framework, _ in found})
    return [
        Page(README, frozenset({framework}), tuple(code for name, code in found if name == framework))
        for framework in frameworks
    ]


PAGES = [read_page(path) for path in sorted(DOCS.glob("*.md"))] + read_readme()


def runs_here(needs: frozenset[str], requested: frozenset[str]) -> bool:
    """A page runs in the one session made for it: core (none), tests-<framework> (one), parity (several)."""
    if len(requested) <= 1:
        return needs == requested
    return len(needs) > 1 and needs <= requested


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "page" in metafunc.fixturenames:
        requested = frozenset(requested_backends(metafunc.config))
        pages = [page for page in PAGES if page.blocks and runs_here(page.needs, requested)]
        metafunc.parametrize("page", pages, ids=[page.path.name for page in pages])


def test_page_examples_run(page: Page, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": f"docs_{page.path.stem}"}
    for number, code in enumerate(page.blocks, start=1):
        where = f"{page.path.name}, python block {number}"
        expected = RAISES.match(code.splitlines()[0]) if code.strip() else None
        compiled = compile(code, where, "exec")
        if expected is None:
            exec(compiled, namespace)
            continue
        module_name, _, name = expected.group(1).rpartition(".")
        error = getattr(importlib.import_module(module_name), name, None)
        assert isinstance(error, type) and issubclass(error, anycam.AnycamError), where
        with pytest.raises(error):
            exec(compiled, namespace)


def test_every_page_with_code_names_known_frameworks() -> None:
    for page in PAGES:
        assert page.needs <= set(FRAMEWORK), f"{page.path.name} needs unknown frameworks {set(page.needs)}"
    assert any(page.blocks for page in PAGES)


def test_the_readme_has_a_runnable_example() -> None:
    # The front page's "your own model" block runs as written, not as a fragment.
    assert any(page.path == README and page.blocks for page in PAGES)


def test_examples_do_not_hide_in_other_fences() -> None:
    # A ```py or ```python3 fence would render as code but never run.
    for page in PAGES:
        stray = re.findall(r"^```(py|python3|pycon)\b", page.path.read_text(), re.M)
        assert not stray, f"{page.path.name} has ```{stray[0]} blocks; use ```python so they run"


def test_mkdocs_nav_lists_every_page() -> None:
    config = (DOCS.parent / "mkdocs.yml").read_text()
    for page in PAGES:
        if page.path == README:
            continue
        assert re.search(rf":\s*{re.escape(page.path.name)}\s*$", config, re.M), f"{page.path.name} is not in the nav"
    assert os.path.isfile(DOCS / "index.md")


def all_subclasses(base: type) -> set[type]:
    found = set()
    for child in base.__subclasses__():
        found |= {child, *all_subclasses(child)}
    return found


def test_troubleshooting_covers_every_error_and_warning() -> None:
    # Every module that defines errors, imported, so that every subclass is known.
    for module in ("anycam", "anycam.cli", "anycam.dataset", "anycam.metrics", "anycam.metrics.sanity", "anycam.viz"):
        importlib.import_module(module)
    classes = {anycam.AnycamError, anycam.AnycamWarning}
    classes |= all_subclasses(anycam.AnycamError) | all_subclasses(anycam.AnycamWarning)
    public = {cls for cls in classes if cls.__module__.startswith("anycam") and not cls.__name__.startswith("_")}
    headings = set(re.findall(r"^### (\w+)$", (DOCS / "troubleshooting.md").read_text(), re.M))
    missing = sorted(cls.__name__ for cls in public if cls.__name__ not in headings)
    assert not missing, f"docs/troubleshooting.md has no section (### Name) for {missing}: add cause and fix"
