"""The shipped demo: cluttered-digit canvases, a small trained CNN's weights, and the pointing game.

Pure NumPy, so the demo data, the weights and the metric are usable from any framework (or none):
``load_demo()`` reads ``anycam/demo/demo.npz``; ``backends/torch/demo.py`` builds the network in
PyTorch, and the Keras and Flax ports follow ``DEMO_ARCHITECTURE`` below. The npz is written by
``scripts/train_demo.py`` (scikit-learn's 8×8 digits; nothing is downloaded). ``pointing_game`` is
``anycam.metrics.pointing_game``, re-exported: score a batch of heatmaps against ``boxes``.

>>> demo = load_demo()
>>> demo["images"].shape, demo["labels"][:12].tolist()
((48, 1, 64, 64), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
>>> heat = np.zeros((1, 64, 64)); heat[0, 30, 40] = 1.0
>>> pointing_game(heat, np.array([[25, 35, 41, 51]])).tolist()
[True]
"""

from __future__ import annotations

import importlib.resources
from typing import Any

import numpy as np

from .._errors import InputError
from ..metrics import pointing_game

__all__ = [
    "BN_EPS",
    "DEMO_ARCHITECTURE",
    "EXPLAIN_LAYERS",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "load_demo",
    "make_canvas_dataset",
    "pointing_game",
]

IMAGE_SHAPE = (1, 64, 64)
"""One demo input, channels-first ``(C, H, W)``; a batch is ``(N, 1, 64, 64)`` float32 in [0, 1]."""

NUM_CLASSES = 10
BN_EPS = 1e-5
EXPLAIN_LAYERS = ("stage1", "stage3")
"""An early stage (32×32 maps) and the last conv stage (16×16 maps): the layers to explain."""

DEMO_ARCHITECTURE = """\
Demo CNN: input (N, 1, 64, 64) float32 in [0, 1] (channels-last ports: (N, 64, 64, 1)).

Every conv is 3x3, bias-free, with EXPLICIT symmetric zero padding of 1 pixel on each side
(torch padding=1; Keras ZeroPadding2D(1) then Conv2D(padding="valid"); Flax
padding=((1, 1), (1, 1))), also the two stride-2 convs, so every framework computes exactly
out = floor((in + 2 - 3) / stride) + 1 with the same pixel alignment ("same" padding in
TF/Flax pads stride-2 convs asymmetrically and would NOT match). Every BatchNorm is in inference
mode, eps = 1e-5 (Keras' default is 1e-3: set epsilon=1e-5), normalising over channels:
y = (x - running_mean) / sqrt(running_var + eps) * weight + bias. ReLU is max(x, 0).

name (torch module path)   operation                                   output (N, C, H, W)
stem.conv                  conv 3x3, 1 -> 16, stride 1, pad 1          (N, 16, 64, 64)
stem.bn                    BatchNorm(16)
stem.relu                  ReLU                             -> "stem"  (N, 16, 64, 64)
stage1.conv                conv 3x3, 16 -> 32, stride 2, pad 1         (N, 32, 32, 32)
stage1.bn                  BatchNorm(32)
stage1.relu                ReLU                           -> "stage1"  (N, 32, 32, 32)  EXPLAIN
stage2.conv1               conv 3x3, 32 -> 32, stride 1, pad 1
stage2.bn1                 BatchNorm(32)
stage2.relu1               ReLU
stage2.conv2               conv 3x3, 32 -> 32, stride 1, pad 1
stage2.bn2                 BatchNorm(32)
(add)                      stage2.bn2 output + stage2 input (identity)
stage2.relu                ReLU                           -> "stage2"  (N, 32, 32, 32)
stage3.down.conv           conv 3x3, 32 -> 64, stride 2, pad 1         (N, 64, 16, 16)
stage3.down.bn             BatchNorm(64)
stage3.down.relu           ReLU                                        (N, 64, 16, 16)
stage3.block.conv1         conv 3x3, 64 -> 64, stride 1, pad 1
stage3.block.bn1           BatchNorm(64)
stage3.block.relu1         ReLU
stage3.block.conv2         conv 3x3, 64 -> 64, stride 1, pad 1
stage3.block.bn2           BatchNorm(64)
(add)                      stage3.block.bn2 output + stage3.down output (identity)
stage3.block.relu          ReLU                           -> "stage3"  (N, 64, 16, 16)  EXPLAIN
pool                       global average pool over H, W               (N, 64)
fc                         linear 64 -> 10, with bias: logits = x @ weight.T + bias   (N, 10)

Layers to explain (EXPLAIN_LAYERS): "stage1" (early, 32x32) and "stage3" (last conv stage,
16x16); each is the output of that stage's final ReLU. Outputs are pre-softmax logits.

Weights (load_demo()["weights"], torch state_dict names, float32): for each conv
"<path>.weight" (out, in, 3, 3) OIHW; for each BatchNorm "<path>.weight" (gamma),
"<path>.bias" (beta), "<path>.running_mean", "<path>.running_var"; "fc.weight" (10, 64)
(out, in) and "fc.bias" (10,). Ports: conv kernel HWIO = w.transpose(2, 3, 1, 0);
dense kernel = fc.weight.T; Flax BatchNorm(use_running_average=True, epsilon=1e-5) with
scale=weight, bias=bias, mean=running_mean, var=running_var; Keras BatchNormalization(
epsilon=1e-5) with [gamma, beta, moving_mean, moving_variance]. Suggested Keras/Flax layer
names: the torch path with "." replaced by "_" (e.g. "stage3_block_conv1"), and the two
explained outputs named exactly "stage1" and "stage3".
Parity oracle: load_demo()["logits"] are torch's logits for load_demo()["images"].
"""

