"""TensorFlow/Keras 3 adapter: the layer's ``call`` intercepted while a ``tf.function`` traces.

How a capture runs:

* One ``tf.function`` per (model, layers, output selector) × (target form, input shape with the
  batch left open, dtype). It is cached on the model, weakly, and shared by every Explainer of
  that model and layer: repeated calls do not retrace, and neither does a second Explainer with
  another method. ``TensorFlowBackend.trace_count`` counts the traces.
* While it traces, the explained layer's ``call`` is replaced (for the tracing thread only) by a
  wrapper that hands the layer output to a ``GradientTape(watch_accessed_variables=False)``. The
  tape watches that tensor and nothing else: nothing below the layer is differentiated and no
  variable is touched, so frozen models work and variables stay bit-identical. The original
  ``call`` is back in ``finally``; the compiled graph needs no patch when it runs. The one
  mechanism serves Sequential, Functional, nested and subclassed models alike: no sub-model is
  built, so no "Graph disconnected" — the complaint every TF Grad-CAM library hears most.
* Targets are resolved inside the graph (argmax and top-k by ``tf.math.top_k``, which breaks ties
  towards the lower class like the core; given indices by ``tf.gather``), so one forward pass
  gives the scores and the gradients of all K targets. Given indices are range-checked by
  ``anycam.core.resolve_indices`` on the returned outputs. Callable targets run inside the tape
  on the model output and must be written in TF ops; each callable object is traced once (the
  last 8 are kept), so pass the same function rather than a new lambda per call.
* Mixed-precision layers are upcast to float32 where the tape watches them; activations,
  gradients and scores leave the graph as float32 and become NumPy once per call.

Models:

* Any Keras 3 model or layer (Sequential, Functional, subclassed, nested), running on Keras's
  TensorFlow backend. Layers are names (``"conv5_block3_out"``), paths through nested models
  (``"resnet50/conv5_block3_out"``), attribute names of subclassed models (``"features"``), or
  layer objects. The model runs with ``training=False``.
* A plain TF function or ``tf.Module`` has no layers to intercept: give it as a pair,
  ``Explainer((features, head), None, backend="tensorflow")``; the map explains
  ``features(x)`` and the model output is ``head(features(x))`` (``layer`` may also be
  ``"features"``).

Randomised copies (``anycam.sanity_check``): ``parameter_layers()`` lists the layers that own
weights, depth first; ``randomized(layers, seed)`` copies the model (``keras.models.clone_model``
for Sequential and Functional models, ``from_config(get_config())`` for subclassed ones), copies
the weights over, and draws the chosen layers' weights anew from their own initializers.

Layouts: a layer's output layout is its ``data_format``, or that of the nearest layer upstream
that has one, else ``keras.config.image_data_format()``. The input layout likewise defaults to
the ``data_format`` of the model's first layer that has one.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import operator
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from anycam.protocol.backend import AblationHead, Backend, Capture, check_options, select_output
from anycam._errors import (
    AnycamError,
    BackendError,
    ConfigTypeError,
    InputError,
    LayerError,
    TargetError,
    user_stacklevel,
)
from anycam.protocol.inputs import Key, ModelInputs, structure_inputs
from anycam.protocol.layers import choose_layer, is_auto
from anycam.core import (
    TargetSpec,
    check_batch,
    forward_error,
    non_finite_input,
    resolve_indices,
    spatial_shape,
)

from .. import _keras

_CALLABLE_TRACES = 8  # compiled captures kept per program for callable targets (LRU)
_PROGRAMS_PER_MODEL = 16  # (layers, output selector) combinations kept per model (LRU)
_CHOOSE_LOCK = threading.Lock()  # one automatic layer choice at a time
_Ran = tuple[Any, list[tf.Tensor]]  # a forward pass: (model output, captured layer outputs)

# model -> {(layer ids, output selector): _Program}; weak, so a cache never keeps a model alive
# (the compiled functions reach the model only through weak references).
_PROGRAMS: weakref.WeakKeyDictionary[Any, collections.OrderedDict[tuple[Any, ...], _Program]] = (
    weakref.WeakKeyDictionary()
)


_GUIDED_RELU = "AnycamGuidedRelu"


@tf.RegisterGradient(_GUIDED_RELU)
def _guided_relu_gradient(op: Any, gradient: tf.Tensor) -> tf.Tensor:
    # Springenberg et al. 2015, eq. 6: R_l = (f_l > 0) · (R_{l+1} > 0) · R_{l+1}; the Relu's
    # output is positive exactly where its input is.
    passes = tf.logical_and(op.outputs[0] > 0, gradient > 0)
    return tf.where(passes, gradient, tf.zeros_like(gradient))


def _keras_backend_check() -> None:
    active = _keras.backend()
    if active != "tensorflow":
        raise BackendError(
            f"Keras is running on its {active!r} backend, but anycam's tensorflow backend needs "
            f"Keras on TensorFlow; a Keras model on {active!r} is explained with "
            f"backend={active!r} (or backend=None, which detects it), or set the environment "
            "variable KERAS_BACKEND=tensorflow before the first `import keras`"
        )

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
            f"layer {name!r} returns {kind}, not a floating-point tensor; explain a layer whose "
            "output is a feature map"
        )
    leaf = output if output.dtype == tf.float32 else tf.cast(output, tf.float32)
    if tape is not None:
        tape.watch(leaf)  # before the cast back, or the tape would not record that cast
    return leaf, (leaf if leaf is output else tf.cast(leaf, output.dtype))


class _KerasForward:
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


class _PairForward:
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


def _class_output(selected: Any) -> tf.Tensor:
    if not tf.is_tensor(selected):
        raise TargetError(
            f"the selected model output is a {type(selected).__name__}, not a tensor; "
            "use output=..."
        )
    if selected.shape.rank != 2:
        raise TargetError(
            f"class-index targets need a model output of shape (N, classes), got "
            f"{tuple(selected.shape)}; select the output with output=..., or pass a callable "
            "target (in TF ops) that maps the output to (N,) scores"
        )
    return selected


class _Tail:
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


class _Program:
    """The compiled captures of one (model, layers, output selector)."""

    def __init__(self, forward: Callable[..., Any], selector: Any) -> None:
        self.forward = forward
        self.selector = selector
        self.trace_count = 0
        self._functions: dict[tuple[Any, ...], Any] = {}
        self._callables: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        # (layer rank, channel axis) -> the pooled head after the first layer, or None.
        self.heads: dict[tuple[int, int], _Tail | None] = {}

    def function(self, kind: str, param: Any, gradients: bool, inputs: tf.Tensor) -> Any:
        """Returns the compiled capture for a target form and the input's shape and dtype."""
        token = param
        try:
            hash(token)
        except TypeError:  # an unhashable callable target: the cache holds it, so its id is unique
            token = ("id", id(param))
        key = (kind, token, gradients, _signature_key(inputs))
        table = self._callables if kind == "callable" else self._functions
        with self._lock:
            function = table.get(key)
            if function is None:
                function = self._compile(kind, param, gradients, inputs)
                table[key] = function
                if kind == "callable" and len(table) > _CALLABLE_TRACES:
                    self._callables.popitem(last=False)
            elif kind == "callable":
                self._callables.move_to_end(key)
        return function

    def _compile(self, kind: str, param: Any, gradients: bool, inputs: Any) -> Any:
        # The batch left open; several inputs are one nested argument (a list or dict, as Keras takes them).
        signature = [tf.nest.map_structure(lambda t: tf.TensorSpec((None, *t.shape[1:]), t.dtype), inputs)]
        if kind == "indices":
            signature.append(tf.TensorSpec((None, param), tf.int64))
        # autograph=False: AutoGraph never reaches a Keras 3 layer's call anyway, and it would
        # turn anycam's errors raised while tracing into StagingErrors.
        if kind == "predict":
            return tf.function(self._predict, input_signature=signature, autograph=False)
        body = functools.partial(self._capture, kind, param, gradients)
        return tf.function(body, input_signature=signature, autograph=False)

    def method_function(
        self, kind: str, target: str, param: Any, inputs: tf.Tensor, *extra: tf.TensorSpec
    ) -> Any:
        """Returns the compiled function of a method capability, one per target form and shapes.

        ``kind`` is ``"head"`` (``head_scores``), ``"ablate"`` (``ablation_scorer``; ``param`` is
        then (the target's parameter, the channel axis)), ``"tail"`` (``ablation_head``; the
        "inputs" are then the ``(B, N, F)`` features and ``param`` is (the target's parameter,
        the ``_Tail``, the per-row shape)), ``"inputs"`` or ``"probabilities"``
        (``input_scores``) or ``"guided"`` (``guided_gradients``); ``target`` is ``"callable"``
        (``param`` the function), ``"indices"`` (``param`` K) or, for guided, ``"topk"``.
        ``extra`` are the signatures of the arguments after the inputs.
        """
        token = param
        try:
            hash(token)
        except TypeError:
            token = ("id", id(param))
        shapes = tuple((tuple(spec.shape), spec.dtype) for spec in extra)
        key = (kind, target, token, tuple(inputs.shape[1:]), inputs.dtype.name, shapes)
        table = self._callables if target == "callable" else self._functions
        with self._lock:
            function = table.get(key)
            if function is None:
                signature = [tf.TensorSpec((None, *inputs.shape[1:]), inputs.dtype), *extra]
                method = getattr(self, "_inputs" if kind == "probabilities" else f"_{kind}")
                body = functools.partial(method, kind, target, param)
                function = table[key] = tf.function(body, input_signature=signature, autograph=False)
                if target == "callable" and len(table) > _CALLABLE_TRACES:
                    self._callables.popitem(last=False)
            elif target == "callable":
                self._callables.move_to_end(key)
        return function

    def _head(
        self, kind: str, target: str, param: Any, inputs: tf.Tensor, replacements: tf.Tensor, indices: Any = None
    ) -> tf.Tensor:
        self.trace_count += 1

        def scores_of(replacement: tf.Tensor) -> tf.Tensor:
            output, _ = self.forward(inputs, None, replacement)
            scores, _, _ = self._scores(target, param, select_output(output, self.selector), indices)
            return tf.cast(scores, tf.float32)

        # pfor: an op none of whose inputs depends on the mapped replacement (the network before
        # the layer, and any tensor a skip connection carries around it) is created once,
        # unbatched; the ops after the layer are converted to run on all B·N copies at once.
        return tf.vectorized_map(scores_of, replacements)

    def _ablate(
        self,
        kind: str,
        target: str,
        param: Any,
        inputs: tf.Tensor,
        activations: tf.Tensor,
        channels: tf.Tensor,
        indices: Any = None,
    ) -> tf.Tensor:
        self.trace_count += 1
        axis = param[1] % activations.shape.rank
        shape = [1] * activations.shape.rank
        shape[axis] = -1

        def scores_of(channel: tf.Tensor) -> tf.Tensor:
            keep = tf.cast(tf.not_equal(tf.range(tf.shape(activations)[axis]), channel), activations.dtype)
            output, _ = self.forward(inputs, None, activations * tf.reshape(keep, shape))
            scores, _, _ = self._scores(target, param[0], select_output(output, self.selector), indices)
            return tf.cast(scores, tf.float32)

        return tf.vectorized_map(scores_of, channels)

    def _tail(
        self, kind: str, target: str, param: Any, features: tf.Tensor, indices: Any = None
    ) -> tf.Tensor:
        self.trace_count += 1
        chosen, tail, row = param
        shape = tf.shape(features)
        # Every layer of the tail computes a row from that row alone (_keras.pooled_head), so
        # the B·N feature vectors run as one batch.
        hidden = tf.reshape(features, [-1, *row])
        if tail.activation is not None:
            hidden = tail.activation(hidden)
        for layer in tail.layers():
            hidden = layer(hidden, training=False)
        selected = select_output(hidden, self.selector)
        if target == "callable":
            # The callable sees each copy's (N, ...) output, as on the model itself.
            outputs = tf.reshape(selected, tf.concat([shape[:2], tf.shape(selected)[1:]], axis=0))

            def scores_of(output: tf.Tensor) -> tf.Tensor:
                return tf.cast(self._scores(target, chosen, output, None)[0], tf.float32)

            return tf.vectorized_map(scores_of, outputs)
        scores, _, _ = self._scores(target, chosen, selected, tf.tile(indices, [shape[0], 1]))
        return tf.reshape(tf.cast(scores, tf.float32), [shape[0], shape[1], chosen])

    def _inputs(
        self, kind: str, target: str, param: Any, inputs: tf.Tensor, indices: Any = None
    ) -> tuple[Any, Any]:
        self.trace_count += 1
        output, _ = self.forward(inputs, None)
        selected = select_output(output, self.selector)
        if target != "callable" and kind == "probabilities":
            selected = tf.nn.softmax(tf.cast(_class_output(selected), tf.float32), axis=1)
        scores, _, outputs = self._scores(target, param, selected, indices)
        return tf.cast(scores, tf.float32), outputs

    def _guided(
        self, kind: str, target: str, param: Any, inputs: tf.Tensor, indices: Any = None
    ) -> tuple[Any, ...]:
        self.trace_count += 1
        graph = tf.compat.v1.get_default_graph()
        before = len(graph.get_operations())
        # Every Relu op created while the model traces gets the guided gradient, whichever
        # Python function made it: the ReLU layer, activation="relu", keras.activations.relu,
        # keras.ops.relu and tf.nn.relu all end in one Relu op. The override belongs to this
        # graph only; nothing is patched.
        with graph.gradient_override_map({"Relu": _GUIDED_RELU}):
            output, _ = self.forward(inputs, None)
            selected = select_output(output, self.selector)
            scores, chosen, outputs = self._scores(target, param, selected, indices)
        relus = _relu_counts(graph, graph.get_operations()[before:])
        count = scores.shape[1]
        if count is None:
            raise TargetError("a callable target must return a fixed number K of scores per sample")
        # tf.gradients, not a tape: a tape looks gradients up by op type and ignores the override.
        columns = [tf.gradients(scores[:, k], inputs)[0] for k in range(count)]
        if columns and columns[0] is None:
            raise TargetError("the explained scores do not depend on the input (their gradient is None)")
        attributions = tf.stack([tf.cast(column, tf.float32) for column in columns], axis=1)
        return attributions, tf.cast(scores, tf.float32), chosen, outputs, tf.constant(relus, tf.int32)

    def _guided_capture(
        self, kind: str, target: str, param: Any, inputs: tf.Tensor, indices: Any = None
    ) -> tuple[Any, ...]:
        self.trace_count += 1
        graph = tf.compat.v1.get_default_graph()
        before = len(graph.get_operations())
        tape = tf.GradientTape(watch_accessed_variables=False, persistent=True)
        with tape, graph.gradient_override_map({"Relu": _GUIDED_RELU}):
            output, leaves = self.forward(inputs, tape)
            scores, chosen, outputs = self._scores(target, param, select_output(output, self.selector), indices)
            count = scores.shape[1]
            if count is None:
                raise TargetError("a callable target must return a fixed number K of scores per sample")
            totals = tf.reduce_sum(scores, axis=0)
        relus = _relu_counts(graph, graph.get_operations()[before:])
        # One forward pass, two rules: the tape looks gradients up by op type (the ordinary ReLU
        # gradient: Grad-CAM's layer gradients), tf.gradients honours the graph's override (the
        # guided input gradients).
        layer_gradients = self._gradients(tape, scores, totals, leaves)
        columns = [tf.gradients(scores[:, k], inputs)[0] for k in range(count)]
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

    def _predict(self, inputs: tf.Tensor) -> Any:
        self.trace_count += 1
        output, _ = self.forward(inputs, None)
        return select_output(output, self.selector)

    def _capture(
        self, kind: str, param: Any, gradients: bool, inputs: tf.Tensor, indices: Any = None
    ) -> tuple[Any, ...]:
        self.trace_count += 1
        # Persistent only for the fallback below: one recording of the forward pass serves one
        # vectorised backward, or K backward passes where pfor cannot vectorise the head.
        tape = tf.GradientTape(watch_accessed_variables=False, persistent=True) if gradients else None
        with tape if tape is not None else contextlib.nullcontext():
            output, leaves = self.forward(inputs, tape)
            selected = select_output(output, self.selector)
            scores, chosen, outputs = self._scores(kind, param, selected, indices)
            count = scores.shape[1]
            if count is None:
                raise TargetError(
                    "a callable target must return a fixed number K of scores per sample"
                )
            # Summed over the batch on the tape: samples are independent in inference mode, so
            # the gradient of a column's batch sum is each sample's own gradient.
            totals = tf.reduce_sum(scores, axis=0)
        grads = None if tape is None else self._gradients(tape, scores, totals, leaves)
        return tuple(leaves), grads, tf.cast(scores, tf.float32), chosen, outputs

    @staticmethod
    def _scores(kind: str, param: Any, selected: Any, indices: Any) -> tuple[Any, Any, Any]:
        """Returns (N, K) scores, the (N, K) classes chosen in the graph, the outputs to check."""
        if kind == "callable":
            scores = param(selected)
            if not tf.is_tensor(scores) or scores.shape.rank not in (1, 2):
                shape = tuple(scores.shape) if tf.is_tensor(scores) else type(scores).__name__
                raise TargetError(
                    "a callable target must return a tensor of shape (N,) or (N, K), computed "
                    f"with TF ops from the model output; got {shape}"
                )
            if scores.shape.rank == 2 and scores.shape[1] == 0:
                raise TargetError(
                    f"a callable target returned (N, 0) scores {tuple(scores.shape)}: no target to explain; "
                    "return (N,) or (N, K) scores with K ≥ 1"
                )
            return (scores[:, None] if scores.shape.rank == 1 else scores), None, None
        selected = _class_output(selected)
        if kind == "topk":
            classes = selected.shape[1]
            if classes is not None and param > classes:
                raise TargetError(
                    f"top_k({param}) asks for more classes than the model has ({classes})"
                )
            _, chosen = tf.math.top_k(selected, k=param)
            chosen = tf.cast(chosen, tf.int64)
            return tf.gather(selected, chosen, batch_dims=1), chosen, None
        # Out-of-range classes are clipped here and reported by resolve_indices afterwards.
        last = tf.cast(tf.shape(selected)[1], tf.int64) - 1
        safe = tf.clip_by_value(indices, 0, tf.maximum(last, 0))
        return tf.gather(selected, safe, batch_dims=1), None, tf.cast(selected, tf.float32)

    def _gradients(
        self,
        tape: tf.GradientTape,
        scores: tf.Tensor,
        totals: tf.Tensor,
        leaves: list[tf.Tensor],
    ) -> tuple[tf.Tensor, ...]:
        """Returns per layer ∂scores/∂leaf as (K, N, ...) float32 tensors (target axis first).

        ``totals`` is ``scores`` (N, K) summed over the batch, recorded on ``tape``. One target
        is one backward pass. K targets are the Jacobian of the K totals, vectorised by pfor
        (one backward pass of the part above the layer with a leading K axis on every
        cotangent, as ``jax.vmap`` over a vjp), not K passes; where pfor cannot convert an op
        of the head, K backward passes on the same recording.
        """
        count = int(scores.shape[1])
        if count == 1:
            grads = [g if g is None else g[None] for g in tape.gradient(totals, leaves)]
        else:
            try:
                jacobians = tape.jacobian(totals, leaves, experimental_use_pfor=True)
            except (ValueError, NotImplementedError, TypeError):  # pragma: no cover - op without a pfor rule
                columns = [
                    tape.gradient(totals, leaves, output_gradients=tf.one_hot(k, count, dtype=totals.dtype))
                    for k in range(count)
                ]
                jacobians = [
                    None if column[0] is None else tf.stack(list(column), axis=0)
                    for column in zip(*columns, strict=True)
                ]
            # Left (K, N, ...): the capture turns them to (N, K, ...) as a NumPy view, not a copy.
            grads = list(jacobians)
        names = getattr(self.forward, "names", ())
        for index, gradient in enumerate(grads):
            if gradient is None:
                raise LayerError(
                    f"layer {names[index]!r} does not reach the explained output (its gradient "
                    "is None); explain a layer on the path from the input to the output"
                )
        return tuple(tf.cast(tf.convert_to_tensor(g), tf.float32) for g in grads)


