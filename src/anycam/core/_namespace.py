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

_NUMPY_LIKE = (np.ndarray, np.generic, int, float, bool, list, tuple)


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
    try:
        import array_api_compat
    except ImportError:
        return np
    foreign = [a for a in arrays if a is not None and not isinstance(a, _NUMPY_LIKE)]
    if not all(array_api_compat.is_array_api_obj(a) for a in foreign):
        return np
    return array_api_compat.array_namespace(*foreign)


def device_of(array: Any) -> Any:
    """Returns the device of a non-NumPy array (array-api-compat's ``device``)."""
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
