"""Ablation-CAM's pooled head read from the Keras graph: global pooling, then per-row layers to the output.

``pooled_head`` answers whether the network after a layer is a global per-channel pooling read
by layers that compute each row of a batch on its own (so a closed form replaces running every
copy), and returns those layers, with the index of a ``Dense`` layer that reads the pooled vector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras

from .layers import all_layers

_L = keras.layers
_POOLINGS = {
    _L.GlobalAveragePooling1D: 1,
    _L.GlobalAveragePooling2D: 2,
    _L.GlobalAveragePooling3D: 3,
    _L.GlobalMaxPooling1D: 1,
    _L.GlobalMaxPooling2D: 2,
    _L.GlobalMaxPooling3D: 3,
}
# Identities at inference (training=False), the only mode anycam runs a model in.
_INFERENCE_IDENTITIES = (
    _L.Dropout,
    _L.SpatialDropout1D,
    _L.SpatialDropout2D,
    _L.SpatialDropout3D,
    _L.GaussianDropout,
    _L.GaussianNoise,
    _L.AlphaDropout,
    _L.Identity,
)
# Layers that compute each row of a batch from that row alone (exact types: a subclass may
# override call), so the tail can run B·N feature rows as one batch.
_PER_ROW = (
    *_INFERENCE_IDENTITIES,
    _L.Dense,
    _L.Activation,
    _L.Softmax,
    _L.ReLU,
    _L.LeakyReLU,
    _L.ELU,
    _L.PReLU,
    _L.Flatten,
    _L.Reshape,
    _L.BatchNormalization,
    _L.LayerNormalization,
)


@dataclasses.dataclass(frozen=True)
class PooledHead:
    """The network after an explained layer that only a global per-channel pooling reads.

    Attributes:
        pooling: the ``GlobalAveragePooling{1,2,3}D`` / ``GlobalMaxPooling{1,2,3}D`` layer.
        steps: the layers after the pooling, in order, up to the model output; each reads only
            the previous one's output and computes every row of a batch on its own.
        dense: the index in ``steps`` of a ``Dense`` layer that reads the pooled vector as
            ``(N, C)`` through shape-only steps (``Flatten``, ``Reshape``, dropout), or None.
    """

    pooling: Any
    steps: tuple[Any, ...]
    dense: int | None


def _own_call(layer: Any, base: type[Any]) -> bool:
    """Whether ``layer`` is a ``base`` whose ``call`` is ``base``'s own (not overridden)."""
    return isinstance(layer, base) and type(layer).call is base.call


def _functional_class(layer: Any) -> type[Any] | None:
    return next((cls for cls in type(layer).__mro__ if cls.__name__ == "Functional"), None)


def _graph_nodes(model: Any) -> list[Any]:
    return [node for nodes in model._nodes_by_depth.values() for node in nodes if not node.is_input]


def _single_call(node: Any, tensor: Any) -> bool:
    """Whether ``node`` calls its layer on ``tensor`` alone and has one output.

    Keyword arguments may only be None (a nested model's call records ``mask=None``), the
    defaults: ``Dropout()(x, training=True)`` would stay random at inference.
    """
    args, kwargs = node.arguments.args, node.arguments.kwargs
    defaults = all(value is None for value in kwargs.values())
    return len(args) == 1 and args[0] is tensor and defaults and len(node.outputs) == 1


def _contains(layer: Any, target: Any) -> bool:
    return any(inner is target for inner in all_layers(layer))


def _chain(layer: Any) -> list[Any] | None:
    """Returns what ``layer`` computes as a chain of per-row layers, input to output, or None."""
    if _own_call(layer, keras.Sequential):
        return _chains(layer.layers)
    functional = _functional_class(layer)
    if functional is not None:
        if type(layer).call is not functional.call or len(layer.inputs) != 1 or len(layer.outputs) != 1:
            return None
        return _walk(layer, layer.inputs[0])
    return [layer] if type(layer) in _PER_ROW or type(layer) in _POOLINGS else None


def _chains(layers: Sequence[Any]) -> list[Any] | None:
    steps: list[Any] = []
    for layer in layers:
        chain = _chain(layer)
        if chain is None:
            return None
        steps += chain
    return steps


