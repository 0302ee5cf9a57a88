"""The compiled capture: activations and gradients for K targets in one pass, predict, input scores.

Class-index targets are resolved inside the compiled function (``argmax``, ``lax.top_k``, or
indices passed in as an argument); their one-hot cotangents ``(K, N, classes)`` go through
``jax.vmap(vjp_fn)``: one forward pass and K backward passes of the head only. The capture is one
``jax.jit`` whose static argument is the program (see ``models``), so it compiles once per (model,
layer, target kind, shapes), across Explainers too; results come back to NumPy in one
``jax.device_get``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.extend import core as jax_core

from anycam._errors import LayerError, TargetError
from anycam.core import TargetSpec, check_scores_shape, resolve_indices, spatial_shape
from anycam.protocol.backend import Capture

from .inputs import _shape_key, run
from .models import _Program

if TYPE_CHECKING:
    from .backend import JaxBackend


_TRACE_INFO_LIMIT = 64


def _to_numpy(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _callable_scores(fn: Callable[[Any], Any], output: Any, batch: int) -> jax.Array:
    scores = fn(output)
    if not isinstance(scores, jax.Array) or scores.ndim not in (1, 2) or scores.shape[0] != batch:
        shape = tuple(scores.shape) if isinstance(scores, jax.Array) else type(scores).__name__
        raise TargetError(
            f"a callable target must return a JAX array of shape (N,) or (N, K) with N={batch}, got {shape}"
        )
    check_scores_shape(tuple(scores.shape), batch)
    return scores.reshape(batch, -1)


def _class_outputs(output: Any, batch: int) -> jax.Array:
    if not isinstance(output, jax.Array):
        raise TargetError(f"the selected model output is a {type(output).__name__}, not an array; use output=...")
    if output.ndim != 2 or output.shape[0] != batch:
        raise TargetError(
            f"class-index targets need a model output of shape (N, classes), got {tuple(output.shape)}; "
            "pass a callable target that maps the output to (N,) scores"
        )
    return output


def _indices(outputs: jax.Array, mode: tuple[Any, ...], given: jax.Array | None) -> jax.Array:
    """Returns the ``(N, K)`` class indices each map explains (all columns for callables)."""
    kind = mode[0]
    if kind == "argmax":
        return jnp.argmax(outputs, axis=1)[:, None]
    if kind == "topk":
        classes = outputs.shape[1]
        if mode[1] > classes:
            raise TargetError(f"top_k({mode[1]}) asks for more classes than the model has ({classes})")
        # lax.top_k puts the lower index first among ties, like the core's stable argsort.
        return jax.lax.top_k(outputs, mode[1])[1]
    if kind == "given":
        assert given is not None
        return given
    return jnp.broadcast_to(jnp.arange(outputs.shape[1]), outputs.shape)


def _selected_scores(mode: tuple[Any, ...], output: Any, batch: int, given: Any, probabilities: bool = False) -> Any:
    """Returns the ``(N, K)`` scores of a callable target, or of the given class indices."""
    if mode[0] == "callable":
        return _callable_scores(mode[1], output, batch)
    outputs = _class_outputs(output, batch)
    if probabilities:
        outputs = jax.nn.softmax(outputs.astype(jnp.float32), axis=1)
    # Out-of-range classes are clipped here and reported by resolve_indices afterwards.
    safe = jnp.clip(given, 0, outputs.shape[1] - 1)
    return jnp.take_along_axis(outputs, safe, axis=1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _capture(program: _Program, mode: tuple[Any, ...], params: Any, x: jax.Array, given: Any) -> Any:
    """Returns (activations, gradients ``(N, K, ...)``, scores, indices, outputs ``(N, M)``)."""
    batch = x.shape[0]
    shapes = jax.eval_shape(lambda p, xs: program.run(p, xs, None)[1], params, x)
    deltas = tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)

    def outputs_of(deltas: tuple[jax.Array, ...]) -> Any:
        output, activations = program.run(params, x, deltas)
        if mode[0] == "callable":
            return _callable_scores(mode[1], output, batch), activations
        return _class_outputs(output, batch), activations

    outputs, vjp_fn, activations = jax.vjp(outputs_of, deltas, has_aux=True)
    indices = _indices(outputs, mode, given)
    cotangents = jax.nn.one_hot(indices.T, outputs.shape[1], dtype=outputs.dtype)
    if cotangents.shape[0] == 1:
        gradients = tuple(g[:, None] for g in vjp_fn(cotangents[0])[0])
    else:
        gradients = tuple(jnp.moveaxis(g, 0, 1) for g in jax.vmap(vjp_fn)(cotangents)[0])
    scores = jnp.take_along_axis(outputs, indices, axis=1)
    return activations, gradients, scores, indices, outputs


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(program: _Program, params: Any, x: jax.Array) -> Any:
    return program.run(params, x, None)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _input_scores(
    program: _Program, mode: tuple[Any, ...], probabilities: bool, params: Any, x: jax.Array, given: Any
) -> Any:
    """Returns the ``(M, K)`` scores of a batch and, for class targets, its ``(M, classes)`` outputs."""
    output, _ = program.run(params, x, None)
    scores = _selected_scores(mode, output, x.shape[0], given, probabilities)
    return scores, (None if mode[0] == "callable" else _class_outputs(output, x.shape[0]))


def _constant_gradients(traced: Any, count: int) -> tuple[int, ...]:
    """Returns the layers whose gradient depends on no input of the traced capture.

    Such a gradient is a constant; when that constant is zero the layer does not reach the
    output (jax.vjp gives a symbolic zero), which an all-zero check alone cannot tell from a
    dead map.
    """
    jaxpr = traced.jaxpr.jaxpr
    dependent = set(jaxpr.invars) | set(jaxpr.constvars)
    for eqn in jaxpr.eqns:
        if any(isinstance(v, jax_core.Var) and v in dependent for v in eqn.invars):
            dependent.update(eqn.outvars)
    gradients = jaxpr.outvars[count : 2 * count]
    return tuple(i for i, v in enumerate(gradients) if not (isinstance(v, jax_core.Var) and v in dependent))


def check_callable(backend: JaxBackend, program: _Program, params: Any, x: Any, fn: Callable[[Any], Any]) -> None:
    """Refuses a callable target that indexes the model output out of range.

    JAX clamps an out-of-range index instead of failing, so a callable written for an
    ``(N, classes)`` output, given an output of another shape (an input with an extra axis,
    which Flax folds into the batch, gives ``(N, 1, classes)``), returns plausible scores of
    the wrong entries and a wrong map. The callable runs once per (program, callable, input
    shape) under ``checkify``'s index checks, on a zero output of the model's output shape
    (traced, not computed): the indices a target takes from its own constants (labels,
    ``jnp.arange(N)``) are checked exactly; indices it computes from the output's values are not.

    Raises:
        anycam.TargetError: naming the output's shape, the input's and the index that misses.
    """
    key = (program, id(fn), _shape_key(x))
    if key in backend._checked:
        return
    shapes = run(backend, lambda: jax.eval_shape(lambda p, xs: program.run(p, xs, None)[0], params, x), x)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    try:
        error, _ = checkify.checkify(fn, errors=checkify.index_checks)(zeros)
        message = error.get()
    except Exception:  # the callable fails on zeros: the capture reports its own error
        message = None
    if message:
        shape = tuple(getattr(shapes, "shape", ()))
        raise TargetError(
            f"the callable target indexes the model output out of range ({message.strip()}); the model "
            f"returned shape {shape} for the input of shape {tuple(x.shape)}, and JAX clamps such an "
            "index instead of failing, so the scores would belong to other entries. Check the input's "
            "shape (an extra axis is folded into the batch by Flax) or index within range"
        )
    if len(backend._checked) >= _TRACE_INFO_LIMIT:
        backend._checked.clear()
    backend._checked[key] = fn  # keeps fn alive, so its id is not reused while the key is kept


def target_mode(target: TargetSpec, batch: int) -> tuple[tuple[Any, ...], np.ndarray | None]:
    """Returns (mode, placeholder ``(N, K)`` indices or None): the static half of a target."""
    if target.kind == "argmax":
        return ("argmax",), None
    if target.kind == "topk":
        return ("topk", target.k), None
    if target.kind == "callable":
        return ("callable", target.fn), None
    assert target.indices is not None
    return ("given",), np.zeros((batch, target.indices.shape[1]), np.int32)


def given_mode(target: TargetSpec, indices: np.ndarray | None, batch: int) -> tuple[tuple[Any, ...], Any]:
    """Returns (mode, int32 ``(N, K)`` indices or None) for the resolved ``indices`` of a call."""
    if target.kind == "callable":
        return ("callable", target.fn), None
    if indices is None:
        raise TargetError("class-index targets need the (N, K) class indices the capture resolved; got None")
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[0] != batch:
        raise TargetError(f"expected (N, K) class indices with N={batch}, got shape {indices.shape}")
    return ("given",), indices.astype(np.int32)


def with_gradients(
    backend: JaxBackend, program: _Program, params: Any, x: jax.Array, target: TargetSpec, native: bool = False
) -> Any:
    """Returns (activations, gradients ``(N, K, ...)``, scores, indices) from the compiled capture.

    NumPy arrays, or with ``native`` the compiled function's own arrays, on the model's device;
    the (N, K) class indices come to the host either way, and ``native`` syncs one boolean per
    layer whose gradient is a constant.
    """
    batch = x.shape[0]
    mode, given = target_mode(target, batch)
    key = (program, mode, _shape_key(x), None if given is None else given.shape)
    info = backend._traced.get(key)
    if info is None:
        if mode[0] == "callable":
            check_callable(backend, program, params, x, mode[1])
        traced = run(backend, lambda: _capture.trace(program, mode, params, x, given), x)
        info = (traced.out_info[4].shape[1], _constant_gradients(traced, len(backend.layer_names)))
        if len(backend._traced) >= _TRACE_INFO_LIMIT:
            # pop(..., None): another thread sharing the Explainer may evict the same entry.
            backend._traced.pop(next(iter(backend._traced), None), None)
        backend._traced[key] = info
    classes, constant = info
    indices = None
    if mode == ("given",):
        indices = resolve_indices(target, np.zeros((batch, classes), np.float32))
        given = indices.astype(np.int32)
    if native:
        # Explicit transfers only (allowed under jax.transfer_guard("disallow")): the indices in,
        # the (N, K) indices and one boolean per constant-gradient layer out.
        given = None if given is None else jax.device_put(given)
        activations, gradients, scores, found = _capture(program, mode, params, x, given)[:4]
        reaches = {i: bool(jax.device_get(jnp.any(gradients[i] != 0))) for i in constant}
    else:
        result = jax.device_get(_capture(program, mode, params, x, given)[:4])
        activations, gradients, scores, found = result
        reaches = {i: bool(np.any(gradients[i])) for i in constant}
    for index, reached in reaches.items():
        if not reached:
            raise LayerError(
                f"layer {backend.layer_names[index]!r} does not reach the explained output: its "
                "gradient is zero everywhere and depends on no input (no path from the layer "
                "to the output); explain a layer on the path to the output"
            )
    if mode[0] != "callable":
        indices = np.asarray(jax.device_get(found), dtype=np.int64)
    return activations, gradients, scores, indices


def without_gradients(
    backend: JaxBackend, program: _Program, params: Any, x: jax.Array, target: TargetSpec, native: bool = False
) -> Any:
    """Returns (activations, scores, indices) from one compiled forward pass (see ``with_gradients``)."""
    batch = x.shape[0]
    output, activations = run(backend, lambda: _forward(program, params, x), x)
    if target.kind == "callable":
        assert target.fn is not None
        check_callable(backend, program, params, x, target.fn)
        scores = _callable_scores(target.fn, output, batch)
        if not native:
            activations, scores = jax.device_get((activations, scores))
        return activations, scores, None
    if native:
        # The classes are chosen on the device; only the (N, K) indices come to the host.
        logits = _class_outputs(output, batch)
        mode, _ = target_mode(target, batch)
        if mode == ("given",):
            chosen = resolve_indices(target, np.zeros(logits.shape, np.float32))
        else:
            chosen = np.asarray(jax.device_get(_indices(logits, mode, None)), np.int64)
        scores = jnp.take_along_axis(logits, jax.device_put(chosen.astype(np.int32)), axis=1)
        return activations, scores, chosen
    activations, outputs = jax.device_get((activations, _class_outputs(output, batch)))
    outputs = _to_numpy(outputs)
    indices = resolve_indices(target, outputs)
    return activations, np.take_along_axis(outputs, indices, axis=1), indices


def _to_native(array: jax.Array) -> jax.Array:
    """Returns a device array as float32 on its device (float64 stays float64)."""
    return array if array.dtype in (jnp.float32, jnp.float64) else array.astype(jnp.float32)


def capture(
    backend: JaxBackend, inputs: Any, target: TargetSpec, *, gradients: bool = True, native: bool = False
) -> Capture:
    """Returns the explained layers' activations, the targets' gradients and scores for a batch.

    ``native``: JAX arrays on the model's device (float32; float64 stays), the target NumPy.
    """
    x = backend._as_input(inputs)
    backend._example = (tuple(x.shape), x.dtype)
    program, params = backend._model.snapshot()
    convert = _to_native if native else _to_numpy
    grads_out: tuple[Any, ...] | None = None
    if gradients:
        activations, grads, scores, indices = with_gradients(backend, program, params, x, target, native)
        grads_out = tuple(convert(g) for g in grads)
    else:
        activations, scores, indices = without_gradients(backend, program, params, x, target, native)
    return Capture(
        activations=tuple(convert(a) for a in activations),
        gradients=grads_out,
        scores=convert(scores),
        target=indices,
        input_spatial=spatial_shape(tuple(x.shape), backend.input_layout),
        layouts=(backend.layer_layout if layouts_decided(backend) else None,) * len(backend.layer_names),
        input_shape=tuple(x.shape),
        input_layout=backend.input_layout,
        layouts_follow_input=True,
    )


def layouts_decided(backend: JaxBackend) -> bool:
    """Whether the model's convention or the user's ``input_layout=`` decides the layouts.

    A Flax model, or an Equinox model with a convolution or pooling, has a convention; an
    Equinox model of Linear layers and a ``(features, head)`` pair only have the channels-first
    default, and a channels-last sequence ``(N, 77, 26)`` whose layer outputs are ``(N, 77, 16)``
    reads as 16 positions of 77 channels as well as 77 positions of 16. Undecided, the capture's
    layouts are None and the core refuses when both readings fit, unless ``layout=`` decides.
    """
    return bool(getattr(backend._model, "decided", True) or getattr(backend, "input_layout_given", True))


def input_scores(
    backend: JaxBackend, inputs: Any, target: TargetSpec, indices: np.ndarray | None, *, probabilities: bool = False
) -> np.ndarray:
    """Returns ``(M, K)`` float32 scores of the targets on a batch of (modified) inputs.

    ``probabilities=True`` takes the softmax over the classes first (Score-CAM's weights),
    for class-index targets only. One compiled forward per (model, target kind, shapes).

    Raises:
        anycam.TargetError: ``probabilities=True`` with a callable target, or indices that
            do not fit the batch or the model's classes.
    """
    x = backend._as_input(inputs)
    if probabilities and target.kind == "callable":
        raise TargetError(
            "Score-CAM weights by the softmax of class scores, and a callable target has no "
            "classes to take it over; pass class indices, or a callable that returns what to "
            "weight by and probabilities=False"
        )
    mode, given = given_mode(target, indices, x.shape[0])
    program, params = backend._model.snapshot()
    scores, outputs = jax.device_get(_input_scores(program, mode, bool(probabilities), params, x, given))
    if outputs is not None:
        resolve_indices(TargetSpec("indices", squeeze=False, indices=np.asarray(indices)), _to_numpy(outputs))
    return _to_numpy(scores).reshape(x.shape[0], -1)


def predict(backend: JaxBackend, inputs: Any) -> np.ndarray:
    """Returns the selected model output for a batch, as NumPy."""
    x = backend._as_input(inputs)
    backend._example = (tuple(x.shape), x.dtype)
    program, params = backend._model.snapshot()
    output, _ = run(backend, lambda: _forward(program, params, x), x)
    return _to_numpy(jax.device_get(output))


def to_native(backend: JaxBackend, array: np.ndarray) -> jax.Array:
    """Returns ``array`` on the device of the model's weights (JAX's default device without any)."""
    _, params = backend._model.snapshot()
    for leaf in jax.tree_util.tree_leaves(params):
        if isinstance(leaf, jax.Array):
            return jax.device_put(np.asarray(array), next(iter(leaf.devices())))
    return jax.device_put(np.asarray(array))
