"""Checks at the adapters' input boundary, shared by every backend (no framework here).

Each takes plain shapes or NumPy values, so a backend calls it once per tensor it receives:
an empty batch, non-finite inputs, a callable target's scores of the wrong shape, and the
error that wraps a failed forward pass.
"""

from __future__ import annotations

import re

from .._errors import InputError, NonFiniteError, TargetError

_LAYOUT_FORMS = {"channels_first": "(N, C, *spatial)", "channels_last": "(N, *spatial, C)"}


def check_batch(shape: tuple[int, ...], what: str = "input") -> None:
    """Raises InputError for an empty batch (N = 0).

    An empty batch is refused rather than answered with empty arrays: the layer's shape, and
    so the shape of ``cam`` and ``weights``, is only known from a forward pass, and a
    zero-sample pass fails in some frameworks' kernels. Skip empty batches before explaining.

    >>> check_batch((0, 3, 8, 8))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    anycam._errors.InputError: input of shape (0, 3, 8, 8) is an empty batch (N = 0); ...
    """
    if len(shape) and int(shape[0]) == 0:
        raise InputError(
            f"{what} of shape {tuple(int(d) for d in shape)} is an empty batch (N = 0); anycam explains at least one "
            "sample, skip empty batches"
        )


def non_finite_input(what: str, nan: bool, count: int) -> NonFiniteError:
    """Returns the error for ``count`` NaN/inf values found in an input."""
    kind = "NaN" if nan else "inf"
    return NonFiniteError(
        f"{kind} in the {what} ({count} non-finite values); a map of such an input means nothing "
        "(and fused kernels may hide the NaN); clean the input first, e.g. np.nan_to_num"
    )


def check_scores_shape(shape: tuple[int, ...], batch: int) -> None:
    """Raises TargetError unless a callable target's scores are ``(N,)`` or ``(N, K)`` with K ≥ 1."""
    shape = tuple(int(d) for d in shape)
    if len(shape) not in (1, 2) or shape[0] != batch:
        raise TargetError(f"a callable target must return scores of shape (N,) or (N, K) with N={batch}, got {shape}")
    if len(shape) == 2 and shape[1] == 0:
        raise TargetError(
            f"a callable target returned (N, 0) scores {shape}: no target to explain; return (N,) or (N, K) "
            "scores with K ≥ 1 (an empty selection, e.g. no detected box, has nothing to explain)"
        )


# Words a framework's message uses when an input's shape or layout does not fit a layer. A failure
# without them (a model's own RuntimeError, an assertion, out of memory) is the model's, not the input's.
_SHAPE_WORDS = re.compile(
    r"shape|size|dimension|\bdims?\b|channel|rank|broadcast|incompatible|mismatch|expected input|"
    r"cannot be multiplied|contracting",
    re.IGNORECASE,
)
_OUT_OF_MEMORY = re.compile(r"out of memory|RESOURCE_EXHAUSTED|OOM when allocating", re.IGNORECASE)


def is_input_failure(exc: BaseException) -> bool:
    """Whether a failed forward pass is explained by the input's shape or layout.

    Out-of-memory errors (which callers catch to halve a batch) and a model's own exceptions
    are not: those propagate with their own type.

    >>> is_input_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x48 and 12x5)"))
    True
    >>> is_input_failure(RuntimeError("boom"))
    False
    >>> is_input_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (size mismatch)"))
    False
    """
    memory = isinstance(exc, MemoryError) or type(exc).__name__.endswith("OutOfMemoryError")
    if memory or _OUT_OF_MEMORY.search(str(exc)):
        return False
    return bool(_SHAPE_WORDS.search(str(exc)))


def forward_error(exc: BaseException, shape: tuple[int, ...], layout: str, what: str = "input") -> InputError | None:
    """Returns an InputError for a forward pass that failed on an input of ``shape``, or None.

    None when the failure is not the input's (:func:`is_input_failure`): the caller re-raises
    ``exc`` unchanged, with a note added here naming the input's shape and layout. Otherwise the
    framework's message stays in the InputError's text and as its cause (raise it ``from exc``).
    """
    form = _LAYOUT_FORMS.get(layout, layout)
    if not is_input_failure(exc):
        exc.add_note(f"anycam: raised by the model on the {what} of shape {tuple(shape)}, read as {layout} {form}")
        return None
    message = " ".join(str(exc).split())
    if len(message) > 400:
        message = message[:400] + " …"
    return InputError(
        f"the model failed on the {what} of shape {tuple(shape)}, read as {layout} {form}: "
        f"{type(exc).__name__}: {message}. Check the input's rank and channel placement against what the "
        "model was built for (a batch axis first; the channels where the model expects them), "
        "or pass input_layout=; and that every batched value the model is called with (also one "
        "given through model_kwargs=) has the same N rows"
    )


def integer_input_error(what: str, dtype: object, cast: str) -> InputError:
    """Returns the error for an integer input where a floating-point one carries the heatmap's grid.

    Integers are two different things: image pixels (0..255), which want scaling, and token ids
    or class labels, which a cast would turn into meaningless numbers. The message says both.

    Args:
        what: the input's name in messages (``"input"``, ``"input 'input_ids'"``).
        dtype: the input's dtype, as the framework prints it.
        cast: the framework's spelling of the cast, e.g. ``"x.float() / 255"``.

    >>> str(integer_input_error("input", "torch.int64", "x.float() / 255"))  # doctest: +ELLIPSIS
    'input has dtype torch.int64, but the heatmap needs a floating-point input with spatial axes: ...'
    """
    return InputError(
        f"{what} has dtype {dtype}, but the heatmap needs a floating-point input with spatial axes: "
        f"if it holds image pixels, scale them ({cast}); if it holds token ids, labels or other integers, "
        "do not cast them: pass them beside the floating-point input that has spatial axes (a tuple or "
        "dict, with spatial_input= naming it), or explain a layer of a model that takes such an input"
    )
