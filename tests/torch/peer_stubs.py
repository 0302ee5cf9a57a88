"""A stand-in for torchvision, so pytorch-grad-cam imports beside the CPU torch build.

torchvision has no build beside this project's torch; pytorch-grad-cam imports a few names from
it at import time but never calls them in the methods and the imputer the tests compare with.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any


def stub_torchvision(install: Callable[[str, Any], None]) -> None:
    """Installs the stand-in modules through ``install(name, module)`` unless torchvision imports.

    Pass ``lambda name, m: monkeypatch.setitem(sys.modules, name, m)`` to have the stand-in
    removed after the test, or use :func:`torchvision_stub` around an import: it must never stay
    in ``sys.modules``, where other libraries (transformers) ask whether torchvision exists and
    fail on a module without a spec.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or not importable beside this torch build
        pass
    else:
        return
    package = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    for name in ("Compose", "Normalize", "ToTensor"):
        setattr(transforms, name, None)
    functional.resize = None  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    package.transforms = transforms  # type: ignore[attr-defined]
    for name, module in (
        ("torchvision", package),
        ("torchvision.transforms", transforms),
        ("torchvision.transforms.functional", functional),
    ):
        install(name, module)


@contextlib.contextmanager
def torchvision_stub() -> Iterator[None]:
    """The stand-in in ``sys.modules`` inside the block only (for imports of pytorch-grad-cam)."""
    installed: list[str] = []

    def install(name: str, module: Any) -> None:
        sys.modules[name] = module
        installed.append(name)

    stub_torchvision(install)
    try:
        yield
    finally:
        for name in installed:
            sys.modules.pop(name, None)
