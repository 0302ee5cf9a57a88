"""Test-run options shared by every suite.

``--backends torch,jax`` (or ANYCAM_BACKENDS) names the backends the contract suite runs for.
A named backend whose framework cannot be imported fails the run: a session that asked for
TensorFlow must never pass by skipping every TensorFlow test.
"""

from __future__ import annotations

import importlib
import os

import pytest

FRAMEWORK = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backends",
        default=os.environ.get("ANYCAM_BACKENDS", ""),
        help="comma-separated backends for the contract suite (torch, tensorflow, jax)",
    )


def requested_backends(config: pytest.Config) -> list[str]:
    names = [n.strip() for n in config.getoption("--backends").split(",") if n.strip()]
    for name in names:
        if name not in FRAMEWORK:
            raise pytest.UsageError(f"unknown backend {name!r} in --backends")
        try:
            importlib.import_module(FRAMEWORK[name])
        except ImportError as exc:
            raise pytest.UsageError(f"backend {name!r} was requested but cannot be imported: {exc}") from exc
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kit" in metafunc.fixturenames:
        names = requested_backends(metafunc.config)
        metafunc.parametrize("kit", names, indirect=True, ids=names)


@pytest.fixture
def kit(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    module = importlib.import_module(f"tests.contract.kit_{request.param}")
    return module.KIT