def _walk(model: Any, tensor: Any) -> list[Any] | None:
    """Returns the chain from ``tensor`` to the single output of a Functional ``model``, or None
    where ``tensor`` (or a tensor after it) is read by several layers, or a layer reads more."""
    nodes = _graph_nodes(model)
    steps: list[Any] = []
    while True:
        # Functional graphs hold only the nodes that lead to an output (map_graph walks back
        # from the outputs), so a consumer here is one the output depends on.
        readers = [node for node in nodes if any(t is tensor for t in node.input_tensors)]
        if not readers:
            return steps if len(model.outputs) == 1 and tensor is model.outputs[0] else None
        if len(readers) != 1 or not _single_call(readers[0], tensor):
            return None
        chain = _chain(readers[0].operation)
        if chain is None:
            return None
        steps += chain
        tensor = readers[0].outputs[0]


def _after(model: Any, layer: Any) -> list[Any] | None:
    """Returns the chain from ``layer``'s output to ``model``'s output, where ``layer`` runs
    exactly once inside ``model`` (nested models included), or None."""
    if _own_call(model, keras.Sequential):
        inner = list(model.layers)
        positions = [i for i, step in enumerate(inner) if step is layer or _contains(step, layer)]
        if len(positions) != 1:
            return None
        index = positions[0]
        before = [] if inner[index] is layer else _after(inner[index], layer)
        rest = _chains(inner[index + 1 :])
        return None if before is None or rest is None else before + rest
    functional = _functional_class(model)
    if functional is None or type(model).call is not functional.call or len(model.outputs) != 1:
        return None
    holders = [n for n in _graph_nodes(model) if n.operation is layer or _contains(n.operation, layer)]
    if len(holders) != 1 or len(holders[0].outputs) != 1:
        return None
    node = holders[0]
    before = [] if node.operation is layer else _after(node.operation, layer)
    rest = _walk(model, node.outputs[0])
    return None if before is None or rest is None else before + rest


def pooled_head(model: Any, layer: Any, rank: int, channel_axis: int, *, head: bool = False) -> PooledHead | None:
    """Returns the network after ``layer`` as a :class:`PooledHead`, or None where it is not one.

    Only certain structures qualify: ``layer`` runs once in ``model`` (a Sequential or
    Functional model, nested ones included, none with its own ``call``), its output is read by
    exactly one layer, a global pooling over all the spatial axes of a rank-``rank`` output in
    the layout ``channel_axis`` gives, and every layer after it reads only the previous layer's
    output (no skip connection over the layer, no second input) and is a known per-row layer
    (``Dense``, activations, normalisations, dropout, ``Flatten``, ``Reshape``) computing in
    float32. ``head=True``: ``model`` is the head of a ``(features, head)`` pair and ``layer``
    is ignored: the chain starts at the head's input.
    """
    steps = _chain(model) if head else (None if layer is model else _after(model, layer))
    if not steps or _POOLINGS.get(type(steps[0])) != rank - 2:
        return None
    pooling, rest = steps[0], tuple(steps[1:])
    first = pooling.data_format == "channels_first"
    if (channel_axis % rank == 1) != first or rank < 3:
        return None
    floats = [pooling, *rest] if head else [layer, pooling, *rest]
    if any(getattr(step, "compute_dtype", None) != "float32" for step in floats):
        return None
    # Until the dense layer the pooled tensor keeps one axis of length C (size-1 axes besides),
    # so Flatten and Reshape keep the channel order whatever their data_format.
    width = rank if pooling.keepdims else 2
    dense = None
    for index, step in enumerate(rest):
        if isinstance(step, _INFERENCE_IDENTITIES):
            continue
        if type(step) is _L.Flatten:
            width = 2
        elif type(step) is _L.Reshape and sum(size != 1 for size in step.target_shape) <= 1:
            width = 1 + len(step.target_shape)
        elif type(step) is _L.Dense and width == 2 and _float_kernel(step):
            dense = index
            break
        else:
            break
    return PooledHead(pooling, rest, dense)


def _float_kernel(dense: Any) -> bool:
    return getattr(dense, "quantization_mode", None) is None and str(dense.kernel.dtype) == "float32"
