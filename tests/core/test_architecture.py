"""The shape of the code: who may import whom, mirrored framework packages, the wheel's package list.

Read from the sources with ``ast`` (nothing is imported), so it runs in the NumPy-only session.
DESIGN.md §9 is the picture: core ← protocol ← explain ← metrics / dataset / cli; viz ← core; a
framework package imports the protocol, the core, its own framework and (Keras adapters) ``_keras``
— never another framework's package and never the layers above the protocol.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"anycam": ROOT / "src" / "anycam", "anycam.backends": ROOT / "backends"}
FRAMEWORK_PACKAGES = ("torch", "tensorflow", "jax")
# The top-level distributions of each framework (what `import x` names).
FRAMEWORK_ROOTS = {
    "torch": {"torch"},
    "tensorflow": {"tensorflow", "keras"},
    "jax": {"jax", "jaxlib", "flax", "equinox"},
}
ALL_FRAMEWORKS = {"torch", "tensorflow", "keras", "jax", "jaxlib", "flax", "equinox"}

# What each part of src/anycam may import from anycam (prefixes; a module may always import its own part).
SRC_RULES: dict[str, tuple[str, ...]] = {
    "anycam._errors": (),
    "anycam._progress": ("anycam._errors",),
    "anycam.core": ("anycam._errors",),
    "anycam.protocol": ("anycam._errors", "anycam.core"),
    "anycam.viz": ("anycam._errors", "anycam.core"),
    "anycam.explain": (
        "anycam._errors",
        "anycam._progress",
        "anycam.core",
        "anycam.protocol",
        "anycam.viz",
    ),
    "anycam.metrics": (
        "anycam._errors",
        "anycam._progress",
        "anycam.core",
        "anycam.protocol",
        "anycam.explain",
        "anycam.viz",
    ),
    "anycam.demo": ("anycam._errors", "anycam.core", "anycam.metrics"),
    "anycam.dataset": (
        "anycam._errors",
        "anycam._progress",
        "anycam.core",
        "anycam.protocol",
        "anycam.explain",
        "anycam.metrics",
    ),
    "anycam.ray": ("anycam._errors", "anycam.dataset", "anycam.explain"),
}
# The top of the package (the public API, the CLI) may import anything of anycam.
UNRESTRICTED = ("anycam.__main__", "anycam.cli")


def _modules() -> dict[str, Path]:
    """Maps every module name (as installed) to its file."""
    found: dict[str, Path] = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            if package == "anycam" and parts[:1] == ("backends",):
                continue
            found[name] = path
    return found


MODULES = _modules()


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """Returns (imported module, at module level?) for every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_of(module, path)
    # Imports under `if TYPE_CHECKING:` or `try:` at the top still run at import time: count them as
    # module-level; only those inside functions (and classes' methods) are deferred.
    deferred: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            deferred.update(id(inner) for inner in ast.walk(node) if inner is not node)
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, id(node) not in deferred) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.level and not node.module:
                # `from . import x` / `from .. import x`: each name may be a submodule.
                found.extend((f"{target}.{alias.name}", id(node) not in deferred) for alias in node.names)
            else:
                found.append((target, id(node) not in deferred))
    return found


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _violations(rule) -> list[str]:  # type: ignore[no-untyped-def]
    problems = []
    for module, path in MODULES.items():
        for imported, module_level in _imports(module, path):
            problem = rule(module, imported, module_level)
            if problem:
                problems.append(f"{path.relative_to(ROOT)}: {problem}")
    return problems


def test_the_sources_are_found():
    # The checks below must see the code they check: a wrong root would make every one pass.
    assert len(MODULES) > 40
    assert "anycam.core.methods" in MODULES
    assert "anycam.backends.torch.backend" in MODULES and "anycam.backends.jax.guided" in MODULES
    imports = [name for name, _ in _imports("anycam.backends.torch.backend", MODULES["anycam.backends.torch.backend"])]
    assert "torch" in imports and "anycam.protocol.backend" in imports


def _part(module: str) -> str | None:
    for part in sorted(SRC_RULES, key=len, reverse=True):
        if _within(module, (part,)):
            return part
    return None


