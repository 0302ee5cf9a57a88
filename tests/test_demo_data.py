"""The demo's canvases, its shipped npz (checked against a NumPy forward pass) and the pointing game."""

from __future__ import annotations

import re

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import anycam
import anycam.metrics
from anycam.demo.data import (
    BN_EPS,
    DEMO_ARCHITECTURE,
    EXPLAIN_LAYERS,
    IMAGE_SHAPE,
    load_demo,
    make_canvas_dataset,
    pointing_game,
)


def _digits(count: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digit-like 8×8 images in 0..16, each with a different footprint (zero borders vary)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 8, 8))
    for i in range(count):
        top, left = i % 3, (i // 3) % 3
        images[i, top : top + 5, left : left + 4] = rng.integers(1, 17, size=(5, 4))
    return images, np.arange(count) % 10


# make_canvas_dataset ------------------------------------------------------------------------


def test_canvas_shapes_dtypes_and_range():
    digits, labels = _digits()
    images, out_labels, boxes = make_canvas_dataset(digits, labels, 25, 0)
    assert images.shape == (25, 1, 64, 64) and images.dtype == np.float32
    assert out_labels.shape == (25,) and out_labels.dtype == np.int64
    assert boxes.shape == (25, 4) and np.issubdtype(boxes.dtype, np.integer)
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(out_labels, labels[np.arange(25) % 10])


@pytest.mark.parametrize("scale", [2, 3])
def test_box_is_the_tight_footprint_of_the_digit(scale):
    digits, labels = _digits()
    images, _, boxes = make_canvas_dataset(
        digits, labels, 20, np.random.default_rng(1), size=48, scale=scale, strokes=(0, 0), noise=0
    )
    for i in range(20):
        canvas = images[i, 0]
        rows, cols = np.nonzero(canvas)
        # No clutter, no noise: the only non-zero pixels are the digit's.
        assert tuple(boxes[i]) == (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
        glyph = np.kron(digits[i % 10], np.ones((scale, scale))) / 16.0
        glyph = glyph[np.ix_(np.any(glyph > 0, 1), np.any(glyph > 0, 0))]
        row0, col0, row1, col1 = boxes[i]
        np.testing.assert_allclose(canvas[row0:row1, col0:col1], glyph, rtol=1e-6)


def test_clutter_stays_away_from_the_digit():
    digits, labels = _digits()
    images, _, boxes = make_canvas_dataset(digits, labels, 40, 7, strokes=(6, 7), noise=0)
    for i in range(40):
        canvas = images[i, 0]
        row0, col0, row1, col1 = boxes[i]
        glyph = np.kron(digits[i % 10], np.ones((2, 2))) / 16.0
        glyph = glyph[np.ix_(np.any(glyph > 0, 1), np.any(glyph > 0, 0))]
        np.testing.assert_allclose(canvas[row0:row1, col0:col1], glyph, rtol=1e-6)
        margin = np.zeros(canvas.shape, bool)
        margin[max(row0 - 2, 0) : row1 + 2, max(col0 - 2, 0) : col1 + 2] = True
        margin[row0:row1, col0:col1] = False
        assert not canvas[margin].any(), "a stroke touches the digit's 2-pixel margin"
    outside = images[:, 0].copy()
    for i, (row0, col0, row1, col1) in enumerate(boxes):
        outside[i, row0:row1, col0:col1] = 0.0
    assert np.all(np.count_nonzero(outside.reshape(40, -1), axis=1) > 0)
    assert outside.max() <= 0.8 + 1e-6


def test_canvases_are_reproducible_and_noise_is_bounded():
    digits, labels = _digits()
    first = make_canvas_dataset(digits, labels, 5, 3, noise=0.1)
    second = make_canvas_dataset(digits, labels, 5, np.random.default_rng(3), noise=0.1)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    # One canvas: the same placement and strokes with and without noise (the noise comes last).
    noisy = make_canvas_dataset(digits, labels, 1, 3, noise=0.1)[0]
    clean = make_canvas_dataset(digits, labels, 1, 3, noise=0.0)[0]
    difference = noisy - clean
    assert difference.min() >= 0.0 and difference.max() < 0.1 and difference.std() > 0.02


@pytest.mark.parametrize(
    ("digits", "labels", "match"),
    [
        (np.zeros((3, 64)), np.zeros(3), "(M, h, w)"),
        (np.full((2, 8, 8), 17.0), np.zeros(2), "[0, 16]"),
        (np.ones((2, 8, 8)), np.zeros(3), "labels"),
        (np.zeros((2, 8, 8)), np.zeros(2), "non-zero"),
    ],
)
def test_canvas_errors(digits, labels, match):
    with pytest.raises(anycam.InputError, match=re.escape(match)):
        make_canvas_dataset(digits, labels, 2, 0)


def test_canvas_too_small():
    with pytest.raises(anycam.InputError, match="does not fit"):
        make_canvas_dataset(np.ones((1, 8, 8)), np.zeros(1), 1, 0, size=12, scale=2)


# pointing_game --------------------------------------------------------------------------------


def test_pointing_game_is_the_metrics_one():
    assert pointing_game is anycam.metrics.pointing_game  # one implementation, tested in tests/core


def test_pointing_game_hand_computed_on_canvas_boxes():
    heat = np.zeros((4, 10, 10))
    heat[0, 3, 4] = 1.0  # inside (2, 2, 5, 6)
    heat[1, 5, 4] = 1.0  # row 5 is the exclusive end: outside by one row
    heat[2, 9, 9] = 0.5  # far corner, distance sqrt(4² + 3²) = 5 from (0, 0, 6, 7)
    heat[3] = 0.3  # flat: every pixel is a peak, so any non-empty box is hit
    boxes = np.array([[2, 2, 5, 6], [2, 2, 5, 6], [0, 0, 6, 7], [7, 7, 8, 8]])
    np.testing.assert_array_equal(pointing_game(heat, boxes), [True, False, False, True])
    np.testing.assert_array_equal(pointing_game(heat, boxes, tolerance=1), [True, True, False, True])
    assert not pointing_game(heat, boxes, tolerance=4)[2]
    assert pointing_game(heat, boxes, tolerance=5)[2]
    with pytest.raises(anycam.InputError):
        pointing_game(np.full((4, 10, 10), np.nan), boxes)


# the shipped demo --------------------------------------------------------------------------------


def test_load_demo_contents():
    demo = load_demo()
    n = len(demo["images"])
    assert 40 <= n <= 64
    assert demo["images"].shape == (n, *IMAGE_SHAPE) and demo["images"].dtype == np.float32
    assert demo["labels"].shape == (n,) and demo["labels"].dtype == np.int64
    assert demo["boxes"].shape == (n, 4)
    assert demo["logits"].shape == (n, 10) and demo["logits"].dtype == np.float32
    assert set(demo["labels"].tolist()) == set(range(10))
    assert all(w.dtype == np.float32 for w in demo["weights"].values())
    assert demo["weights"]["stem.conv.weight"].shape == (16, 1, 3, 3)
    assert demo["weights"]["fc.weight"].shape == (10, 64)
    assert demo["accuracy"] > 0.9
    # Each held-out box holds a bright digit: its peak is far above the noise floor.
    for image, (row0, col0, row1, col1) in zip(demo["images"], demo["boxes"], strict=True):
        assert image[0, row0:row1, col0:col1].max() >= 0.5
    for name in EXPLAIN_LAYERS:
        assert f'"{name}"' in DEMO_ARCHITECTURE


def _conv(x: np.ndarray, weight: np.ndarray, stride: int = 1) -> np.ndarray:
    """3×3 cross-correlation with symmetric zero padding 1, as DEMO_ARCHITECTURE specifies."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = sliding_window_view(padded, (3, 3), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("nchwij,ocij->nohw", windows, weight, optimize=True)


def _bn(x: np.ndarray, weights: dict[str, np.ndarray], name: str) -> np.ndarray:
    scale = weights[f"{name}.weight"] / np.sqrt(weights[f"{name}.running_var"] + BN_EPS)
    shift = weights[f"{name}.bias"] - weights[f"{name}.running_mean"] * scale
    return x * scale[:, None, None] + shift[:, None, None]


def _numpy_demo_net(x: np.ndarray, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """DEMO_ARCHITECTURE written out in NumPy (float64), independently of any framework."""
    relu = lambda t: np.maximum(t, 0.0)  # noqa: E731
    w = {k: v.astype(np.float64) for k, v in w.items()}
    out = {"stem": relu(_bn(_conv(x, w["stem.conv.weight"]), w, "stem.bn"))}
    out["stage1"] = relu(_bn(_conv(out["stem"], w["stage1.conv.weight"], 2), w, "stage1.bn"))
    h = relu(_bn(_conv(out["stage1"], w["stage2.conv1.weight"]), w, "stage2.bn1"))
    out["stage2"] = relu(out["stage1"] + _bn(_conv(h, w["stage2.conv2.weight"]), w, "stage2.bn2"))
    down = relu(_bn(_conv(out["stage2"], w["stage3.down.conv.weight"], 2), w, "stage3.down.bn"))
    h = relu(_bn(_conv(down, w["stage3.block.conv1.weight"]), w, "stage3.block.bn1"))
    out["stage3"] = relu(down + _bn(_conv(h, w["stage3.block.conv2.weight"]), w, "stage3.block.bn2"))
    out["logits"] = out["stage3"].mean(axis=(2, 3)) @ w["fc.weight"].T + w["fc.bias"]
    return out


def test_architecture_description_reproduces_the_shipped_logits():
    demo = load_demo()
    out = _numpy_demo_net(demo["images"].astype(np.float64), demo["weights"])
    n = len(demo["images"])
    assert out["stage1"].shape == (n, 32, 32, 32)
    assert out["stage3"].shape == (n, 64, 16, 16)
    np.testing.assert_allclose(out["logits"], demo["logits"], rtol=1e-4, atol=1e-4)
    accuracy = float((out["logits"].argmax(1) == demo["labels"]).mean())
    assert accuracy == demo["accuracy"]


def test_trained_model_looks_at_the_digit_not_the_clutter():
    """The point of the demo: CAM of the true class at "stage3" peaks on (or next to) the digit."""
    demo = load_demo()
    out = _numpy_demo_net(demo["images"].astype(np.float64), demo["weights"])
    class_weights = demo["weights"]["fc.weight"][demo["labels"]]
    cam = np.maximum(anycam.core.class_activation_map(out["stage3"], class_weights), 0.0)
    heat = anycam.core.normalize(anycam.core.resize(cam, (64, 64)))
    assert pointing_game(heat, demo["boxes"], tolerance=3).mean() >= 0.8


def test_no_framework_imported():
    import subprocess
    import sys

    code = (
        "import sys, anycam.demo.data, anycam.viz; "
        "bad = {'torch', 'tensorflow', 'jax', 'sklearn', 'matplotlib', 'PIL'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
