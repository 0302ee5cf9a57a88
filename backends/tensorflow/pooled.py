"""Ablation-CAM's pooled-head closed form (ablation_head): global pooling → [dense] → tail.

Where the Keras graph after the layer is a global pooling read by per-row layers only
(``_keras.pooled_head``), zeroing a channel changes one pooled value, so the dense layer is
applied in closed form and only the tail runs, on all B·N feature rows as one batch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from anycam.core import TargetSpec
from anycam.protocol.backend import AblationHead, select_output

from .. import _keras
from .capture import Program, as_numpy, resolved

if TYPE_CHECKING:
    from .backend import TensorFlowBackend


class Tail:
    """A pooled head after its features (``_keras.PooledHead``), its layers held weakly.

    ``dense`` is the layer whose kernel and bias Ablation-CAM applies in closed form (None: the
    features are the pooled vectors); ``activation`` is that layer's activation, and ``layers``
    the ones after it (after the pooling without a dense layer), up to the model output.
    """

    def __init__(self, pooling: Any, dense: Any, layers: Sequence[Any]) -> None:
        self._pooling = weakref.ref(pooling)
        self._dense = None if dense is None else weakref.ref(dense)
        self.activation = None if dense is None else dense.activation
        self._layers = [weakref.ref(layer) for layer in layers]

    @staticmethod
    def _alive(ref: Callable[[], Any]) -> Any:
        layer = ref()
        if layer is None:  # pragma: no cover - the backend holds the model while it is used
            raise RuntimeError("a layer of this model no longer exists")
        return layer

    def pooling(self) -> Any:
        return self._alive(self._pooling)

    def dense(self) -> Any:
        return None if self._dense is None else self._alive(self._dense)

    def layers(self) -> list[Any]:
        return [self._alive(ref) for ref in self._layers]


def _tail(
    program: Program, kind: str, target: str, param: Any, features: tf.Tensor, indices: Any = None
) -> tf.Tensor:
    """The traced graph of ``ablation_head``'s tail: ``(B, N, K)`` scores of ``(B, N, F)`` feature rows."""
    program.trace_count += 1
    chosen, tail, row = param
    shape = tf.shape(features)
    # Every layer of the tail computes a row from that row alone (_keras.pooled_head), so
    # the B·N feature vectors run as one batch.
    hidden = tf.reshape(features, [-1, *row])
    if tail.activation is not None:
        hidden = tail.activation(hidden)
    for layer in tail.layers():
        hidden = layer(hidden, training=False)
    selected = select_output(hidden, program.selector)
    if target == "callable":
        # The callable sees each copy's (N, ...) output, as on the model itself.
        outputs = tf.reshape(selected, tf.concat([shape[:2], tf.shape(selected)[1:]], axis=0))

        def scores_of(output: tf.Tensor) -> tf.Tensor:
            return tf.cast(program.target_scores(target, chosen, output, None)[0], tf.float32)

        return tf.vectorized_map(scores_of, outputs)
    scores, _, _ = program.target_scores(target, chosen, selected, tf.tile(indices, [shape[0], 1]))
    return tf.reshape(tf.cast(scores, tf.float32), [shape[0], shape[1], chosen])


def ablation_head(
    backend: TensorFlowBackend,
    inputs: Any,
    target: TargetSpec,
    indices: np.ndarray | None,
    activations: np.ndarray,
    channel_axis: int,
) -> AblationHead | None:
    """Returns the network after the layer as global pooling → [dense] → tail, or None.

    Read from the Keras graph (``_keras.pooled_head``): the layer's output feeds exactly one
    ``GlobalAveragePooling{1,2,3}D`` / ``GlobalMaxPooling{1,2,3}D`` over all its spatial
    axes, then per-row layers only, each reading the previous one's output, to the model
    output; a ``Dense`` reached through ``Flatten`` / ``Reshape`` / dropout gives
    ``weight`` and ``bias``. Of a ``(features, head)`` pair the head is read. ``pooled`` is
    the model's own pooling of ``activations``; ``tail`` runs the rest (the dense layer's
    activation and every layer after it) on the B·N feature rows as one batch in one
    ``tf.function`` per (target form, shapes; B open) and applies the targets per copy.
    None for several layers, the ``"input"`` port, an ``output=`` selector, ``model_kwargs``,
    several inputs, non-float32 layers, and every other structure (branches, skip
    connections over the layer, shared layers, subclassed models): Ablation-CAM then runs
    the network after the layer on every copy.
    """
    # A native capture's tensor stays on the device; a NumPy one becomes a tensor once.
    values = activations if isinstance(activations, tf.Tensor) else tf.constant(np.asarray(activations))
    refused = len(backend.layers) != 1 or backend.ports[0] != "output" or backend.output is not None
    if refused or backend.model_kwargs or isinstance(inputs, (list, tuple, dict)):
        return None
    if values.dtype != tf.float32 or values.shape.rank < 3:
        return None
    batch, rank = int(values.shape[0]), values.shape.rank
    axis = int(channel_axis) % rank
    heads = backend._program.heads
    if (rank, axis) not in heads:
        heads[(rank, axis)] = _pooled_head(backend, rank, axis)
    tail = heads[(rank, axis)]
    if tail is None:
        return None
    form, param, extra = resolved(target, indices, batch)
    pooled_tensor = tail.pooling()(values)
    channels = int(values.shape[axis])
    if pooled_tensor.shape.num_elements() != batch * channels:
        return None
    pooled = as_numpy(pooled_tensor).reshape(batch, channels)
    dense = tail.dense()
    weight = bias = None
    row: tuple[int, ...] = tuple(pooled_tensor.shape[1:])
    if dense is not None:
        weight = as_numpy(tf.convert_to_tensor(dense.kernel))
        if dense.bias is not None:
            bias = as_numpy(tf.convert_to_tensor(dense.bias))
        row = (weight.shape[1],)
    spec = tf.TensorSpec((None, batch, weight.shape[1] if weight is not None else channels), tf.float32)
    specs = [tf.TensorSpec((None, param), tf.int64)] if form == "indices" else []
    compiled = backend._program.method_function(_tail, "tail", form, (param, tail, row), spec, *specs)

    def run(features: np.ndarray) -> np.ndarray:
        return as_numpy(compiled(tf.constant(np.asarray(features, dtype=np.float32)), *extra))

    return AblationHead(pooled, run, weight, bias)


def _pooled_head(backend: TensorFlowBackend, rank: int, axis: int) -> Tail | None:
    if isinstance(backend.model, keras.Layer):
        found = _keras.pooled_head(backend.model, backend.layers[0], rank, axis)
    else:
        head = backend.model[1]
        found = _keras.pooled_head(head, None, rank, axis, head=True) if isinstance(head, keras.Layer) else None
    if found is None:
        return None
    if found.dense is None:
        return Tail(found.pooling, None, found.steps)
    return Tail(found.pooling, found.steps[found.dense], found.steps[found.dense + 1 :])
