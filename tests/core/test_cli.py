"""The command line without frameworks: it says which extra to install."""

from __future__ import annotations

import sys

import pytest

import anycam.cli.demo as cli_demo
from anycam.__main__ import main


def test_demo_without_the_backend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setattr(cli_demo, "installed_backends", lambda: [])
    with pytest.raises(SystemExit, match=r'pip install "anycam\[torch\]"'):
        main(["demo"])
    monkeypatch.setattr(cli_demo, "installed_backends", lambda: ["torch"])
    with pytest.raises(SystemExit, match=r"anycam\[jax\]"):
        main(["demo", "--backend", "jax"])


def test_install_hints_name_the_package_index_and_a_source_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    import anycam

    # Until anycam is on a package index, only the checkout form works: every hint gives both.
    monkeypatch.setattr(cli_demo, "installed_backends", lambda: ["torch"])
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--backend", "jax"])
    assert 'pip install "anycam[jax]"' in str(exited.value) and 'pip install ".[jax]"' in str(exited.value)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(anycam.MissingExtraError) as missing:
        anycam.plot(None, np.zeros((1, 4, 4)))
    assert 'pip install "anycam[viz]"' in str(missing.value) and 'pip install ".[viz]"' in str(missing.value)
