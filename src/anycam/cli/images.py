"""Images for ``anycam explain``: reading any bit depth as 0..255, and the size a model is fed.

Pillow opens 16-bit PNGs and TIFFs as ``I;16``/``I`` and float TIFFs as ``F``; its
``convert("RGB")`` clips those at 255 instead of scaling them, so a 16-bit photo would reach the
model saturated. ``read_image`` scales them itself. Nothing here imports a framework.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import InputError, require

# A model is fed at most this many pixels per image unless a size is asked for explicitly
# (``ModelSpec(size=...)`` or ``preprocess=``): 2048 x 2048. A 12-megapixel photo at full size
# took minutes and gigabytes in a ResNet; nobody wants that by accident.
MAX_UNASKED_PIXELS = 2048 * 2048
# A bare model of unknown input size: images whose short side is longer are shrunk to this
# (aspect kept), the evaluation size of most ImageNet classifiers.
BARE_SHORT_SIDE = 224

_WIDE_MODES = ("I", "F")  # Pillow's 32-bit integer and float modes; "I;16*" are 16-bit


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Returns the image at ``path`` as uint8 ``(H, W, 3)`` RGB (``(H, W)`` for ``channels=1``).

    EXIF orientation is applied, as a photo viewer shows it. 16-bit images (PNG, TIFF) are
    scaled by 255 / 65535 and float images, read as intensities in [0, 1], by 255, each rounded;
    8-bit modes (RGB, palette, CMYK, …) are converted by Pillow.

    Raises:
        InputError: a file that is missing, that Pillow cannot read, that is larger than Pillow's
            guard against decompression bombs, or float pixels outside [0, 1] (or not finite).
        anycam.MissingExtraError: Pillow is not installed.
    """
    image_module = require("PIL.Image", "viz", "reading images")
    ops = require("PIL.ImageOps", "viz", "reading images")
    name = str(path)
    try:
        with warnings.catch_warnings():
            # Between Pillow's two limits it only warns; the CLI shrinks large images anyway.
            warnings.simplefilter("ignore", image_module.DecompressionBombWarning)
            with image_module.open(path) as opened:
                picture = ops.exif_transpose(opened)
                if picture.mode in _WIDE_MODES or picture.mode.startswith("I;16"):
                    gray = _scaled_to_uint8(np.asarray(picture), picture.mode, name)
                    picture = image_module.fromarray(gray, mode="L")
                picture = picture.convert("RGB" if channels == 3 else "L")
    except FileNotFoundError as exc:
        raise InputError(f"image {name!r} does not exist") from exc
    except IsADirectoryError as exc:
        raise InputError(f"image {name!r} is a folder; give image files") from exc
    except image_module.DecompressionBombError as exc:
        raise InputError(
            f"image {name!r} is too large for Pillow ({exc}); shrink it first, or, if you trust the file, "
            "raise PIL.Image.MAX_IMAGE_PIXELS in your factory's module"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        raise InputError(
            f"cannot read image {name!r} ({exc}); give a PNG, JPEG or another format Pillow reads"
        ) from exc
    return np.asarray(picture, dtype=np.uint8)


def _scaled_to_uint8(pixels: np.ndarray, mode: str, name: str) -> np.ndarray:
    """Returns 16-bit (``I;16*``, ``I``) or float (``F``) pixels as uint8 0..255, rounded."""
    values = pixels.astype(np.float64)
    if mode == "F":
        if not np.all(np.isfinite(values)):
            raise InputError(f"image {name!r} holds NaN or inf pixels")
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            raise InputError(
                f"image {name!r} is a float image with values in [{low:.4g}, {high:.4g}]; anycam explain reads "
                "float images as intensities in [0, 1]: save it scaled to [0, 1], or as an 8- or 16-bit image"
            )
        full = 1.0
    else:
        # Pillow reads 16-bit PNGs and TIFFs into these modes; wider integers have no known scale.
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 65535.0:
            raise InputError(
                f"image {name!r} is a 32-bit integer image with values in [{low:.0f}, {high:.0f}]; anycam explain "
                "reads 8- and 16-bit images: save it as one"
            )
        full = 65535.0
    return np.asarray(np.rint(values * (255.0 / full)), dtype=np.uint8)


def known_input_size(model: Any, layout: str) -> tuple[int, int] | None:
    """Returns the ``(height, width)`` a model declares for its input (a Keras model's ``input_shape``).

    None where the model declares none, several inputs, or unknown (None) spatial sizes.
    """
    try:
        shape = model.input_shape  # Keras; a subclassed model that was never built raises
    except Exception:  # any failure means the model does not say
        return None
    if not isinstance(shape, tuple) or len(shape) != 4:
        return None
    spatial = shape[2:4] if layout == "channels_first" else shape[1:3]
    if all(isinstance(v, int) and v > 0 for v in spatial):
        return int(spatial[0]), int(spatial[1])
    return None


def bare_size(image_shape: Sequence[int], known: tuple[int, int] | None) -> tuple[int, int]:
    """Returns the size a bare model is fed an image at: its declared size, else a short side ≤ 224."""
    if known is not None:
        return known
    height, width = int(image_shape[0]), int(image_shape[1])
    short = min(height, width)
    if short <= BARE_SHORT_SIDE:
        return height, width
    scale = BARE_SHORT_SIDE / short
    return max(1, round(height * scale)), max(1, round(width * scale))


def check_unasked_size(name: str, shape: Sequence[int]) -> None:
    """Refuses an image fed at its own size when it has more than ``MAX_UNASKED_PIXELS`` pixels.

    Raises:
        InputError: naming the image, its size and the fix (``ModelSpec(size=...)``).
    """
    height, width = int(shape[0]), int(shape[1])
    if height * width > MAX_UNASKED_PIXELS:
        raise InputError(
            f"image {name!r} is {height} x {width} pixels and the factory's ModelSpec has size=None, which feeds "
            f"every image at its own size: {height * width:,} pixels is more than the {MAX_UNASKED_PIXELS:,} "
            "anycam explain feeds a model unasked (minutes and gigabytes per image); return "
            "ModelSpec(model, size=(224, 224), ...) with your model's input size, or preprocess=..."
        )


def default_preprocess(image: np.ndarray, spec: Any, layout: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Returns float32 ``(pixels / 255 − mean) / std`` at ``size`` (default ``spec.size``), in ``layout``.

    No batch axis; ``spec`` is an ``anycam.cli.ModelSpec``. Resizing is Pillow's bilinear.
    """
    target = spec.size if size is None else size
    if target is not None and tuple(int(v) for v in target) != tuple(image.shape[:2]):
        image_module = require("PIL.Image", "viz", "resizing images")
        height, width = (int(v) for v in target)
        resized = image_module.fromarray(image).resize((width, height), image_module.Resampling.BILINEAR)
        image = np.asarray(resized)
    pixels: np.ndarray = image.astype(np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if spec.mean is not None:
        pixels = pixels - np.asarray(spec.mean, dtype=np.float32)
    if spec.std is not None:
        pixels = pixels / np.asarray(spec.std, dtype=np.float32)
    if layout == "channels_first":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=np.float32)


__all__ = [
    "BARE_SHORT_SIDE",
    "MAX_UNASKED_PIXELS",
    "bare_size",
    "check_unasked_size",
    "default_preprocess",
    "known_input_size",
    "read_image",
]
