"""Trains the demo CNN once on CPU and writes src/anycam/demo/demo.npz.

    python scripts/train_demo.py            # a few minutes on 2 cores

scikit-learn's 8×8 digits (shipped with scikit-learn, nothing is downloaded) are split 80/20,
stratified; the network trains on fresh cluttered canvases of the training digits every epoch
and is tested on canvases of the test digits it never saw. The npz holds the float32 weights
under the torch ``state_dict`` names (``weights/<name>``, without the BatchNorms'
``num_batches_tracked``), 48 held-out canvases with their labels and digit boxes, the model's
logits on them (an oracle for the Keras and Flax ports) and its accuracy on them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from anycam.backends.torch.demo import build_demo_model
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional

from anycam.demo.data import NUM_CLASSES, make_canvas_dataset

SEED = 0
HELD_OUT = 48
OUTPUT = Path(__file__).resolve().parents[1] / "src" / "anycam" / "demo" / "demo.npz"


def held_out_digits(
    images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``count`` distinct digits cycling through the classes 0, 1, …, 9, 0, …"""
    chosen = []
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in range(NUM_CLASSES)}
    for i in range(count):
        chosen.append(pools[i % NUM_CLASSES].pop())
    return images[chosen], labels[chosen]


def predict(model: torch.nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Returns the model's ``(N, 10)`` logits as float32."""
    with torch.no_grad():
        parts = [model(torch.from_numpy(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(parts).numpy().astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--per-epoch", type=int, default=4000, help="canvases per epoch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images, digits.target, test_size=0.2, stratify=digits.target, random_state=SEED
    )
    test_images, test_labels, _ = make_canvas_dataset(test_x, test_y, 3 * len(test_x), rng)
    shown_x, shown_y = held_out_digits(test_x, test_y, HELD_OUT, rng)
    held_images, held_labels, held_boxes = make_canvas_dataset(shown_x, shown_y, HELD_OUT, rng)

    model = build_demo_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (args.per_epoch // args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = rng.permutation(len(train_x))
        images, labels, _ = make_canvas_dataset(train_x[order], train_y[order], args.per_epoch, rng)
        inputs, targets = torch.from_numpy(images), torch.from_numpy(labels)
        total = 0.0
        for i in range(0, args.per_epoch - args.batch + 1, args.batch):
            loss = functional.cross_entropy(model(inputs[i : i + args.batch]), targets[i : i + args.batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * args.batch
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {total / args.per_epoch:.4f} ({time.perf_counter() - start:.0f} s)"
        )

    model.eval()
    test_accuracy = float((predict(model, test_images).argmax(1) == test_labels).mean())
    logits = predict(model, held_images)
    held_accuracy = float((logits.argmax(1) == held_labels).mean())
    print(f"test accuracy ({len(test_images)} canvases of {len(test_x)} unseen digits): {test_accuracy:.4f}")
    print(f"shipped held-out accuracy ({HELD_OUT} canvases): {held_accuracy:.4f}")

    weights = {
        f"weights/{name}": tensor.detach().numpy().astype(np.float32)
        for name, tensor in model.state_dict().items()
        if not name.endswith("num_batches_tracked")
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.output,
        **weights,
        images=held_images,
        labels=held_labels,
        boxes=held_boxes,
        logits=logits,
        accuracy=np.float64(held_accuracy),
        test_accuracy=np.float64(test_accuracy),
    )
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
