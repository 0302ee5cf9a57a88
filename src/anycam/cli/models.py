"""Your model for ``anycam explain``: factories, ``ModelSpec`` and reading images.

The model comes from a *factory*: a function without arguments named ``PACKAGE.MODULE:FACTORY``
(imported as ``python -m`` would, with the current folder on the path) or
``path/to/file.py:FACTORY``. It returns the model itself — a ``torch.nn.Module``, a Keras
model, a Flax or Equinox module — or a :class:`ModelSpec` (or a dict with the same keys) that
adds the default layer, the preprocessing and the class names::

    # my_models.py
    import torchvision
    from anycam.cli import ModelSpec

    def resnet():
        model = torchvision.models.resnet18(weights="DEFAULT").eval()
        return ModelSpec(model, layer="layer4", size=(224, 224),
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

    $ anycam explain cat.jpg dog.png --model my_models:resnet --method gradcam --out maps/

Nothing here imports a framework: the factory does.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import AnycamError, closest
from .images import default_preprocess, read_image


class FactoryError(AnycamError, ValueError):
    """``--model`` names a factory that cannot be imported, fails, or returns no known model."""


@dataclass(frozen=True)
class ModelSpec:
    """A model and how to feed it images: what a ``--model`` factory may return.

    Attributes:
        model: the model, in any form ``anycam.Explainer`` accepts.
        layer: the layer to explain when ``--layer`` is not given (None: the automatic choice, as
            ``Explainer(model, None)``).
        preprocess: a function from one image — uint8 ``(H, W, 3)`` RGB, or ``(H, W)`` with
            ``channels=1`` — to one model input without the batch axis (e.g. float32
            ``(3, 224, 224)``). When given, ``size``, ``mean`` and ``std`` are not used.
        size: ``(height, width)`` the default preprocessing resizes every image to (Pillow,
            bilinear); None keeps each image's size, up to 2048 x 2048 pixels (a larger image is
            refused: give the size your model was trained at). A factory that returns a bare
            model instead of a ``ModelSpec`` gets a Keras model's declared input size, else
            images shrunk to a short side of 224, pixels scaled to [0, 1] with no mean/std (the
            command's first line says so).
        mean, std: per-channel values on the [0, 1] scale; the default preprocessing computes
            ``(pixels / 255 − mean) / std``.
        channels: 3 (RGB) or 1 (grayscale).
        labels: class names, ``labels[i]`` for output ``i``: printed with the top classes, and
            accepted by ``--target``.
        backend: ``"torch"``, ``"tensorflow"`` or ``"jax"`` where the model's type does not tell
            (a JAX ``(features, head)`` pair).
        target: the target when ``--target`` is not given: any ``Explainer`` target form, e.g.
            a callable for a segmentation or detection model.
        options: further ``anycam.Explainer`` keyword arguments (``output=``,
            ``input_layout=``, ``model_kwargs=`` …).
    """

    model: Any
    layer: Any = None
    preprocess: Callable[[np.ndarray], Any] | None = None
    size: tuple[int, int] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    channels: int = 3
    labels: Sequence[str] | None = None
    backend: str | None = None
    target: Any = None
    options: dict[str, Any] = field(default_factory=dict)


def load_factory(reference: str) -> Callable[[], Any]:
    """Returns the function that ``reference`` (``PACKAGE.MODULE:FACTORY`` or ``file.py:FACTORY``) names.

    Raises:
        FactoryError: a malformed reference, a module that cannot be imported (or raises while
            importing), a missing attribute or one that is not callable.
    """
    module_name, colon, attribute = reference.rpartition(":")
    if not colon or not module_name or not attribute.isidentifier():
        raise FactoryError(
            f"--model {reference!r} is not PACKAGE.MODULE:FACTORY; e.g. --model my_models:resnet for a "
            "function resnet() in my_models.py, or --model path/to/file.py:resnet"
        )
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        module = _import_file(Path(module_name), reference)
    else:
        module = _import_module(module_name)
    factory = getattr(module, attribute, None)
    if factory is None:
        public = [name for name in dir(module) if not name.startswith("_")]
        raise FactoryError(
            f"module {module_name!r} has no {attribute!r}{closest(attribute, public)}; "
            f"define a function {attribute}() that returns the model"
        )
    if not callable(factory):
        raise FactoryError(
            f"{reference!r} is a {type(factory).__name__}, not a function; the factory must be a function "
            "without arguments that returns the model"
        )
    return factory


def _import_module(name: str) -> Any:
    # As `python -m` does: modules in the current folder are importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise FactoryError(
                f"cannot import module {name!r} ({exc}); run anycam from the folder that holds it, add "
                "that folder to PYTHONPATH, or name the file: --model path/to/file.py:FACTORY"
            ) from exc
        raise FactoryError(f"importing {name!r} failed: {exc}; install what it needs") from exc
    except Exception as exc:  # the user's module may raise anything while importing
        raise FactoryError(f"importing {name!r} failed: {type(exc).__name__}: {exc}") from exc


def _import_file(path: Path, reference: str) -> Any:
    if not path.is_file():
        raise FactoryError(f"--model {reference!r}: no file {str(path)!r}")
    spec = importlib.util.spec_from_file_location(f"anycam_factory_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise FactoryError(f"--model {reference!r}: {str(path)!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file may raise anything while importing
        raise FactoryError(f"importing {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    return module


def model_spec(result: Any, reference: str = "the factory") -> ModelSpec:
    """Returns what a factory returned as a checked :class:`ModelSpec`.

    Raises:
        FactoryError: a dict with unknown keys or no ``"model"``, or a model no backend knows.
    """
    if isinstance(result, dict):
        known = [f.name for f in fields(ModelSpec)]
        unknown = sorted(set(result) - set(known))
        if unknown or "model" not in result:
            problem = f"unknown keys {unknown}" if unknown else "no 'model' key"
            raise FactoryError(f"{reference} returned a dict with {problem}; the keys are {', '.join(known)}")
        result = ModelSpec(**result)
    spec = result if isinstance(result, ModelSpec) else ModelSpec(model=result)
    if spec.channels not in (1, 3):
        raise FactoryError(f"{reference}: channels must be 1 or 3, got {spec.channels!r}")
    if spec.backend is None:
        backends = importlib.import_module("anycam.backends")
        try:
            backends.detect(spec.model)
        except AnycamError as exc:
            kind = f"{type(spec.model).__module__}.{type(spec.model).__qualname__}"
            raise FactoryError(
                f"{reference} returned a {kind}, which is no model anycam knows; return a torch.nn.Module, a "
                "Keras model, a Flax module (or (module, variables)), an Equinox module, or "
                "anycam.cli.ModelSpec(model, backend='jax') for a (features, head) pair of functions"
            ) from exc
    return spec


__all__ = ["FactoryError", "ModelSpec", "default_preprocess", "load_factory", "model_spec", "read_image"]
