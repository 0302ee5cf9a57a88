"""The model's inputs: one tensor, list or dict → tensors of the model's dtype; the boundary checks.

Every check runs eagerly, before a compiled capture: dtype and rank against the model's declared
input, the layout's spatial axes, an empty batch and NaN/inf in the input that carries the
heatmap's grid. A forward failure the input's shape explains becomes anycam's InputError here; a
model's own exception keeps its type. Every path (captures, masked or ablated copies, guided
gradients) enters through :func:`structured`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from anycam._errors import AnycamError, InputError
from anycam.core import check_batch, forward_error, is_input_failure, non_finite_input, spatial_shape
from anycam.protocol.inputs import Key, ModelInputs, structure_inputs

from .layers import choose

if TYPE_CHECKING:
    from .backend import TensorFlowBackend


def _is_spatial(value: Any) -> bool:
    """A floating input with spatial axes: the default carrier of the heatmap's grid."""
    if isinstance(value, np.ndarray):
        return np.issubdtype(value.dtype, np.floating) and value.ndim >= 3
    return tf.is_tensor(value) and value.dtype.is_floating and value.shape.rank is not None and value.shape.rank >= 3


def _check_spatial(inputs: tf.Tensor, what: str) -> None:
    """Refuses an empty batch and NaN/inf in the input that carries the grid.

    Checked eagerly, before the compiled capture: inside ``tf.function`` a fused
    Conv+BiasAdd+ReLU can turn a NaN input into a finite map.
    """
    check_batch(tuple(inputs.shape), what)
    # A NaN or inf anywhere makes the sum NaN or inf: a finite sum (one pass) proves the input
    # finite; otherwise (a bad element, or an overflowing sum) it is checked element-wise.
    wide = tf.float64 if inputs.dtype == tf.float64 else tf.float32
    if bool(tf.math.is_finite(tf.reduce_sum(tf.cast(inputs, wide)))):
        return
    finite = tf.math.is_finite(inputs)
    if not bool(tf.reduce_all(finite)):
        bad = int(tf.reduce_sum(tf.cast(~finite, tf.int64)))
        raise non_finite_input(what, bool(tf.reduce_any(tf.math.is_nan(inputs))), bad)


def structured(backend: TensorFlowBackend, inputs: Any) -> ModelInputs:
    """Returns the call's inputs as one structure, every tensor converted and checked.

    One array is checked against the model's declared input; a list or dict (a Keras
    multi-input model) has each entry converted, the spatial one checked for a grid.
    """
    structure = structure_inputs(inputs, is_spatial=_is_spatial, spatial_input=backend.spatial_input)
    if structure.kind == "single":
        return structure.map(lambda key, value: as_input(backend, value))
    if not isinstance(backend.model, keras.Layer):
        raise InputError(
            f"a (features, head) pair takes one input tensor, got a {type(inputs).__name__} of "
            f"{len(structure.keys)}; close over the others in features"
        )
    return structure.map(lambda key, value: _convert(backend, key, value, key == structure.spatial))


def _not_floating(what: str, dtype: str, shape: tuple[Any, ...]) -> InputError:
    """The refusal of an integer (or bool) input that would carry the heatmap's grid, with the way out that fits it."""
    if len(shape) == 2:
        # (N, T) integers are token ids, not pixels: scaling them would feed the model nonsense.
        advice = (
            "token ids (N, T) cannot carry the map; embed them first and explain the model from its "
            "embeddings: Explainer((features, head), None, backend='tensorflow') with features taking "
            "the (N, T, D) floating-point embeddings, or give the ids beside a floating input and name "
            "that one with spatial_input="
        )
    else:
        advice = "an integer image is scaled to floats first, e.g. tf.cast(x, tf.float32) / 255"
    return InputError(
        f"{what} carries the heatmap's grid, so it must be floating point, got {dtype} of shape "
        f"{tuple(shape)}; {advice}"
    )


