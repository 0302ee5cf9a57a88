"""The control maps of the real-photo table (scripts/evaluate_photos.py) and its docs block, without a framework.

Each map is checked against a computation written here: the Sobel magnitude by explicit
convolution (and a ramp's closed form), the 7 × 7 map by half-pixel bilinear interpolation
written out, the noise by the documented generator call.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "evaluate_photos.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evaluate_photos", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["evaluate_photos"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _sobel_by_hand(grey: np.ndarray) -> np.ndarray:
    """|∇| of one 2-D image: derivative [-1, 0, 1] times smoothing [1, 2, 1], edges mirrored (d c b a | a b c d)."""
    padded = np.pad(grey, 1, mode="symmetric")
    height, width = grey.shape

    def window(dr: int, dc: int) -> np.ndarray:
        return padded[1 + dr : 1 + dr + height, 1 + dc : 1 + dc + width]

    smooth = {-1: 1.0, 0: 2.0, 1: 1.0}
    down = sum(smooth[dc] * (window(1, dc) - window(-1, dc)) for dc in (-1, 0, 1))
    across = sum(smooth[dr] * (window(dr, 1) - window(dr, -1)) for dr in (-1, 0, 1))
    return np.sqrt(down**2 + across**2)


def test_edge_map_is_the_sobel_magnitude_of_the_grey_photo(script: ModuleType) -> None:
    pytest.importorskip("scipy")
    images = np.random.default_rng(3).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    edges = script.edge_map(images)
    assert edges.shape == (2, 5, 7)
    for photo, got in zip(images, edges, strict=True):
        want = _sobel_by_hand(photo.astype(np.float64).mean(axis=-1))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)


def test_edge_map_of_a_ramp_is_eight_times_its_slope_inside(script: ModuleType) -> None:
    pytest.importorskip("scipy")
    slope = 3.0
    grey = np.tile(slope * np.arange(9.0), (6, 1))  # brightness rises along the columns only
    images = np.repeat(grey[None, :, :, None], 3, axis=-1)
    edges = script.edge_map(images)[0]
    # Inside: (x+1 − (x−1))·slope times the smoothing weights 1 + 2 + 1 = 8·slope; no row gradient.
    np.testing.assert_allclose(edges[:, 1:-1], 8 * slope, rtol=1e-12)
    # At a mirrored edge the derivative sees one step only: 4·slope.
    np.testing.assert_allclose(edges[:, [0, -1]], 4 * slope, rtol=1e-12)


def test_random_map_is_the_seeded_generator_per_pixel(script: ModuleType) -> None:
    maps = script.random_map(3, (4, 5), seed=7)
    assert maps.shape == (3, 4, 5)
    np.testing.assert_array_equal(maps, np.random.default_rng(7).random((3, 4, 5)))
    assert not np.array_equal(maps, script.random_map(3, (4, 5), seed=8))


def _bilinear_by_hand(lattice: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre linear upsampling of a square map, edges clamped, written out per axis."""
    grid = lattice.shape[-1]
    where = np.clip((np.arange(size) + 0.5) * grid / size - 0.5, 0, grid - 1)
    low = np.floor(where).astype(int)
    high = np.minimum(low + 1, grid - 1)
    weight = where - low
    rows = lattice[:, low, :] * (1 - weight)[None, :, None] + lattice[:, high, :] * weight[None, :, None]
    return rows[:, :, low] * (1 - weight) + rows[:, :, high] * weight


def test_block_random_map_is_a_seeded_7x7_lattice_upsampled_like_a_cam(script: ModuleType) -> None:
    maps = script.block_random_map(2, (28, 28), seed=5)
    assert maps.shape == (2, 28, 28)
    lattice = np.random.default_rng(5).random((2, 7, 7))
    np.testing.assert_allclose(maps, _bilinear_by_hand(lattice, 28), rtol=0, atol=1e-12)
    # At most 7 × 7 distinct local maxima: a coarse map, unlike the per-pixel noise.
    assert not np.array_equal(maps, script.block_random_map(2, (28, 28), seed=6))


def test_control_maps_are_normalised_per_photo_and_named(script: ModuleType) -> None:
    pytest.importorskip("scipy")
    images = np.random.default_rng(0).integers(0, 256, (2, 14, 14, 3), dtype=np.uint8)
    maps = script.control_maps(images, seed=1)
    assert tuple(maps) == script.CONTROLS
    for heat in maps.values():
        assert heat.shape == (2, 14, 14)
        np.testing.assert_allclose(heat.min(axis=(1, 2)), 0.0, atol=1e-12)
        np.testing.assert_allclose(heat.max(axis=(1, 2)), 1.0, rtol=1e-12)
    # Normalising keeps each map's order, which is all deletion and ROAD read.
    raw = np.random.default_rng(1).random((2, 14, 14))
    np.testing.assert_array_equal(
        np.argsort(maps[script.CONTROLS[0]].reshape(2, -1), axis=1), np.argsort(raw.reshape(2, -1), axis=1)
    )


def test_write_block_replaces_only_the_text_between_the_markers(script: ModuleType, tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nbefore\n\n{script.BEGIN}\nold table\n{script.END}\n\nafter\n")
    script.write_block(page, "| new | table |")
    want = f"# Title\n\nbefore\n\n{script.BEGIN}\n| new | table |\n{script.END}\n\nafter\n"
    assert page.read_text() == want
    script.write_block(page, "| new | table |")  # a second run rewrites in place, never appends
    assert page.read_text() == want


def test_write_block_refuses_a_page_without_markers(script: ModuleType, tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n")
    with pytest.raises(SystemExit, match="markers"):
        script.write_block(page, "table")
    assert page.read_text() == "# Title\n"


def test_markdown_marks_controls_and_missing_values(script: ModuleType) -> None:
    table = script.Table(photos=["a", "b"], labels=["cat (50%)", "dog (40%)"])
    columns = [key for key, _ in script.COLUMNS]
    table.scores["gradcam"] = {key: np.array([0.1, 0.3]) for key in columns}
    table.scores[script.CONTROLS[0]] = {key: np.array([0.5, np.nan]) for key in columns}
    table.skipped["guided-backprop"] = "ReLU6"
    text = script.markdown(table, "python scripts/evaluate_photos.py")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1] == "| gradcam | " + " | ".join(["0.200"] * len(columns)) + " |"
    assert rows[2] == f"| *{script.CONTROLS[0]}* | " + " | ".join(["n/a"] * len(columns)) + " |"
    assert "2 photos" in text and "guided-backprop is not in the table: ReLU6" in text
