"""Attention capture in TensorFlow: each ``MultiHeadAttention`` explicit, its probabilities on the tape.

One ``tf.function`` per (target form, input signature) runs the model with every Keras
``MultiHeadAttention`` in its explicit form (``backends/_keras/attention.py``): the
probabilities ``A`` are watched by a ``GradientTape(watch_accessed_variables=False)`` as they
are made, so ∂score/∂A comes from the tape — one backward for one target, K targets vectorised
by ``pfor`` as in the layer capture. Nothing below the attention is differentiated and no
variable is touched; the layers' own ``_compute_attention`` is back in ``finally``.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from anycam._errors import LayerError, TargetError, UnsupportedError
from anycam.core import TargetSpec, spatial_shape
from anycam.core.attention import requested
from anycam.protocol.backend import AttentionCapture, select_output

from .._keras.attention import explicit_attention
from .capture import Program, as_numpy, given_indices, resolved_targets
from .inputs import build, naming_inputs, run, structured

if TYPE_CHECKING:
    from .backend import TensorFlowBackend


def _gradients(
    tape: tf.GradientTape, totals: tf.Tensor, probabilities: list[tf.Tensor], names: list[str]
) -> list[tf.Tensor]:
    """Returns ∂totals/∂A per call as (K, N, H, T, S) float32.

    Raises:
        anycam.LayerError: an attention call that does not reach the explained output (the tape
            knows it when tracing: its gradient is None), the rule the torch adapter follows.
    """
    count = int(totals.shape[0])
    none = tf.UnconnectedGradients.NONE
    grads: list[tf.Tensor | None]
    if count == 1:
        grads = [
            None if g is None else g[None] for g in tape.gradient(totals, probabilities, unconnected_gradients=none)
        ]
    else:
        try:
            grads = list(tape.jacobian(totals, probabilities, unconnected_gradients=none, experimental_use_pfor=True))
        except (ValueError, NotImplementedError, TypeError):  # pragma: no cover - an op without a pfor rule
            columns = [
                tape.gradient(totals, probabilities, output_gradients=tf.one_hot(k, count, dtype=totals.dtype),
                              unconnected_gradients=none)
                for k in range(count)
            ]  # fmt: skip
            grads = [
                None if column[0] is None else tf.stack(list(column), axis=0) for column in zip(*columns, strict=True)
            ]
    unreached = [index for index, g in enumerate(grads) if g is None]
    if unreached:
        raise LayerError(
            f"attention call(s) {[names[i] if i < len(names) else i for i in unreached]} do not reach the explained "
            "output (the tape has no gradient for them); the attention methods need every attention on the path "
            "to the output"
        )
    return [tf.cast(g, tf.float32) for g in grads]


def _attend(program: Program, kind: str, target: str, param: Any, inputs: Any, indices: Any = None) -> tuple[Any, ...]:
    """The traced graph: (probabilities per call, their gradients (K, N, …) or (), scores, chosen, outputs).

    Reduced (``AttentionRequest.reduced``), what leaves the graph is what the method reads:
    without gradients each call's head mean ``(N, 1, T, S)``; with them each call's
    ``Ē = mean_h ReLU(∂score/∂A ⊙ A)`` ``(K, N, 1, T, S)``, formed as its gradient exists (the
    graph frees the gradient once Ē and the earlier blocks' gradients no longer need it), with
    all-ones probabilities ``(N, 1, T, S)`` beside it.
    """
    program.trace_count += 1
    (gradients, reduced), param = param
    model, kwargs = program.attention_model()  # type: ignore[attr-defined]
    tape = tf.GradientTape(watch_accessed_variables=False, persistent=True) if gradients else None
    probabilities: list[tf.Tensor] = []

    def hook(name: str, value: tf.Tensor) -> tf.Tensor:
        # Watched where it is made, in float32 (cast back for the model: exact for float16 and bfloat16).
        leaf = value if value.dtype == tf.float32 else tf.cast(value, tf.float32)
        if tape is not None:
            tape.watch(leaf)
        probabilities.append(leaf)
        return leaf if leaf is value else tf.cast(leaf, value.dtype)

    with tape if tape is not None else contextlib.nullcontext():
        with explicit_attention(model, hook) as calls:
            output = model(inputs, training=False, **kwargs)
        scores, chosen, outputs = program.target_scores(target, param, select_output(output, program.selector), indices)
        if scores.shape[1] is None:
            raise TargetError("a callable target must return a fixed number K of scores per sample")
        # Summed over the batch on the tape: samples are independent in inference mode.
        totals = tf.reduce_sum(scores, axis=0)
    program.attention_names = tuple(calls)  # type: ignore[attr-defined]
    grads = _gradients(tape, totals, probabilities, list(calls)) if tape is not None else []
    if reduced and grads:
        grads = [
            tf.reduce_mean(tf.nn.relu(g * p[None]), axis=2, keepdims=True)
            for g, p in zip(grads, probabilities, strict=True)
        ]
        probabilities = [tf.ones_like(g[0]) for g in grads]
    elif reduced:
        probabilities = [tf.reduce_mean(p, axis=1, keepdims=True) if p.shape.rank == 4 else p for p in probabilities]
    return tuple(probabilities), tuple(grads), tf.cast(scores, tf.float32), chosen, outputs


def _program(backend: TensorFlowBackend) -> Program:
    """The backend's compiled attention captures (no layer is tapped: the attention layers are)."""
    program = backend.__dict__.get("_attention_program")
    if program is None:
        program = backend.__dict__["_attention_program"] = Program(lambda *_: None, backend.output)
        model = weakref.ref(backend.model)  # the compiled functions must not keep the model alive
        kwargs = dict(backend.model_kwargs)
        program.attention_model = lambda: (model(), kwargs)  # type: ignore[attr-defined]
    return program


def attention_capture(
    backend: TensorFlowBackend, inputs: Any, target: TargetSpec, *, gradients: bool
) -> AttentionCapture:
    """Returns each ``MultiHeadAttention`` call's probabilities ``(N, H, T, S)`` and, if asked, ∂score/∂A.

    When the driver requests ``reduced`` (``anycam.core.attention.requested()``), the arrays
    are what the method reads, reduced inside the graph.

    Raises:
        anycam.UnsupportedError: the model is not Keras, has no ``MultiHeadAttention``, or one
            that overrides ``_compute_attention`` or attends over several axes.
        anycam.TargetError: for targets that do not fit the output.
        anycam.LayerError: an attention call that does not reach the explained output.
    """
    request = (gradients, requested().reduced)
    model = backend.model
    if not isinstance(model, keras.Layer):
        raise UnsupportedError(
            "the attention methods need a Keras model with MultiHeadAttention layers; a (features, head) pair has none"
        )
    structure = structured(backend, inputs)
    with naming_inputs(structure):
        x = structure.container()
        build(backend, x)  # not ready(): with layer=None it would choose a layer, which attention needs none of
        spatial = structure.spatial_value
        batch = int(spatial.shape[0])
        program = _program(backend)
        if target.kind == "callable":
            compiled = program.method_function(_attend, "attention", "callable", (request, target.fn), x)
            result = run(backend, lambda: compiled(x), structure)
        elif target.kind in ("argmax", "topk"):
            k = 1 if target.kind == "argmax" else target.k
            compiled = program.method_function(_attend, "attention", "topk", (request, k), x)
            result = run(backend, lambda: compiled(x), structure)
        else:
            given = given_indices(target, batch)
            spec = tf.TensorSpec((None, given.shape[1]), tf.int64)
            compiled = program.method_function(_attend, "attention", "indices", (request, given.shape[1]), x, spec)
            result = run(backend, lambda: compiled(x, tf.constant(given)), structure)
    probabilities, grads, scores, chosen, outputs = result
    names = getattr(program, "attention_names", ())
    for name, value in zip(names, probabilities, strict=False):
        if value.shape.rank != 4:
            raise UnsupportedError(
                f"the attention {name!r} gives probabilities of shape {tuple(value.shape)}; the attention "
                "methods need (N, heads, queries, keys): a MultiHeadAttention with one attention axis"
            )
    scores_np, indices = resolved_targets(scores, chosen, outputs, target, batch)
    return AttentionCapture(
        attentions=tuple(as_numpy(p) for p in probabilities),
        gradients=tuple(np.moveaxis(as_numpy(g), 0, 1) for g in grads) if gradients else None,
        scores=scores_np,
        target=indices,
        input_spatial=spatial_shape(tuple(spatial.shape), backend.input_layout),
        names=names,
    )
