"""The explained layers of a TensorFlow model: taps on a Keras layer's ``call``, the (features, head) pair.

A forward (``KerasForward`` or ``PairForward``) runs the model once with each explained layer's
output handed to a ``GradientTape`` (``_watched``), or replaced by a given tensor (Ablation-CAM's
copies). ``choose`` makes the ``layer="auto"`` choice from one eager pass through every layer.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from anycam._errors import InputError, LayerError
from anycam.core import spatial_shape

from .. import _keras

if TYPE_CHECKING:
    from .backend import TensorFlowBackend

_CHOOSE_LOCK = threading.Lock()  # one automatic layer choice at a time
_Ran = tuple[Any, list[tf.Tensor]]  # a forward pass: (model output, captured layer outputs)


def _call(part: Any, tensor: tf.Tensor) -> Any:
    if isinstance(part, keras.Layer):
        return part(tensor, training=False)
    return part(tensor)


def _watched(output: Any, name: str, tape: tf.GradientTape | None) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns ``(leaf, downstream)``: the float32 tensor the tape watches, and what flows on.

    A float16/bfloat16 output is upcast for the tape and cast back for the rest of the model
    (exact), so gradients arrive in float32.
    """
    if not tf.is_tensor(output) or not output.dtype.is_floating:
        kind = f"a {type(output).__name__}"
        if tf.is_tensor(output):
            kind = f"a {output.dtype.name} tensor"
        raise LayerError(
            f"layer {name!r} returns {kind}, not a floating-point tensor; explain a layer whose output is a feature map"
        )
    leaf = output if output.dtype == tf.float32 else tf.cast(output, tf.float32)
    if tape is not None:
        tape.watch(leaf)  # before the cast back, or the tape would not record that cast
    return leaf, (leaf if leaf is output else tf.cast(leaf, output.dtype))


class KerasForward:
    """Runs a Keras model with its explained layers intercepted; holds them only weakly."""

    def __init__(
        self,
        model: Any,
        layers: Sequence[Any],
        names: Sequence[str],
        ports: Sequence[str] | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.kwargs = dict(kwargs or {})
        self._model = weakref.ref(model)
        self._layers = [weakref.ref(layer) for layer in layers]
        self.names = tuple(names)
        self.ports = tuple(ports) if ports is not None else ("output",) * len(self.names)

    @property
    def model(self) -> Any:
        model = self._model()
        if model is None:  # pragma: no cover - the backend holds the model while it is used
            raise RuntimeError("the model of this capture no longer exists")
        return model

    def __call__(self, inputs: tf.Tensor, tape: tf.GradientTape | None, replacement: Any = None) -> _Ran:
        """Runs the model; with a ``replacement``, the first layer returns it instead of its output."""
        captured: dict[int, tf.Tensor] = {}

        def tap(index: int, value: Any) -> tf.Tensor:
            leaf, downstream = _watched(value, self.names[index], tape)
            captured[index] = leaf
            return downstream

        layers = [ref() for ref in self._layers]
        names, ports = self.names, self.ports
        if replacement is not None:
            layers, names, ports = layers[:1], names[:1], ports[:1]

        def replace(index: int, value: Any) -> Any:
            tap(index, value)
            if not replacement.shape[1:].is_compatible_with(value.shape[1:]):
                raise InputError(
                    f"a replacement for layer {names[index]!r} has per-sample shape "
                    f"{tuple(replacement.shape[1:])}, but the layer outputs {tuple(value.shape[1:])}; "
                    "pass (B, N, *layer_shape) replacements in the layer's layout"
                )
            return tf.cast(replacement, value.dtype)

        def forward() -> Any:
            return self.model(inputs, training=False, **self.kwargs)

        output = _keras.run(forward, layers, names, tap if replacement is None else replace, ports)
        return output, [captured[index] for index in range(len(names))]


class PairForward:
    """Runs ``head(features(x))`` with ``features(x)`` watched."""

    names = ("features",)

    def __init__(self, features: Any, head: Any) -> None:
        self.features = features
        self.head = head

    def __call__(self, inputs: tf.Tensor, tape: tf.GradientTape | None, replacement: Any = None) -> _Ran:
        if replacement is not None:  # the head alone: nothing before the layer is needed
            return _call(self.head, replacement), []
        leaf, downstream = _watched(_call(self.features, inputs), "features", tape)
        return _call(self.head, downstream), [leaf]


def is_feature(value: Any) -> bool:
    return tf.is_tensor(value) and value.dtype.is_floating


def choose(backend: TensorFlowBackend, inputs: Any, spatial: tf.Tensor) -> None:
    """Chooses the layer for ``layer="auto"`` from one eager pass through every layer, once."""
    with _CHOOSE_LOCK:
        if backend.layer_names:
            return
        records, paths = _keras.layer_records(
            backend.model, lambda: backend.model(inputs, training=False, **backend.model_kwargs), is_feature
        )
        input_spatial = spatial_shape(tuple(spatial.shape), backend.input_layout)
        chosen, note = _keras.auto_choice(records, paths, int(spatial.shape[0]), input_spatial)
        backend._set_layers([(chosen, paths[chosen], "output")])
        if note is not None:  # chosen for holding the attention's (N, T, C) tokens: that is its layout
            backend.auto_note, backend.layouts = note, ("tokens",)
