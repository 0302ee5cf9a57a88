"""Pictures of heatmaps: colour overlays, PNG files, grids and boxes, as uint8 RGB arrays.

Only NumPy is imported here; matplotlib (colormaps) and Pillow (PNG files) are imported when
``overlay`` or ``save`` is called, and come with ``pip install "anycam[viz]"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import InputError, MissingExtraError, closest
from ..core.resize import resize


def install_hint(extra: str) -> str:
    """Returns how to install an extra: from the package index, and from a source checkout."""
    return f'pip install "anycam[{extra}]" (from a source checkout: pip install ".[{extra}]")'


_EXTRA = install_hint("viz")


def overlay(image: np.ndarray, heatmap: np.ndarray, colormap: str | Any = "jet", alpha: float = 0.5) -> np.ndarray:
    """Returns round(255 · ((1 − alpha) · image + alpha · colormap(heatmap))) as uint8 RGB.

    The heatmap is resized to the image (separable linear, half-pixel centres, as
    ``anycam.core.resize``) when their sizes differ, then coloured with a matplotlib colormap;
    a grayscale image is repeated over R, G and B.

    Args:
        image: ``(H, W)``, ``(H, W, 1|3|4)`` or channels-first ``(1|3, H, W)``; uint8 (or any
            integer type with values 0..255), bool, or float in [0, 1]. An alpha channel is
            dropped.
        heatmap: ``(h, w)`` (leading axes of size 1 are dropped, e.g. one explainer output
            ``(1, h, w)``), finite, values in [0, 1] (``Explainer`` output; normalise raw cams
            with ``anycam.core.normalize``).
        colormap: a matplotlib colormap name or ``Colormap``.
        alpha: weight of the colour, in [0, 1]; 0 returns the image, 1 the coloured heatmap.

    Returns:
        ``(H, W, 3)`` uint8 RGB.

    Raises:
        InputError: for an image or heatmap of unusable shape, dtype or range, a bad alpha or an
            unknown colormap.
        MissingExtraError: if matplotlib cannot be imported.
    """
    rgb = as_rgb_float(image)
    height, width = rgb.shape[:2]
    heat = _as_heatmap(heatmap, (height, width))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha must lie in [0, 1] (0: only the image, 1: only colour), got {alpha}")
    colors = lookup_colormap(colormap)(heat)[..., :3]
    blended = (1.0 - float(alpha)) * rgb + float(alpha) * colors
    out: np.ndarray = np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
    return out


def save(path: str | Path, image: np.ndarray) -> Path:
    """Writes ``image`` to ``path`` with Pillow (PNG unless the suffix names another format).

    Args:
        path: the file to write.
        image: uint8 ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` (``overlay``/``grid`` output).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        InputError: if ``image`` is not uint8 of one of those shapes.
        MissingExtraError: if Pillow cannot be imported.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise InputError(
            f"save writes uint8 images, got dtype {array.dtype}; pass overlay()'s output or "
            "convert with (image * 255).round().astype(np.uint8)"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or 0 in array.shape:
        raise InputError(f"save writes (H, W), (H, W, 3) or (H, W, 4) images, got {array.shape}")
    try:
        from PIL import Image
    except ImportError as exc:
        raise MissingExtraError(f"saving images needs Pillow ({exc}); {_EXTRA}") from exc
    target = Path(path)
    Image.fromarray(np.ascontiguousarray(array)).save(target, format=None if target.suffix else "PNG")
    return target


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, background: int = 255) -> np.ndarray:
    """Returns the images tiled row by row, ``pad`` pixels between and around them, as uint8 RGB.

    Every cell is as large as the largest image; smaller images sit at their cell's top left,
    grayscale ones are repeated over R, G and B, and short rows are filled with ``background``.

    Args:
        rows: a list of rows, each a list of uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``.
        pad: gap in pixels, ``>= 0``.
        background: gray level of the gaps and empty cells, 0..255.

    Returns:
        ``(R·h + (R + 1)·pad, C·w + (C + 1)·pad, 3)`` uint8, ``R`` rows, ``C`` the longest row,
        ``h × w`` the largest image.

    Raises:
        InputError: for no images, a non-uint8 or oddly shaped image, or a bad pad/background.
    """
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise InputError(f"pad must be an integer >= 0, got {pad!r}")
    if isinstance(background, bool) or not isinstance(background, (int, np.integer)) or not (0 <= background <= 255):
        raise InputError(f"background must be an integer gray level 0..255, got {background!r}")
    cells = [[_as_rgb_uint8(image, f"rows[{r}][{c}]") for c, image in enumerate(row)] for r, row in enumerate(rows)]
    if not cells or not any(cells):
        raise InputError("grid needs at least one image, got none")
    height = max(cell.shape[0] for row in cells for cell in row)
    width = max(cell.shape[1] for row in cells for cell in row)
    columns = max(len(row) for row in cells)
    out = np.full((len(cells) * (height + pad) + pad, columns * (width + pad) + pad, 3), background, np.uint8)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            out[top : top + cell.shape[0], left : left + cell.shape[1]] = cell
    return out


def draw_box(
    image: np.ndarray,
    box: Sequence[int] | np.ndarray,
    color: tuple[int, int, int] = (0, 255, 0),
    thickness: int = 1,
) -> np.ndarray:
    """Returns a copy of ``image`` with the outline of ``box`` drawn inside the box's edges.

    Args:
        image: uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` (grayscale becomes RGB).
        box: ``(row0, col0, row1, col1)``, ends exclusive (``make_canvas_dataset``'s boxes);
            the parts of the outline outside the image are not drawn.
        color: RGB, each 0..255.
        thickness: line width in pixels, ``>= 1``.

    Returns:
        ``(H, W, 3)`` uint8.

    Raises:
        InputError: for a bad image, box, colour or thickness.
    """
    out = _as_rgb_uint8(image, "image").copy()
    coords = np.asarray(box)
    if coords.shape != (4,) or not np.issubdtype(coords.dtype, np.integer):
        raise InputError(f"box must be 4 integers (row0, col0, row1, col1), got {box!r}")
    if coords[2] <= coords[0] or coords[3] <= coords[1]:
        raise InputError(f"box needs row0 < row1 and col0 < col1 (ends exclusive), got {box!r}")
    rgb = np.asarray(color)
    if rgb.shape != (3,) or np.any(rgb < 0) or np.any(rgb > 255):
        raise InputError(f"color must be 3 integers 0..255 (R, G, B), got {color!r}")
    if isinstance(thickness, bool) or not isinstance(thickness, (int, np.integer)) or thickness < 1:
        raise InputError(f"thickness must be an integer >= 1, got {thickness!r}")
    row0, col0, row1, col1 = (int(v) for v in coords)
    rows, cols = np.ogrid[: out.shape[0], : out.shape[1]]
    inside = (rows >= row0) & (rows < row1) & (cols >= col0) & (cols < col1)
    edge = (
        (rows < row0 + thickness) | (rows >= row1 - thickness) | (cols < col0 + thickness) | (cols >= col1 - thickness)
    )
    out[inside & edge] = rgb.astype(np.uint8)
    return out


def as_rgb_float(image: np.ndarray) -> np.ndarray:
    """Returns ``image`` as ``(H, W, 3)`` float64 in [0, 1], from any layout ``overlay`` accepts."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3) or 0 in array.shape:
        raise InputError(
            f"image must be (H, W), (H, W, 1|3|4) or channels-first (1|3, H, W), got shape {np.shape(image)}"
        )
    if array.dtype == np.bool_:
        values = array.astype(np.float64)
    elif np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise InputError(
                f"an integer image must hold 0..255, got {array.min()}..{array.max()} (dtype {array.dtype})"
            )
        values = array.astype(np.float64) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise InputError("image contains NaN or inf")
        if values.min() < 0.0 or values.max() > 1.0:
            raise InputError(
                f"a float image must lie in [0, 1], got {values.min():.4g}..{values.max():.4g}; "
                "divide 0..255 images by 255 or pass them as uint8"
            )
    else:
        raise InputError(f"image dtype {array.dtype} is not an image; use uint8 or float in [0, 1]")
    return np.broadcast_to(values, (*values.shape[:2], 3))


def _as_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Returns ``heatmap`` as ``(H, W)`` float64 in [0, 1], resized to ``size`` if needed."""
    array = np.asarray(heatmap)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or 0 in array.shape:
        raise InputError(
            f"heatmap must be (h, w) (or (1, h, w) for one sample), got shape {np.shape(heatmap)}; "
            "overlay one sample at a time: overlay(image, heat[i])"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"heatmap must be numeric, got dtype {array.dtype}")
    values = array.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise InputError("heatmap contains NaN or inf; it cannot be coloured")
    low, high = values.min(), values.max()
    if low < -1e-6 or high > 1.0 + 1e-6:
        raise InputError(
            f"heatmap values must lie in [0, 1], got {low:.4g}..{high:.4g}; normalise a raw cam "
            "first with anycam.core.normalize"
        )
    if values.shape != size:
        values = resize(values, size, "linear")
    return np.clip(values, 0.0, 1.0)


def _as_rgb_uint8(image: np.ndarray, what: str) -> np.ndarray:
    """Returns a uint8 ``(H, W)``/``(H, W, 1|3)`` image as ``(H, W, 3)``."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise InputError(f"{what} must be uint8 (overlay's output), got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3) or 0 in array.shape:
        raise InputError(f"{what} must be (H, W), (H, W, 1) or (H, W, 3), got shape {array.shape}")
    return np.broadcast_to(array, (*array.shape[:2], 3))


def lookup_colormap(colormap: str | Any) -> Any:
    """Returns the matplotlib ``Colormap`` for a name, or ``colormap`` itself if it is one."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtraError(f"colouring heatmaps needs matplotlib ({exc}); {_EXTRA}") from exc
    if isinstance(colormap, matplotlib.colors.Colormap):
        return colormap
    if not isinstance(colormap, str):
        raise InputError(f"colormap must be a matplotlib colormap name or Colormap, got {type(colormap).__name__}")
    try:
        return matplotlib.colormaps[colormap]
    except KeyError:
        hint = closest(colormap, list(matplotlib.colormaps))
        raise InputError(f"unknown colormap {colormap!r}{hint}") from None
