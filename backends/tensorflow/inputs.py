"""The model's inputs: one tensor, list or dict → tensors of the model's dtype; the boundary checks.

Every check runs eagerly, before a compiled capture: dtype and rank against the model's declared
input, the layout's spatial axes, an empty batch and NaN/inf in the input that carries the
heatmap's grid. A framework error of the forward pass becomes anycam's InputError here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from anycam._errors import AnycamError, InputError
from anycam.core import check_batch, forward_error, non_finite_input, spatial_shape
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
            raise InputError(
                f"{what} carries the heatmap's grid, so it must be floating point, got {value.dtype.name}"
            )
        spatial_shape(tuple(value.shape), backend.input_layout)
        _check_spatial(value, what)
    return value


def as_input(backend: TensorFlowBackend, inputs: Any) -> tf.Tensor:
    if isinstance(inputs, np.ndarray):
        if not np.issubdtype(inputs.dtype, np.floating):
            raise InputError(
                f"input must be floating point, got dtype {inputs.dtype}; scale it to "
                "floats first, e.g. x.astype('float32') / 255"
            )
        inputs = tf.cast(tf.convert_to_tensor(inputs), backend._input_dtype)
    elif tf.is_tensor(inputs) or isinstance(inputs, tf.Variable):
        inputs = tf.convert_to_tensor(inputs)
    else:
        raise InputError(
            f"input must be a tf.Tensor or a NumPy array, got {type(inputs).__name__}"
        )
    if not inputs.dtype.is_floating:
        raise InputError(
            f"input must be floating point, got {inputs.dtype.name}; e.g. "
            "tf.cast(x, tf.float32) / 255"
        )
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


def run(backend: TensorFlowBackend, call: Callable[[], Any], structure: ModelInputs) -> Any:
    """Runs ``call``; a framework error of the forward pass becomes an InputError (its cause).

    Several inputs are left to ``naming_inputs``, which names the inputs given.
    """
    try:
        return call()
    except AnycamError:
        raise
    except (ValueError, TypeError, IndexError, tf.errors.InvalidArgumentError) as exc:
        if structure.kind != "single":
            raise
        error = forward_error(exc, tuple(structure.spatial_value.shape), backend.input_layout)
        if error is None:  # the model's own exception: its type, with a note
            raise
        raise error from exc


def ready(backend: TensorFlowBackend, structure: ModelInputs) -> Any:
    """Returns the inputs as the model takes them (a tensor, list or dict), the model built."""
    x = structure.container()
    build(backend, x)
    if backend.auto_layer and not backend.layer_names:
        choose(backend, x, structure.spatial_value)
    return x


@contextlib.contextmanager
def naming_inputs(structure: ModelInputs) -> Iterator[None]:
    """Wraps the model's refusal of several inputs (a missing or unknown key) with the inputs given."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as exc:
        if structure.kind == "single" or isinstance(exc, AnycamError):
            raise
        raise InputError(
            f"the model does not accept the inputs given ({structure.describe()}): {type(exc).__name__}: "
            f"{exc}; pass a dict with the model's input names, or a list in the order of model.inputs"
        ) from exc
