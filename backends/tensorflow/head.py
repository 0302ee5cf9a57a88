"""The network after the layer, run on Ablation-CAM's copies of its output (head_scores, ablation_scorer).

Each copy replaces the first explained layer's output while the model runs once under
``tf.vectorized_map``: the network before the layer is computed once, unbatched, and the layers
after it run on all B·N copies at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from anycam._errors import InputError, TargetError
from anycam.core import TargetSpec
from anycam.protocol.backend import select_output

from .capture import Program, as_numpy, resolved
from .inputs import model_inputs

if TYPE_CHECKING:
    from .backend import TensorFlowBackend


def _head(
    program: Program,
    kind: str,
    target: str,
    param: Any,
    inputs: Any,
    replacements: tf.Tensor,
    indices: Any = None,
) -> tf.Tensor:
    """The traced graph of ``head_scores``: ``(B, N, K)`` scores, one forward per copy, vectorised."""
    program.trace_count += 1

    def scores_of(replacement: tf.Tensor) -> tf.Tensor:
        output, _ = program.forward(inputs, None, replacement)
        scores, _, _ = program.target_scores(target, param, select_output(output, program.selector), indices)
        return tf.cast(scores, tf.float32)

    # pfor: an op none of whose inputs depends on the mapped replacement (the network before
    # the layer, and any tensor a skip connection carries around it) is created once,
    # unbatched; the ops after the layer are converted to run on all B·N copies at once.
    return tf.vectorized_map(scores_of, replacements)


def _ablate(
    program: Program,
    kind: str,
    target: str,
    param: Any,
    inputs: Any,
    activations: tf.Tensor,
    channels: tf.Tensor,
    indices: Any = None,
) -> tf.Tensor:
    """The traced graph of ``ablation_scorer``: ``(B, N, K)`` scores, channel ``channels[b]`` zeroed."""
    program.trace_count += 1
    axis = param[1] % activations.shape.rank
    shape = [1] * activations.shape.rank
    shape[axis] = -1

    def scores_of(channel: tf.Tensor) -> tf.Tensor:
        keep = tf.cast(tf.not_equal(tf.range(tf.shape(activations)[axis]), channel), activations.dtype)
        output, _ = program.forward(inputs, None, activations * tf.reshape(keep, shape))
        scores, _, _ = program.target_scores(target, param[0], select_output(output, program.selector), indices)
        return tf.cast(scores, tf.float32)

    return tf.vectorized_map(scores_of, channels)


def head_scores(
    backend: TensorFlowBackend, inputs: Any, replacements: np.ndarray, target: TargetSpec, indices: np.ndarray | None
) -> np.ndarray:
    """Returns ``(B, N, K)`` float32 scores with the first layer's output replaced by each copy.

    One ``tf.function`` per (target form, input and layer shapes; B and N open) runs the
    model once, its first explained layer's ``call`` returning the replacement, under
    ``tf.vectorized_map`` over the B copies. The vectorizer creates every op that does not
    depend on the replacement once, unbatched — the network before the layer, and tensors
    that skip connections carry around it, which therefore stay correct — and runs the ops
    after the layer on all B·N copies at once. Ops without a vectorization rule fall back
    to a loop over the copies for that op (TensorFlow warns), still correct. A
    ``(features, head)`` pair runs only ``head``.

    Raises:
        anycam.InputError: replacements of another shape than the layer's output.
    """
    x, spatial, _ = model_inputs(backend, inputs)
    batch = int(spatial.shape[0])
    form, param, extra = resolved(target, indices, batch)
    values = np.asarray(replacements, dtype=np.float32)
    if values.ndim < 2 or values.shape[1] != batch:
        raise InputError(
            f"replacements must be (B, N, *layer_shape) with N={batch}, got shape {values.shape}"
        )
    specs = [tf.TensorSpec((None, None, *values.shape[2:]), tf.float32)]
    specs += [tf.TensorSpec((None, param), tf.int64)] if form == "indices" else []
    compiled = backend._program.method_function(_head, "head", form, param, x, *specs)
    scores = as_numpy(compiled(x, tf.constant(values), *extra))
    if form == "callable" and scores.shape[1] != batch:
        raise TargetError(f"a callable target must return (N,) or (N, K) scores with N={batch}")
    return scores


def ablation_scorer(
    backend: TensorFlowBackend,
    inputs: Any,
    target: TargetSpec,
    indices: np.ndarray | None,
    activations: np.ndarray,
    channel_axis: int,
) -> Callable[[np.ndarray], np.ndarray]:
    """Returns ``f(channels (B,)) -> (B, N, K)``: scores with channel ``channels[b]`` zeroed.

    As ``head_scores``, with each copy made inside the vectorized function from one
    ``activations`` tensor and the B channel indices: no B·N copies are built in NumPy and
    fed in. One ``tf.function`` per (target form, input and layer shapes).
    """
    x, spatial, _ = model_inputs(backend, inputs)
    batch = int(spatial.shape[0])
    form, param, extra = resolved(target, indices, batch)
    if isinstance(activations, tf.Tensor):  # a native capture's tensor stays on the device
        values = tf.cast(activations, tf.float32)
    else:
        values = tf.constant(np.asarray(activations, dtype=np.float32))
    if values.shape.rank < 2 or values.shape[0] != batch:
        raise InputError(f"activations must be (N, ...) with N={batch}, got shape {tuple(values.shape)}")
    axis = int(channel_axis) % values.shape.rank
    specs = [tf.TensorSpec((None, *values.shape[1:]), tf.float32), tf.TensorSpec((None,), tf.int32)]
    specs += [tf.TensorSpec((None, param), tf.int64)] if form == "indices" else []
    compiled = backend._program.method_function(_ablate, "ablate", form, (param, axis), x, *specs)

    def scores(channels: np.ndarray) -> np.ndarray:
        chosen = tf.constant(np.asarray(channels, dtype=np.int32))
        return as_numpy(compiled(x, values, chosen, *extra))

    return scores
