"""Layouts: bringing a layer's output into the core's ``(..., C, *S)`` form.

Frameworks disagree on where the channel axis lives (PyTorch and Equinox first, Keras and Flax
last), and transformers emit tokens ``(N, T, C)`` with class-token prefixes. The core only ever
sees an explicit channel axis, so every layout is converted here, once, in NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._errors import ConfigError, InputError
from ._namespace import namespace

LAYOUTS = ("channels_first", "channels_last", "tokens")


def canonical_layout(layout: str) -> str:
    """Returns ``"channels_first"``, ``"channels_last"`` or ``"tokens"`` for a layout spelling.

    ``"NCHW"``-style strings (``"NCL"``, ``"NCDHW"``) mean channels first; ``"NHWC"``-style strings
    (``"NLC"``, ``"NDHWC"``) channels last.

    Raises:
        ConfigError: for an unknown spelling (also a ``ValueError``).
    """
    if layout in LAYOUTS:
        return layout
    upper = layout.upper() if isinstance(layout, str) else ""
    if len(upper) >= 3 and upper.startswith("NC") and upper.isalpha():
        return "channels_first"
    if len(upper) >= 3 and upper.startswith("N") and upper.endswith("C") and upper.isalpha():
        return "channels_last"
    raise ConfigError(
        f"unknown layout {layout!r}; use 'channels_first' (NCHW), 'channels_last' (NHWC) or 'tokens' (N, T, C)"
    )


def token_grid(tokens: int, grid: tuple[int, ...] | None = None) -> tuple[int, tuple[int, ...]]:
    """Returns ``(prefix, grid)`` for a token sequence of length ``tokens``.

    With no ``grid`` given, the grid is the largest square that leaves at most 8 prefix tokens
    (class and register tokens precede the patches in ViT-style models).

    Raises:
        InputError: if no square grid fits, or ``grid`` needs more tokens than there are.
    """
    if grid is not None:
        patches = math.prod(grid)
        if patches > tokens:
            raise InputError(f"token_grid {grid} needs {patches} tokens, the layer has {tokens}")
        return tokens - patches, tuple(int(g) for g in grid)
    for prefix in range(0, min(tokens, 9)):
        side = math.isqrt(tokens - prefix)
        if side > 0 and side * side == tokens - prefix:
            return prefix, (side, side)
    raise InputError(f"cannot infer a square patch grid from {tokens} tokens; pass token_grid=(rows, cols)")


def to_channels_first(
    array: np.ndarray,
    layout: str,
    *,
    lead: int = 1,
    grid: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Returns ``array`` with the channel axis right after its ``lead`` batch-like axes.

    Args:
        array: ``(*lead, C, *S)``, ``(*lead, *S, C)`` or tokens ``(*lead, T, C)``.
        layout: see :func:`canonical_layout`.
        lead: how many leading axes are batch-like (1 for ``(N, ...)``, 2 for ``(N, K, ...)``).
        grid: the patch grid of a token layout; inferred when square.

    Returns:
        ``(*lead, C, *S)``; a view where no copy is needed.

    Raises:
        InputError: if the array has no spatial axis in that layout.
    """
    layout = canonical_layout(layout)
    if array.ndim < lead + 2:
        raise InputError(
            f"layer output of shape {array.shape[lead:]} (per sample) has no spatial axis; "
            "Grad-CAM needs a convolutional feature map (C, *spatial) or tokens (T, C)"
        )
    if layout == "channels_first":
        return array
    xp = namespace(array)
    if layout == "channels_last":
        return xp.moveaxis(array, -1, lead)
    if array.ndim != lead + 2:
        raise InputError(f"a token layout needs (N, T, C) outputs, got {tuple(array.shape)}")
    prefix, patch_grid = token_grid(array.shape[lead], grid)
    patches = array[(slice(None),) * lead + (slice(prefix, None), ...)]
    patches = xp.reshape(patches, (*array.shape[:lead], *patch_grid, array.shape[-1]))
    return xp.moveaxis(patches, -1, lead)


