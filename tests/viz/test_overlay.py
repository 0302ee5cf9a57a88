"""anycam.viz with the viz extra (matplotlib, Pillow): colours, layouts and PNG files.

Collected only in sessions that install ``anycam[viz]``; a missing extra fails here, on purpose.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from PIL import Image

import anycam
from anycam import core, viz


def _jet_bytes(values: np.ndarray) -> np.ndarray:
    """matplotlib's own jet colours for ``values``, rounded to uint8 RGB."""
    rgba = matplotlib.colormaps["jet"](values)
    return np.rint(rgba[..., :3] * 255).astype(np.uint8)


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)


@pytest.fixture
def heat() -> np.ndarray:
    return np.random.default_rng(1).random((12, 10))


def test_alpha_zero_returns_the_image(image, heat):
    out = viz.overlay(image, heat, alpha=0.0)
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    np.testing.assert_array_equal(out, image)


def test_alpha_one_returns_the_colormap_of_the_heatmap(image, heat):
    np.testing.assert_array_equal(viz.overlay(image, heat, alpha=1.0), _jet_bytes(heat))


def test_half_alpha_is_the_rounded_mean(image, heat):
    colors = matplotlib.colormaps["viridis"](heat)[..., :3]
    expected = np.rint(127.5 * (image / 255.0 + colors)).astype(np.uint8)
    np.testing.assert_array_equal(viz.overlay(image, heat, "viridis", 0.5), expected)


def test_rgb_order_hot_is_red_cold_is_blue():
    black = np.zeros((2, 2), np.uint8)
    hot = viz.overlay(black, np.ones((2, 2)), alpha=1.0)
    cold = viz.overlay(black, np.zeros((2, 2)), alpha=1.0)
    # jet: 1 -> (0.5, 0, 0) dark red, 0 -> (0, 0, 0.5) dark blue
    np.testing.assert_array_equal(hot[0, 0], [128, 0, 0])
    np.testing.assert_array_equal(cold[0, 0], [0, 0, 128])
    assert hot[..., 0].min() > hot[..., 2].max()


@pytest.mark.parametrize(
    "layout",
    [
        lambda g: g,  # (H, W) uint8
        lambda g: g[..., None],  # (H, W, 1)
        lambda g: g[None],  # (1, H, W)
        lambda g: np.repeat(g[..., None], 3, axis=2),  # (H, W, 3)
        lambda g: np.repeat(g[None], 3, axis=0),  # (3, H, W)
        lambda g: g.astype(np.float32) / 255.0,  # float in [0, 1]
        lambda g: np.concatenate([np.repeat(g[..., None], 3, 2), g[..., None]], 2),  # RGBA
    ],
)
def test_grayscale_and_layouts_broadcast_to_rgb(layout):
    gray = np.random.default_rng(2).integers(0, 256, (12, 10), dtype=np.uint8)
    heat = np.linspace(0, 1, 120).reshape(12, 10)
    rgb = np.repeat(gray[..., None], 3, 2)
    expected = np.rint(255 * (0.7 * rgb / 255 + 0.3 * matplotlib.colormaps["jet"](heat)[..., :3]))
    out = viz.overlay(layout(gray), heat, alpha=0.3)
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8
    # The oracle's float operations are ordered differently: exact halves may round either way.
    assert np.abs(out.astype(int) - expected).max() <= 1
    if layout(gray).dtype == np.uint8:
        np.testing.assert_array_equal(out, viz.overlay(rgb, heat, alpha=0.3))


def test_heatmap_is_resized_with_core_resize(image):
    small = np.random.default_rng(3).random((3, 5))
    expected = _jet_bytes(np.clip(core.resize(small, (12, 10)), 0, 1))
    np.testing.assert_array_equal(viz.overlay(image, small, alpha=1.0), expected)
    # One explainer output (1, h, w) works too.
    np.testing.assert_array_equal(viz.overlay(image, small[None], alpha=1.0), expected)


def test_colormap_object_and_unknown_name(image, heat):
    cmap = matplotlib.colormaps["gray"]
    gray = viz.overlay(image, heat, cmap, alpha=1.0)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    with pytest.raises(anycam.InputError, match="unknown colormap 'jett'; closest: 'jet'"):
        viz.overlay(image, heat, "jett")
    with pytest.raises(anycam.InputError, match="colormap must be"):
        viz.overlay(image, heat, 3)


def test_save_round_trips_png(tmp_path, image, heat):
    picture = viz.overlay(image, heat)
    path = viz.save(tmp_path / "overlay.png", picture)
    with Image.open(path) as loaded:
        assert loaded.format == "PNG"
        np.testing.assert_array_equal(np.asarray(loaded), picture)
    no_suffix = viz.save(tmp_path / "grid", viz.grid([[picture, picture]]))
    with Image.open(no_suffix) as loaded:
        assert loaded.format == "PNG" and loaded.size == (2 * 10 + 3 * 2, 12 + 2 * 2)


def test_demo_picture_end_to_end(tmp_path):
    from anycam.demo.data import load_demo

    demo = load_demo()
    image = demo["images"][0, 0]
    heat = np.zeros((16, 16))
    row0, col0, row1, col1 = demo["boxes"][0] // 4
    heat[row0:row1, col0:col1] = 1.0
    picture = viz.draw_box(viz.overlay(image, heat), demo["boxes"][0])
    assert picture.shape == (64, 64, 3)
    viz.save(tmp_path / "demo.png", viz.grid([[picture, viz.overlay(image, heat, alpha=0)]]))
