"""Trains the demo ViT once on CPU and writes src/anycam/demo/vit.npz (issue 22's quality table).

    python scripts/train_demo_vit.py        # about 20 minutes on one CPU thread (it sets torch.set_num_threads(1))

The same data as scripts/train_demo.py: scikit-learn's 8×8 digits split 80/20 (stratified, seed
0), fresh cluttered canvases of the training digits every epoch, accuracy on canvases of the
unseen test digits. The npz holds the float32 weights under the torch ``state_dict`` names
(``weights/<name>``) and the model's accuracy; the canvases to explain are demo.npz's held-out ones.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from anycam.backends.torch.demo import build_demo_vit
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional

from anycam.demo.data import load_demo, make_canvas_dataset

SEED = 0
OUTPUT = Path(__file__).resolve().parents[1] / "src" / "anycam" / "demo" / "vit.npz"


def predict(model: torch.nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Returns the model's ``(N, 10)`` logits as float32."""
    with torch.no_grad():
        parts = [model(torch.from_numpy(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(parts).numpy().astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--per-epoch", type=int, default=3000, help="canvases per epoch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()

    torch.set_num_threads(1)  # the shipped weights were trained on one thread: reproducible
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images, digits.target, test_size=0.2, stratify=digits.target, random_state=SEED
    )
    test_images, test_labels, _ = make_canvas_dataset(test_x, test_y, 3 * len(test_x), rng)

    model = build_demo_vit().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * (args.per_epoch // args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
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
        seconds = time.perf_counter() - start
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / args.per_epoch:.4f} ({seconds:.0f} s)")

    model.eval()
    test_accuracy = float((predict(model, test_images).argmax(1) == test_labels).mean())
    demo = load_demo()
    held_accuracy = float((predict(model, demo["images"]).argmax(1) == demo["labels"]).mean())
    print(f"test accuracy ({len(test_images)} canvases of {len(test_x)} unseen digits): {test_accuracy:.4f}")
    print(f"held-out demo canvases ({len(demo['labels'])}): {held_accuracy:.4f}")
    weights = {f"weights/{name}": t.detach().numpy().astype(np.float32) for name, t in model.state_dict().items()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.output, **weights, accuracy=np.float64(held_accuracy), test_accuracy=np.float64(test_accuracy)
    )
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
