"""Keras 3 ``MultiHeadAttention`` run in its explicit form, its probabilities handed to a hook.

Keras 3 computes ``MultiHeadAttention`` through ``ops.dot_product_attention`` — the backend's
fused kernel (cuDNN/flash where available), which never builds the probabilities — whenever
dropout is 0, the scores are not asked for and the inputs have one attention axis; only
otherwise does ``_compute_attention`` run the einsum, masked softmax and einsum. While a model
is explained, each ``MultiHeadAttention`` layer's ``_compute_attention`` is replaced, for the
calling thread only, by the explicit form built from the layer's own equations, scale, causal
mask and masked softmax, and the probabilities ``A`` go through ``hook(name, A)``, which may
watch them (TensorFlow's tape) or add a zero delta (JAX) so that ∂score/∂A exists. The
original method is back in ``finally``; the layer's weights are only read. Shared by the
TensorFlow, JAX and torch Keras adapters.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import keras

from anycam._errors import BackendError, UnsupportedError

from .intercept import _MISSING, _PATCH_LOCK
from .layers import layer_paths

Hook = Callable[[str, Any], Any]
"""``hook(name, probabilities) -> probabilities``: sees each attention call's ``(N, H, T, S)`` probabilities."""


def attention_layers(model: Any) -> list[tuple[str, Any]]:
    """Returns ``(path, layer)`` of every ``keras.layers.MultiHeadAttention`` in ``model`` (itself included).

    Raises:
        anycam.UnsupportedError: a subclass overrides ``_compute_attention`` (anycam cannot know
            what it computes), or the model has no ``MultiHeadAttention`` at all.
    """
    found: dict[int, tuple[str, Any]] = {}
    candidates = [("", model), *layer_paths(model).items()]
    for path, layer in candidates:
        if isinstance(layer, keras.layers.MultiHeadAttention) and id(layer) not in found:
            found[id(layer)] = (path or layer.name, layer)
    if not found:
        raise UnsupportedError(
            f"the Keras {type(model).__name__} has no keras.layers.MultiHeadAttention layer; the attention "
            "methods read the probabilities of MultiHeadAttention (GroupedQueryAttention and custom attention "
            "layers are not read)"
        )
    for path, layer in found.values():
        if type(layer)._compute_attention is not keras.layers.MultiHeadAttention._compute_attention:
            raise UnsupportedError(
                f"the attention layer {path!r} ({type(layer).__name__}) overrides _compute_attention, so anycam "
                "cannot run it in its explicit form; the attention methods read keras.layers.MultiHeadAttention "
                "as Keras defines it"
            )
    return list(found.values())


def _explicit(layer: Any, name: str, hook: Hook) -> Callable[..., Any]:
    """Returns ``_compute_attention`` for ``layer`` in its explicit form: softmax(q kᵀ/√d + mask) @ v."""
    ops = keras.ops

    def compute_attention(
        query: Any,
        key: Any,
        value: Any,
        attention_mask: Any = None,
        training: Any = None,
        return_attention_scores: bool = False,
        use_causal_mask: bool = False,
    ) -> tuple[Any, Any]:
        if layer._dropout > 0.0 and training:
            raise BackendError(f"the attention {name!r} applies dropout: the model runs in training mode")
        if use_causal_mask:  # what Keras's own explicit path does when the fused causal kernel is skipped
            causal = layer._compute_causal_mask(query, value)
            attention_mask = (
                causal if attention_mask is None else ops.logical_and(ops.cast(attention_mask, "bool"), causal)
            )
        query = ops.multiply(query, ops.cast(layer._inverse_sqrt_key_dim, query.dtype))
        scores = ops.einsum(layer._dot_product_equation, key, query)
        probabilities = hook(name, layer._masked_softmax(scores, attention_mask))
        output = ops.einsum(layer._combine_equation, probabilities, value)
        return output, (probabilities if return_attention_scores else None)

    return compute_attention


@contextlib.contextmanager
def explicit_attention(model: Any, hook: Hook) -> Iterator[list[str]]:
    """Runs every ``MultiHeadAttention`` of ``model`` explicitly (this thread only) while the block runs.

    Yields the list the names of the attention calls are appended to, in execution order.
    """
    layers = attention_layers(model)
    owner = threading.get_ident()
    calls: list[str] = []

    def recorded(name: str, probabilities: Any) -> Any:
        calls.append(name)
        return hook(name, probabilities)

    saved: list[tuple[Any, Any]] = []
    with _PATCH_LOCK:
        try:
            for name, layer in layers:
                original = layer._compute_attention
                explicit = _explicit(layer, name, recorded)

                @functools.wraps(original)
                def compute(*args: Any, __original: Any = original, __explicit: Any = explicit, **kwargs: Any) -> Any:
                    if threading.get_ident() != owner:
                        return __original(*args, **kwargs)
                    return __explicit(*args, **kwargs)

                saved.append((layer, layer.__dict__.get("_compute_attention", _MISSING)))
                # object.__setattr__: Keras's __setattr__ would try to track the function.
                object.__setattr__(layer, "_compute_attention", compute)
            yield calls
        finally:
            for layer, value in reversed(saved):
                if value is _MISSING:
                    object.__delattr__(layer, "_compute_attention")
                else:
                    object.__setattr__(layer, "_compute_attention", value)