def _src_rule(module: str, imported: str, module_level: bool) -> str | None:
    if not imported.startswith("anycam") or _within(module, UNRESTRICTED) or module == "anycam":
        return None
    if _within(module, ("anycam.backends",)):
        return None  # the adapters have rules of their own below
    if _within(imported, ("anycam.backends",)):
        return (
            None
            if _within(module, ("anycam.explain", "anycam.metrics")) and not module_level
            else (f"imports {imported} (only the Explainer and the metrics load adapters, at call time)")
        )
    if imported == "anycam":
        return f"imports the top-level package ({imported}); import the module that holds the name"
    part = _part(module)
    assert part is not None, f"{module} belongs to no part of SRC_RULES: add it there"
    allowed = (part, *SRC_RULES[part])
    return None if _within(imported, allowed) else f"{part} imports {imported}"


def test_src_imports_point_down_the_layers():
    assert _violations(_src_rule) == []


def _core_rule(module: str, imported: str, module_level: bool) -> str | None:
    if not _within(module, ("anycam.core",)):
        return None
    root = imported.split(".")[0]
    if root in sys.stdlib_module_names or root == "numpy" or _within(imported, ("anycam.core", "anycam._errors")):
        return None
    # Issue 21: one module finds the namespace of non-NumPy arrays, importing array-api-compat
    # (which imports no framework) only when such an array arrives.
    if root == "array_api_compat" and module == "anycam.core._namespace" and not module_level:
        return None
    return f"the core imports {imported}"


def test_the_core_is_numpy_code():
    assert _violations(_core_rule) == []


def _module_level_rule(module: str, imported: str, module_level: bool) -> str | None:
    if module.startswith("anycam.backends") or not module_level:
        return None
    root = imported.split(".")[0]
    heavy = ALL_FRAMEWORKS | {"ray", "scipy", "matplotlib", "pyarrow", "tqdm", "PIL"}
    return f"imports {imported} at module level" if root in heavy else None


def test_no_framework_at_module_level_in_src():
    assert _violations(_module_level_rule) == []