def _convert(backend: TensorFlowBackend, key: Key, value: Any, spatial: bool) -> tf.Tensor:
    what = f"input {key!r}"
    if isinstance(value, np.ndarray):
        value = tf.convert_to_tensor(value)
        if value.dtype.is_floating:
            value = tf.cast(value, keras.config.floatx())
    elif not (tf.is_tensor(value) or isinstance(value, tf.Variable)):
        raise InputError(f"{what} must be a tf.Tensor or a NumPy array, got {type(value).__name__}")
    value = tf.convert_to_tensor(value)
    if spatial:
        if not value.dtype.is_floating:
            raise _not_floating(what, value.dtype.name, tuple(value.shape))
        try:
            spatial_shape(tuple(value.shape), backend.input_layout)
        except InputError as exc:
            chosen = (
                f"spatial_input={backend.spatial_input!r} names it"
                if backend.spatial_input is not None
                else "it is the first floating input with three or more axes"
            )
            raise InputError(
                f"{what} carries the heatmap's grid ({chosen}), but: {exc}; name the input with spatial "
                "axes by spatial_input= (an index for a list, a key for a dict)"
            ) from exc
        _check_spatial(value, what)
    return value


def as_input(backend: TensorFlowBackend, inputs: Any) -> tf.Tensor:
    if isinstance(inputs, np.ndarray):
        if not np.issubdtype(inputs.dtype, np.floating):
            raise _not_floating("input", str(inputs.dtype), inputs.shape)
        inputs = tf.cast(tf.convert_to_tensor(inputs), backend._input_dtype)
    elif tf.is_tensor(inputs) or isinstance(inputs, tf.Variable):
        inputs = tf.convert_to_tensor(inputs)
    else:
        raise InputError(
            f"input must be a tf.Tensor or a NumPy array, got {type(inputs).__name__}"
        )
    if not inputs.dtype.is_floating:
        raise _not_floating("input", inputs.dtype.name, tuple(inputs.shape))
    shape = tuple(inputs.shape)
    expected = backend._input_shape
    if expected is not None and (
        len(shape) != len(expected)
        or any(e is not None and e != s for e, s in zip(expected[1:], shape[1:], strict=True))
    ):
        raise InputError(
            f"input of shape {shape} does not fit the model's input {expected} (None is "
            f"any size); the model expects rank {len(expected)}, batch first, in its "
            "training layout"
        )
    spatial_shape(shape, backend.input_layout)
    _check_spatial(inputs, "input")
    return inputs


def build(backend: TensorFlowBackend, inputs: Any) -> None:
    # Variables cannot be created inside the compiled capture: build an unbuilt model
    # once, eagerly, on one sample.
    if not backend._built:
        backend.model(tf.nest.map_structure(lambda t: t[:1], inputs), training=False, **backend.model_kwargs)
        backend._built = True


# Keras appends the call's arguments to an exception raised inside a layer ("Arguments received
# by X.call(): x=tf.Tensor(shape=...)"), so every such message names a shape; only the text
# before that part says what failed.
_KERAS_ARGUMENTS = re.compile(r"\n\s*Arguments received by ", re.MULTILINE)
# A tf.debugging assertion (or tf.Assert) of the model failed: its own check, never the input's shape.
_ASSERTION = re.compile(r"assertion failed|\bAssert(Guard)?\b")
# The layer whose call raised, as Keras names it.
_RAISED_IN = re.compile(r"Exception encountered when calling (\w+)\.call\(\)")
# What Keras says when a multi-input model does not take the structure given.
_STRUCTURE = re.compile(
    r"Missing data for input|named input\(s\)|expects \d+ input|input tensors|Input \d+ .* is incompatible|"
    r"Invalid input shape",
    re.IGNORECASE,
)


def failure_text(exc: BaseException) -> str:
    """Returns the message of a forward pass's exception without the arguments Keras appends."""
    return _KERAS_ARGUMENTS.split(str(exc), maxsplit=1)[0]


