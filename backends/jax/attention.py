"""Attention capture in JAX: every attention call run in its explicit form, A and ∂score/∂A read off.

The attention modules of a private copy of the model (or, for linen, of the apply-local module
clones) run ``softmax(q kᵀ/√d + mask)`` explicitly and add a zero *delta* to the probabilities
A: ``A + δ`` flows on, so ``∂score/∂δ`` at δ = 0 is ``∂score/∂A`` — A becomes an explicit
input of the differentiated function, which is what ``jax.vjp`` needs. The same mechanism
serves all three libraries (a ``sow``/``perturb`` capture exists in linen only, and a hook inside
Equinox's per-head ``vmap`` could not take a per-head δ):

* Flax linen ``nn.MultiHeadDotProductAttention`` (and ``SelfAttention``): caught by
  ``nn.intercept_methods``; its ``attention_fn`` is swapped on the apply-local module clone for
  the call's duration (the user's module definition is never touched).
* Flax NNX ``nnx.MultiHeadAttention``: its ``attention_fn`` is swapped on the private copy that
  is rebuilt inside the trace. NNX's default ``dot_product_attention`` takes the fused
  ``jax.nn.dot_product_attention`` path, which never builds A.
* ``nn.dot_product_attention`` / ``nnx.dot_product_attention`` called directly by a model: the
  module attributes are replaced, for the tracing thread only, while the model traces.
* Equinox ``eqx.nn.MultiheadAttention``: replaced in the private copy by a module that runs the
  same projections and the explicit softmax over all heads at once.

Accepted ``attention_fn``: Flax's ``dot_product_attention`` (linen or NNX) and
``jax.nn.dot_product_attention``, or ``functools.partial`` of them; any other function is
refused (anycam cannot know what it computes). Models run in inference mode (no dropout).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from anycam._errors import BackendError, LayerError, UnsupportedError
from anycam.core import TargetSpec, resolve_indices, spatial_shape
from anycam.core.attention import requested
from anycam.protocol.backend import AttentionCapture, select_output

from .capture import (
    _TRACE_INFO_LIMIT,
    _callable_scores,
    _class_outputs,
    _indices,
    _to_numpy,
    check_callable,
    target_mode,
)
from .inputs import _call_model, run, structured
from .models import _EquinoxProgram, _FunctionsProgram, _LinenProgram, _NnxProgram, _Program, _SequentialProgram

if TYPE_CHECKING:
    from .backend import JaxBackend


class _Recorder:
    """The attention probabilities of one traced forward pass; adds each call's zero delta."""

    def __init__(self, deltas: tuple[jax.Array, ...] | None) -> None:
        self.deltas = deltas
        self.weights: list[jax.Array] = []
        self.names: list[str] = []

    def __call__(self, weights: jax.Array, name: str) -> jax.Array:
        index = len(self.weights)
        if self.deltas is not None:
            weights = weights + self.deltas[index].astype(weights.dtype)
        self.weights.append(weights)
        self.names.append(name)
        return weights


# The recorder of the trace in progress (a context variable: each thread traces its own).
_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("anycam_attention", default=None)


def _record(weights: jax.Array, name: str) -> jax.Array:
    recorder = _RECORDER.get()
    return weights if recorder is None else recorder(weights, name)


# -- the explicit form of Flax's attention functions ------------------------------------------------


def _accepted(function: Any) -> dict[str, Any] | None:
    """Returns the keyword arguments bound to an accepted attention function, or None for another one."""
    keywords: dict[str, Any] = {}
    while isinstance(function, functools.partial):
        if function.args:
            return None
        keywords = {**function.keywords, **keywords}
        function = function.func
    known = [jax.nn.dot_product_attention]
    for name in ("flax.linen.attention", "flax.nnx.nn.attention"):
        module = sys.modules.get(name)
        if module is not None:
            known.append(_ORIGINALS.get((name, "dot_product_attention"), module.dot_product_attention))
    return keywords if any(function is known_fn for known_fn in known) else None


def _weights_function() -> Callable[..., jax.Array]:
    """Flax's explicit ``dot_product_attention_weights`` (NNX's when loaded: it knows ``is_causal``)."""
    nnx_attention = sys.modules.get("flax.nnx.nn.attention")
    if nnx_attention is not None:
        return nnx_attention.dot_product_attention_weights
    import flax.linen as nn

    return nn.dot_product_attention_weights


