"""``anycam explain``: your images, your model, overlays on disk and the top classes printed.

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

import argparse
import contextlib
import importlib
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import core
from ._errors import AnycamError, InputError, TargetError, closest, require

# TensorFlow >= 2.16 writes these from C++ while it is imported, before absl's logging is set up,
# so TF_CPP_MIN_LOG_LEVEL does not hide them: "I0000 00:00:17.. 1234 port.cc:153] oneDNN ...".
_ABSL_PREAMBLE = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$"
)
_ABSL_LINE = re.compile(r"^([IWE])\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.]+:\d+\] ")
_ABSL_LEVELS = {"I": 0, "W": 1, "E": 2}


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Hides the C++ start-up log lines that TF_CPP_MIN_LOG_LEVEL asks to hide, and nothing else.

    File descriptor 2 is captured while the block runs (C++ libraries write there directly,
    past ``sys.stderr``); afterwards every captured line is written back except absl log lines
    below the level ``TF_CPP_MIN_LOG_LEVEL`` sets (2: info and warnings hidden, errors kept)
    and absl's preamble, so real errors and the block's own output still appear.
    """
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    if level <= 0:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (an embedded interpreter): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                match = _ABSL_LINE.match(line)
                if _ABSL_PREAMBLE.match(line) or (match and _ABSL_LEVELS[match.group(1)] < level):
                    continue
                sys.stderr.write(line)
            sys.stderr.flush()


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
            bilinear); None keeps each image's size.
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


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Returns the image at ``path`` as uint8 ``(H, W, 3)`` RGB (``(H, W)`` for ``channels=1``).

    EXIF orientation is applied, as a photo viewer shows it.

    Raises:
        InputError: a file that is missing or that Pillow cannot read.
        anycam.MissingExtraError: Pillow is not installed.
    """
    image_module = require("PIL.Image", "viz", "reading images")
    ops = require("PIL.ImageOps", "viz", "reading images")
    try:
        with image_module.open(path) as opened:
            picture = ops.exif_transpose(opened).convert("RGB" if channels == 3 else "L")
    except FileNotFoundError as exc:
        raise InputError(f"image {str(path)!r} does not exist") from exc
    except (OSError, ValueError) as exc:  # Pillow's UnidentifiedImageError is an OSError
        raise InputError(
            f"cannot read image {str(path)!r} ({exc}); give a PNG, JPEG or another format Pillow reads"
        ) from exc
    return np.asarray(picture, dtype=np.uint8)


def default_preprocess(image: np.ndarray, spec: ModelSpec, layout: str) -> np.ndarray:
    """Returns float32 ``(pixels / 255 − mean) / std`` at ``spec.size``, in ``layout``, no batch axis."""
    if spec.size is not None:
        image_module = require("PIL.Image", "viz", "resizing images")
        height, width = (int(v) for v in spec.size)
        resized = image_module.fromarray(image).resize((width, height), image_module.Resampling.BILINEAR)
        image = np.asarray(resized)
    pixels: np.ndarray = image.astype(np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if spec.mean is not None:
        pixels = pixels - np.asarray(spec.mean, dtype=np.float32)
    if spec.std is not None:
        pixels = pixels / np.asarray(spec.std, dtype=np.float32)
    if layout == "channels_first":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def parse_target(text: str | None, labels: Sequence[str] | None, count: int) -> Any:
    """Returns the Explainer target for ``--target``: None, ``top_k(k)``, or an ``(N, K)`` array.

    ``text`` is ``argmax`` (or None), ``top:K``, or comma-separated classes, each an index or a
    name from ``labels``; the same classes are explained for every image.

    Raises:
        TargetError: an unknown class name or a malformed value.
    """
    if text is None or text == "argmax":
        return None
    match = re.fullmatch(r"top:?(\d+)", text)
    if match:
        return core.top_k(int(match.group(1)))
    classes = []
    names = [str(label) for label in labels] if labels is not None else []
    for item in (part.strip() for part in text.split(",")):
        if re.fullmatch(r"\d+", item):
            classes.append(int(item))
        elif item in names:
            classes.append(names.index(item))
        elif item.lower() in (lowered := [name.lower() for name in names]):
            classes.append(lowered.index(item.lower()))
        else:
            hint = closest(item, names) if names else "; the factory gave no labels, so give class indices"
            raise TargetError(f"--target {text!r}: {item!r} is neither a class index nor a label{hint}")
    return np.tile(np.asarray(classes, dtype=np.int64), (count, 1))


def _class_name(index: int, labels: Sequence[str] | None) -> str:
    if labels is not None and 0 <= index < len(labels):
        return f"{index} {labels[index]}"
    return str(index)


def _top_classes(scores: np.ndarray, count: int, labels: Sequence[str] | None) -> str:
    best = np.argsort(-scores, kind="stable")[:count]
    shifted = np.exp(scores - scores.max())
    probabilities = shifted / shifted.sum()
    return ", ".join(
        f"{_class_name(int(c), labels)} (score {scores[c]:.3g}, softmax {probabilities[c]:.3f})" for c in best
    )


def _output_names(paths: Sequence[str]) -> list[str]:
    """Returns one file stem per image, numbered where two images share one."""
    stems = [Path(path).stem for path in paths]
    return [stem if stems.count(stem) == 1 else f"{stem}-{index}" for index, stem in enumerate(stems)]


def explain_command(args: argparse.Namespace) -> int:
    """Runs ``anycam explain``; returns the exit status."""
    from ._explainer import Explainer
    from .viz import overlay, save

    reference = args.model
    # The factory usually imports its framework: that is when TensorFlow writes its C++ log.
    with quiet_native_logs():
        factory = load_factory(reference)
        try:
            built = factory()
        except Exception as exc:  # the user's factory may raise anything
            raise FactoryError(f"the factory {reference!r} raised {type(exc).__name__}: {exc}") from exc
    spec = model_spec(built, f"the factory {reference!r}")
    # Neither --layer nor the spec's layer: None, the Explainer's automatic rule (and the only
    # layer a JAX (features, head) pair accepts: it is already cut at its layer).
    layer = args.layer if args.layer is not None else spec.layer
    chosen = args.method or ["gradcam"]
    methods = list(core.METHODS) if "all" in chosen else list(dict.fromkeys(chosen))
    for name, value in (("--top", args.top), ("--batch-size", args.batch_size)):
        if value < 1:
            raise InputError(f"{name} must be a positive integer, got {value}")
    if not 0.0 <= args.alpha <= 1.0:
        raise InputError(f"--alpha must lie in [0, 1], got {args.alpha}")
    explainers = {
        method: Explainer(spec.model, layer, method=method, backend=spec.backend, **spec.options) for method in methods
    }
    first = explainers[methods[0]]
    layout = getattr(first.backend, "input_layout", "channels_first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = [read_image(path, spec.channels) for path in args.images]
    inputs = [
        np.asarray(spec.preprocess(image)) if spec.preprocess is not None else default_preprocess(image, spec, layout)
        for image in images
    ]
    names = _output_names(args.images)
    # The automatic layer is resolved on the first forward pass; say which it was after that one.
    unresolved = not first.layer_names
    layer_text = ", ".join(first.layer_names) or "auto"
    print(f"anycam explain: {len(images)} image(s); layer {layer_text}; {', '.join(methods)}")
    written = 0
    # Images of one input shape go through the model together, batch_size at a time.
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, array in enumerate(inputs):
        groups.setdefault(array.shape, []).append(index)
    chunks = [
        group[i : i + args.batch_size] for group in groups.values() for i in range(0, len(group), args.batch_size)
    ]
    for chunk in chunks:
        batch = np.stack([inputs[i] for i in chunk])
        target = parse_target(args.target, spec.labels, len(chunk)) if args.target is not None else spec.target
        outputs = np.asarray(first.backend.predict(batch), dtype=np.float64)
        for row, index in enumerate(chunk):
            print(f"\n{args.images[index]}")
            if outputs.ndim == 2:
                print(f"  top classes: {_top_classes(outputs[row], args.top, spec.labels)}")
            else:
                print(f"  the model's output has shape {outputs.shape[1:]} per image, not (classes,): no top classes")
        for method in methods:
            explanation = explainers[method].explain(batch, target)
            if unresolved:
                unresolved = False
                picked = explanation.layer if isinstance(explanation.layer, str) else ", ".join(explanation.layer)
                print(f"  layer auto chose {picked}")
            several = explanation.scores.ndim == 2
            for row, index in enumerate(chunk):
                maps = explanation.heatmap[row] if several else explanation.heatmap[row][None]
                classes = None if explanation.target is None else np.atleast_1d(explanation.target[row])
                for column, heatmap in enumerate(maps):
                    label = None if classes is None else int(classes[column])
                    suffix = "" if not several else f"_{label if label is not None else column}"
                    path = out / f"{names[index]}_{method}{suffix}.png"
                    save(path, overlay(images[index], heatmap, alpha=args.alpha))
                    written += 1
                    what = "" if label is None else f", class {_class_name(label, spec.labels)}"
                    print(f"  {method}{what}: {path}")
    print(f"\nwrote {written} overlay(s) to {out}")
    return 0


def add_explain_parser(commands: Any) -> None:
    """Adds the ``explain`` sub-command to an ``argparse`` sub-parser collection."""
    command = commands.add_parser(
        "explain",
        help="explain your own images with your own model; write overlays, print the top classes",
        description=(
            "Explains IMAGE files with the model a factory function returns (PyTorch, TensorFlow/Keras or JAX), "
            "writes one overlay PNG per image and method, and prints each image's top classes."
        ),
        epilog="The factory may return the model or anycam.cli.ModelSpec(model, layer=..., size=..., mean=..., "
        "std=..., labels=..., preprocess=...); see the docs' command-line page.",
    )
    command.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    command.add_argument(
        "--model",
        required=True,
        metavar="PACKAGE.MODULE:FACTORY",
        help="a function without arguments returning the model or an anycam.cli.ModelSpec, e.g. my_models:resnet "
        "(importable from the current folder) or path/to/file.py:resnet",
    )
    command.add_argument(
        "--layer",
        default=None,
        metavar="NAME|auto",
        help="the layer to explain, e.g. layer4 or conv5_block3_out, or 'auto': the last layer whose output keeps "
        "the input's spatial axes (default: the ModelSpec's layer, else the automatic choice)",
    )
    command.add_argument(
        "--method",
        action="append",
        choices=("all", *core.METHODS),
        default=None,
        help="CAM method; repeat for several, or 'all' (default: gradcam)",
    )
    command.add_argument(
        "--target",
        default=None,
        metavar="WHICH",
        help="'argmax' (default: each image's top class), 'top:K' (K maps per image), or comma-separated class "
        "indices or label names explained for every image",
    )
    command.add_argument(
        "--out", default="anycam-maps", metavar="DIR", help="folder for the overlays (default: ./anycam-maps)"
    )
    command.add_argument("--top", type=int, default=5, metavar="K", help="top classes printed per image (default: 5)")
    command.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per forward pass (default: 8)")
    command.add_argument(
        "--alpha", type=float, default=0.5, help="weight of the heatmap colour in the overlays, 0..1 (default: 0.5)"
    )


__all__ = [
    "FactoryError",
    "ModelSpec",
    "add_explain_parser",
    "explain_command",
    "load_factory",
    "model_spec",
    "read_image",
]