def _own(exc: BaseException) -> bool:
    """Whether a forward pass's failure is the model's own (a raise in its code, a failed assertion).

    A failed ``tf.debugging`` assertion is the model's; a built-in Keras layer refusing the tensor
    it was given (Keras names it: "Exception encountered when calling Conv2D.call()") is a shape
    or layout problem of the input; anything else is judged by its message, without the
    arguments Keras appends (which always name a shape).
    """
    text = failure_text(exc)
    if isinstance(exc, tf.errors.OpError) and _ASSERTION.search(text):
        return True
    raised_in = _RAISED_IN.search(text)
    if raised_in is not None and isinstance(getattr(keras.layers, raised_in.group(1), None), type):
        return False
    return not is_input_failure(RuntimeError(text))


def _note(exc: BaseException, structure: ModelInputs) -> None:
    exc.add_note(f"anycam: raised by the model on the inputs {structure.describe()}")


def run(backend: TensorFlowBackend, call: Callable[[], Any], structure: ModelInputs) -> Any:
    """Runs ``call``; a failure the input's shape explains becomes an InputError (its cause).

    A model's own exception (raised in its code, a failed ``tf.debugging`` assertion) keeps
    its type, with a note naming the input. Several inputs are left to ``naming_inputs``,
    which names the inputs given.
    """
    try:
        return call()
    except AnycamError:
        raise
    except (ValueError, TypeError, IndexError, tf.errors.InvalidArgumentError) as exc:
        if structure.kind != "single":
            raise
        if _own(exc):
            _note(exc, structure)
            raise
        shape = tuple(structure.spatial_value.shape)
        # The message without Keras's argument dump where that still reads as a shape failure; a
        # built-in layer's refusal that names no shape word keeps the whole message.
        error = forward_error(RuntimeError(failure_text(exc)), shape, backend.input_layout)
        error = error or forward_error(exc, shape, backend.input_layout)
        if error is None:  # pragma: no cover - Keras's argument dump always names a shape
            raise
        raise error from exc


def model_inputs(backend: TensorFlowBackend, inputs: Any) -> tuple[Any, tf.Tensor, Key]:
    """Returns (the inputs as the model takes them, the input carrying the grid, its key), the model ready.

    The one boundary of every path (captures, Score-CAM's masked copies, Ablation-CAM's copies,
    the guided methods): one tensor or several (a list or dict), each converted and checked
    by :func:`structured`.
    """
    structure = structured(backend, inputs)
    # ready: a layer=None Explainer whose first call is not a capture (guided-backprop) chooses here.
    return ready(backend, structure), structure.spatial_value, structure.spatial


def spatial_of(inputs: Any, key: Key) -> tf.Tensor:
    """Returns the input that carries the grid from the inputs as the model takes them."""
    if isinstance(inputs, dict):
        return inputs[key]
    return inputs[int(key)] if isinstance(inputs, (list, tuple)) else inputs


def ready(backend: TensorFlowBackend, structure: ModelInputs) -> Any:
    """Returns the inputs as the model takes them (a tensor, list or dict), the model built."""
    x = structure.container()
    build(backend, x)
    if backend.auto_layer and not backend.layer_names:
        choose(backend, x, structure.spatial_value)
    return x


@contextlib.contextmanager
def naming_inputs(structure: ModelInputs) -> Iterator[None]:
    """Wraps the model's refusal of several inputs (a missing or unknown key, a wrong shape) with the inputs given.

    A model's own exception keeps its type (with a note naming the inputs).
    """
    try:
        yield
    except (ValueError, TypeError, KeyError) as exc:
        if structure.kind == "single" or isinstance(exc, AnycamError):
            raise
        refused = isinstance(exc, KeyError) and structure.kind == "keyword"
        if not refused and not _STRUCTURE.search(failure_text(exc)) and _own(exc):
            _note(exc, structure)
            raise
        raise InputError(
            f"the model does not accept the inputs given ({structure.describe()}): {type(exc).__name__}: "
            f"{' '.join(failure_text(exc).split())}; pass a dict with the model's input names, or a list in "
            "the order of model.inputs"
        ) from exc
