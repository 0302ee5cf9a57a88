"""Guided Backpropagation: the guided ReLU rule, its installation in one traced graph, its coverage report.

The rule (Springenberg et al. 2015) is a registered gradient that the traced graph's
``gradient_override_map`` gives to every ``Relu`` op the model creates while it traces; nothing
is patched, so the model and every other function keep the ordinary gradient. The input
gradients come from ``tf.gradients``, which honours the override (a tape does not). ReLUs inside
a nested ``tf.function`` or a ``tf.cond``/``tf.while_loop`` body are out of the override's reach:
they are counted, and a warning says the result is only partly guided.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from anycam._errors import AnycamWarning, TargetError, user_stacklevel
from anycam.core import TargetSpec, spatial_shape
from anycam.protocol.backend import Capture, select_output

from .capture import Program, as_numpy, given_indices, resolved_targets
from .inputs import model_inputs, spatial_of

if TYPE_CHECKING:
    from .backend import TensorFlowBackend

_GUIDED_RELU = "AnycamGuidedRelu"


@tf.RegisterGradient(_GUIDED_RELU)
def _guided_relu_gradient(op: Any, gradient: tf.Tensor) -> tf.Tensor:
    # Springenberg et al. 2015, eq. 6: R_l = (f_l > 0) · (R_{l+1} > 0) · R_{l+1}; the Relu's
    # output is positive exactly where its input is.
    passes = tf.logical_and(op.outputs[0] > 0, gradient > 0)
    return tf.where(passes, gradient, tf.zeros_like(gradient))


def _guided(
    program: Program, kind: str, target: str, param: Any, inputs: Any, indices: Any = None
) -> tuple[Any, ...]:
    """The traced graph of ``guided_gradients``: guided input gradients, scores, targets, ReLU counts.

    ``param`` is (the target's parameter, the key of the input the gradients are taken of).
    """
    program.trace_count += 1
    param, key = param
    graph = tf.compat.v1.get_default_graph()
    before = len(graph.get_operations())
    # Every Relu op created while the model traces gets the guided gradient, whichever
    # Python function made it: the ReLU layer, activation="relu", keras.activations.relu,
    # keras.ops.relu and tf.nn.relu all end in one Relu op. The override belongs to this
    # graph only; nothing is patched.
    with graph.gradient_override_map({"Relu": _GUIDED_RELU}):
        output, _ = program.forward(inputs, None)
        selected = select_output(output, program.selector)
        scores, chosen, outputs = program.target_scores(target, param, selected, indices)
    relus = _relu_counts(graph, graph.get_operations()[before:])
    count = scores.shape[1]
    if count is None:
        raise TargetError("a callable target must return a fixed number K of scores per sample")
    # tf.gradients, not a tape: a tape looks gradients up by op type and ignores the override.
    columns = [tf.gradients(scores[:, k], spatial_of(inputs, key))[0] for k in range(count)]
    if columns and columns[0] is None:
        raise TargetError("the explained scores do not depend on the input (their gradient is None)")
    attributions = tf.stack([tf.cast(column, tf.float32) for column in columns], axis=1)
    return attributions, tf.cast(scores, tf.float32), chosen, outputs, tf.constant(relus, tf.int32)


def _guided_capture(
    program: Program, kind: str, target: str, param: Any, inputs: Any, indices: Any = None
) -> tuple[Any, ...]:
    """The traced graph of ``guided_capture``: the layer capture and the guided input gradients of one forward.

    ``param`` is (the target's parameter, the key of the input the gradients are taken of).
    """
    program.trace_count += 1
    param, key = param
    graph = tf.compat.v1.get_default_graph()
    before = len(graph.get_operations())
    tape = tf.GradientTape(watch_accessed_variables=False, persistent=True)
    with tape, graph.gradient_override_map({"Relu": _GUIDED_RELU}):
        output, leaves = program.forward(inputs, tape)
        scores, chosen, outputs = program.target_scores(target, param, select_output(output, program.selector), indices)
        count = scores.shape[1]
        if count is None:
            raise TargetError("a callable target must return a fixed number K of scores per sample")
        totals = tf.reduce_sum(scores, axis=0)
    relus = _relu_counts(graph, graph.get_operations()[before:])
    # One forward pass, two rules: the tape looks gradients up by op type (the ordinary ReLU
    # gradient: Grad-CAM's layer gradients), tf.gradients honours the graph's override (the
    # guided input gradients).
    layer_gradients = program.layer_gradients(tape, scores, totals, leaves)
    columns = [tf.gradients(scores[:, k], spatial_of(inputs, key))[0] for k in range(count)]
    if columns and columns[0] is None:
        raise TargetError("the explained scores do not depend on the input (their gradient is None)")
    attributions = tf.stack([tf.cast(column, tf.float32) for column in columns], axis=1)
    return (
        tuple(leaves),
        layer_gradients,
        tf.cast(scores, tf.float32),
        chosen,
        outputs,
        attributions,
        tf.constant(relus, tf.int32),
    )


def guided_gradients(
    backend: TensorFlowBackend, inputs: Any, target: TargetSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Returns Guided Backpropagation: (∂score/∂input ``(N, K, ...)``, scores ``(N, K)``, indices).

    While the compiled function traces the model, the graph's gradient of every ``Relu``
    op is overridden by the guided rule (a gradient passes where the ReLU's output and the
    incoming gradient are both positive), and the input gradients come from
    ``tf.gradients`` of that graph. The op is caught, not the layer: ``keras.layers.ReLU``,
    ``activation="relu"``, ``keras.activations.relu``, ``keras.ops.relu`` and ``tf.nn.relu``
    all create it. The override belongs to that one graph, so the model and every other
    function are untouched, also when the call fails. Not caught: ReLUs inside a nested
    ``tf.function`` or a ``tf.cond``/``tf.while_loop`` body of the model (functions of their
    own: they are counted, and a warning says the result is only partly guided) and ReLU
    variants that are other ops (``relu6``, leaky ReLU, ``tf.maximum(x, 0)``).

    Raises:
        anycam.TargetError: for targets that do not fit the output.
    Warns:
        anycam.AnycamWarning: no ReLU was found, so the result equals plain input gradients, or
            ReLUs ran where the guided rule cannot reach them.
    """
    x, spatial, key = model_inputs(backend, inputs)
    batch = int(spatial.shape[0])
    if target.kind == "callable":
        compiled = backend._program.method_function(_guided, "guided", "callable", (target.fn, key), x)
        attributions, scores, chosen, outputs, relus = compiled(x)
    elif target.kind in ("argmax", "topk"):
        k = 1 if target.kind == "argmax" else target.k
        compiled = backend._program.method_function(_guided, "guided", "topk", (k, key), x)
        attributions, scores, chosen, outputs, relus = compiled(x)
    else:
        given = given_indices(target, batch)
        spec = tf.TensorSpec((None, given.shape[1]), tf.int64)
        compiled = backend._program.method_function(_guided, "guided", "indices", (given.shape[1], key), x, spec)
        attributions, scores, chosen, outputs, relus = compiled(x, tf.constant(given))
    scores_np, indices = _guided_results(relus, scores, chosen, outputs, target, batch)
    return as_numpy(attributions), scores_np, indices


def guided_capture(backend: TensorFlowBackend, inputs: Any, target: TargetSpec) -> tuple[Capture, np.ndarray]:
    """Returns Guided Grad-CAM's Grad-CAM capture and guided input gradients from one forward.

    One compiled function records the forward pass (layer intercepted, ``Relu`` gradients
    overridden as in :func:`guided_gradients`) and differentiates it twice: the tape gives
    the layer gradients by the ordinary rules, ``tf.gradients`` the guided input gradients.

    Warns:
        anycam.AnycamWarning: as :func:`guided_gradients`.
    """
    x, spatial, key = model_inputs(backend, inputs)
    batch = int(spatial.shape[0])
    if target.kind == "callable":
        compiled = backend._program.method_function(_guided_capture, "guided_capture", "callable", (target.fn, key), x)
        result = compiled(x)
    elif target.kind in ("argmax", "topk"):
        k = 1 if target.kind == "argmax" else target.k
        result = backend._program.method_function(_guided_capture, "guided_capture", "topk", (k, key), x)(x)
    else:
        given = given_indices(target, batch)
        spec = tf.TensorSpec((None, given.shape[1]), tf.int64)
        compiled = backend._program.method_function(
            _guided_capture, "guided_capture", "indices", (given.shape[1], key), x, spec
        )
        result = compiled(x, tf.constant(given))
    leaves, grads, scores, chosen, outputs, attributions, relus = result
    scores_np, indices = _guided_results(relus, scores, chosen, outputs, target, batch)
    capture = Capture(
        activations=tuple(as_numpy(a) for a in leaves),
        gradients=tuple(np.moveaxis(as_numpy(g), 0, 1) for g in grads),
        scores=scores_np,
        target=indices,
        input_spatial=spatial_shape(tuple(spatial.shape), backend.input_layout),
        layouts=backend.layouts,
        input_shape=tuple(spatial.shape),
        input_layout=backend.input_layout,
    )
    return capture, as_numpy(attributions)


def _relu_counts(graph: Any, ops: Sequence[Any]) -> tuple[int, int]:
    """Returns (Relu ops in ``ops``, Relu ops inside the functions they call).

    The guided override belongs to the traced graph; a nested ``tf.function`` (or a
    ``tf.cond``/``tf.while_loop`` body) is a function of its own, whose ReLUs keep the ordinary
    gradient. Those are counted through every level of calls so that a partly guided result is
    never returned without a word.
    """
    seen: set[str] = set()

    def body(name: str) -> int:
        if name in seen:
            return 0
        seen.add(name)
        # The graph's function library (a private lookup: if it ever goes, nothing is counted).
        function = getattr(graph, "_get_function", lambda _: None)(name)
        if function is None:
            return 0
        count = 0
        for node in function.definition.node_def:
            count += node.op == "Relu"
            count += body(node.op)  # a call written as the function's own op type
            for value in node.attr.values():
                if value.HasField("func"):
                    count += body(value.func.name)
        return count

    direct = nested = 0
    for op in ops:
        direct += op.type == "Relu"
        for attr in op.node_def.attr.values():
            if attr.HasField("func"):
                nested += body(attr.func.name)
    return direct, nested


def _guided_results(
    relus: Any, scores: Any, chosen: Any, outputs: Any, target: TargetSpec, batch: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`resolved_targets` of a guided pass; warns when the guided rule missed ReLUs."""
    direct, nested = (int(n) for n in np.asarray(relus).reshape(2))
    if nested:
        warnings.warn(
            f"guided backpropagation: {nested} ReLU op(s) run inside a nested tf.function (or a "
            "tf.cond / tf.while_loop body) of the model and keep the ordinary ReLU gradient, so the "
            "result is only partly guided; remove the inner @tf.function to guide them too",
            AnycamWarning,
            stacklevel=user_stacklevel(),
        )
    elif direct == 0:
        warnings.warn(
            "guided backpropagation found no ReLU op in the model (ReLU layers, "
            "activation='relu', keras.activations.relu, tf.nn.relu), so its result equals "
            "plain input gradients",
            AnycamWarning,
            stacklevel=user_stacklevel(),
        )
    return resolved_targets(scores, chosen, outputs, target, batch)
