"""Activations and gradients of the explained layers (K targets in one pass), predict, input scores.

A ``Program`` holds the compiled functions of one (model, layers, output selector): captures per
target form and input signature, and the compiled functions of the other capabilities (head,
pooled, guided modules), whose graphs it traces on demand. Programs are cached on the model,
weakly, so every Explainer of that model and layer shares them and nothing is traced twice.
Targets are resolved inside the graph (argmax and top-k by ``tf.math.top_k``, given indices by
``tf.gather``) and range-checked afterwards by ``anycam.core.resolve_indices``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from anycam._errors import LayerError, TargetError
from anycam.core import TargetSpec, resolve_indices, spatial_shape
from anycam.protocol.backend import Capture, select_output
from anycam.protocol.inputs import ModelInputs

from .inputs import model_inputs, naming_inputs, ready, run, structured
from .layers import KerasForward

if TYPE_CHECKING:
    from .backend import TensorFlowBackend
    from .pooled import Tail

_CALLABLE_TRACES = 8  # compiled captures kept per program for callable targets (LRU)
_PROGRAMS_PER_MODEL = 16  # (layers, output selector) combinations kept per model (LRU)

# model -> {(layer ids, output selector): Program}; weak, so a cache never keeps a model alive
# (the compiled functions reach the model only through weak references).
_PROGRAMS: weakref.WeakKeyDictionary[Any, collections.OrderedDict[tuple[Any, ...], Program]] = (
    weakref.WeakKeyDictionary()
)


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


class Program:
    """The compiled captures of one (model, layers, output selector)."""

    def __init__(self, forward: Callable[..., Any], selector: Any) -> None:
        self.forward = forward
        self.selector = selector
        self.trace_count = 0
        self._functions: dict[tuple[Any, ...], Any] = {}
        self._callables: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        # (layer rank, channel axis) -> the pooled head after the first layer, or None.
        self.heads: dict[tuple[int, int], Tail | None] = {}

    def function(self, kind: str, param: Any, gradients: bool, inputs: tf.Tensor) -> Any:
        """Returns the compiled capture for a target form and the input's shape and dtype."""
        key = (kind, _token(param), gradients, _signature_key(inputs))
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
        self, body: Callable[..., Any], kind: str, target: str, param: Any, inputs: Any, *extra: tf.TensorSpec
    ) -> Any:
        """Returns the compiled function of a method capability, one per target form and shapes.

        ``body(program, kind, target, param, inputs, *args)`` is what the function traces: the
        graph of that capability (in ``head``, ``pooled``, ``guided``, or ``_inputs`` here).
        ``kind`` is ``"head"`` (``head_scores``), ``"ablate"`` (``ablation_scorer``; ``param`` is
        then (the target's parameter, the channel axis)), ``"tail"`` (``ablation_head``; the
        "inputs" are then the ``(B, N, F)`` features and ``param`` is (the target's parameter,
        the ``pooled.Tail``, the per-row shape)), ``"inputs"`` or ``"probabilities"``
        (``input_scores``) or ``"guided"`` (``guided_gradients``); ``target`` is ``"callable"``
        (``param`` the function), ``"indices"`` (``param`` K) or, for guided, ``"topk"``.
        ``extra`` are the signatures of the arguments after the inputs.
        """
        token = _token(param)
        shapes = tuple((tuple(spec.shape), spec.dtype) for spec in extra)
        key = (kind, target, token, _signature_key(inputs), shapes)
        table = self._callables if target == "callable" else self._functions
        with self._lock:
            function = table.get(key)
            if function is None:
                # The batch left open; several inputs are one nested argument, as Keras takes them.
                opened = tf.nest.map_structure(lambda t: tf.TensorSpec((None, *t.shape[1:]), t.dtype), inputs)
                signature = [opened, *extra]
                traced = functools.partial(body, self, kind, target, param)
                function = table[key] = tf.function(traced, input_signature=signature, autograph=False)
                if target == "callable" and len(table) > _CALLABLE_TRACES:
                    self._callables.popitem(last=False)
            elif target == "callable":
                self._callables.move_to_end(key)
        return function

    def _inputs(
        self, kind: str, target: str, param: Any, inputs: tf.Tensor, indices: Any = None
    ) -> tuple[Any, Any]:
        self.trace_count += 1
        output, _ = self.forward(inputs, None)
        selected = select_output(output, self.selector)
        if target != "callable" and kind == "probabilities":
            selected = tf.nn.softmax(tf.cast(_class_output(selected), tf.float32), axis=1)
        scores, _, outputs = self.target_scores(target, param, selected, indices)
        return tf.cast(scores, tf.float32), outputs

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
            scores, chosen, outputs = self.target_scores(kind, param, selected, indices)
            count = scores.shape[1]
            if count is None:
                raise TargetError(
                    "a callable target must return a fixed number K of scores per sample"
                )
            # Summed over the batch on the tape: samples are independent in inference mode, so
            # the gradient of a column's batch sum is each sample's own gradient.
            totals = tf.reduce_sum(scores, axis=0)
        grads = None if tape is None else self.layer_gradients(tape, scores, totals, leaves)
        return tuple(leaves), grads, tf.cast(scores, tf.float32), chosen, outputs

    @staticmethod
    def target_scores(kind: str, param: Any, selected: Any, indices: Any) -> tuple[Any, Any, Any]:
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

    def layer_gradients(
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


def _token(param: Any) -> Any:
    """Returns a compiled function's cache key for its parameter: the value, or an id where unhashable.

    A tuple is keyed element by element: an unhashable callable target inside ``(fn, axis)`` is
    keyed by its own id (the cached function holds it, so the id stays unique), never by the
    id of a tuple built for this one call.
    """
    if isinstance(param, tuple):
        return tuple(_token(part) for part in param)
    try:
        hash(param)
    except TypeError:
        return ("id", id(param))
    return param


def _signature_key(inputs: Any) -> tuple[Any, ...]:
    """The compiled capture's cache key for an input structure: its layout, shapes (batch open), dtypes."""
    flat = tf.nest.flatten(inputs)
    layout = tuple(sorted(inputs)) if isinstance(inputs, dict) else (type(inputs).__name__, len(flat))
    return (layout, tuple((tuple(t.shape[1:]), t.dtype.name) for t in flat))


def as_numpy(tensor: Any) -> np.ndarray:
    """Returns ``tensor`` as a float32 NumPy array."""
    # np.asarray views the tensor's buffer (read-only); .numpy() copies it, which for K maps'
    # gradients is tens of megabytes per call.
    return np.asarray(np.asarray(tensor), dtype=np.float32)


def resolved_targets(
    scores: Any, chosen: Any, outputs: Any, target: TargetSpec, batch: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns a compiled pass's ``(N, K)`` scores and the class indices it explained (None for callables)."""
    scores_np = as_numpy(scores)
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


def keras_program(backend: TensorFlowBackend, names: Sequence[str] | None = None) -> Program:
    """Returns the cached Program of the backend's model, layers, ports, output selector and model_kwargs."""
    names = backend.layer_names if names is None else names
    forward = KerasForward(backend.model, backend.layers, names, backend.ports, backend.model_kwargs)
    try:
        key: tuple[Any, ...] = (
            tuple(id(layer) for layer in backend.layers),
            tuple(backend.ports),
            backend.output,
            tuple(sorted(backend.model_kwargs.items())),
        )
        hash(key)
    except TypeError:
        return Program(forward, backend.output)
    programs = _PROGRAMS.setdefault(backend.model, collections.OrderedDict())
    program = programs.get(key)
    if program is None:
        program = programs[key] = Program(forward, backend.output)
        if len(programs) > _PROGRAMS_PER_MODEL:
            programs.popitem(last=False)
    else:
        programs.move_to_end(key)
    return program


def given_indices(target: TargetSpec, batch: int) -> np.ndarray:
    """Returns the ``(N, K)`` int64 class indices of an ``index`` or ``indices`` target."""
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


def resolved(target: TargetSpec, indices: np.ndarray | None, batch: int) -> tuple[str, Any, list[Any]]:
    """Returns (target form, its parameter, the extra arguments) for resolved ``indices``."""
    if target.kind == "callable":
        return "callable", target.fn, []
    if indices is None:
        raise TargetError("class-index targets need the (N, K) class indices the capture resolved; got None")
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[0] != batch:
        raise TargetError(f"expected (N, K) class indices with N={batch}, got shape {indices.shape}")
    return "indices", indices.shape[1], [tf.constant(indices.astype(np.int64))]


def capture(
    backend: TensorFlowBackend,
    inputs: Any,
    target: TargetSpec,
    *,
    gradients: bool = True,
    native: bool = False,
    differentiable: bool = False,
) -> Capture:
    """Runs the model once: the layers' activations and, per target, their gradients.

    ``native``: the arrays stay ``tf.Tensor`` on the model's device, float32 (no NumPy copy; the
    (N, K) class indices come back to the host, and nothing else). ``differentiable`` (implies
    native): a ``tf.GradientTape`` the caller holds records the compiled pass, the inner tape's
    backward pass included (nested tapes): the activations and gradients, and every map the core
    computes from them, are differentiable with respect to the model's variables and a watched
    input.
    """
    structure = structured(backend, inputs)
    with naming_inputs(structure):
        return _capture(backend, structure, target, gradients, native or differentiable)


def _capture(
    backend: TensorFlowBackend,
    structure: ModelInputs,
    target: TargetSpec,
    gradients: bool,
    native: bool = False,
) -> Capture:
    x = ready(backend, structure)
    spatial = structure.spatial_value
    batch = int(spatial.shape[0])
    program = backend._program
    extra: list[Any] = []
    param: Any
    if target.kind == "callable":
        kind, param = "callable", target.fn
    elif target.kind in ("argmax", "topk"):
        kind, param = "topk", 1 if target.kind == "argmax" else target.k
    else:
        given = given_indices(target, batch)
        kind, param, extra = "indices", given.shape[1], [tf.constant(given)]
    # Differentiable needs nothing more: a caller's tape records the compiled call, and TF
    # differentiates a tf.function's graph, the inner tape's backward pass included (second
    # order through the layer's gradient). The captured tensors are not detached anywhere.
    compiled = run(backend, lambda: program.function(kind, param, gradients, x), structure)
    leaves, grads, scores, chosen, outputs = run(backend, lambda: compiled(x, *extra), structure)
    if native:
        indices = native_targets(scores, chosen, outputs, target, batch)
        return Capture(
            activations=tuple(leaves),
            # (K, N, ...) → (N, K, ...) on the device.
            gradients=None if grads is None else tuple(tf.transpose(g, [1, 0, *range(2, g.shape.rank)]) for g in grads),
            scores=scores,
            target=indices,
            input_spatial=spatial_shape(tuple(spatial.shape), backend.input_layout),
            layouts=backend.layouts,
            input_shape=tuple(spatial.shape),
            input_layout=backend.input_layout,
        )
    scores_np, indices = resolved_targets(scores, chosen, outputs, target, batch)
    return Capture(
        activations=tuple(as_numpy(a) for a in leaves),
        gradients=None if grads is None else tuple(np.moveaxis(as_numpy(g), 0, 1) for g in grads),
        scores=scores_np,
        target=indices,
        input_spatial=spatial_shape(tuple(spatial.shape), backend.input_layout),
        layouts=backend.layouts,
        input_shape=tuple(spatial.shape),
        input_layout=backend.input_layout,
    )


def native_targets(scores: Any, chosen: Any, outputs: Any, target: TargetSpec, batch: int) -> np.ndarray | None:
    """Returns the (N, K) int64 class indices of a native capture: the only values read back to the host.

    Given indices are range-checked against the output's shape alone (``resolve_indices`` reads
    nothing else of it for them), so the (N, classes) output stays on the device.
    """
    if outputs is not None:
        return resolve_indices(target, np.broadcast_to(np.float32(0), tuple(int(d) for d in outputs.shape)))
    if chosen is not None:
        return np.asarray(chosen.numpy(), dtype=np.int64)
    if int(scores.shape[0]) != batch:
        raise TargetError(
            f"a callable target must return (N,) or (N, K) scores with N={batch}, got {int(scores.shape[0])} rows"
        )
    return None


def predict(backend: TensorFlowBackend, inputs: Any) -> np.ndarray:
    """Returns the (selected) model output as float32 NumPy, from one compiled forward."""
    structure = structured(backend, inputs)
    with naming_inputs(structure):
        x = ready(backend, structure)
        compiled = backend._program.function("predict", None, False, x)
        return as_numpy(run(backend, lambda: compiled(x), structure))


def input_scores(
    backend: TensorFlowBackend,
    inputs: Any,
    target: TargetSpec,
    indices: np.ndarray | None,
    *,
    probabilities: bool = False,
) -> np.ndarray:
    """Returns ``(M, K)`` float32 scores of the targets on a batch of (modified) inputs.

    ``probabilities=True`` takes the softmax over the classes first (Score-CAM's weights),
    for class-index targets only. One compiled forward per target form and input shape.

    Raises:
        anycam.TargetError: ``probabilities=True`` with a callable target, or indices that
            do not fit the batch or the model's classes.
    """
    x, spatial, _ = model_inputs(backend, inputs)
    if probabilities and target.kind == "callable":
        raise TargetError(
            "Score-CAM weights by the softmax of class scores, and a callable target has no "
            "classes to take it over; pass class indices, or a callable that returns what to "
            "weight by and probabilities=False"
        )
    batch = int(spatial.shape[0])
    form, param, extra = resolved(target, indices, batch)
    specs = [tf.TensorSpec((None, param), tf.int64)] if form == "indices" else []
    kind = "probabilities" if probabilities else "inputs"
    scores, outputs = backend._program.method_function(Program._inputs, kind, form, param, x, *specs)(x, *extra)
    if outputs is not None:
        resolve_indices(TargetSpec("indices", squeeze=False, indices=np.asarray(indices)), outputs.numpy())
    scores_np = as_numpy(scores)
    if scores_np.shape[0] != batch:
        raise TargetError(f"a callable target must return (N,) or (N, K) scores with N={batch}")
    return scores_np
