"""The command line without frameworks: it says which extra to install."""

from __future__ import annotations

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
