"""Scores the transformer methods on the demo ViT and writes the table into docs/transformers.md.

    python scripts/evaluate_demo_vit.py              # about ten minutes on 2 busy cores
    python scripts/evaluate_demo_vit.py --print      # the table on stdout only

The model is the small ViT of ``anycam.backends.torch.demo`` with the weights
``scripts/train_demo_vit.py`` trained (``anycam/demo/vit.npz``); the images are the demo's 48
held-out canvases of digits it never saw, with their digit boxes. For each method: the pointing
game and the energy pointing game against the boxes, deletion and insertion AUC of the class
probability (zeros baseline), ROAD (noisy linear imputation at 10 %, …, 90 % removed, most and
least relevant first, and the combined score ``(LeRF − MoRF) / 2``), and the cascading
sanity check: the model is randomised block by block from the head down (head and final norm,
block 3, …, block 0, patch embedding) and the Spearman correlation of each randomised map
with the original is reported after every step (near 0 means the map follows the weights).
The cascade is also drawn in ``docs/vit-sanity.png`` (needs matplotlib). A per-pixel random
map and a 8 × 8 random map (one value per patch) are the floor. Offline; no download.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anycam.backends.torch.demo import build_demo_vit

import anycam
from anycam.demo.data import load_demo
from anycam.metrics import deletion, energy_pointing_game, insertion, pointing_game, road
from anycam.metrics.sanity import SanityResult, sanity_check

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "src" / "anycam" / "demo" / "vit.npz"
DOCS = ROOT / "docs" / "transformers.md"
PLOT = ROOT / "docs" / "vit-sanity.png"
BEGIN, END = "<!-- demo-vit-table: begin -->", "<!-- demo-vit-table: end -->"

METHODS = {
    "rollout": {"method": "rollout"},
    "attention-grad": {"method": "attention-grad"},
    "gradcam, last block's norm1": {"method": "gradcam", "layer": "blocks.3.norm1", "layout": "tokens"},
    "gradcam, block 2's output": {"method": "gradcam", "layer": "blocks.2", "layout": "tokens"},
}

#: ROAD's imputation noise: the paper's 0.01 for inputs of about unit range (the canvases are in [0, 1]).
ROAD_NOISE = 0.01


def load_vit() -> torch.nn.Module:
    """Returns the trained demo ViT (eval mode)."""
    with np.load(WEIGHTS) as arrays:
        weights = {k.removeprefix("weights/"): arrays[k] for k in arrays.files if k.startswith("weights/")}
    return build_demo_vit(weights)


def cascade_steps(layers: Sequence[str]) -> dict[str, list[str]]:
    """Groups the ViT's parameter layers into cascade steps, input to output.

    ``patch`` is the patch embedding, ``blocks.i.*`` block i, and the final ``norm`` and ``head``
    one step. The class token and the position embeddings belong to the model itself, which the
    torch backend cannot re-initialise (no ``reset_parameters``): they keep their trained values.
    """
    steps: dict[str, list[str]] = {}
    for name in layers:
        parts = name.split(".")
        if parts[0] == "blocks":
            key = f"block {parts[1]}"
        elif parts[0] in ("norm", "head"):
            key = "norm + head"
        else:
            key = "patch embedding" if parts[0] == "patch" else parts[0]
        steps.setdefault(key, []).append(name)
    return steps


def cascade(explainer: Any, x: Any, labels: np.ndarray, seed: int = 0) -> SanityResult:
    """The cascading sanity check of ``explainer`` on the demo ViT, block by block from the head down."""
    steps = cascade_steps(explainer.backend.parameter_layers())
    return sanity_check(explainer, x, target=labels, mode="cascading", layers=steps, seed=seed, progress=False)


def scores(
    scorer: Any,
    images: np.ndarray,
    heat: np.ndarray,
    labels: np.ndarray,
    boxes: Any,
    steps: int,
    percentages: Sequence[float] | None = None,
) -> dict[str, float]:
    """One row's numbers: pointing games, deletion/insertion AUC and ROAD's means, over the batch."""
    kwargs: dict[str, Any] = {"steps": steps, "progress": False}
    extra = {} if percentages is None else {"percentages": percentages}
    removed = road(scorer, images, heat, labels, order="both", noise=ROAD_NOISE, seed=0, progress=False, **extra)
    assert removed.morf_mean is not None and removed.lerf_mean is not None and removed.combined is not None
    return {
        "pointing": float(pointing_game(heat, boxes).mean()) * 100,
        "energy": float(energy_pointing_game(heat, boxes).mean()),
        "deletion": float(deletion(scorer, images, heat, labels, **kwargs).auc.mean()),
        "insertion": float(insertion(scorer, images, heat, labels, **kwargs).auc.mean()),
        "road_morf": float(removed.morf_mean.mean()),
        "road_lerf": float(removed.lerf_mean.mean()),
        "road": float(removed.combined.mean()),
    }


def cascade_text(result: SanityResult | None) -> str:
    """The per-step mean Spearman ρ, head first, as ``a → b → …`` (— without a cascade)."""
    if result is None:
        return "—"
    return " → ".join(f"{value:.2f}".replace("-", "−") for value in result.spearman.mean(axis=1))


def table(steps: int, percentages: Sequence[float] | None = None, plot: Path | None = PLOT) -> tuple[str, float, str]:
    """Returns the Markdown table, the model's accuracy on the canvases and the cascade's step names."""
    torch.manual_seed(0)
    demo = load_demo()
    images, labels, boxes = demo["images"], demo["labels"], demo["boxes"]
    model = load_vit()
    x = torch.from_numpy(images)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1).numpy() == labels).mean())
    rows: list[tuple[str, np.ndarray, SanityResult | None]] = []
    rng = np.random.default_rng(0)
    scorer = anycam.Explainer(model, method="rollout")
    for name, options in METHODS.items():
        explainer = anycam.Explainer(model, **options)
        rows.append((name, explainer(x, labels), cascade(explainer, x, labels)))
        print(f"  {name}: cascade {cascade_text(rows[-1][2])}", flush=True)
    noise = rng.random(images.shape[:1] + images.shape[2:]).astype(np.float32)
    blocks = np.kron(rng.random((len(images), 8, 8)), np.ones((8, 8))).astype(np.float32)
    rows += [("random per pixel (floor)", noise, None), ("random per 8 × 8 patch (floor)", blocks, None)]
    names = next(result.layers for _, _, result in rows if result is not None)
    lines = [
        "| method | pointing game ↑ | energy pointing game ↑ | deletion AUC ↓ | insertion AUC ↑ "
        "| ROAD MoRF ↓ | ROAD LeRF ↑ | ROAD combined ↑ | sanity: Spearman ρ per cascade step ↓ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, heat, result in rows:
        got = scores(scorer, images, heat, labels, boxes, steps, percentages)
        lines.append(
            f"| {name} | {got['pointing']:.1f}% | {got['energy']:.3f} | {got['deletion']:.3f} | {got['insertion']:.3f} "
            f"| {got['road_morf']:.3f} | {got['road_lerf']:.3f} | {got['road']:.3f} | {cascade_text(result)} |"
        )
        print(f"  {name}: {lines[-1]}", flush=True)
    if plot is not None:
        _plot([(name, result) for name, _, result in rows if result is not None], plot)
    return "\n".join(lines), accuracy, " → ".join(names)


def _plot(results: list[tuple[str, SanityResult]], path: Path) -> None:
    """Draws the cascades (mean Spearman ρ per step, one line per method) into ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        print(f"matplotlib is not installed: {path} is not drawn")
        return
    figure, axes = pyplot.subplots(figsize=(6.4, 3.4), dpi=100)
    labels = ["original", *results[0][1].layers]
    for name, result in results:
        mean = result.spearman.mean(axis=1)
        axes.plot(range(len(labels)), [1.0, *mean], marker="o", label=name)
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    axes.set_ylabel("Spearman ρ to the original map")
    axes.set_xlabel("randomised, from the head down (cascading)")
    axes.set_title("Demo ViT: cascading randomisation, 48 canvases", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    pyplot.close(figure)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="deletion/insertion steps")
    parser.add_argument("--print", action="store_true", help="print the table; write neither the docs nor the plot")
    args = parser.parse_args()
    text, accuracy, order = table(args.steps, plot=None if args.print else PLOT)
    block = (
        f"{BEGIN}\n_{len(load_demo()['labels'])} held-out canvases, model accuracy {accuracy:.1%}; "
        f"deletion/insertion {args.steps} steps (zeros); ROAD at 10 %, …, 90 % removed, noise {ROAD_NOISE}; "
        f"cascade steps: {order}; `python scripts/evaluate_demo_vit.py`_\n\n{text}\n{END}"
    )
    print(block)
    if not args.print:
        page = DOCS.read_text()
        if BEGIN not in page:
            raise SystemExit(f"{DOCS} has no {BEGIN} marker")
        DOCS.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, page, flags=re.S))
        print(f"wrote the table into {DOCS}")


if __name__ == "__main__":
    main()
