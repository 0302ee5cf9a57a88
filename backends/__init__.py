"""Framework adapters, one package per framework; installed as ``anycam.backends``.

``torch/``, ``tensorflow/`` and ``jax/`` hold the same module names (see each package's
docstring); ``_keras/`` is the Keras 3 structure the three Keras adapters share. Each package
exports ``backend_for(model)``, the adapter class for a model of that framework.

This module imports no framework. It finds the backend for a model from the model's type, and
only among frameworks the user has already imported (present in ``sys.modules``): a library
must never import a multi-hundred-megabyte framework the user did not ask for.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from anycam._errors import BackendError
from anycam.protocol.backend import Backend

NAMES = ("torch", "tensorflow", "jax")

_INSTALL = {
    "torch": ("PyTorch", "torch"),
    "tensorflow": ("TensorFlow/Keras 3", "tensorflow"),
    "jax": ("JAX", "jax"),
}


def _isinstance(obj: Any, module: str, *attrs: str) -> bool:
    """True if ``obj`` is an instance of ``module.attr1.attr2...``, without importing ``module``."""
    found = sys.modules.get(module)
    for attr in attrs:
        found = getattr(found, attr, None)
    return isinstance(found, type) and isinstance(obj, found)


def is_keras(model: Any) -> bool:
    """True if ``model`` is a Keras 3 layer or model (without importing Keras)."""
    return _isinstance(model, "keras", "Layer")


def _keras_backend(model: Any) -> str | None:
    """Returns the framework Keras runs on if ``model`` is a Keras layer, else None."""
    if not _isinstance(model, "keras", "Layer"):
        return None
    return str(sys.modules["keras"].config.backend())


def _is_torch(model: Any) -> bool:
    return _isinstance(model, "torch", "nn", "Module")


def _is_tensorflow(model: Any) -> bool:
    # AutoTrackable: tf.Module and what tf.saved_model.load returns (refused with the recipe that works).
    return _isinstance(model, "keras", "Layer") or _isinstance(
        model, "tensorflow", "__internal__", "tracking", "AutoTrackable"
    )


def _is_jax(model: Any) -> bool:
    if isinstance(model, tuple) and len(model) == 2 and _isinstance(model[0], "flax.linen", "Module"):
        return True
    return (
        _isinstance(model, "flax.linen", "Module")
        or _isinstance(model, "flax.nnx", "Module")
        or _isinstance(model, "equinox", "Module")
    )


_DETECTORS = (("torch", _is_torch), ("tensorflow", _is_tensorflow), ("jax", _is_jax))


def detect(model: Any) -> str:
    """Returns the backend name for ``model`` from its type.

    A Keras 3 model belongs to the framework Keras runs on (``keras.config.backend()``): the
    same model class is a TensorFlow, JAX or PyTorch model depending on ``KERAS_BACKEND``.

    Raises:
        BackendError: if no imported framework recognises the model.
    """
    keras_backend = _keras_backend(model)
    if keras_backend is not None:
        if keras_backend in NAMES:
            return keras_backend
        raise BackendError(
            f"Keras runs on its {keras_backend!r} backend, which has no automatic differentiation "
            "anycam can use; set KERAS_BACKEND to tensorflow, jax or torch before the first `import keras`"
        )
    for name, predicate in _DETECTORS:
        if predicate(model):
            return name
    raise BackendError(
        f"cannot tell which framework a {type(model).__module__}.{type(model).__qualname__} belongs to; "
        "pass backend='torch', 'tensorflow' or 'jax' (a JAX model given as a (features, head) pair of "
        "functions always needs backend='jax')"
    )


def load(name: str, model: Any = None) -> type[Backend]:
    """Returns the adapter class of backend ``name`` for ``model``, importing its framework.

    The framework package's ``backend_for(model)`` picks the class: a Keras model on JAX or
    PyTorch gets that framework's Keras adapter (``jax/keras.py``, ``torch/keras.py``).

    Raises:
        BackendError: for an unknown name or a framework that cannot be imported.
    """
    if name not in NAMES:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    try:
        package = importlib.import_module(f"{__name__}.{name}")
        adapter: type[Backend] = package.backend_for(model)
    except ImportError as exc:
        framework, extra = _INSTALL[name]
        raise BackendError(
            f'backend {name!r} needs {framework}, which failed to import ({exc}); pip install "anycam[{extra}]" '
            f'(from a source checkout: pip install ".[{extra}]")'
        ) from exc
    return adapter
