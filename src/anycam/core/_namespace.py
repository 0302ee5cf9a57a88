"""Which array namespace the core computes with, and in which precision (issue 21, item 1).

NumPy arrays (and Python sequences) take the NumPy path, the reference, in float64 as always;
``array_api_compat`` is imported only when an array of another library arrives, so ``import
anycam`` and every NumPy call stay free of it. Other arrays (torch, JAX, ``array_api_strict``)
are computed with their own namespace, where they live, in float32 — float64 only when the
input already is float64: many accelerators have no float64 or run it many times slower.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import InputError

_NUMPY_LIKE = (np.ndarray, np.generic, int, float, bool, list, tuple)

# Namespaces that backends register for array types array-api-compat does not cover (TensorFlow's
# tensors: ``anycam.backends.tensorflow.namespace`` registers itself when a TF backend loads), so
# the core finds them without importing any framework. Checked in order, before array-api-compat.
_REGISTERED: list[tuple[type, Any]] = []


def register(array_type: type, xp: Any) -> None:
    """Makes :func:`namespace` answer ``xp`` for arrays of ``array_type`` (idempotent).

    ``xp`` is an array-API-shaped object with the functions the core calls, ``xp.device(x)``
    and ``xp.is_concrete(x)`` (False for symbolic arrays, which must not be cached).
    """
    if not any(known is array_type for known, _ in _REGISTERED):
        _REGISTERED.append((array_type, xp))


def _registered(array: Any) -> Any | None:
    for array_type, xp in _REGISTERED:
        if isinstance(array, array_type):
            return xp
    return None


def is_numpy(*arrays: Any) -> bool:
    """Returns True when every non-None argument is a NumPy array, scalar or Python sequence."""
    return all(array is None or isinstance(array, _NUMPY_LIKE) for array in arrays)


def namespace(*arrays: Any) -> Any:
    """Returns the namespace that computes on ``arrays``: ``numpy`` or array-api-compat's.

    Arrays that array-api-compat does not know (or any array when it is not installed) take
    the NumPy path, converted with ``numpy.asarray`` as before issue 21.
    """
    if is_numpy(*arrays):
        return np
    foreign = [a for a in arrays if a is not None and not isinstance(a, _NUMPY_LIKE)]
    if _REGISTERED:
        spaces = {id(xp): xp for xp in map(_registered, foreign)}
        if len(spaces) == 1 and None not in spaces.values():
            return next(iter(spaces.values()))
        if any(xp is not None for xp in spaces.values()):
            raise InputError(
                "arrays of different libraries given together ("
                + ", ".join(sorted({type(a).__module__ + "." + type(a).__name__ for a in foreign}))
                + "); pass arrays of one framework (NumPy arrays may accompany them)"
            )
    try:
        import array_api_compat
    except ImportError:
        return np
    if not all(array_api_compat.is_array_api_obj(a) for a in foreign):
        return np
    return array_api_compat.array_namespace(*foreign)


def device_of(array: Any) -> Any:
    """Returns the device of a non-NumPy array (array-api-compat's, or a registered namespace's ``device``)."""
    xp = _registered(array)
    if xp is not None:
        return xp.device(array)
    import array_api_compat

    return array_api_compat.device(array)


def compute_dtype(xp: Any, *arrays: Any) -> Any:
    """Returns the floating dtype the core computes in: float64 for NumPy, else float32 or float64.

    Off NumPy, float64 inputs keep float64 (a CPU user who asked for it); everything else —
    float16, bfloat16, float32, integers — is computed in float32.
    """
    if xp is np:
        return np.float64
    if any(a is not None and not isinstance(a, _NUMPY_LIKE) and a.dtype == xp.float64 for a in arrays):
        return xp.float64
    return xp.float32


def as_float(xp: Any, array: Any, dtype: Any) -> Any:
    """Returns ``array`` as ``dtype`` in namespace ``xp`` (no copy where it already is)."""
    if xp is np:
        return np.asarray(array, dtype)
    return array if array.dtype == dtype else xp.astype(array, dtype)


def constant(xp: Any, value: float, like: Any) -> Any:
    """Returns a 0-d array of ``value`` with ``like``'s dtype and device (for ``where``/``maximum``)."""
    if xp is np:
        return np.asarray(value, like.dtype)
    return xp.asarray(value, dtype=like.dtype, device=device_of(like))


def is_concrete(array: Any) -> bool:
    """Whether ``array`` holds values (not a tracer of ``jax.jit`` or a symbolic graph tensor).

    Only concrete arrays may be cached across calls: a tracer or graph tensor is valid only
    inside the trace or graph that made it.
    """
    xp = _registered(array)
    if xp is not None:
        return bool(xp.is_concrete(array))
    name = type(array).__name__
    return "Tracer" not in name and "Symbolic" not in name


def power_of_two(xp: Any, exponent: Any) -> Any:
    """Returns 2**exponent exactly, for integer-valued float ``exponent`` in [-126, 126].

    ``pow(2, e)`` is not exact in every library (XLA and TensorFlow compute it as exp(e·ln 2));
    a product of the exact constants 2^±1, 2^±2, 2^±4 … 2^±64 chosen by e's bits is.
    """
    magnitude = xp.abs(exponent)
    negative = exponent < 0
    one = constant(xp, 1.0, exponent)
    result = xp.ones_like(exponent)
    for bit in range(7):
        half = xp.floor(magnitude / 2.0)
        set_bit = (magnitude - 2.0 * half) > 0
        magnitude = half
        up, down = constant(xp, 2.0 ** (2**bit), exponent), constant(xp, 2.0 ** -(2**bit), exponent)
        result = result * xp.where(set_bit, xp.where(negative, down, up), one)
    return result


def unit_scaled(xp: Any, array: Any, axes: tuple[int, ...]) -> tuple[Any, Any]:
    """Returns ``(array / f, f)``: f a power of two per index outside ``axes`` with max|array / f| ∈ [1, 2).

    Off NumPy the core computes in float32, where A·G overflows from about 1.8e19 · 1.8e19 and
    products of both signs then give inf − inf = NaN; NumPy's float64 does not. Scaling by a
    power of two is exact (no rounding changes, the results are bit-identical wherever nothing
    overflowed or underflowed), and undoing it on the result (``result · f``) saturates to ±inf
    only where float32 cannot hold the value, which the final clip turns into float32's max
    exactly as NumPy's cast does. ``f`` keeps ``axes`` as size-1 axes; it is 1 where the slice
    is all zero or not finite.
    """
    magnitude = xp.max(xp.abs(array), axis=axes, keepdims=True)
    usable = xp.isfinite(magnitude) & (magnitude > 0)
    exponent = xp.floor(xp.log2(xp.where(usable, magnitude, constant(xp, 1.0, magnitude))))
    exponent = xp.clip(exponent, -126.0, 126.0)
    factor = power_of_two(xp, exponent)
    return array * (1.0 / factor), factor
