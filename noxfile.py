"""Test sessions. `nox` runs the default set (the README's test command); `nox -l` lists all.

One spelling everywhere: backend name = pip extra = module in backends/ = session suffix.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import nox

nox.needs_version = ">=2024.3.2"
nox.options.default_venv_backend = "virtualenv"  # pip: uv ignores the local CPU torch wheel
nox.options.error_on_missing_interpreters = True

PROJECT = nox.project.load_toml("pyproject.toml")
TEST = nox.project.dependency_groups(PROJECT, "test")
LINT = nox.project.dependency_groups(PROJECT, "lint")
GROUPS = PROJECT["dependency-groups"]  # test-<backend>: what only that backend's session needs
DOCS = nox.project.dependency_groups(PROJECT, "docs")
PICTURES = nox.project.dependency_groups(PROJECT, "pictures")
BENCH_PEERS = nox.project.dependency_groups(PROJECT, "bench-peers")


def _backend_names() -> tuple[str, ...]:
    """``anycam.backends.NAMES``, read from the source: the one list of backends (nox cannot import anycam)."""
    tree = ast.parse(Path(__file__).with_name("backends").joinpath("__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NAMES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError("backends/__init__.py defines no NAMES")


BACKENDS = _backend_names()
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2"}
# Every install goes through one constraints file: it pins every package the sessions install
# (the tested set, reproducible on a fresh machine; torch is this machine's CPU build) without
# pinning anything in the package metadata. ANYCAM_CONSTRAINTS names another file; `nox -s newest`
# tests against the newest releases instead.
CONSTRAINTS = ("-c", os.environ.get("ANYCAM_CONSTRAINTS", "tests/constraints.txt"))


@nox.session
def core(session: nox.Session) -> None:
    """NumPy-only core: oracles, properties, doctests, visualisation; no framework installed."""
    session.install(*CONSTRAINTS, "-e", ".[viz,metrics]", *TEST, *nox.project.dependency_groups(PROJECT, "test-viz"))
    session.run(
        "pytest",
        "tests/core",
        "tests/viz",
        "tests/test_demo_data.py",
        "tests/docs",
        "--doctest-modules",
        "src/anycam/core",
        "src/anycam/metrics",
        "src/anycam/demo/weights.py",
        "src/anycam/protocol/layers.py",
        *session.posargs,
    )


def _backend_session(backend: str) -> None:
    @nox.session(name=f"tests-{backend}")
    def tests(session: nox.Session) -> None:
        group = f"test-{backend}"
        extra = nox.project.dependency_groups(PROJECT, group) if group in GROUPS else ()
        # The torch session also carries the dataset tests (they run on torch): one torch install, not two.
        extras = f"{backend},viz,metrics" + (",dataset,ray" if backend == "torch" else "")
        session.install(*CONSTRAINTS, "-e", f".[{extras}]", *TEST, *extra)
        if backend == "torch":
            # pytorch-grad-cam (a peer the tests compare with) requires torchvision, which has no
            # build beside this torch; its other dependencies come from the test-torch group.
            session.install(*CONSTRAINTS, "--no-deps", "grad-cam>=1.5")
        session.run(
            "pytest",
            "tests/contract",
            f"tests/{backend}",
            "tests/docs",
            # The core on this framework's arrays (the core session has no framework: they skip there).
            "tests/core/test_array_api.py",
            "tests/core/test_array_api_device.py",
            f"--backends={backend}",
            *session.posargs,
            env=QUIET,
        )
        if backend == "torch":
            _dataset_tests(session)

    tests.__doc__ = f"The {backend} backend: the shared contract suite and {backend}-specific tests." + (
        " Then the dataset tests (as `nox -s dataset`) in the same environment." if backend == "torch" else ""
    )


for _name in BACKENDS:
    _backend_session(_name)


def _lint(session: nox.Session, *pytest_args: str) -> None:
    session.run("ruff", "check", "src", "backends", "tests", "noxfile.py")
    session.run("mypy")
    session.run("pytest", "tests/core/test_architecture.py", *pytest_args)


def _dataset_tests(session: nox.Session, *pytest_args: str) -> None:
    session.run("pytest", "tests/dataset", "tests/ray", "--durations=10", *pytest_args, env=QUIET)


@nox.session
def parity(session: nox.Session) -> None:
    """All three frameworks in one environment: lint (as `nox -s lint`), then same weights, same maps; the demo."""
    session.install(*CONSTRAINTS, "-e", ".[all]", *TEST, *LINT)
    _lint(session)
    session.run("pytest", "tests/parity", "tests/docs", "--backends=torch,tensorflow,jax", *session.posargs, env=QUIET)


@nox.session(default=False)
def dataset(session: nox.Session) -> None:
    """explain_dataset, its store, TTA, streaming metrics, anycam.ray on a local Ray (default run: in tests-torch)."""
    session.install(*CONSTRAINTS, "-e", ".[torch,dataset,ray,metrics]", *TEST)
    _dataset_tests(session, *session.posargs)


@nox.session(default=False)
def lint(session: nox.Session) -> None:
    """ruff, mypy over src/ and backends/, the architecture test (in the default run: parity)."""
    session.install(*CONSTRAINTS, "-e", ".[all]", *LINT, *TEST)
    _lint(session, *session.posargs)


@nox.session(default=False)
def newest(session: nox.Session) -> None:
    """Every dependency at its newest release (no pins but torch): what users installing today get."""
    session.install("-c", "tests/constraints-newest.txt", "--upgrade", "-e", ".[all,dataset,ray]", *TEST)
    session.run(
        "pytest",
        "tests/core",
        "tests/contract",
        "tests/parity",
        "tests/dataset",
        "--backends=torch,tensorflow,jax",
        *session.posargs,
        env=QUIET,
    )


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, MkDocs with warnings as errors, into site/ (its code runs in the test sessions)."""
    session.install(*CONSTRAINTS, *DOCS)
    # mkdocstrings reads the sources statically: no framework, not even anycam, is installed.
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})
    if not session.posargs:  # the site opens from disk: every local link names a file
        session.run("python", "scripts/check_site_links.py", "site")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Speed and memory against plain inference and the anchors, as ratios from one run."""
    session.install(*CONSTRAINTS, "-e", ".[all,ray]", "psutil", *BENCH_PEERS)
    # Without its dependencies (torchvision among them: see the bench-peers group).
    session.install(*CONSTRAINTS, "--no-deps", "grad-cam")
    session.run("python", "-m", "tests.benchmarks", *session.posargs, env=QUIET)


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """The shipped demo model explained in every framework (python -m anycam demo)."""
    session.install(*CONSTRAINTS, "-e", ".[all]")
    session.run("python", "-m", "anycam", "demo", "--backend", "all", *session.posargs, env=QUIET)


@nox.session(default=False)
def pictures(session: nox.Session) -> None:
    """The README's pictures: real photos, the demo grid, the sanity figure (scripts/make_pictures.py)."""
    session.install(*CONSTRAINTS, "-e", ".[all]", *PICTURES)
    session.run("python", "scripts/make_pictures.py", *session.posargs, env=QUIET)


@nox.session(name="evaluate-photos", default=False)
def evaluate_photos(session: nox.Session) -> None:
    """The real-photo evaluation table in docs/evaluation.md (scripts/evaluate_photos.py)."""
    session.install(*CONSTRAINTS, "-e", ".[all]", *PICTURES)
    session.run("python", "scripts/evaluate_photos.py", *session.posargs, env=QUIET)


@nox.session(name="evaluate-vit", default=False)
def evaluate_vit(session: nox.Session) -> None:
    """The demo ViT's transformer-method table in docs/transformers.md (scripts/evaluate_demo_vit.py)."""
    session.install(*CONSTRAINTS, "-e", ".[torch,metrics,viz]")
    session.run("python", "scripts/evaluate_demo_vit.py", *session.posargs, env=QUIET)
