"""The README stays a front page and nothing it used to hold is lost.

Until the README became a front page it was the manual (794 lines). ``HOMES`` lists each section
heading it had then, with the file that holds that section now and, where the heading changed,
its new text; the tests check that each heading is still a heading of its file, that the README
fits on a page and that it still carries the two commands verbatim.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DEMO_COMMAND = 'python -m pip install -c tests/constraints.txt ".[torch,viz]" && python -m anycam demo'
TEST_COMMAND = 'python -m pip install "nox>=2024.3.2" && python -m nox'
MAX_README_LINES = 250

# Old README heading -> (file that holds it now, its heading there; None: unchanged).
HOMES: dict[str, tuple[str, str | None]] = {
    "Install and the two commands": ("README.md", None),
    "A pretrained ImageNet classifier on real photographs": ("docs/demo.md", None),
    "Quickstart": ("README.md", None),
    "PyTorch": ("README.md", None),
    "Hugging Face, several inputs, layer choice (PyTorch)": (
        "docs/torch.md",
        "Hugging Face, several inputs, layer choice",
    ),
    "TensorFlow / Keras 3": ("docs/tensorflow.md", None),
    "Keras 3 on JAX or PyTorch": ("docs/frameworks.md", None),
    "JAX (Flax linen / NNX, Equinox, plain functions)": (
        "docs/jax.md",
        "JAX: Flax linen, Flax NNX, Equinox, plain functions",
    ),
    "Targets": ("docs/targets.md", "Targets: classes, segmentation, detection, embeddings"),
    "Options": ("docs/methods.md", None),
    "Beyond gradients: Score-CAM, Ablation-CAM, Guided Backprop / Guided Grad-CAM": ("docs/methods.md", None),
    "Never a silently wrong map": ("docs/troubleshooting.md", None),
    "Pictures": ("docs/pictures.md", None),
    "Your own images: `anycam explain`": ("docs/cli.md", "`anycam explain`"),
    "Math contract": ("docs/math.md", None),
    "Is the explanation any good?": ("docs/evaluation.md", None),
    "Whole datasets": ("docs/datasets.md", None),
    "Ray Data: the same code on a laptop and on a cluster": ("docs/datasets.md", None),
    "Benchmarks": ("docs/benchmarks.md", None),
    "Score-CAM, Ablation-CAM, Guided Grad-CAM (PyTorch)": ("docs/benchmarks.md", None),
    "Development": ("docs/development.md", None),
}


def headings(path: Path) -> set[str]:
    """Returns the text of every Markdown heading (``#`` to ``######``) of ``path``, outside code blocks."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {match.strip() for match in re.findall(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("old", sorted(HOMES))
def test_every_old_readme_section_has_a_home(old: str) -> None:
    page, new = HOMES[old]
    path = ROOT / page
    assert path.is_file(), f"{page}, the home of the README's old section {old!r}, does not exist"
    heading = new or old
    assert heading in headings(path), f"{page} has no heading {heading!r} (the README's old section {old!r})"


def test_every_home_page_is_in_the_docs_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    for page, _ in HOMES.values():
        if page.startswith("docs/"):
            name = page.removeprefix("docs/")
            assert re.search(rf":\s*{re.escape(name)}\s*$", config, re.M), f"{name} is not in mkdocs.yml's nav"


def test_the_readme_fits_on_a_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_readme_keeps_the_two_commands_verbatim() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert DEMO_COMMAND in lines and TEST_COMMAND in lines
    assert lines.index(TEST_COMMAND) == lines.index(DEMO_COMMAND) + 1  # one block, demo first
    install = (ROOT / "docs" / "install.md").read_text().splitlines()
    assert DEMO_COMMAND in install and TEST_COMMAND in install  # the manual repeats them unchanged


def test_the_readme_links_only_to_pages_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(((?:docs/)[^)#\s]+)(?:#[^)]*)?\)", readme)
    assert targets
    missing = sorted({target for target in targets if not (ROOT / target).is_file()})
    assert not missing, f"README.md links to missing files {missing}"