_DIGIT_MAX = 16.0  # scikit-learn's digits are integers 0..16


def make_canvas_dataset(
    digits_images: np.ndarray,
    labels: np.ndarray,
    count: int,
    rng: np.random.Generator | int | None,
    size: int = 64,
    *,
    scale: int = 2,
    strokes: tuple[int, int] = (3, 8),
    noise: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns ``count`` canvases, each one digit (upscaled ``scale``×) at a random place among clutter.

    Sample ``i`` shows digit ``i mod M`` (shuffle the inputs for a random subset): its values
    ``0..16`` are scaled to [0, 1], repeated ``scale``× along both axes (nearest neighbour) and
    pasted at a uniformly random position of a ``size``×``size`` canvas. The clutter is 1-pixel
    wide straight strokes of random length (3–9 px), angle and intensity (0.3–0.8) that keep
    at least 2 pixels away from the digit's bounding box, so they never touch or cross it, plus
    uniform noise in ``[0, noise)`` everywhere; the result is clipped to [0, 1].

    Args:
        digits_images: ``(M, h, w)`` digits with values in [0, 16] (``load_digits().images``).
        labels: ``(M,)`` integer classes.
        count: number of canvases.
        rng: a ``np.random.Generator`` or a seed.
        size: canvas height and width.
        scale: integer upscaling of each digit.
        strokes: ``(low, high)``: each canvas gets ``low <= k < high`` strokes.
        noise: amplitude of the additive uniform noise.

    Returns:
        ``images`` ``(count, 1, size, size)`` float32 in [0, 1]; ``labels`` ``(count,)`` int64;
        ``boxes`` ``(count, 4)`` int64 ``(row0, col0, row1, col1)``, the tight bounding box of the
        digit's non-zero pixels on the canvas, ends exclusive.

    Raises:
        InputError: for digits of the wrong rank or range, mismatched labels, or a canvas too small.
    """
    digits = np.asarray(digits_images, dtype=np.float64)
    labels = np.asarray(labels)
    if digits.ndim != 3 or digits.shape[0] == 0:
        raise InputError(
            f"digits_images must be (M, h, w) with M >= 1, got shape {digits.shape}; "
            "pass sklearn.datasets.load_digits().images"
        )
    if labels.shape != (digits.shape[0],):
        raise InputError(f"labels must have shape ({digits.shape[0]},), got {labels.shape}")
    if not np.all(np.isfinite(digits)) or digits.min() < 0 or digits.max() > _DIGIT_MAX:
        raise InputError("digits_images must hold finite values in [0, 16] (scikit-learn digits)")
    if not np.any(digits.reshape(len(digits), -1) > 0, axis=1).all():
        raise InputError("every digit needs at least one non-zero pixel to have a bounding box")
    glyph_h, glyph_w = digits.shape[1] * scale, digits.shape[2] * scale
    if scale < 1 or size < max(glyph_h, glyph_w) or count < 0:
        raise InputError(
            f"a {glyph_h}x{glyph_w} digit (scale {scale}) does not fit a {size}x{size} canvas (count={count})"
        )
    generator = np.random.default_rng(rng)
    glyphs = np.repeat(np.repeat(digits / _DIGIT_MAX, scale, axis=1), scale, axis=2)

    images = np.zeros((count, 1, size, size), dtype=np.float32)
    boxes = np.zeros((count, 4), dtype=np.int64)
    out_labels = np.zeros(count, dtype=np.int64)
    for i in range(count):
        glyph = glyphs[i % len(glyphs)]
        top = int(generator.integers(0, size - glyph_h + 1))
        left = int(generator.integers(0, size - glyph_w + 1))
        canvas = _clutter(generator, size, strokes)
        rows, cols = np.nonzero(glyph)
        box = (top + rows.min(), left + cols.min(), top + rows.max() + 1, left + cols.max() + 1)
        margin = 2
        canvas[max(box[0] - margin, 0) : box[2] + margin, max(box[1] - margin, 0) : box[3] + margin] = 0.0
        window = canvas[top : top + glyph_h, left : left + glyph_w]
        np.maximum(window, glyph, out=window)
        if noise > 0:
            canvas += generator.uniform(0.0, noise, size=canvas.shape)
        images[i, 0] = np.clip(canvas, 0.0, 1.0)
        boxes[i] = box
        out_labels[i] = labels[i % len(labels)]
    return images, out_labels, boxes


def _clutter(generator: np.random.Generator, size: int, strokes: tuple[int, int]) -> np.ndarray:
    """Returns a ``(size, size)`` canvas of thin straight strokes (never digit-like loops)."""
    canvas = np.zeros((size, size))
    low, high = strokes
    for _ in range(int(generator.integers(low, high)) if high > low else 0):
        length = generator.uniform(3.0, 9.0)
        angle = generator.uniform(0.0, np.pi)
        start = generator.uniform(0.0, size, size=2)
        steps = np.linspace(0.0, length, int(np.ceil(length)) * 2 + 1)
        rows = np.rint(start[0] + steps * np.sin(angle)).astype(int)
        cols = np.rint(start[1] + steps * np.cos(angle)).astype(int)
        keep = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
        canvas[rows[keep], cols[keep]] = generator.uniform(0.3, 0.8)
    return canvas


def load_demo() -> dict[str, Any]:
    """Returns the shipped demo: trained weights and held-out canvases, all NumPy.

    Returns:
        A dict with ``"weights"`` (name → float32 array, torch ``state_dict`` names, conv kernels
        OIHW, linear ``(out, in)``; see ``DEMO_ARCHITECTURE``), ``"images"`` ``(n, 1, 64, 64)``
        float32, ``"labels"`` ``(n,)`` int64, ``"boxes"`` ``(n, 4)`` int64 (``make_canvas_dataset``'s
        convention), ``"logits"`` ``(n, 10)`` float32 (the PyTorch model's outputs on ``images``,
        an oracle for ports), ``"accuracy"`` (float, its accuracy on these images) and
        ``"test_accuracy"`` (its accuracy on 1080 canvases of all 360 held-out test digits).
    """
    resource = importlib.resources.files("anycam.demo") / "demo.npz"
    with resource.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    weights = {name.removeprefix("weights/"): array for name, array in arrays.items() if name.startswith("weights/")}
    return {
        "weights": weights,
        "images": arrays["images"],
        "labels": arrays["labels"],
        "boxes": arrays["boxes"],
        "logits": arrays["logits"],
        "accuracy": float(arrays["accuracy"]),
        "test_accuracy": float(arrays["test_accuracy"]),
    }