def _explicit(name: str, bound: dict[str, Any] | None = None) -> Callable[..., jax.Array]:
    """Returns an ``attention_fn`` computing ``A = softmax(q kᵀ/√d + bias + mask)`` and ``A @ v`` explicitly."""
    bound = dict(bound or {})

    def attention(
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: Any = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: Any = None,
        force_fp32_for_softmax: bool = False,
        is_causal: bool = False,
        scale: float | None = None,
    ) -> jax.Array:
        given = {
            "bias": bias,
            "mask": mask,
            "dropout_rate": dropout_rate,
            "deterministic": deterministic,
            "is_causal": is_causal,
            "scale": scale,
            "dtype": dtype,
            "precision": precision,
        }
        given.update(bound)
        if given["dropout_rate"] and not given["deterministic"]:
            raise BackendError(
                f"the attention {name!r} applies dropout (dropout_rate={given['dropout_rate']}, "
                "deterministic=False): the model runs in training mode. Run it in inference mode, "
                "e.g. model_kwargs={'deterministic': True}, or build it with deterministic=True"
            )
        if given["scale"] is not None:  # jax.nn.dot_product_attention's scale: fold it into q
            query = query * (given["scale"] * math.sqrt(query.shape[-1]))
        weights_fn = _weights_function()
        arguments = {
            "bias": given["bias"],
            "mask": given["mask"],
            "dtype": given["dtype"],
            "precision": given["precision"],
            "deterministic": True,
            "dropout_rate": 0.0,
        }
        if given["is_causal"]:
            if "is_causal" not in _parameters(weights_fn):
                raise UnsupportedError(
                    f"the attention {name!r} is causal, which this Flax version cannot make explicit"
                )
            arguments["is_causal"] = True
        if given["mask"] is not None:
            arguments["mask"] = given["mask"].astype(bool)
        weights = weights_fn(query, key, **arguments)
        weights = _record(weights, name)
        heads = weights.shape[-3]
        if value.shape[-2] != heads:  # grouped-query attention: each value head serves a group
            value = jnp.repeat(value, heads // value.shape[-2], axis=-2)
        return jnp.einsum("...hqk,...khd->...qhd", weights, value.astype(weights.dtype), precision=given["precision"])

    return attention


@functools.cache
def _parameters_of(function: Any) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(function).parameters)


def _parameters(function: Any) -> frozenset[str]:
    return _parameters_of(function)


def _checked_fn(module: Any, name: str) -> Callable[..., jax.Array]:
    """The explicit replacement of a Flax attention module's ``attention_fn``; refuses unknown functions."""
    bound = _accepted(module.attention_fn)
    if bound is None:
        function_name = getattr(module.attention_fn, "__name__", module.attention_fn)
        raise UnsupportedError(
            f"the attention module {name!r} uses attention_fn={function_name!r}, "
            "which anycam cannot run in its explicit form; the attention methods accept Flax's "
            "dot_product_attention and jax.nn.dot_product_attention (or functools.partial of them)"
        )
    return _explicit(name, bound)


# -- direct calls of nn.dot_product_attention / nnx.dot_product_attention ---------------------------

_FUNCTION_SITES = (
    ("flax.linen", "dot_product_attention"),
    ("flax.linen.attention", "dot_product_attention"),
    ("flax.nnx", "dot_product_attention"),
    ("flax.nnx.nn.attention", "dot_product_attention"),
)
_ORIGINALS: dict[tuple[str, str], Any] = {}
_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def _functions_replaced() -> Iterator[None]:
    """Replaces Flax's ``dot_product_attention`` by the explicit form, for this thread, while a model traces."""
    owner = threading.get_ident()
    counter = [0]
    with _PATCH_LOCK:
        saved: list[tuple[Any, str, Any]] = []
        try:
            for module_name, attribute in _FUNCTION_SITES:
                module = sys.modules.get(module_name)
                original = getattr(module, attribute, None) if module is not None else None
                if original is None:
                    continue
                original = _ORIGINALS.setdefault((module_name, attribute), original)

                def replaced(*args: Any, __original: Any = original, **kwargs: Any) -> Any:
                    if threading.get_ident() != owner or _RECORDER.get() is None:
                        return __original(*args, **kwargs)
                    counter[0] += 1
                    return _explicit(f"dot_product_attention#{counter[0]}")(*args, **kwargs)

                saved.append((module, attribute, getattr(module, attribute)))
                setattr(module, attribute, replaced)
            yield
        finally:
            for module, attribute, value in reversed(saved):
                setattr(module, attribute, value)


