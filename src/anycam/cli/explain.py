"""``anycam explain``: your images, your model (see ``anycam.cli.models``), overlays on disk and
the top classes printed. Nothing here imports a framework: the factory does.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import core
from .._errors import InputError, TargetError, closest
from .logs import quiet_native_logs
from .models import FactoryError, default_preprocess, load_factory, model_spec, read_image


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
    from ..explain.explainer import Explainer
    from ..viz.overlay import overlay, save

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
    layout = first.backend.input_layout
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


__all__ = ["add_explain_parser", "explain_command", "parse_target"]
