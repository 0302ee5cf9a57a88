"""Scores the transformer methods on the demo ViT and writes the table into docs/transformers.md.

    python scripts/evaluate_demo_vit.py              # a minute or two on 2 cores
    python scripts/evaluate_demo_vit.py --print      # the table on stdout only

The model is the small ViT of ``anycam.backends.torch.demo`` with the weights
``scripts/train_demo_vit.py`` trained (``anycam/demo/vit.npz``); the images are the demo's 48
held-out canvases of digits it never saw, with their digit boxes. For each method: the pointing
game and the energy pointing game against the boxes, deletion and insertion AUC of the class
probability (zeros baseline), and the sanity check (Spearman correlation of the maps of the
model and of the fully randomised model; near 0 means the map follows the model's weights).
A per-pixel random map and a 8 × 8 random map (one value per patch) are the floor.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch
from anycam.backends.torch.demo import build_demo_vit

import anycam
from anycam.demo.data import load_demo
from anycam.metrics import deletion, energy_pointing_game, insertion, pointing_game
from anycam.metrics.sanity import sanity_check

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "anycam" / "demo" / "vit.npz"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "transformers.md"
BEGIN, END = "<!-- demo-vit-table: begin -->", "<!-- demo-vit-table: end -->"

METHODS = {
    "rollout": {"method": "rollout"},
    "attention-grad": {"method": "attention-grad"},
    "gradcam, last block's norm1": {"method": "gradcam", "layer": "blocks.3.norm1", "layout": "tokens"},
    "gradcam, block 2's output": {"method": "gradcam", "layer": "blocks.2", "layout": "tokens"},
}


def load_vit() -> torch.nn.Module:
    """Returns the trained demo ViT (eval mode)."""
    with np.load(WEIGHTS) as arrays:
        weights = {k.removeprefix("weights/"): arrays[k] for k in arrays.files if k.startswith("weights/")}
    return build_demo_vit(weights)


def table(steps: int) -> tuple[str, float]:
    """Returns the Markdown table and the model's accuracy on the canvases."""
    torch.manual_seed(0)
    demo = load_demo()
    images, labels, boxes = demo["images"], demo["labels"], demo["boxes"]
    model = load_vit()
    x = torch.from_numpy(images)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1).numpy() == labels).mean())
    rows = []
    rng = np.random.default_rng(0)
    kwargs = {"steps": steps, "progress": False}
    scorer = anycam.Explainer(model, method="rollout")
    for name, options in METHODS.items():
        explainer = anycam.Explainer(model, **options)
        heat = explainer(x, labels)
        sanity = sanity_check(explainer, x, target=labels, mode="full")
        rows.append((name, heat, float(sanity.spearman[-1].mean())))
    noise = rng.random(images.shape[:1] + images.shape[2:]).astype(np.float32)
    blocks = np.kron(rng.random((len(images), 8, 8)), np.ones((8, 8))).astype(np.float32)
    rows += [("random per pixel (floor)", noise, float("nan"))]
    rows += [("random per 8 × 8 patch (floor)", blocks, float("nan"))]
    lines = [
        "| method | pointing game ↑ | energy pointing game ↑ | deletion AUC ↓ | insertion AUC ↑ "
        "| sanity: Spearman at full randomisation ↓ |",
        "|---|---|---|---|---|---|",
    ]
    for name, heat, spearman in rows:
        hits = float(pointing_game(heat, boxes).mean()) * 100
        energy = float(energy_pointing_game(heat, boxes).mean())
        deleted = float(deletion(scorer, images, heat, labels, **kwargs).auc.mean())
        inserted = float(insertion(scorer, images, heat, labels, **kwargs).auc.mean())
        sane = "—" if np.isnan(spearman) else f"{spearman:.3f}"
        lines.append(f"| {name} | {hits:.1f}% | {energy:.3f} | {deleted:.3f} | {inserted:.3f} | {sane} |")
    return "\n".join(lines), accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="deletion/insertion steps")
    parser.add_argument("--print", action="store_true", help="print the table, do not write the docs")
    args = parser.parse_args()
    text, accuracy = table(args.steps)
    block = (
        f"{BEGIN}\n_{len(load_demo()['labels'])} held-out canvases, model accuracy {accuracy:.1%}; "
        f"`python scripts/evaluate_demo_vit.py`_\n\n{text}\n{END}"
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