# -- Equinox: MultiheadAttention with the explicit softmax over all heads ---------------------------


@functools.cache
def _equinox_explicit() -> type:
    import equinox as eqx

    class ExplicitMultiheadAttention(eqx.Module):
        """Runs an ``eqx.nn.MultiheadAttention``'s projections with an explicit, recorded softmax."""

        _anycam_inner: Any
        _anycam_name: str = eqx.field(static=True)

        def __call__(
            self,
            query: jax.Array,
            key_: jax.Array,
            value: jax.Array,
            mask: jax.Array | None = None,
            *,
            key: Any = None,
            inference: bool | None = None,
            deterministic: bool | None = None,
            process_heads: Any = None,
        ) -> jax.Array:
            inner = self._anycam_inner
            query_heads = inner._project(inner.query_proj, query)
            key_heads = inner._project(inner.key_proj, key_)
            value_heads = inner._project(inner.value_proj, value)
            if process_heads is not None:
                query_heads, key_heads, value_heads = process_heads(query_heads, key_heads, value_heads)
            # As eqx.nn._attention.dot_product_attention_weights, for every head at once.
            query_heads = query_heads / math.sqrt(query_heads.shape[-1])
            logits = jnp.einsum("shd,Shd->hsS", query_heads, key_heads)
            if mask is not None:
                logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            dtype = jnp.result_type(logits.dtype, jnp.float32)
            weights = jax.nn.softmax(logits.astype(dtype), axis=-1).astype(logits.dtype)
            weights = _record(weights, self._anycam_name)
            attended = jnp.einsum("hsS,Shd->shd", weights, value_heads)
            return jax.vmap(inner.output_proj)(attended.reshape(query.shape[0], -1))

    return ExplicitMultiheadAttention


def _equinox_model(program: _Program, params: Any) -> Any:
    import equinox as eqx

    from .models import _equinox_modules, _follow

    model = eqx.nn.inference_mode(eqx.combine(params, program.structure))
    found = [(path, m) for path, m in _equinox_modules(model) if isinstance(m, eqx.nn.MultiheadAttention)]
    explicit = _equinox_explicit()
    if isinstance(model, eqx.nn.MultiheadAttention):
        return explicit(model, "")
    # Deepest first, so replacing one leaves the paths of those around it valid.
    for path, module in sorted(found, key=lambda item: -len(item[0])):
        model = eqx.tree_at(functools.partial(_follow, path=path), model, explicit(module, ".".join(map(str, path))))
    return model


# -- one forward pass with every attention explicit ---------------------------------------------


def _linen_call(program: _Program, params: Any, x: Any) -> Any:
    import flax.linen as nn

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.MultiHeadDotProductAttention):
            return next_fun(*args, **kwargs)
        name = "/".join(module.path)
        original = module.attention_fn
        # The apply-local clone's field, for this call only: the user's module is another object.
        object.__setattr__(module, "attention_fn", _checked_fn(module, name))
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "attention_fn", original)

    with nn.intercept_methods(interceptor):
        return _call_model(functools.partial(program.structure.apply, params), x, program.kwargs)


def _nnx_call(program: _Program, params: Any, x: Any) -> Any:
    from flax import nnx

    if isinstance(program.structure, nnx.GraphDef):
        model = nnx.merge(program.structure, params)
    else:
        model = jax.tree_util.tree_unflatten(program.structure, params)
    model.eval()
    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.MultiHeadAttention):
            name = ".".join(map(str, path))
            module.attention_fn = _checked_fn(module, name)  # the private copy's, built in this trace
    return _call_model(model, x, program.kwargs)


def _call(program: _Program, params: Any, x: Any) -> Any:
    own = getattr(program, "attention_call", None)  # a Keras model on JAX (see keras.py)
    if own is not None:
        return own(params, x)
    if isinstance(program, _LinenProgram):
        return _linen_call(program, params, x)
    if isinstance(program, _NnxProgram):
        return _nnx_call(program, params, x)
    if isinstance(program, (_EquinoxProgram, _SequentialProgram)):
        return _call_model(_equinox_model(program, params), x, program.kwargs)
    if isinstance(program, _FunctionsProgram):
        features, head, with_params = program.structure
        args = (params,) if with_params else ()
        return head(*args, features(*args, x))
    raise UnsupportedError(f"attention capture does not know the JAX model family of {type(program).__name__}")


