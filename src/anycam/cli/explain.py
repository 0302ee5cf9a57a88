"""``anycam explain``: your images, your model (see ``anycam.cli.models``), overlays on disk and
the top classes printed. Nothing here imports a framework: the factory does.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import core
from .._errors import AnycamError, InputError, TargetError, closest
from .images import BARE_SHORT_SIDE, bare_size, check_unasked_size, known_input_size
from .logs import quiet_native_logs
from .models import FactoryError, ModelSpec, default_preprocess, load_factory, model_spec, read_image


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


def _unique_stems(paths: Sequence[str]) -> list[str]:
    """Returns one file stem per image, none equal to another (also ignoring case).

    Images that share a stem (``a/x.png``, ``b/x.png``, ``x.jpg``) are numbered ``x-1``, ``x-2``,
    … skipping any number another image's own stem already takes, so no overlay overwrites another.
    """
    stems = [Path(path).stem for path in paths]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem.casefold()] = counts.get(stem.casefold(), 0) + 1
    taken = {stem.casefold() for stem in stems if counts[stem.casefold()] == 1}
    names = []
    for stem in stems:
        if counts[stem.casefold()] == 1:
            names.append(stem)
            continue
        number = 1
        while f"{stem}-{number}".casefold() in taken:
            number += 1
        taken.add(f"{stem}-{number}".casefold())
        names.append(f"{stem}-{number}")
    return names


def output_folder(text: str) -> Path:
    """Returns the ``--out`` folder, created.

    Raises:
        InputError: the path is a file, or the folder cannot be created (a file on the way,
            no permission), in one line.
    """
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {text!r} is a file, not a folder; name a folder for the overlays")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {text!r}: cannot create the folder ({exc.strerror or exc})") from exc
    return out


def _model_inputs(
    spec: ModelSpec, bare: bool, images: list[np.ndarray], paths: Sequence[str], layout: str
) -> tuple[list[np.ndarray], str | None]:
    """Returns each image as the model's input, and for a bare model the line that says what was assumed."""
    if spec.preprocess is not None:
        return [np.asarray(spec.preprocess(image)) for image in images], None
    if not bare:
        if spec.size is None:
            for path, image in zip(paths, images, strict=True):
                check_unasked_size(path, image.shape)
        return [default_preprocess(image, spec, layout) for image in images], None
    known = known_input_size(spec.model, layout)
    sizes = [bare_size(image.shape, known) for image in images]
    inputs = [default_preprocess(image, spec, layout, size) for image, size in zip(images, sizes, strict=True)]
    if known is not None:
        how = f"resized to {known[0]} x {known[1]}, the model's input size"
    else:
        how = f"images with a short side over {BARE_SHORT_SIDE} px shrunk to {BARE_SHORT_SIDE} (aspect kept)"
    assumed = (
        f"anycam explain: the factory returned a bare model, so pixels are scaled to [0, 1] with no mean/std and "
        f"{how}; to change this return anycam.cli.ModelSpec(model, size=(H, W), mean=..., std=...)"
    )
    return inputs, assumed


