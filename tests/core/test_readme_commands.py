"""The README's two commands stay true: CI runs the test command verbatim, the demo's extras exist."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def two_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install and the two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the README's install section has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    demo, tests = two_commands()
    assert "nox" in tests and tests.startswith("python -m pip install ")  # it installs its own runner
    script = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in script
    assert demo.endswith("&& python -m anycam demo")


def test_the_demo_command_installs_existing_extras_under_the_constraints() -> None:
    demo, _ = two_commands()
    extras = re.search(r'"\.\[([a-z,]+)\]"', demo)
    assert extras is not None
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in extras.group(1).split(","):
        assert extra in declared, extra
    assert {"torch", "viz"} <= set(extras.group(1).split(","))  # a framework and the picture
    constraints = re.search(r"-c (\S+)", demo)
    assert constraints is not None
    pins = (ROOT / constraints.group(1)).read_text()
    assert re.search(r"^torch==", pins, re.M)  # the constraints pin torch: no multi-GB surprise
    for requirement in declared["torch"]:
        assert "==" not in requirement  # the package metadata itself only names ranges