def _forward(program: _Program, params: Any, x: Any, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
    """Returns (selected output, attention probabilities per call) with every attention explicit."""

    def one(x: Any, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        recorder = _Recorder(deltas)
        token = _RECORDER.set(recorder)
        try:
            with _functions_replaced():
                output = _call(program, params, x)
        finally:
            _RECORDER.reset(token)
        _NAMES[program] = tuple(recorder.names)
        return output, tuple(recorder.weights)

    output, weights = jax.vmap(one)(x, deltas) if program.vmap else one(x, deltas)
    return select_output(output, program.output), weights


class _Explicit:
    """``program`` run with every attention explicit, as ``check_callable`` runs a program."""

    def __init__(self, program: _Program) -> None:
        self.program = program

    def __hash__(self) -> int:
        return hash(("attention", self.program))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Explicit) and other.program == self.program

    def run(self, params: Any, x: Any, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        return _forward(self.program, params, x, deltas)


# program → the attention calls' names, written while tracing (names cannot leave a compiled function).
_NAMES: dict[Any, tuple[str, ...]] = {}


def _reaching(closed: Any) -> list[bool]:
    """Per input of a closed jaxpr: whether a differentiable path leads from it to an output.

    A dataflow pass over the equations: ``stop_gradient`` and equations whose outputs are all
    integers or booleans (argmax, comparisons) cut the path, as they cut torch's autograd graph
    and TensorFlow's tape; an equation with a nested program (``pjit``, ``custom_jvp_call``,
    ``scan`` …) is taken as joining all its inputs to all its outputs, which can only over-report
    a path, never miss one.
    """
    jaxpr = closed.jaxpr
    depends: dict[Any, frozenset[int]] = {var: frozenset({i}) for i, var in enumerate(jaxpr.invars)}

    def sources(var: Any) -> frozenset[int]:
        return depends.get(var, frozenset()) if not hasattr(var, "val") else frozenset()

    for eqn in jaxpr.eqns:
        found = frozenset().union(*(sources(var) for var in eqn.invars))
        if not found or eqn.primitive.name == "stop_gradient":
            continue
        for var in eqn.outvars:
            dtype = getattr(getattr(var, "aval", None), "dtype", None)
            if dtype is not None and jnp.issubdtype(dtype, jnp.inexact):
                depends[var] = found
    reached = frozenset().union(*(sources(var) for var in jaxpr.outvars))
    return [i in reached for i in range(len(jaxpr.invars))]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _attend(
    program: _Program, mode: tuple[Any, ...], request: tuple[bool, bool], params: Any, x: Any, given: Any
) -> Any:
    """Returns (probabilities per call, their gradients ``(N, K, ...)`` or None, scores, indices, outputs).

    ``request`` is (gradients, reduced); reduced, what leaves the program is what the method
    reads: without gradients each call's head mean ``(N, 1, T, S)``; with them each call's
    ``Ē = mean_h ReLU(∂score/∂A ⊙ A)`` ``(N, K, 1, T, S)`` (XLA fuses it into the backward) and
    all-ones probabilities ``(N, 1, T, S)`` beside it.

    Raises:
        anycam.LayerError: (when tracing) an attention call that does not reach the explained
            output — no differentiable path from its probabilities to the scores — the rule the
            torch and TensorFlow adapters follow.
    """
    gradients, reduced = request
    batch = x.shape[0]
    shapes = jax.eval_shape(lambda xs: _forward(program, params, xs, None)[1], x)
    deltas = tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)

    def outputs_of(deltas: Any) -> Any:
        output, weights = _forward(program, params, x, deltas)
        if mode[0] == "callable":
            return _callable_scores(mode[1], output, batch), weights
        return _class_outputs(output, batch), weights

    if not gradients:
        outputs, weights = outputs_of(deltas)
        indices = _indices(outputs, mode, given)
        if reduced:
            weights = tuple(w.mean(axis=1, keepdims=True) if w.ndim == 4 else w for w in weights)
        return weights, None, jnp.take_along_axis(outputs, indices, axis=1), indices, outputs
    reaching = _reaching(jax.make_jaxpr(lambda d: outputs_of(d)[0])(deltas))
    unreached = [index for index, hit in enumerate(reaching) if not hit]
    if unreached:
        names = _NAMES.get(program, ())
        raise LayerError(
            f"attention call(s) {[names[i] if i < len(names) else i for i in unreached]} do not reach the "
            "explained output (no differentiable path from their probabilities to it); the attention methods "
            "need every attention on the path to the output"
        )
    outputs, vjp_fn, weights = jax.vjp(outputs_of, deltas, has_aux=True)
    indices = _indices(outputs, mode, given)
    cotangents = jax.nn.one_hot(indices.T, outputs.shape[1], dtype=outputs.dtype)
    if cotangents.shape[0] == 1:
        grads = tuple(g[:, None] for g in vjp_fn(cotangents[0])[0])
    else:
        grads = tuple(jnp.moveaxis(g, 0, 1) for g in jax.vmap(vjp_fn)(cotangents)[0])
    if reduced:
        grads = tuple(
            jnp.maximum(g.astype(jnp.float32) * w.astype(jnp.float32)[:, None], 0.0).mean(axis=2, keepdims=True)
            for g, w in zip(grads, weights, strict=True)
        )
        weights = tuple(jnp.ones_like(g[:, 0]) for g in grads)
    return weights, grads, jnp.take_along_axis(outputs, indices, axis=1), indices, outputs


def attention_capture(
    backend: JaxBackend, inputs: Any, target: TargetSpec, *, gradients: bool, snapshot: Any = None
) -> AttentionCapture:
    """Returns every attention call's probabilities ``(N, H, T, T)`` and, if asked, ∂score/∂A ``(N, K, H, T, T)``.

    One compiled forward pass (and one backward per target, vectorised) with each attention in
    its explicit form; the model's outputs equal those of its own (possibly fused) attention
    within float tolerance. Nothing is patched on the model: linen's apply-local clones get the
    explicit ``attention_fn`` for their call, NNX and Equinox models a private copy, and
    Flax's module-level ``dot_product_attention`` is replaced for the tracing thread only and
    restored in ``finally``.

    Raises:
        anycam.UnsupportedError: the model has no attention anycam can read, or an attention
            whose probabilities are not ``(N, H, T, S)``, or an unknown ``attention_fn``.
        anycam.BackendError: an attention applies dropout (training mode).
        anycam.TargetError: for targets that do not fit the output.
        anycam.LayerError: an attention call that does not reach the explained output.

    When the driver requests ``reduced`` (``anycam.core.attention.requested()``), the arrays
    are what the method reads, reduced inside the program.
    """
    request = (gradients, requested().reduced)
    # Not backend._as_input: with layer=None it would choose a layer, which attention needs none of.
    x = structured(backend, inputs)
    batch = x.shape[0]
    mode, given = target_mode(target, batch)
    if mode == ("given",):
        assert target.indices is not None
        if target.kind == "indices" and target.indices.shape[0] != batch:
            resolve_indices(target, np.zeros((batch, 1), np.float32))  # raises: wrong count
        given = np.broadcast_to(target.indices, (batch, target.indices.shape[1])).astype(np.int32)
    program, params = backend._model.snapshot() if snapshot is None else snapshot()
    if mode[0] == "callable":
        # The layer taps of an automatic layer choice have no part here: check on the explicit forward.
        check_callable(backend, _Explicit(program), params, x, mode[1])  # type: ignore[arg-type]
    result = run(backend, lambda: jax.device_get(_attend(program, mode, request, params, x, given)), x)
    weights, grads, scores, found, outputs = result
    names = _NAMES.get(program, ())
    if len(_NAMES) > _TRACE_INFO_LIMIT:
        _NAMES.pop(next(iter(_NAMES)), None)
    if not weights:
        raise UnsupportedError(
            "the model made no attention call anycam can read (Flax linen MultiHeadDotProductAttention, "
            "NNX MultiHeadAttention, nn/nnx.dot_product_attention, Equinox MultiheadAttention); "
            "the attention methods need one"
        )
    for name, w in zip(names, weights, strict=False):
        if w.ndim != 4:
            raise UnsupportedError(
                f"the attention {name!r} gives probabilities of shape {tuple(w.shape)}; the attention "
                "methods need (N, heads, queries, keys), one batch axis and one token axis"
            )
    indices: np.ndarray | None = None
    if mode == ("given",):
        indices = resolve_indices(target, _to_numpy(outputs))
    elif mode[0] != "callable":
        indices = np.asarray(found, dtype=np.int64)
    return AttentionCapture(
        attentions=tuple(_to_numpy(w) for w in weights),
        gradients=None if grads is None else tuple(_to_numpy(g) for g in grads),
        scores=_to_numpy(scores),
        target=indices,
        input_spatial=spatial_shape(tuple(x.shape), backend.input_layout),
        names=names,
    )
