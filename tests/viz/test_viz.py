"""anycam.viz without matplotlib or Pillow: validation, missing extras, grid and draw_box.

The colour and file tests are in test_overlay.py next to this file.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import anycam
from anycam import viz

IMAGE = np.zeros((4, 5, 3), np.uint8)
HEAT = np.zeros((4, 5))


@pytest.mark.parametrize(
    ("image", "heatmap", "kwargs", "match"),
    [
        (np.zeros((4, 5, 2)), HEAT, {}, "image must be"),
        (np.zeros((2, 4, 5)), HEAT, {}, "image must be"),
        (np.zeros((1, 1, 4, 5)), HEAT, {}, "image must be"),
        (np.zeros((0, 5)), HEAT, {}, "image must be"),
        (np.full((4, 5), 2.0), HEAT, {}, r"float image must lie in \[0, 1\]"),
        (np.full((4, 5), np.nan), HEAT, {}, "NaN"),
        (np.full((4, 5), 300), HEAT, {}, "0..255"),
        (np.zeros((4, 5), complex), HEAT, {}, "dtype"),
        (IMAGE, np.zeros((2, 4, 5)), {}, "one sample at a time"),
        (IMAGE, np.zeros(5), {}, "heatmap must be"),
        (IMAGE, np.full((4, 5), np.inf), {}, "NaN or inf"),
        (IMAGE, np.full((4, 5), 3.0), {}, "normalize"),
        (IMAGE, np.full((4, 5), -0.5), {}, r"\[0, 1\]"),
        (IMAGE, HEAT, {"alpha": 1.5}, "alpha"),
        (IMAGE, HEAT, {"alpha": -0.1}, "alpha"),
        (IMAGE, HEAT, {"alpha": "half"}, "alpha"),
        (IMAGE, HEAT, {"alpha": True}, "alpha"),
    ],
)
def test_overlay_rejects_bad_inputs_before_touching_matplotlib(monkeypatch, image, heatmap, kwargs, match):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # validation must come first
    with pytest.raises(anycam.InputError, match=match):
        viz.overlay(image, heatmap, **kwargs)


def test_overlay_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "anycam\[viz\]"') as info:
        viz.overlay(IMAGE, HEAT)
    assert isinstance(info.value, anycam.AnycamError)


def test_save_without_pillow_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r'pip install "anycam\[viz\]"'):
        viz.save(tmp_path / "x.png", IMAGE)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("image", "match"),
    [(np.zeros((4, 5, 3)), "uint8"), (np.zeros((4, 5, 2), np.uint8), "images, got")],
)
def test_save_rejects_bad_images(monkeypatch, tmp_path, image, match):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(anycam.InputError, match=match):
        viz.save(tmp_path / "x.png", image)


def test_grid_places_every_image_with_padding():
    a = np.full((2, 3, 3), 10, np.uint8)
    b = np.full((1, 2), 20, np.uint8)  # grayscale, smaller: top-left of its cell
    c = np.full((2, 3, 1), 30, np.uint8)
    out = viz.grid([[a, b], [c]], pad=1, background=0)
    # 2 rows of height 2 and 2 columns of width 3, 1 pixel around and between.
    assert out.shape == (2 * 2 + 3, 2 * 3 + 3, 3) and out.dtype == np.uint8
    expected = np.zeros((7, 9), np.uint8)
    expected[1:3, 1:4] = 10
    expected[1:2, 5:7] = 20
    expected[4:6, 1:4] = 30
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))


def test_grid_without_padding_is_concatenation():
    rng = np.random.default_rng(0)
    tiles = [[rng.integers(0, 256, (3, 4, 3), dtype=np.uint8) for _ in range(2)] for _ in range(2)]
    expected = np.concatenate([np.concatenate(row, axis=1) for row in tiles], axis=0)
    np.testing.assert_array_equal(viz.grid(tiles, pad=0), expected)


@pytest.mark.parametrize(
    ("rows", "kwargs", "match"),
    [
        ([], {}, "at least one"),
        ([[]], {}, "at least one"),
        ([[np.zeros((2, 2))]], {}, r"rows\[0\]\[0\] must be uint8"),
        ([[np.zeros((2, 2, 2), np.uint8)]], {}, "must be"),
        ([[IMAGE]], {"pad": -1}, "pad"),
        ([[IMAGE]], {"background": 256}, "background"),
    ],
)
def test_grid_errors(rows, kwargs, match):
    with pytest.raises(anycam.InputError, match=match):
        viz.grid(rows, **kwargs)


def test_draw_box_outlines_exactly_the_box_edges():
    image = np.zeros((6, 7), np.uint8)
    out = viz.draw_box(image, (1, 2, 4, 6), color=(255, 0, 0))
    assert out.shape == (6, 7, 3)
    mask = np.zeros((6, 7), bool)
    mask[1:4, 2:6] = True
    mask[2:3, 3:5] = False  # the interior stays untouched
    np.testing.assert_array_equal(out[..., 0] == 255, mask)
    assert not out[..., 1:].any()
    assert not image.any()  # a copy, the input unchanged


def test_draw_box_draws_only_the_visible_edges():
    out = viz.draw_box(np.zeros((4, 4, 3), np.uint8), np.array([-2, 2, 3, 9]), thickness=1)
    green = out[..., 1] == 255
    # Box rows -2..2, cols 2..8: only its left edge (col 2) and bottom edge (row 2) are visible.
    expected = np.zeros((4, 4), bool)
    expected[0:3, 2] = True
    expected[2, 2:4] = True
    np.testing.assert_array_equal(green, expected)


@pytest.mark.parametrize(
    ("box", "kwargs", "match"),
    [
        ((1, 1, 1, 3), {}, "row0 < row1"),
        ((1.0, 1, 2, 3), {}, "4 integers"),
        ((0, 0, 2, 2), {"color": (300, 0, 0)}, "color"),
        ((0, 0, 2, 2), {"thickness": 0}, "thickness"),
    ],
)
def test_draw_box_errors(box, kwargs, match):
    with pytest.raises(anycam.InputError, match=match):
        viz.draw_box(IMAGE, box, **kwargs)