def _framework_package(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 3 and parts[:2] == ["anycam", "backends"] and parts[2] in FRAMEWORK_PACKAGES:
        return parts[2]
    return None


def _framework_rule(module: str, imported: str, module_level: bool) -> str | None:
    framework = _framework_package(module)
    if framework is None:
        return None
    root = imported.split(".")[0]
    own = f"anycam.backends.{framework}"
    is_demo = module.endswith(".demo")
    is_keras = module.endswith(".keras") or framework == "tensorflow"
    if root in ALL_FRAMEWORKS:
        allowed = FRAMEWORK_ROOTS[framework] | ({"keras"} if is_keras else set())
        return None if root in allowed else f"the {framework} package imports {imported}"
    if not imported.startswith("anycam"):
        return None
    allowed_prefixes = (own, "anycam.protocol", "anycam.core", "anycam._errors")
    if _within(imported, allowed_prefixes) or imported in ("anycam.backends", "anycam.backends.is_keras"):
        return None
    if is_keras and _within(imported, ("anycam.backends._keras",)):
        return None
    if is_demo and _within(imported, ("anycam.demo", "anycam.backends._keras.demo")):
        return None
    return f"the {framework} package imports {imported}"


def test_a_framework_package_imports_only_the_protocol_the_core_and_its_own_framework():
    assert _violations(_framework_rule) == []


def _keras_rule(module: str, imported: str, module_level: bool) -> str | None:
    if not _within(module, ("anycam.backends._keras",)):
        return None
    root = imported.split(".")[0]
    if root in ALL_FRAMEWORKS:
        return None if root == "keras" else f"_keras imports {imported}"
    if not imported.startswith("anycam"):
        return None
    allowed = ["anycam.backends._keras", "anycam.protocol", "anycam.core", "anycam._errors"]
    if module.endswith(".demo"):
        allowed.append("anycam.demo")
    return None if _within(imported, tuple(allowed)) else f"_keras imports {imported}"


def test_the_shared_keras_package_imports_no_framework_package_and_no_upper_layer():
    assert _violations(_keras_rule) == []


def test_the_registry_imports_no_framework():
    imports = _imports("anycam.backends", MODULES["anycam.backends"])
    assert [name for name, _ in imports if name.split(".")[0] in ALL_FRAMEWORKS] == []


@pytest.mark.parametrize(
    ("rule", "module", "imported", "module_level"),
    [
        (_src_rule, "anycam.core.methods", "anycam.explain.explainer", False),
        (_src_rule, "anycam.protocol.backend", "anycam.metrics", False),
        (_src_rule, "anycam.explain.explainer", "anycam.backends.torch", True),
        (_core_rule, "anycam.core.resize", "scipy.ndimage", False),
        (_module_level_rule, "anycam.explain.explainer", "torch", True),
        (_framework_rule, "anycam.backends.torch.capture", "jax.numpy", False),
        (_framework_rule, "anycam.backends.jax.head", "anycam.backends.torch.head", False),
        (_framework_rule, "anycam.backends.jax.capture", "anycam.explain.assembly", False),
        (_framework_rule, "anycam.backends.torch.capture", "keras", False),
        (_keras_rule, "anycam.backends._keras.layers", "anycam.backends.tensorflow.backend", False),
    ],
)
def test_the_rules_can_fail(rule, module, imported, module_level):  # type: ignore[no-untyped-def]
    # Each rule reports a forbidden import when it sees one: the checks above are not vacuous.
    assert rule(module, imported, module_level)


def _module_names(package: str) -> set[str]:
    return {path.stem for path in (SOURCES["anycam.backends"] / package).glob("*.py")}


def test_the_framework_packages_mirror_each_other():
    common = {
        "__init__",
        "backend",
        "inputs",
        "layers",
        "capture",
        "head",
        "pooled",
        "guided",
        "randomize",
        "demo",
        "attention",
    }
    # Issue 22: backends/torch/attention.py first; once the TensorFlow and JAX adapters have theirs,
    # "attention" moves to ``common``.
    extra = {"torch": {"keras"}, "tensorflow": {"namespace"}, "jax": {"keras", "compose"}}
    for package in FRAMEWORK_PACKAGES:
        names = _module_names(package)
        assert common <= names, f"backends/{package} lacks {sorted(common - names)}"
        others = names - common - extra[package] - {"models"}
        assert not others, f"backends/{package} has modules its twins lack: {sorted(others)}"
        assert extra[package] <= names


def test_every_framework_package_exports_backend_for():
    for package in FRAMEWORK_PACKAGES:
        tree = ast.parse((SOURCES["anycam.backends"] / package / "__init__.py").read_text())
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert "backend_for" in functions, package


def _packages_on_disk() -> set[str]:
    found = set()
    for package, folder in SOURCES.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join((package, *parts)))
    return found


def test_the_wheel_lists_every_package_on_disk():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert listed == _packages_on_disk()


def test_every_folder_with_python_code_is_a_package():
    for folder in SOURCES.values():
        for path in folder.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            assert (path.parent / "__init__.py").exists(), f"{path.parent} has modules but no __init__.py"


def _names_tuple(path: Path, name: str) -> tuple[str, ...]:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{path} defines no {name}")


def test_one_list_of_backends():
    names = _names_tuple(SOURCES["anycam.backends"] / "__init__.py", "NAMES")
    assert names == FRAMEWORK_PACKAGES
    # The noxfile reads NAMES from backends/__init__.py and makes one session per name.
    noxfile = (ROOT / "noxfile.py").read_text()
    assert re.search(r"^BACKENDS = _backend_names\(\)$", noxfile, re.MULTILINE)
    assert 'f"tests-{backend}"' in noxfile
    conftest = ROOT / "tests" / "conftest.py"
    assert tuple(_dict_keys(conftest, "FRAMEWORK")) == names


def _dict_keys(path: Path, name: str) -> list[str]:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{path} defines no {name}")


@pytest.mark.parametrize("limit", [600])
def test_no_source_module_is_too_long(limit):
    long = {
        str(path.relative_to(ROOT)): n for path in MODULES.values() if (n := len(path.read_text().splitlines())) > limit
    }
    assert long == {}
