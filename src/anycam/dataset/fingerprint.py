"""Fingerprints of what a store is written from: the model's weights and each batch's inputs.

A resumed or repeated run compares them with the stored ones, so a store never mixes maps of two
models or of two versions of the data. The weights are read through the objects' own methods
(``state_dict`` in torch, ``weights`` in Keras, the parameter pytree of the JAX backend), so no
framework is imported here.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

#: Models whose weights take up to this many bytes are hashed whole; larger ones by their shapes
#: and a strided sample of every tensor (an update of the weights, as in fine-tuning, moves the
#: sample too; a change confined to a few unsampled values goes unseen).
WHOLE_BYTES = 256 * 2**20
SAMPLE = 4096


def _numpy(value: Any) -> np.ndarray | None:
    """Returns a framework tensor as NumPy (bfloat16 as float32), or None for a non-array."""
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
        try:
            return np.asarray(value)
        except TypeError:  # bfloat16 has no NumPy dtype
            return np.asarray(value.float())
    if hasattr(value, "numpy") and callable(value.numpy):  # tf.Variable, keras.Variable
        value = value.numpy()
    try:
        array = np.asarray(value)
    except Exception:  # an object NumPy cannot take is simply not fingerprinted
        return None
    return None if array.dtype == object else array


def _weights(explainer: Any) -> list[tuple[str, Any]] | None:
    """Returns the named weights of the explained model, or None where they cannot be reached."""
    backend = getattr(explainer, "backend", None)
    model = getattr(backend, "model", None)
    state_dict = getattr(model, "state_dict", None)
    if callable(state_dict):  # torch: parameters and buffers (BatchNorm statistics)
        return sorted(state_dict().items())
    weights = getattr(model, "weights", None)
    if isinstance(weights, (list, tuple)):  # Keras
        return [(str(getattr(w, "path", getattr(w, "name", i))), w) for i, w in enumerate(weights)]
    resolved = getattr(backend, "_model", None)
    snapshot = getattr(resolved, "snapshot", None)
    jax = sys.modules.get("jax")
    if callable(snapshot) and jax is not None:  # the JAX backend: (program, params)
        leaves = jax.tree_util.tree_leaves_with_path(snapshot()[1])
        return [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves]
    return None


def weights_digest(explainer: Any) -> str | None:
    """Returns ``"sha256:…"`` of the model's weights (whole, or shapes + a sample when large).

    None where the backend's weights cannot be reached; the store then relies on the rest of
    its fingerprint (configuration, ids, inputs) and on ``metadata=``.
    """
    named = _weights(explainer)
    if named is None:
        return None
    arrays = [(name, _numpy(value)) for name, value in named]
    total = sum(a.nbytes for _, a in arrays if a is not None)
    whole = total <= WHOLE_BYTES
    digest = hashlib.sha256(b"whole" if whole else b"sampled")
    for name, array in arrays:
        digest.update(name.encode())
        if array is None:
            continue
        digest.update(f"{array.dtype}{array.shape}".encode())
        flat = np.ascontiguousarray(array).reshape(-1)
        if not whole and flat.size > SAMPLE:
            flat = np.ascontiguousarray(flat[:: -(-flat.size // SAMPLE)])
        digest.update(flat.view(np.uint8).data)
    return f"sha256:{digest.hexdigest()[:32]}" + ("" if whole else " (shapes and a sample)")


def _leaves(inputs: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(inputs, Mapping):
        for key in sorted(inputs, key=str):
            for name, leaf in _leaves(inputs[key]):
                yield f"{key}/{name}", leaf
    elif isinstance(inputs, (list, tuple)):
        for index, item in enumerate(inputs):
            for name, leaf in _leaves(item):
                yield f"{index}/{name}", leaf
    else:
        yield "", inputs


def inputs_digest(inputs: Any) -> str | None:
    """Returns a short sha256 of a batch's input values (dtype and shape included), or None.

    None when some input is not an array (a list of strings, an object NumPy cannot take).
    """
    digest = hashlib.sha256()
    for name, leaf in _leaves(inputs):
        array = _numpy(leaf)
        if array is None:
            return None
        digest.update(f"{name}:{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)  # no copy
    return digest.hexdigest()[:32]