def explain_command(args: argparse.Namespace) -> int:
    """Runs ``anycam explain``; returns the exit status (2 when nothing could be written)."""
    from ..explain.explainer import Explainer
    from ..viz.overlay import overlay, save

    reference = args.model
    for name, value in (("--top", args.top), ("--batch-size", args.batch_size)):
        if value < 1:
            raise InputError(f"{name} must be a positive integer, got {value}")
    if not 0.0 <= args.alpha <= 1.0:
        raise InputError(f"--alpha must lie in [0, 1], got {args.alpha}")
    out = output_folder(args.out)
    # The factory usually imports its framework: that is when TensorFlow writes its C++ log.
    with quiet_native_logs():
        factory = load_factory(reference)
        try:
            built = factory()
        except Exception as exc:  # the user's factory may raise anything
            raise FactoryError(f"the factory {reference!r} raised {type(exc).__name__}: {exc}") from exc
    spec = model_spec(built, f"the factory {reference!r}")
    bare = not isinstance(built, (ModelSpec, dict))
    # Neither --layer nor the spec's layer: None, the Explainer's automatic rule (and the only
    # layer a JAX (features, head) pair accepts: it is already cut at its layer).
    layer = args.layer if args.layer is not None else spec.layer
    chosen = args.method or ["gradcam"]
    methods = list(core.METHODS) if "all" in chosen else list(dict.fromkeys(chosen))
    skipped: dict[str, AnycamError] = {}
    missed: dict[str, list[str]] = {}  # the images a method skipped where it ran on others
    explainers: dict[str, Any] = {}
    for method in methods:
        try:
            explainers[method] = Explainer(spec.model, layer, method=method, backend=spec.backend, **spec.options)
        except AnycamError as exc:
            skipped[method] = exc
    if not explainers:
        raise _nothing_ran(skipped)
    first = next(iter(explainers.values()))
    layout = first.backend.input_layout
    images = [read_image(path, spec.channels) for path in args.images]
    inputs, assumed = _model_inputs(spec, bare, images, args.images, layout)
    if assumed is not None:
        print(assumed)
    names = _unique_stems(args.images)
    layer_text = ", ".join(first.layer_names) or "auto"
    print(f"anycam explain: {len(images)} image(s); layer {layer_text}; {', '.join(methods)}")
    # The automatic layer is resolved on the first forward pass; say which it was after that one.
    unresolved = not first.layer_names
    written = 0
    # Images of one input shape go through the model together, batch_size at a time.
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, array in enumerate(inputs):
        groups.setdefault(array.shape, []).append(index)
    chunks = [
        group[i : i + args.batch_size] for group in groups.values() for i in range(0, len(group), args.batch_size)
    ]
    for chunk in sorted(chunks):
        batch = np.stack([inputs[i] for i in chunk])
        target = parse_target(args.target, spec.labels, len(chunk)) if args.target is not None else spec.target
        outputs = np.asarray(first.backend.predict(batch), dtype=np.float64)
        explanations = {}
        for method, explainer in explainers.items():
            try:
                explanations[method] = explainer.explain(batch, target)
            except AnycamError as exc:  # one method's limit must not stop the others
                skipped.setdefault(method, exc)
                missed.setdefault(method, []).extend(args.images[i] for i in chunk)
                continue
            layer_used = explanations[method].layer
            if unresolved and layer_used:
                unresolved = False
                print(f"layer auto chose {layer_used if isinstance(layer_used, str) else ', '.join(layer_used)}")
        # One block per image: its top classes, then every overlay written for it.
        for row, index in enumerate(chunk):
            print(f"\n{args.images[index]}")
            if outputs.ndim == 2:
                print(f"  top classes: {_top_classes(outputs[row], args.top, spec.labels)}")
            else:
                print(f"  the model's output has shape {outputs.shape[1:]} per image, not (classes,): no top classes")
            for method, explanation in explanations.items():
                several = explanation.scores.ndim == 2
                maps = explanation.heatmap[row] if several else explanation.heatmap[row][None]
                classes = None if explanation.target is None else np.atleast_1d(explanation.target[row])
                for column, heatmap in enumerate(maps):
                    label = None if classes is None else int(classes[column])
                    suffix = "" if not several else f"_{label if label is not None else column}"
                    path = out / f"{names[index]}_{method}{suffix}.png"
                    try:
                        save(path, overlay(images[index], heatmap, alpha=args.alpha))
                    except OSError as exc:
                        raise InputError(f"cannot write {str(path)!r} ({exc.strerror or exc})") from exc
                    written += 1
                    what = "" if label is None else f", class {_class_name(label, spec.labels)}"
                    print(f"  {method}{what}: {path}")
    if written == 0 and skipped:
        raise _nothing_ran(skipped)
    print(f"\nwrote {written} overlay(s) to {out}")
    for method, error in skipped.items():
        images_missed = missed.get(method, args.images)
        which = "" if len(images_missed) == len(args.images) else f" for {', '.join(images_missed)}"
        print(f"anycam explain: skipped {method}{which}: {_one_line(error)}", file=sys.stderr)
    return 0 if written else 2


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _nothing_ran(skipped: dict[str, AnycamError]) -> AnycamError:
    """Returns the error to raise when no method could run: the one error, or all methods' reasons."""
    if len(skipped) == 1:
        return next(iter(skipped.values()))
    by_reason: dict[str, list[str]] = {}
    for method, exc in skipped.items():
        by_reason.setdefault(_one_line(exc), []).append(method)
    reasons = "; ".join(f"{', '.join(methods)}: {reason}" for reason, methods in by_reason.items())
    return AnycamError(f"no method could run, nothing was written ({reasons})")


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


__all__ = ["add_explain_parser", "explain_command", "output_folder", "parse_target"]