def _is_feature(value: Any) -> bool:
    return tf.is_tensor(value) and value.dtype.is_floating


def _is_spatial(value: Any) -> bool:
    """A floating input with spatial axes: the default carrier of the heatmap's grid."""
    if isinstance(value, np.ndarray):
        return np.issubdtype(value.dtype, np.floating) and value.ndim >= 3
    return tf.is_tensor(value) and value.dtype.is_floating and value.shape.rank is not None and value.shape.rank >= 3


def _signature_key(inputs: Any) -> tuple[Any, ...]:
    """The compiled capture's cache key for an input structure: its layout, shapes (batch open), dtypes."""
    flat = tf.nest.flatten(inputs)
    layout = tuple(sorted(inputs)) if isinstance(inputs, dict) else (type(inputs).__name__, len(flat))
    return (layout, tuple((tuple(t.shape[1:]), t.dtype.name) for t in flat))


def _as_numpy(tensor: Any) -> np.ndarray:
    # np.asarray views the tensor's buffer (read-only); .numpy() copies it, which for K maps'
    # gradients is tens of megabytes per call.
    return np.asarray(np.asarray(tensor), dtype=np.float32)


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


class TensorFlowBackend(Backend):
    """Adapter for Keras 3 models (on Keras's TensorFlow backend) and TF ``(features, head)`` pairs.

    See the module docstring for how layers are named and how a capture runs. No options.

    A model that is not Keras is given split at the explained layer, as a pair of TF callables
    (plain functions, ``tf.function`` objects, ``tf.Module`` objects or Keras layers)::

        explainer = anycam.Explainer((features, head), None, backend="tensorflow")
        heatmaps = explainer(x)  # explains features(x); the model output is head(features(x))

    Raises (constructor):
        anycam.BackendError: Keras runs on another backend than TensorFlow.
        anycam.LayerError: a layer cannot be found (the message lists the closest names).
        TypeError: the model is neither a Keras layer nor a (features, head) pair.
    """

    name = "tensorflow"
    capabilities = frozenset({"input_scores", "head_scores", "ablation_head", "guided_gradients", "randomize"})

    def __init__(
        self,
        model: Any,
        layers: Sequence[Any],
        *,
        output: Any = None,
        input_layout: str | None = None,
        **options: Any,
    ) -> None:
        check_options(self.name, options, ("model_kwargs", "spatial_input"))
        self.spatial_input: Key | None = options.get("spatial_input")
        self.model_kwargs: dict[str, Any] = dict(options.get("model_kwargs") or {})
        self.model = model
        self.output = output
        self._input_shape: tuple[Any, ...] | None = None
        self._input_dtype = keras.config.floatx()
        self._built = True
        if isinstance(model, keras.Layer):
            _keras_backend_check()
            self._input_shape, self._input_dtype = _keras.input_spec(model)
            self._built = bool(getattr(model, "built", True))
            default_layout = _keras.input_layout(model)
            self.auto_layer = len(layers) == 1 and is_auto(layers[0])
            self.layer_names = ()
            if not self.auto_layer:
                self._set_layers([_keras.resolve_spec(model, layer) for layer in layers])
        elif isinstance(model, tuple) and len(model) == 2 and all(callable(p) for p in model):
            if any(isinstance(part, keras.Layer) for part in model):
                _keras_backend_check()
            wrong = [layer for layer in layers if layer not in (None, "features", "auto")]
            if wrong:
                raise LayerError(
                    "a (features, head) pair explains the output of features; pass layer=None "
                    f"or 'features', got {wrong[0]!r}"
                )
            features, head = model
            self.layers = [features]
            self.ports = ["output"]
            self.layer_names = ("features",)
            guessed = _keras.data_format(features) if isinstance(features, keras.Layer) else None
            self.layouts = (guessed or keras.config.image_data_format(),)
            default_layout = keras.config.image_data_format()
            self._program = _Program(_PairForward(features, head), output)
        elif isinstance(model, tf.Module):
            raise ConfigTypeError(
                f"a {type(model).__name__} (a tf.Module, not a Keras model) has no layers anycam "
                "can intercept; split it at the explained layer and pass the pair: "
                "Explainer((features, head), None, backend='tensorflow'), where the model is "
                "head(features(x))"
            )
        else:
            raise ConfigTypeError(
                "the tensorflow backend needs a Keras 3 model or layer, or a (features, head) "
                f"pair of TF callables; got {type(model).__name__}"
            )
        self.input_layout = input_layout or default_layout

    def _set_layers(self, resolved: Sequence[tuple[str, Any, str]]) -> None:
        self.layers = [layer for _, layer, _ in resolved]
        self.ports = [port for _, _, port in resolved]
        self.layouts = _keras.layouts(self.layers)
        names = tuple(name for name, _, _ in resolved)
        self._program = self._keras_program(names)
        self.layer_names = names  # last: a non-empty layer_names means ready

    def _choose(self, inputs: Any, spatial: tf.Tensor) -> None:
        """Chooses the layer for ``layer="auto"`` from one eager pass through every layer, once."""
        with _CHOOSE_LOCK:
            if self.layer_names:
                return
            records, paths = _keras.layer_records(
                self.model, lambda: self.model(inputs, training=False, **self.model_kwargs), _is_feature
            )
            chosen = choose_layer(records, spatial_shape(tuple(spatial.shape), self.input_layout))
            self._set_layers([(chosen, paths[chosen], "output")])

    def _keras_program(self, names: Sequence[str] | None = None) -> _Program:
        names = self.layer_names if names is None else names
        forward = _KerasForward(self.model, self.layers, names, self.ports, self.model_kwargs)
        try:
            key: tuple[Any, ...] = (
                tuple(id(layer) for layer in self.layers),
                tuple(self.ports),
                self.output,
                tuple(sorted(self.model_kwargs.items())),
            )
            hash(key)
        except TypeError:
            return _Program(forward, self.output)
        programs = _PROGRAMS.setdefault(self.model, collections.OrderedDict())
        program = programs.get(key)
        if program is None:
            program = programs[key] = _Program(forward, self.output)
            if len(programs) > _PROGRAMS_PER_MODEL:
                programs.popitem(last=False)
        else:
            programs.move_to_end(key)
        return program

    @property
    def trace_count(self) -> int:
        """How many times this backend's compiled captures were traced (shared per model)."""
        return self._program.trace_count

    # -- sanity check ---------------------------------------------------------------------

    def parameter_layers(self, inputs: Any = None) -> tuple[str, ...]:
        """Returns the paths of the layers that own weights (trainable or not), input to output.

        Paths as layers are addressed (``"inner/conv"`` inside a nested model); a layer counts
        when it creates weights itself, so a nested model is listed through its layers.

        Raises:
            NotImplementedError: for a ``(features, head)`` pair.
            anycam.LayerError: the model is not built yet.
        """
        return _keras.parameter_layers(self.model)

    def randomized(self, layers: Sequence[str], seed: int = 0) -> TensorFlowBackend:
        """Returns a backend over a copy of the model whose ``layers`` have fresh weights.

        Each chosen layer's weights are drawn anew from the layer's own initializers
        (``kernel_initializer``, ``gamma_initializer``, ...), re-seeded from ``seed`` and the
        layer's path (a plain function given as initializer is called as it is); every other
        weight keeps the model's value. The model itself is only read, and the global random
        states are left as they were. The copy explains the same layers, under the same names,
        with the same output selector, and has its own compiled captures.

        Raises:
            anycam.LayerError: a layer is unknown, owns no weights, or keeps no initializer for
                one of them.
            NotImplementedError: for a ``(features, head)`` pair, or a model Keras cannot
                rebuild from its config.
        """
        duplicate, twins = _keras.randomized_copy(self.model, layers, operator.index(seed))
        clone = copy.copy(self)
        clone.model = duplicate
        clone.layers = [twins[id(layer)] for layer in self.layers]
        clone._built = True
        clone._program = clone._keras_program()
        return clone

    # -- inputs ---------------------------------------------------------------------------

    def _structure(self, inputs: Any) -> ModelInputs:
        """Returns the call's inputs as one structure, every tensor converted and checked.

        One array is checked against the model's declared input; a list or dict (a Keras
        multi-input model) has each entry converted, the spatial one checked for a grid.
        """
        structure = structure_inputs(inputs, is_spatial=_is_spatial, spatial_input=self.spatial_input)
        if structure.kind == "single":
            return structure.map(lambda key, value: self._as_input(value))
        if not isinstance(self.model, keras.Layer):
            raise InputError(
                f"a (features, head) pair takes one input tensor, got a {type(inputs).__name__} of "
                f"{len(structure.keys)}; close over the others in features"
            )
        return structure.map(lambda key, value: self._convert(key, value, key == structure.spatial))

    def _convert(self, key: Key, value: Any, spatial: bool) -> tf.Tensor:
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
            spatial_shape(tuple(value.shape), self.input_layout)
            _check_spatial(value, what)
        return value

    def _as_input(self, inputs: Any) -> tf.Tensor:
        if isinstance(inputs, np.ndarray):
            if not np.issubdtype(inputs.dtype, np.floating):
                raise InputError(
                    f"input must be floating point, got dtype {inputs.dtype}; scale it to "
                    "floats first, e.g. x.astype('float32') / 255"
                )
            inputs = tf.cast(tf.convert_to_tensor(inputs), self._input_dtype)
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
        expected = self._input_shape
        if expected is not None and (
            len(shape) != len(expected)
            or any(e is not None and e != s for e, s in zip(expected[1:], shape[1:], strict=True))
        ):
            raise InputError(
                f"input of shape {shape} does not fit the model's input {expected} (None is "
                f"any size); the model expects rank {len(expected)}, batch first, in its "
                "training layout"
            )
        spatial_shape(shape, self.input_layout)
        _check_spatial(inputs, "input")
        return inputs

    def _build(self, inputs: Any) -> None:
        # Variables cannot be created inside the compiled capture: build an unbuilt model
        # once, eagerly, on one sample.
        if not self._built:
            self.model(tf.nest.map_structure(lambda t: t[:1], inputs), training=False, **self.model_kwargs)
            self._built = True

    def _run(self, call: Callable[[], Any], structure: ModelInputs) -> Any:
        """Runs ``call``; a framework error of the forward pass becomes an InputError (its cause).

        Several inputs are left to ``_naming_inputs``, which names the inputs given.
        """
        try:
            return call()
        except AnycamError:
            raise
        except (ValueError, TypeError, IndexError, tf.errors.InvalidArgumentError) as exc:
            if structure.kind != "single":
                raise
            raise forward_error(exc, tuple(structure.spatial_value.shape), self.input_layout) from exc

    @staticmethod
    def _given_indices(target: TargetSpec, batch: int) -> np.ndarray:
        assert target.indices is not None
        indices = target.indices
        if target.kind == "index":
            return np.broadcast_to(indices, (batch, 1)).astype(np.int64)
        if indices.shape[0] != batch:
            raise TargetError(
                f"got {indices.shape[0]} targets for a batch of {batch}; pass one per sample, "
                "or a single int for the whole batch"
            )
        return indices.astype(np.int64)

    # -- captures -------------------------------------------------------------------------

    def _ready(self, structure: ModelInputs) -> Any:
        """Returns the inputs as the model takes them (a tensor, list or dict), the model built."""
        x = structure.container()
        self._build(x)
        if self.auto_layer and not self.layer_names:
            self._choose(x, structure.spatial_value)
        return x

    @contextlib.contextmanager
    def _naming_inputs(self, structure: ModelInputs) -> Iterator[None]:
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

    def capture(self, inputs: Any, target: TargetSpec, *, gradients: bool = True) -> Capture:
        structure = self._structure(inputs)
        with self._naming_inputs(structure):
            return self._capture(structure, target, gradients)

    def _capture(self, structure: ModelInputs, target: TargetSpec, gradients: bool) -> Capture:
        x = self._ready(structure)
        spatial = structure.spatial_value
        batch = int(spatial.shape[0])
        if target.kind == "callable":
            compiled = self._run(lambda: self._program.function("callable", target.fn, gradients, x), structure)
            leaves, grads, scores, chosen, outputs = self._run(lambda: compiled(x), structure)
        elif target.kind in ("argmax", "topk"):
            k = 1 if target.kind == "argmax" else target.k
            compiled = self._run(lambda: self._program.function("topk", k, gradients, x), structure)
            leaves, grads, scores, chosen, outputs = self._run(lambda: compiled(x), structure)
        else:
            given = self._given_indices(target, batch)
            compiled = self._run(lambda: self._program.function("indices", given.shape[1], gradients, x), structure)
            leaves, grads, scores, chosen, outputs = self._run(lambda: compiled(x, tf.constant(given)), structure)
        scores_np, indices = _resolved_targets(scores, chosen, outputs, target, batch)
        return Capture(
            activations=tuple(_as_numpy(a) for a in leaves),
            gradients=None if grads is None else tuple(np.moveaxis(_as_numpy(g), 0, 1) for g in grads),
            scores=scores_np,
            target=indices,
            input_spatial=spatial_shape(tuple(spatial.shape), self.input_layout),
            layouts=self.layouts,
            input_shape=tuple(spatial.shape),
            input_layout=self.input_layout,
        )

    # -- gradient-free and guided methods (Score-CAM, Ablation-CAM, Guided Backprop) --------

    @staticmethod
    def _resolved(target: TargetSpec, indices: np.ndarray | None, batch: int) -> tuple[str, Any, list[Any]]:
        """Returns (target form, its parameter, the extra arguments) for resolved ``indices``."""
        if target.kind == "callable":
            return "callable", target.fn, []
        if indices is None:
            raise TargetError("class-index targets need the (N, K) class indices the capture resolved; got None")
        indices = np.asarray(indices)
        if indices.ndim != 2 or indices.shape[0] != batch:
            raise TargetError(f"expected (N, K) class indices with N={batch}, got shape {indices.shape}")
        return "indices", indices.shape[1], [tf.constant(indices.astype(np.int64))]

    def head_scores(
        self, inputs: Any, replacements: np.ndarray, target: TargetSpec, indices: np.ndarray | None
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
        x = self._as_input(inputs)
        self._build(x)
        batch = int(x.shape[0])
        form, param, extra = self._resolved(target, indices, batch)
        values = np.asarray(replacements, dtype=np.float32)
        if values.ndim < 2 or values.shape[1] != batch:
            raise InputError(
                f"replacements must be (B, N, *layer_shape) with N={batch}, got shape {values.shape}"
            )
        specs = [tf.TensorSpec((None, None, *values.shape[2:]), tf.float32)]
        specs += [tf.TensorSpec((None, param), tf.int64)] if form == "indices" else []
        compiled = self._program.method_function("head", form, param, x, *specs)
        scores = _as_numpy(compiled(x, tf.constant(values), *extra))
        if form == "callable" and scores.shape[1] != batch:
            raise TargetError(f"a callable target must return (N,) or (N, K) scores with N={batch}")
        return scores

    def ablation_scorer(
        self,
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
        x = self._as_input(inputs)
        self._build(x)
        batch = int(x.shape[0])
        form, param, extra = self._resolved(target, indices, batch)
        values = tf.constant(np.asarray(activations, dtype=np.float32))
        if values.shape.rank < 2 or values.shape[0] != batch:
            raise InputError(f"activations must be (N, ...) with N={batch}, got shape {tuple(values.shape)}")
        axis = int(channel_axis) % values.shape.rank
        specs = [tf.TensorSpec((None, *values.shape[1:]), tf.float32), tf.TensorSpec((None,), tf.int32)]
        specs += [tf.TensorSpec((None, param), tf.int64)] if form == "indices" else []
        compiled = self._program.method_function("ablate", form, (param, axis), x, *specs)

        def scores(channels: np.ndarray) -> np.ndarray:
            chosen = tf.constant(np.asarray(channels, dtype=np.int32))
            return _as_numpy(compiled(x, values, chosen, *extra))

        return scores

    def ablation_head(
        self,
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
        values = np.asarray(activations)
        refused = len(self.layers) != 1 or self.ports[0] != "output" or self.output is not None
        if refused or self.model_kwargs or isinstance(inputs, (list, tuple, dict)):
            return None
        if values.dtype != np.float32 or values.ndim < 3:
            return None
        batch, rank = values.shape[0], values.ndim
        axis = int(channel_axis) % rank
        heads = self._program.heads
        if (rank, axis) not in heads:
            heads[(rank, axis)] = self._pooled_head(rank, axis)
        tail = heads[(rank, axis)]
        if tail is None:
            return None
        form, param, extra = self._resolved(target, indices, batch)
        pooled_tensor = tail.pooling()(tf.constant(values))
        channels = values.shape[axis]
        if pooled_tensor.shape.num_elements() != batch * channels:
            return None
        pooled = _as_numpy(pooled_tensor).reshape(batch, channels)
        dense = tail.dense()
        weight = bias = None
        row: tuple[int, ...] = tuple(pooled_tensor.shape[1:])
        if dense is not None:
            weight = _as_numpy(tf.convert_to_tensor(dense.kernel))
            if dense.bias is not None:
                bias = _as_numpy(tf.convert_to_tensor(dense.bias))
            row = (weight.shape[1],)
        spec = tf.TensorSpec((None, batch, weight.shape[1] if weight is not None else channels), tf.float32)
        specs = [tf.TensorSpec((None, param), tf.int64)] if form == "indices" else []
        compiled = self._program.method_function("tail", form, (param, tail, row), spec, *specs)

        def run(features: np.ndarray) -> np.ndarray:
            return _as_numpy(compiled(tf.constant(np.asarray(features, dtype=np.float32)), *extra))

        return AblationHead(pooled, run, weight, bias)

    def _pooled_head(self, rank: int, axis: int) -> _Tail | None:
        if isinstance(self.model, keras.Layer):
            found = _keras.pooled_head(self.model, self.layers[0], rank, axis)
        else:
            head = self.model[1]
            found = _keras.pooled_head(head, None, rank, axis, head=True) if isinstance(head, keras.Layer) else None
        if found is None:
            return None
        if found.dense is None:
            return _Tail(found.pooling, None, found.steps)
        return _Tail(found.pooling, found.steps[found.dense], found.steps[found.dense + 1 :])

    def input_scores(
        self, inputs: Any, target: TargetSpec, indices: np.ndarray | None, *, probabilities: bool = False
    ) -> np.ndarray:
        """Returns ``(M, K)`` float32 scores of the targets on a batch of (modified) inputs.

        ``probabilities=True`` takes the softmax over the classes first (Score-CAM's weights),
        for class-index targets only. One compiled forward per target form and input shape.

        Raises:
            anycam.TargetError: ``probabilities=True`` with a callable target, or indices that
                do not fit the batch or the model's classes.
        """
        x = self._as_input(inputs)
        self._build(x)
        if probabilities and target.kind == "callable":
            raise TargetError(
                "Score-CAM weights by the softmax of class scores, and a callable target has no "
                "classes to take it over; pass class indices, or a callable that returns what to "
                "weight by and probabilities=False"
            )
        batch = int(x.shape[0])
        form, param, extra = self._resolved(target, indices, batch)
        specs = [tf.TensorSpec((None, param), tf.int64)] if form == "indices" else []
        kind = "probabilities" if probabilities else "inputs"
        scores, outputs = self._program.method_function(kind, form, param, x, *specs)(x, *extra)
        if outputs is not None:
            resolve_indices(TargetSpec("indices", squeeze=False, indices=np.asarray(indices)), outputs.numpy())
        scores_np = _as_numpy(scores)
        if scores_np.shape[0] != batch:
            raise TargetError(f"a callable target must return (N,) or (N, K) scores with N={batch}")
        return scores_np

    def guided_gradients(
        self, inputs: Any, target: TargetSpec
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
            UserWarning: no ReLU was found, so the result equals plain input gradients.
        """
        x = self._as_input(inputs)
        self._build(x)
        batch = int(x.shape[0])
        if target.kind == "callable":
            compiled = self._program.method_function("guided", "callable", target.fn, x)
            attributions, scores, chosen, outputs, relus = compiled(x)
        elif target.kind in ("argmax", "topk"):
            k = 1 if target.kind == "argmax" else target.k
            compiled = self._program.method_function("guided", "topk", k, x)
            attributions, scores, chosen, outputs, relus = compiled(x)
        else:
            given = self._given_indices(target, batch)
            spec = tf.TensorSpec((None, given.shape[1]), tf.int64)
            compiled = self._program.method_function("guided", "indices", given.shape[1], x, spec)
            attributions, scores, chosen, outputs, relus = compiled(x, tf.constant(given))
        scores_np, indices = _guided_results(relus, scores, chosen, outputs, target, batch)
        return _as_numpy(attributions), scores_np, indices

    def guided_capture(self, inputs: Any, target: TargetSpec) -> tuple[Capture, np.ndarray]:
        """Returns Guided Grad-CAM's Grad-CAM capture and guided input gradients from one forward.

        One compiled function records the forward pass (layer intercepted, ``Relu`` gradients
        overridden as in :meth:`guided_gradients`) and differentiates it twice: the tape gives
        the layer gradients by the ordinary rules, ``tf.gradients`` the guided input gradients.

        Warns:
            UserWarning: no ReLU was found, so the guided gradients equal plain input gradients.
        """
        x = self._as_input(inputs)
        self._build(x)
        batch = int(x.shape[0])
        if target.kind == "callable":
            compiled = self._program.method_function("guided_capture", "callable", target.fn, x)
            result = compiled(x)
        elif target.kind in ("argmax", "topk"):
            k = 1 if target.kind == "argmax" else target.k
            result = self._program.method_function("guided_capture", "topk", k, x)(x)
        else:
            given = self._given_indices(target, batch)
            spec = tf.TensorSpec((None, given.shape[1]), tf.int64)
            compiled = self._program.method_function("guided_capture", "indices", given.shape[1], x, spec)
            result = compiled(x, tf.constant(given))
        leaves, grads, scores, chosen, outputs, attributions, relus = result
        scores_np, indices = _guided_results(relus, scores, chosen, outputs, target, batch)
        capture = Capture(
            activations=tuple(_as_numpy(a) for a in leaves),
            gradients=tuple(np.moveaxis(_as_numpy(g), 0, 1) for g in grads),
            scores=scores_np,
            target=indices,
            input_spatial=spatial_shape(tuple(x.shape), self.input_layout),
            layouts=self.layouts,
            input_shape=tuple(x.shape),
            input_layout=self.input_layout,
        )
        return capture, _as_numpy(attributions)

    def predict(self, inputs: Any) -> np.ndarray:
        structure = self._structure(inputs)
        with self._naming_inputs(structure):
            x = self._ready(structure)
            compiled = self._program.function("predict", None, False, x)
            return _as_numpy(self._run(lambda: compiled(x), structure))



def _resolved_targets(
    scores: Any, chosen: Any, outputs: Any, target: TargetSpec, batch: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns a compiled pass's ``(N, K)`` scores and the class indices it explained (None for callables)."""
    scores_np = _as_numpy(scores)
    indices: np.ndarray | None = None
    if outputs is not None:
        indices = resolve_indices(target, outputs.numpy())
    elif chosen is not None:
        indices = chosen.numpy().astype(np.int64)
    elif scores_np.shape[0] != batch:
        raise TargetError(
            f"a callable target must return (N,) or (N, K) scores with N={batch}, got {scores_np.shape[0]} rows"
        )
    return scores_np, indices


_CALLS = ("PartitionedCall", "StatefulPartitionedCall")


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
    """:func:`_resolved_targets` of a guided pass; warns when the guided rule missed ReLUs."""
    direct, nested = (int(n) for n in np.asarray(relus).reshape(2))
    if nested:
        warnings.warn(
            f"guided backpropagation: {nested} ReLU op(s) run inside a nested tf.function (or a "
            "tf.cond / tf.while_loop body) of the model and keep the ordinary ReLU gradient, so the "
            "result is only partly guided; remove the inner @tf.function to guide them too",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    elif direct == 0:
        warnings.warn(
            "guided backpropagation found no ReLU op in the model (ReLU layers, "
            "activation='relu', keras.activations.relu, tf.nn.relu), so its result equals "
            "plain input gradients",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return _resolved_targets(scores, chosen, outputs, target, batch)
