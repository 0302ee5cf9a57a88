"""``anycam demo``: the shipped demo model explained in every installed framework.

The demo model is a small CNN trained on scikit-learn's digits placed on cluttered canvases, so
the true location of the evidence is known; the command writes a PNG grid and prints the
pointing-game accuracy per method and framework, and how closely the frameworks agree.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import core
from .._errors import InputError, MissingExtraError
from ..viz.overlay import install_hint
from .explain import output_folder
from .logs import quiet_native_logs

BACKENDS = ("torch", "tensorflow", "jax")
FRAMEWORK_MODULE = {"torch": "torch", "tensorflow": "tensorflow", "jax": "flax"}


def installed_backends() -> list[str]:
    """Returns the backends whose framework can be imported (checked without importing it)."""
    return [name for name in BACKENDS if importlib.util.find_spec(FRAMEWORK_MODULE[name]) is not None]


def _layer_methods() -> list[str]:
    """The methods ``--method all`` runs on the demo CNN: every one but the attention methods (it has no attention)."""
    return [name for name, method in core.METHODS.items() if method.kind != "attention"]


def _choose_backends(requested: str) -> list[str]:
    available = installed_backends()
    if requested == "all":
        if not available:
            raise SystemExit(
                "anycam demo: no framework is installed; install one, e.g. "
                'pip install "anycam[torch]" (or [tensorflow], [jax], [all]; from a source checkout: '
                'pip install ".[torch]")'
            )
        return available
    if requested not in available:
        raise SystemExit(f"anycam demo: backend {requested!r} is not installed; {install_hint(requested)}")
    return [requested]


def _load_model(backend: str, weights: dict[str, np.ndarray]) -> tuple[Any, str]:
    """Returns the demo model in ``backend`` and the input layout it expects."""
    with quiet_native_logs():  # importing TensorFlow writes C++ log lines
        module = importlib.import_module(f"anycam.backends.{backend}.demo")
        return module.build_demo_model(weights), module.INPUT_LAYOUT


def _inputs(images: np.ndarray, layout: str) -> np.ndarray:
    return images if layout == "channels_first" else np.ascontiguousarray(images.transpose(0, 2, 3, 1))


class DemoRun:
    """The demo model loaded in several frameworks, explained with several methods."""

    def __init__(self, backends: Sequence[str], layer: str) -> None:
        from ..demo.data import load_demo

        self.demo = load_demo()
        self.layer = layer
        self.models = {}
        for name in backends:
            start = time.perf_counter()
            self.models[name] = _load_model(name, self.demo["weights"])
            print(f"  {name:<10} model loaded in {time.perf_counter() - start:.1f} s", flush=True)

    def explainer(self, backend: str, method: str) -> Any:
        from ..explain.explainer import Explainer

        return Explainer(self.models[backend][0], self.layer, method=method, backend=backend)

    def explain(self, backend: str, method: str, images: np.ndarray) -> Any:
        explainer = self.explainer(backend, method)
        layout = self.models[backend][1]
        return explainer, explainer.explain(_inputs(images, layout), target=self.demo["labels"][: len(images)])


def _agreement(maps: dict[str, np.ndarray]) -> float:
    names = list(maps)
    return max((float(np.abs(maps[a] - maps[b]).max()) for a in names for b in names if a < b), default=0.0)


def demo(args: argparse.Namespace) -> int:
    from ..metrics.localisation import pointing_game

    backends = _choose_backends(args.backend)
    methods = _layer_methods() if args.method == "all" else [args.method]
    if args.rows < 1:
        raise InputError(f"--rows must be a positive integer, got {args.rows}")
    out = output_folder(args.out)
    print(f"anycam demo: backends {', '.join(backends)}; layer {args.layer!r}; methods {', '.join(methods)}")
    run = DemoRun(backends, args.layer)
    images, labels, boxes = run.demo["images"], run.demo["labels"], run.demo["boxes"]
    outputs = {}
    for name in backends:
        _, layout = run.models[name]
        outputs[name] = run.explainer(name, "gradcam").backend.predict(_inputs(images, layout))
        accuracy = float((outputs[name].argmax(1) == labels).mean() * 100)
        print(f"  {name:<10} accuracy on the {len(images)} held-out canvases: {accuracy:.1f}%")
    if len(backends) > 1:
        print(f"  logits agree across frameworks to {_agreement(outputs):.1e} (max abs difference)")
    print()
    several = len(backends) > 1
    header = "| method | " + " | ".join(f"pointing game, {b}" for b in backends) + " |"
    if several:
        header += " max heatmap difference between frameworks |"
    print(header)
    print("|" + "---|" * (len(backends) + 1 + several))
    heatmaps: dict[str, dict[str, np.ndarray]] = {}
    for method in methods:
        maps, hits = {}, {}
        for name in backends:
            _, explanation = run.explain(name, method, images)
            maps[name] = explanation.heatmap
            hits[name] = float(pointing_game(explanation.heatmap, boxes).mean() * 100)
        heatmaps[method] = maps
        cells = " | ".join(f"{hits[b]:.1f}%" for b in backends)
        agreement = f" {_agreement(maps):.1e} |" if several else ""
        print(f"| {method} | {cells} |{agreement}", flush=True)
    shown = {m: heatmaps[m][backends[0]] for m in methods}
    source = f"{backends[0]} backend, layer {args.layer}"
    written = _write_picture(out / "demo.png", run.demo, shown, args.rows, source)
    if written is not None:
        count = min(args.rows, len(images))
        print(
            f"\nwrote {written}: the first {count} of the {len(images)} held-out canvases (--rows sets how many), "
            "each the image, then one overlay per method"
        )
    return 0


# The picture is saved at this resolution; the README shows it about 800 pixels wide.
PICTURE_DPI = 120


def demo_figure(demo: dict[str, Any], maps: dict[str, np.ndarray], rows: int, source: str) -> Any:
    """Returns the demo's figure: the first ``rows`` canvases, each the image then one overlay per method.

    Raises:
        anycam.MissingExtraError: matplotlib is not installed.
    """
    from ..viz.figures import plot

    count = min(rows, len(demo["images"]))
    return plot(
        demo["images"][:count, 0],
        {method: heat[:count] for method, heat in maps.items()},
        labels=[f"digit {label}" for label in demo["labels"][:count]],
        boxes=demo["boxes"][:count],
        title=f"anycam demo: held-out canvases, true box in green; maps from the {source}",
        # Eight cells to a row, 1.3 inches and 12-point text each: the picture stays readable
        # scaled down to a README's width (about 800 pixels), its colorbar beside the maps.
        max_columns=8,
        cell_inches=1.3,
        fontsize=12,
    )


def _write_picture(
    path: Path, demo: dict[str, Any], maps: dict[str, np.ndarray], rows: int, source: str
) -> Path | None:
    """Writes the demo figure; without matplotlib says what the picture needs and returns None."""
    try:
        demo_figure(demo, maps, rows, source).savefig(path, dpi=PICTURE_DPI)
    except MissingExtraError as exc:
        # exc says which import failed and names the extra to install.
        print(f"\n(no picture: it needs matplotlib and Pillow: {exc})")
        return None
    return path