def spatial_shape(shape: tuple[int, ...], layout: str, what: str = "input") -> tuple[int, ...]:
    """Returns the spatial part of an input of ``shape`` ``(N, ...)`` in ``layout``.

    Args:
        shape: the input's shape, batch first.
        layout: ``"channels_first"`` or ``"channels_last"``.
        what: the input's name in messages (``"input 'pixel_values'"`` for one of several).

    Raises:
        InputError: if the input has no spatial axis; the message names the input and
            ``spatial_input=`` (the input that carries the grid may be another one).
    """
    layout = canonical_layout(layout)
    if len(shape) < 3:
        raise InputError(
            f"{what} of shape {tuple(shape)} has no spatial axis; expected (N, C, *spatial) or (N, *spatial, C). "
            "The heatmap takes its grid from an image-like input: if the model takes several inputs, pass them "
            "all (a tuple or dict) and name that one with spatial_input="
        )
    if layout == "channels_first":
        return tuple(shape[2:])
    if layout == "channels_last":
        return tuple(shape[1:-1])
    raise InputError("inputs cannot be in a token layout; pass input_layout='channels_first' or 'channels_last'")


# -- checking a layer's layout against the input ------------------------------------------------

_OTHER = {"channels_first": "channels_last", "channels_last": "channels_first"}


@dataclass(frozen=True)
class LayerReading:
    """How one layer output is read against the input.

    Attributes:
        layout: ``"channels_first"``, ``"channels_last"`` or ``"tokens"``.
        grid: the patch grid of a token layout (None otherwise).
        spatial: the layer's spatial shape in that layout (the grid for tokens).
        aligned: ``(layer, input)`` spatial shapes brought to one rank by dropping size-1 axes
            (the shapes themselves when their ranks already agree); the map is upsampled from
            the first to the second, then given the input's spatial shape.
    """

    layout: str
    grid: tuple[int, ...] | None
    spatial: tuple[int, ...]
    aligned: tuple[tuple[int, ...], tuple[int, ...]]


def align_spatial(
    layer: tuple[int, ...], inputs: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Returns ``(layer, inputs)`` at one rank with every layer axis ≤ the input's, or None.

    Ranks that differ are brought together by dropping the size-1 axes of both (a 1-D model
    written with ``Conv2d`` on ``x[..., None]`` has a ``(L, 1)`` feature map for an ``(L,)``
    signal). Equal ranks are compared as they are.

    >>> align_spatial((64, 1), (1024,))
    ((64,), (1024,))
    >>> align_spatial((8,), (8, 8)) is None
    True
    """
    if len(layer) != len(inputs):
        layer = tuple(d for d in layer if d != 1)
        inputs = tuple(d for d in inputs if d != 1)
    if not layer or len(layer) != len(inputs) or any(a > b for a, b in zip(layer, inputs, strict=True)):
        return None
    return layer, inputs


def _strict_grid(tokens: int, inputs: tuple[int, ...]) -> tuple[int, ...] | None:
    """The square grid of ``tokens`` if it tiles a square ``inputs`` in equal whole patches.

    Stricter than :func:`token_grid`, because here nobody said the output holds tokens: the
    patches must also outnumber the class/register tokens before them four times over (the 6
    channels of a 1-D map are not 2 register tokens and a 2×2 grid; ViTs have 1 to 5 of them
    before 49 to 1024 patches).
    """
    if len(inputs) != 2 or inputs[0] != inputs[1]:
        return None
    try:
        prefix, grid = token_grid(tokens)
    except InputError:
        return None
    return grid if inputs[0] % grid[0] == 0 and 4 * prefix <= math.prod(grid) else None


def _reading(
    shape: tuple[int, ...], layout: str, inputs: tuple[int, ...], grid: tuple[int, ...] | None, strict: bool
) -> LayerReading | None:
    """The reading of a per-sample ``shape`` in ``layout`` if it fits ``inputs``, else None."""
    if layout == "tokens":
        if len(shape) != 2:
            return None
        if grid is None and strict:
            found = _strict_grid(shape[0], inputs)
            if found is None:
                return None
            grid = found
        else:
            try:
                grid = token_grid(shape[0], grid)[1]
            except InputError:
                return None
        spatial = grid
    else:
        spatial = shape[1:] if layout == "channels_first" else shape[:-1]
    aligned = align_spatial(spatial, inputs)
    if aligned is None:
        return None
    return LayerReading(layout, grid if layout == "tokens" else None, tuple(spatial), aligned)


def _describe(shape: tuple[int, ...], inputs: tuple[int, ...], grid: tuple[int, ...] | None) -> str:
    parts = [f"channels_first gives {shape[1:]}", f"channels_last gives {shape[:-1]}"]
    if len(shape) == 2:
        try:
            parts.append(f"tokens gives the grid {token_grid(shape[0], grid)[1]}")
        except InputError:
            parts.append(f"tokens gives no grid ({shape[0]} tokens)")
    return "; ".join(parts)


def read_layer(
    shape: tuple[int, ...],
    input_spatial: tuple[int, ...],
    *,
    guess: str | None,
    given: str | None = None,
    grid: tuple[int, ...] | None = None,
    name: str = "",
    input_shape: tuple[int, ...] | None = None,
) -> LayerReading:
    """Returns the one reading of a layer output ``(N, *shape)`` that fits the input.

    A reading fits when the layer's spatial shape and the input's have one rank after dropping
    size-1 axes, and each layer axis is no larger than the input's. A ``given`` layout is only
    checked. Otherwise the backend's ``guess`` is kept when it fits; when it does not, the one
    other reading that fits is taken: the other channel placement, or tokens ``(N, T, C)`` (a
    3-D output under a 2-D input, its square patch grid tiling the input in whole patches).
    A ``guess`` of None means nothing in the model decides the layout: every reading is tried
    and only one that fits alone is taken. When none fits, or several do, the shapes cannot
    tell, and the error says what to pass.

    >>> read_layer((2, 8, 8, 6), (8, 8), guess="channels_first").spatial  # the backend decides
    (8, 6)
    >>> read_layer((2, 8, 8, 6), (8, 8), guess=None)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    anycam.InputError: cannot tell the layout of layer output (2, 8, 8, 6) ...
    >>> read_layer((2, 6, 8, 10), (8, 8), guess=None).layout  # only one reading fits
    'channels_last'

    Args:
        shape: the layer output's shape ``(N, ...)``.
        input_spatial: the input's spatial shape.
        guess: the backend's layout for the layer, or None when nothing decides it.
        given: the user's ``layout=``, or None.
        grid: the user's ``token_grid=``, or None.
        name: the layer, for messages.
        input_shape: the input's full shape, for messages.

    Raises:
        InputError: no reading fits, several do, or ``given`` contradicts the shapes; the
            message names both shapes.
    """
    per_sample = tuple(int(d) for d in shape[1:])
    where = f"layer {name!r} output {tuple(shape)}" if name else f"layer output {tuple(shape)}"
    against = f"input {tuple(input_shape)} (spatial {tuple(input_spatial)})" if input_shape else (
        f"input spatial shape {tuple(input_spatial)}"
    )
    if len(per_sample) < 2:
        raise InputError(
            f"{where} has no spatial axis; Grad-CAM needs a feature map (C, *spatial) or tokens (T, C): "
            "explain an earlier layer"
        )
    if given is not None:
        given = canonical_layout(given)
        found = _reading(per_sample, given, input_spatial, grid, strict=False)
        if found is None:
            fitting = [
                layout
                for layout in ("channels_first", "channels_last", "tokens")
                if layout != given and _reading(per_sample, layout, input_spatial, grid, strict=False)
            ]
            hint = f"; the shapes fit {' or '.join(map(repr, fitting))}" if fitting else ""
            raise InputError(
                f"layout={given!r} contradicts the shapes: {where} read as {given} does not fit the "
                f"{against} (same rank after dropping size-1 axes, each layer axis ≤ the input's)"
                f"{hint}; {_describe(per_sample, input_spatial, grid)}. Pass the layer's true layout, "
                "or input_layout= if the input is read wrongly"
            )
        return found
    if guess is None:
        # Nothing decided: no reading is preferred, so a fit is taken only where it is the only one.
        others = list(LAYOUTS)
    else:
        guessed = _reading(per_sample, guess, input_spatial, grid, strict=False)
        if guessed is not None:
            return guessed
        others = [layout for layout in (_OTHER.get(guess, "channels_first"), "tokens") if layout != guess]
        if guess == "tokens":
            others = ["channels_first", "channels_last"]
    strict = grid is None  # a detected token reading must tile the input (see _strict_grid)
    candidates = (_reading(per_sample, other, input_spatial, grid, strict=strict) for other in others)
    fits = [reading for reading in candidates if reading is not None]
    if len(fits) == 1 and not _ambiguous_tokens(fits[0], per_sample, input_spatial, grid):
        return fits[0]
    if fits:
        undecided = " (nothing in the model decides it)" if guess is None else ""
        raise InputError(
            f"cannot tell the layout of {where} under the {against}{undecided}: it reads as "
            f"{' or as '.join(r.layout for r in fits)} ({_describe(per_sample, input_spatial, grid)}); "
            "pass layout='channels_first', 'channels_last' or 'tokens' (with token_grid=)"
        )
    raise InputError(
        f"{where} does not fit the {against}: no layout gives the input's spatial rank (after "
        f"dropping size-1 axes) with each layer axis ≤ the input's ({_describe(per_sample, input_spatial, grid)}); "
        "pass layout= (and token_grid= for tokens) or input_layout=, or explain a layer with a "
        "spatial feature map"
    )


def _ambiguous_tokens(
    reading: LayerReading, shape: tuple[int, ...], inputs: tuple[int, ...], grid: tuple[int, ...] | None
) -> bool:
    """True when a detected token reading ``(T, C)`` would fit just as well as ``(C, T)``.

    A 1-D feature map ``(C, L)`` under a 2-D input reads as tokens whenever C happens to be
    a square plus a few prefix tokens; then the shapes do not tell.
    """
    if reading.layout != "tokens" or grid is not None:
        return False
    return _strict_grid(shape[1], inputs) is not None


def read_layouts(
    shapes: Sequence[tuple[int, ...]],
    guesses: Sequence[str | None],
    inputs: Sequence[tuple[str, tuple[int, ...]]],
    *,
    given: str | None = None,
    grid: tuple[int, ...] | None = None,
    names: Sequence[str] = (),
    follow: bool = False,
    input_shape: tuple[int, ...] | None = None,
) -> tuple[str, tuple[int, ...], tuple[LayerReading, ...]]:
    """Returns the input's layout and spatial shape and each layer's reading (:func:`read_layer`).

    Args:
        shapes: per layer, the output's shape ``(N, ...)``.
        guesses: per layer, the backend's layout, or None where nothing decides it.
        inputs: the input readings to try, ``(layout, spatial shape)``, the backend's first; a
            second one is tried only when some layer fits no reading under the first.
        given, grid: the user's ``layout=`` and ``token_grid=``.
        names: the layer names, for messages.
        follow: the backend's layer guesses follow the input layout (JAX), so under the other
            input reading the layers are guessed in that layout too. A None guess then means
            that nothing in the model decides the input's layout either: when, with no
            ``given``, the input and every layer fit in each of two layouts, the shapes cannot
            tell, and the input is refused rather than read in the first.
        input_shape: the input's full shape, for messages.

    Raises:
        InputError: from the first input reading, when no input reading fits every layer; or,
            undecided (above), when two readings fit.
    """
    undecided = follow and given is None and any(guess is None for guess in guesses)
    first_error: InputError | None = None
    fits: list[tuple[str, tuple[int, ...], tuple[LayerReading, ...]]] = []
    for attempt, (input_layout, spatial) in enumerate(inputs):
        try:
            readings = []
            for index, shape in enumerate(shapes):
                guess = guesses[index]
                if follow and (guess is None or (attempt and guess in _OTHER)):
                    guess = input_layout
                readings.append(
                    read_layer(
                        shape,
                        spatial,
                        guess=guess,
                        given=given,
                        grid=grid,
                        name=names[index] if index < len(names) else "",
                        input_shape=input_shape,
                    )
                )
        except InputError as exc:
            first_error = first_error or exc
            continue
        if not undecided:
            return input_layout, tuple(spatial), tuple(readings)
        fits.append((input_layout, tuple(spatial), tuple(readings)))
    # Two input readings under each of which every layer keeps the input's layout: nothing tells
    # 77 positions of 26 letters from 26 positions of 77 features.
    both = [fit for fit in fits if all(reading.layout == fit[0] for reading in fit[2])]
    if len(both) > 1:
        shown = input_shape if input_shape is not None else "of unknown shape"
        readings_told = "; ".join(
            f"as {layout}: input spatial {spatial}, layer spatial {', '.join(str(r.spatial) for r in readings)}"
            for layout, spatial, readings in both
        )
        raise InputError(
            f"cannot tell the layout of the input {shown} and the layer output(s) "
            f"{', '.join(str(tuple(s)) for s in shapes)}: nothing in the model decides it, and they read "
            f"both ways ({readings_told}). Pass input_layout='channels_last' (e.g. a sequence of feature "
            "vectors, one-hot letters per position) or input_layout='channels_first', or the layers' layout="
        )
    if fits:
        return fits[0]
    assert first_error is not None
    raise first_error
