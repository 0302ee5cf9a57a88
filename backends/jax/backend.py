"""JAX adapter: cut the model at the layer, ``jax.vjp`` the rest, compile the capture once.

How a capture runs:

* A *program* says, statically, how to run one model family with the explained layers' outputs
  exposed: Flax linen through ``nn.intercept_methods``, Flax NNX through a private copy
  (unflattened inside the trace) whose target modules get a tapped ``__call__``, Equinox through
  ``eqx.tree_at`` (or by slicing an ``eqx.nn.Sequential``), a ``(features, head)`` pair as
  given. A zero ``delta`` is added to each explained output (what Flax's ``Module.perturb``
  does), so ``jax.vjp`` with respect to the deltas is ∂output/∂layer, and nothing before the
  layer is differentiated. The user's model is never changed.
* Class-index targets are resolved inside the compiled function (``argmax``, ``lax.top_k``, or
  indices passed in as an argument); their one-hot cotangents ``(K, N, classes)`` go through
  ``jax.vmap(vjp_fn)``: one forward pass and K backward passes of the head only.
* The capture is one ``jax.jit`` whose static argument is the program. Programs compare equal
  by model structure, layers and options, and weights are arguments, not constants, so a
  capture compiles once per (model, layer, target kind, shapes), across Explainers too.
  Results come back to NumPy in one ``jax.device_get``.
* Models run in inference mode: NNX and Equinox models on a private copy switched with
  ``.eval()`` / ``eqx.nn.inference_mode``; a Flax linen model gets its mode through
  ``model_kwargs`` (e.g. ``{"train": False}``), and one that tries to update ``batch_stats``
  raises an error saying so (BatchNorm in training mode mixes the samples of a batch).

Randomised copies (``anycam.sanity_check``): ``parameter_layers()`` lists the modules that own
parameters directly, in definition order, or in the order they run when given a batch;
``randomized(layers, seed)`` returns a backend over a copy whose chosen layers have fresh values:
a linen model from one ``module.init`` (the modules' own initialisers), NNX and Equinox layers
rebuilt from the constructor arguments they keep, the leaves of a ``(features, head, params)``
dict redrawn from a Gaussian of their own mean and spread. Weights are arguments of the
compiled capture, so the copy reuses it.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import functools
import inspect
import operator
import re
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.extend import core as jax_core

from anycam.protocol.backend import AblationHead, Backend, Capture, check_options, select_output
from anycam._errors import (
    AnycamError,
    BackendError,
    ConfigTypeError,
    InputError,
    LayerError,
    TargetError,
    closest,
    user_stacklevel,
)
from anycam.protocol.inputs import structure_inputs
from anycam.protocol.layers import LayerRecord, choose_layer, is_auto, parse_layer
from anycam.core import (
    TargetSpec,
    check_batch,
    check_scores_shape,
    forward_error,
    non_finite_input,
    resolve_indices,
    spatial_shape,
)

ACCEPTED = (
    "a Flax linen (module, variables) pair or bound module, a Flax NNX module, an Equinox "
    "module, or a (features, head) or (features, head, params) tuple of functions"
)
_TRACE_INFO_LIMIT = 64


# -- cache keys ---------------------------------------------------------------------------------


class _Identity:
    """Compares by identity: the cache key of a value that cannot be hashed."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value


def _is_hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return ("mapping", tuple((key, _hashable(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_hashable(item) for item in value))
    return value if _is_hashable(value) else _Identity(value)


# -- programs: the static half of a capture ------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class _Inputs:
    """Several model inputs as one pytree: ``model(*args, **kwargs)``.

    ``shape``, ``dtype`` and ``ndim`` are those of the spatial input, so the capture reads the
    batch and the grid as it does from one array; ``jit``, ``vmap`` and ``vjp`` see the pytree.
    ``kind`` is how they were given (``"positional"`` or ``"keyword"``), for Keras, which takes
    several inputs as one list or dict.
    """

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any], spatial: Any, kind: str) -> None:
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.spatial = spatial
        self.kind = kind

    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        keys = tuple(self.kwargs)
        return (self.args, tuple(self.kwargs[k] for k in keys)), (keys, self.spatial, self.kind)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> _Inputs:
        keys, spatial, kind = aux
        args, values = children
        return cls(tuple(args), dict(zip(keys, values, strict=True)), spatial, kind)

    @property
    def value(self) -> Any:
        return self.args[self.spatial] if isinstance(self.spatial, int) else self.kwargs[self.spatial]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> Any:
        return self.value.dtype

    @property
    def ndim(self) -> int:
        return int(self.value.ndim)

    def container(self) -> Any:
        return list(self.args) if self.kind == "positional" else dict(self.kwargs)

    def describe(self) -> str:
        """Returns ``"0: (2, 8, 8, 3), 'scale': (2, 4)"`` for error messages."""
        entries = [*enumerate(self.args), *self.kwargs.items()]
        return ", ".join(f"{key!r}: {tuple(getattr(value, 'shape', ()))}" for key, value in entries)


def _call_model(fn: Callable[..., Any], x: Any, kwargs: Mapping[str, Any]) -> Any:
    """Returns ``fn(x, **kwargs)``, or ``fn(*args, **inputs, **kwargs)`` for several inputs."""
    if isinstance(x, _Inputs):
        return fn(*x.args, **x.kwargs, **kwargs)
    return fn(x, **kwargs)


def _one_input(x: Any, what: str) -> None:
    if isinstance(x, _Inputs):
        raise InputError(f"{what} takes one input array; got several ({len(x.args)} positional, keys {list(x.kwargs)})")


def _shape_key(x: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(x)
    return treedef, tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves)


class _Record:
    """What ``layer="auto"`` reads from one abstract pass with every module tapped: order, calls, shapes."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.calls: dict[int, int] = {}
        self.shapes: dict[int, tuple[int, ...] | None] = {}

    def note(self, index: int, value: Any) -> Any:
        self.calls[index] = self.calls.get(index, 0) + 1
        if self.calls[index] == 1:
            self.order.append(index)
            floating = isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.floating)
            self.shapes[index] = tuple(value.shape) if floating else None
        return value


# Set while ``layer="auto"`` records a pass: every _Taps of that trace only notes what it sees.
_RECORDING: contextvars.ContextVar[_Record | None] = contextvars.ContextVar("anycam_jax_record", default=None)


def _reaching(jaxpr: Any, count: int) -> list[bool]:
    """Returns, for each of the first ``count`` inputs of ``jaxpr``, whether an output depends on it."""
    deps: dict[Any, frozenset[int]] = {v: frozenset([i]) for i, v in enumerate(jaxpr.invars[:count])}
    empty: frozenset[int] = frozenset()
    for eqn in jaxpr.eqns:
        found = empty.union(*(deps.get(v, empty) for v in eqn.invars if isinstance(v, jax_core.Var)))
        if found:
            for out in eqn.outvars:
                deps[out] = found
    reached = empty.union(*(deps.get(v, empty) for v in jaxpr.outvars if isinstance(v, jax_core.Var)))
    return [i in reached for i in range(count)]


class _Taps:
    """The explained layers' outputs, collected during one traced model call.

    Adds each layer's zero delta to its output, so the vjp of the model output with respect to
    the deltas is its gradient with respect to the layer outputs. ``deltas`` given as
    ``{"replace": array}`` instead makes the first layer return that array (``head_scores``):
    under ``jax.vmap`` over the replacements everything before the layer stays unbatched, so it
    is computed once, and a skip connection around the layer sees the original tensor.
    """

    def __init__(self, names: tuple[str, ...], deltas: Any) -> None:
        self.names = names
        self.deltas = deltas
        self.found: dict[int, jax.Array] = {}
        self.record = _RECORDING.get()

    def __call__(self, index: int, value: Any) -> Any:
        if self.record is not None:
            return self.record.note(index, value)
        name = self.names[index]
        if not isinstance(value, jax.Array) or not jnp.issubdtype(value.dtype, jnp.floating):
            kind = f"an array of {value.dtype}" if isinstance(value, jax.Array) else type(value).__name__
            raise LayerError(
                f"layer {name!r} returns {kind}, not a floating-point array; "
                "explain a layer whose output is a feature map"
            )
        if index in self.found:
            raise LayerError(
                f"layer {name!r} runs more than once per forward pass (a shared module); "
                "explain a module that runs once"
            )
        self.found[index] = value
        if isinstance(self.deltas, dict):
            if index:
                return value
            replacement = self.deltas["replace"]
            if replacement.shape != value.shape:
                raise InputError(
                    f"a replacement for layer {name!r} has shape {tuple(replacement.shape)}, but the layer "
                    f"outputs {tuple(value.shape)} per call; pass (B, N, *layer_shape) replacements"
                )
            return replacement.astype(value.dtype)
        return value if self.deltas is None else value + self.deltas[index]

    def activations(self) -> tuple[jax.Array, ...]:
        if self.record is not None:
            return ()
        missing = [name for i, name in enumerate(self.names) if i not in self.found]
        if missing:
            raise LayerError(
                f"layer(s) {', '.join(map(repr, missing))} did not run during the forward pass; "
                "explain a layer on the path from the input to the output"
            )
        return tuple(self.found[i] for i in range(len(self.names)))


class _Program:
    """How to run one model family with its explained layers tapped; a jit static argument.

    Equal programs share compiled code, so equality is by model *structure* (module
    definition, NNX graphdef, Equinox static part, function identity), layers and options.
    """

    def __init__(
        self,
        structure: Any,
        paths: tuple[Any, ...],
        names: tuple[str, ...],
        *,
        output: Any,
        vmap: bool,
        kwargs: Mapping[str, Any],
        key: Any = None,
        ports: tuple[str, ...] = (),
    ) -> None:
        self.structure = structure
        self.paths = paths
        self.names = names
        # "output" or "input" per layer: "name:input" taps what flows into the module.
        self.ports = tuple(ports) or ("output",) * len(names)
        self.output = output
        self.vmap = vmap
        self.kwargs = dict(kwargs)
        structure_key = _hashable(structure) if key is None else key
        self._key = (type(self), structure_key, paths, self.ports, _hashable(output), vmap, _hashable(self.kwargs))
        self._hash = hash(self._key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Program) and self._key == other._key

    def call(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        """Runs the model once on ``x`` (a batch, or one sample under vmap)."""
        raise NotImplementedError

    def run(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        """Returns (selected output, activations) for a batch; deltas None adds nothing."""
        if self.vmap:
            output, activations = jax.vmap(functools.partial(self.call, params))(x, deltas)
        else:
            output, activations = self.call(params, x, deltas)
        return select_output(output, self.output), activations


class _FunctionsProgram(_Program):
    """A ``(features, head)`` or ``(features, head, params)`` split given by the user."""

    def call(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        features, head, with_params = self.structure
        taps = _Taps(self.names, deltas)
        args = (params,) if with_params else ()
        _one_input(x, "a (features, head) pair")
        activations = taps(0, features(*args, x))
        return head(*args, activations), taps.activations()


class _LinenProgram(_Program):
    """A Flax linen module; the layers' ``__call__`` outputs are intercepted by module path."""

    def call(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        import flax.errors
        import flax.linen as nn

        taps = _Taps(self.names, deltas)
        index = {path: i for i, path in enumerate(self.paths)}

        def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
            found = index.get(context.module.path) if context.method_name == "__call__" else None
            if found is not None and self.ports[found] == "input":
                args = (taps(found, _first_input(self.names[found], args)), *args[1:])
                return next_fun(*args, **kwargs)
            out = next_fun(*args, **kwargs)
            if found is not None:
                out = taps(found, out)
            return out

        try:
            with nn.intercept_methods(interceptor):
                output = _call_model(functools.partial(self.structure.apply, params), x, self.kwargs)
        except flax.errors.ModifyScopeVariableError as exc:
            raise BackendError(
                f"the Flax model tried to update a variable ({exc}); it runs in training mode, "
                "where BatchNorm mixes the samples of a batch. Run it in inference mode: pass the "
                "argument your model takes, e.g. model_kwargs={'train': False}, or build BatchNorm "
                "with use_running_average=True"
            ) from exc
        except flax.errors.InvalidRngError as exc:
            raise BackendError(
                f"the Flax model asked for a random key ({exc}); Dropout runs in training mode. "
                "Run it in inference mode, e.g. model_kwargs={'train': False} (deterministic=True)"
            ) from exc
        return output, taps.activations()


def _first_input(name: str, args: Sequence[Any]) -> Any:
    if not args:
        raise LayerError(
            f"layer {name!r}: the module is called with no positional input to capture; explain the "
            "output of the module before it"
        )
    return args[0]


def _follow(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        if isinstance(part, int) or isinstance(node, Mapping):
            node = node[part]
        else:
            node = getattr(node, part)
    return node


class _NnxProgram(_Program):
    """A Flax NNX module, rebuilt privately inside the trace; targets get a tapped ``__call__``.

    ``structure`` is a pytree treedef (NNX modules are pytrees; flattening is ~10× cheaper
    than ``nnx.split``) or, for modules that share submodules or are not pytrees, a graphdef.
    """

    def call(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        from flax import nnx

        if isinstance(self.structure, nnx.GraphDef):
            model = nnx.merge(self.structure, params)
        else:
            model = jax.tree_util.tree_unflatten(self.structure, params)
        model.eval()
        taps = _Taps(self.names, deltas)
        for index, path in enumerate(self.paths):
            _tap_nnx(_follow(model, path), index, taps, self.ports[index])
        return _call_model(model, x, self.kwargs), taps.activations()


def _tap_nnx(module: Any, index: int, taps: _Taps, port: str = "output") -> None:
    """Gives one module of a private copy a ``__call__`` that reports its output (or input) to ``taps``."""
    base = type(module)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if port == "input":
            args = (taps(index, _first_input(taps.names[index], args)), *args[1:])
            return base.__call__(self, *args, **kwargs)
        return taps(index, base.__call__(self, *args, **kwargs))

    module.__class__ = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__})


@functools.cache
def _equinox_tap() -> type:
    import equinox as eqx

    class Tap(eqx.Module):
        inner: Any
        index: int = eqx.field(static=True)
        taps: Any = eqx.field(static=True)
        port: str = eqx.field(static=True, default="output")

        def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
            if self.port == "input":
                return self.inner(self.taps(self.index, x), *args, **kwargs)
            return self.taps(self.index, self.inner(x, *args, **kwargs))

    return Tap


class _EquinoxProgram(_Program):
    """An Equinox module; the layers are wrapped with ``eqx.tree_at`` in a private copy."""

    def call(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        import equinox as eqx

        model = eqx.nn.inference_mode(eqx.combine(params, self.structure))
        taps = _Taps(self.names, deltas)
        tap = _equinox_tap()
        # Deepest first: wrapping a module leaves the paths of the modules around it unchanged,
        # so a block and a layer inside it can both be tapped.
        for index in sorted(range(len(self.paths)), key=lambda i: -len(self.paths[i])):
            path = self.paths[index]
            wrapped = tap(_follow(model, path), index, taps, self.ports[index])
            model = eqx.tree_at(functools.partial(_follow, path=path), model, wrapped)
        return _call_model(model, x, self.kwargs), taps.activations()


class _SequentialProgram(_Program):
    """An ``eqx.nn.Sequential`` sliced after the explained layer: ``head(features(x))``."""

    def call(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        import equinox as eqx

        model = eqx.nn.inference_mode(eqx.combine(params, self.structure))
        _one_input(x, "an eqx.nn.Sequential")
        cut = self.paths[0][-1] + (0 if self.ports[0] == "input" else 1)
        taps = _Taps(self.names, deltas)
        activations = taps(0, model[:cut](x, **self.kwargs))
        return model[cut:](activations, **self.kwargs), taps.activations()


# -- the compiled capture ------------------------------------------------------------------------


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
def _head_scores(
    program: _Program, mode: tuple[Any, ...], params: Any, x: jax.Array, replacements: jax.Array, given: Any
) -> jax.Array:
    """Returns ``(B, N, K)`` scores with the first layer's output replaced by each of ``replacements``.

    ``jax.vmap`` over the B replacements with ``x`` unbatched: the part before the layer does
    not depend on the mapped axis, so it stays unbatched and runs once; everything after the
    layer runs batched over the copies (B·N samples through each convolution).
    """
    batch = x.shape[0]

    def scores_of(replacement: jax.Array) -> jax.Array:
        output, _ = program.run(params, x, {"replace": replacement})
        return _selected_scores(mode, output, batch, given)

    return jax.vmap(scores_of)(replacements)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _ablation_scores(
    program: _Program,
    mode: tuple[Any, ...],
    channel_axis: int,
    params: Any,
    x: jax.Array,
    activations: jax.Array,
    channels: jax.Array,
    given: Any,
) -> jax.Array:
    """Returns ``(B, N, K)`` scores with channel ``channels[b]`` of the first layer's output zeroed.

    Like ``_head_scores``, with each copy made inside the vmapped function from one
    ``activations`` array: the zeroing fuses into the suffix's first operation, and no B·N
    copies of the layer output are built outside.
    """
    batch = x.shape[0]
    axis = channel_axis % activations.ndim
    shape = [1] * activations.ndim
    shape[axis] = activations.shape[axis]

    def scores_of(channel: jax.Array) -> jax.Array:
        keep = (jnp.arange(activations.shape[axis]) != channel).astype(activations.dtype).reshape(shape)
        output, _ = program.run(params, x, {"replace": activations * keep})
        return _selected_scores(mode, output, batch, given)

    return jax.vmap(scores_of)(channels)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _input_scores(
    program: _Program, mode: tuple[Any, ...], probabilities: bool, params: Any, x: jax.Array, given: Any
) -> Any:
    """Returns the ``(M, K)`` scores of a batch and, for class targets, its ``(M, classes)`` outputs."""
    output, _ = program.run(params, x, None)
    scores = _selected_scores(mode, output, x.shape[0], given, probabilities)
    return scores, (None if mode[0] == "callable" else _class_outputs(output, x.shape[0]))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _guided(program: _Program, mode: tuple[Any, ...], params: Any, x: jax.Array, given: Any) -> Any:
    """Returns (guided input gradients ``(N, K, ...)``, scores, indices, outputs, ReLU count).

    The model is traced to a jaxpr once, and the jaxpr is evaluated again with every ReLU
    (``jax.nn.relu``, ``max(x, 0)``) replaced by ``_guided_relu``; the ordinary ``jax.vjp`` of
    that evaluation is guided backpropagation. The count of ReLUs replaced is known when
    tracing and comes back as a constant.
    """
    batch = x.shape[0]

    def outputs_of(params: Any, x: jax.Array) -> jax.Array:
        output, _ = program.run(params, x, None)
        if mode[0] == "callable":
            return _callable_scores(mode[1], output, batch)
        return _class_outputs(output, batch)

    closed = jax.make_jaxpr(outputs_of)(params, x)
    leaves = jax.tree_util.tree_leaves(params)
    replaced = [0]

    def guided(x: jax.Array) -> jax.Array:
        return _evaluate_guided(closed.jaxpr, closed.consts, [*leaves, x], replaced)[0]

    outputs, vjp_fn = jax.vjp(guided, x)
    indices = _indices(outputs, mode, None if given is None else jnp.clip(given, 0, outputs.shape[1] - 1))
    cotangents = jax.nn.one_hot(indices.T, outputs.shape[1], dtype=outputs.dtype)
    if cotangents.shape[0] == 1:
        gradients = vjp_fn(cotangents[0])[0][:, None]
    else:
        gradients = jnp.moveaxis(jax.vmap(vjp_fn)(cotangents)[0], 0, 1)
    scores = jnp.take_along_axis(outputs, indices, axis=1)
    return gradients, scores, indices, outputs, jnp.asarray(replaced[0], jnp.int32)


# -- guided backpropagation: ReLUs rewritten in the traced program --------------------------------


@jax.custom_vjp
def _guided_relu(x: jax.Array) -> jax.Array:
    return jnp.maximum(x, jnp.zeros((), x.dtype))


def _guided_relu_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _guided_relu(x), x


def _guided_relu_backward(x: jax.Array, gradient: jax.Array) -> tuple[jax.Array]:
    # Springenberg et al. 2015, eq. 6: R_l = (f_l > 0) · (R_{l+1} > 0) · R_{l+1}.
    return (jnp.where((x > 0) & (gradient > 0), gradient, jnp.zeros((), gradient.dtype)),)


_guided_relu.defvjp(_guided_relu_forward, _guided_relu_backward)

# Call-like primitives whose body is evaluated inline when it holds a ReLU (their jit boundary
# or custom rule does not survive; custom rules of functions *without* ReLUs are kept).
_INLINE = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


def _is_zero(atom: Any) -> bool:
    return isinstance(atom, jax_core.Literal) and np.ndim(atom.val) == 0 and bool(atom.val == 0)


def _relu_operand(eqn: Any) -> int | None:
    """Returns which operand of a ``max(x, 0)`` equation is ``x``, or None for anything else."""
    if eqn.primitive.name != "max" or len(eqn.invars) != 2:
        return None
    first, second = eqn.invars
    if _is_zero(second) and not isinstance(first, jax_core.Literal):
        return 0
    if _is_zero(first) and not isinstance(second, jax_core.Literal):
        return 1
    return None


def _is_relu_body(jaxpr: Any) -> bool:
    """True for a one-input jaxpr that is ``max(x, 0)``, possibly inside a ``jit`` (``jax.nn.relu``)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    if len(jaxpr.eqns) != 1 or len(jaxpr.invars) != 1 or len(jaxpr.outvars) != 1:
        return False
    eqn = jaxpr.eqns[0]
    if eqn.outvars[0] is not jaxpr.outvars[0]:
        return False
    operand = _relu_operand(eqn)
    if operand is not None:
        return eqn.invars[operand] is jaxpr.invars[0]
    inner = eqn.params.get("jaxpr")
    return inner is not None and list(eqn.invars) == list(jaxpr.invars) and _is_relu_body(inner)


def _is_relu(eqn: Any) -> bool:
    return _relu_operand(eqn) is not None or (
        eqn.primitive.name == "custom_jvp_call" and _is_relu_body(eqn.params["call_jaxpr"])
    )


def _holds_relu(jaxpr: Any) -> bool:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return any(
        _is_relu(eqn) or any(_holds_relu(inner) for inner in jax_core.jaxprs_in_params(eqn.params))
        for eqn in jaxpr.eqns
    )


def _evaluate_guided(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], replaced: list[int]) -> list[Any]:
    """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``, with each ReLU replaced by ``_guided_relu``.

    A ReLU is a ``max`` with a literal zero operand, or a ``custom_jvp_call`` whose body is one
    (``jax.nn.relu``, which Flax's ``nn.relu`` and Equinox's default activations are). Bodies of
    call-like primitives that hold a ReLU are evaluated inline; loops and conditionals
    (``scan``, ``while``, ``cond``) get their bodies rewritten the same way. ``replaced[0]``
    counts the ReLUs replaced.
    """
    env: dict[Any, Any] = {}

    def read(atom: Any) -> Any:
        return atom.val if isinstance(atom, jax_core.Literal) else env[atom]

    def write(var: Any, value: Any) -> None:
        if not isinstance(var, jax_core.DropVar):
            env[var] = value

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        write(var, value)
    for var, value in zip(jaxpr.invars, args, strict=True):
        write(var, value)
    for eqn in jaxpr.eqns:
        inputs = [read(atom) for atom in eqn.invars]
        for var, value in zip(eqn.outvars, _apply_guided(eqn, inputs, replaced), strict=True):
            write(var, value)
    return [read(atom) for atom in jaxpr.outvars]


def _apply_guided(eqn: Any, inputs: list[Any], replaced: list[int]) -> list[Any]:
    operand = _relu_operand(eqn)
    if operand is not None:
        replaced[0] += 1
        return [_guided_relu(inputs[operand])]
    name = eqn.primitive.name
    if name == "custom_jvp_call" and _is_relu_body(eqn.params["call_jaxpr"]):
        replaced[0] += 1
        return [_guided_relu(inputs[-1])]
    params = eqn.params
    if any(_holds_relu(inner) for inner in jax_core.jaxprs_in_params(params)):
        key = _INLINE.get(name)
        if key is not None and isinstance(params.get(key), jax_core.ClosedJaxpr):
            body = params[key]
            return _evaluate_guided(body.jaxpr, body.consts, inputs, replaced)
        params = {key: _rewritten(value, replaced) for key, value in params.items()}
    bind_params = eqn.primitive.get_bind_params(params)
    if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
        subfuns, bind_params = bind_params
        inputs = [*subfuns, *inputs]
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*inputs, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _rewritten(value: Any, replaced: list[int]) -> Any:
    """Returns a primitive's parameter with the ReLUs in its closed jaxprs made guided."""
    if isinstance(value, jax_core.ClosedJaxpr):
        if not _holds_relu(value):
            return value
        avals = [var.aval for var in value.jaxpr.invars]
        return jax.make_jaxpr(lambda *args: _evaluate_guided(value.jaxpr, value.consts, args, replaced))(*avals)
    if isinstance(value, (tuple, list)) and any(isinstance(item, jax_core.ClosedJaxpr) for item in value):
        return type(value)(_rewritten(item, replaced) for item in value)
    return value


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


# -- Ablation-CAM's pooled head: the network after the layer, read from its jaxpr -----------------

# Steps between the pooling and a dense layer that keep each entry apart and map 0 to 0.
_SCALING = ("mul", "div", "neg")
_ORDER_KEEPING = ("reshape", "squeeze", "expand_dims", "broadcast_in_dim", "copy", "copy_p", "convert_element_type")
_POOLINGS = ("reduce_sum", "reduce_max")
_HEAD_PLANS: dict[Any, Any] = {}


@dataclasses.dataclass(eq=False)
class _Op:
    """One equation of a flattened jaxpr, its values named by int keys (``eqn`` None: a constant)."""

    eqn: Any
    inputs: list[Any]  # int keys or jax_core.Literal; for a constant, its value
    outputs: list[int]

    @property
    def name(self) -> str:
        return "" if self.eqn is None else str(self.eqn.primitive.name)

    def reads(self) -> list[int]:
        return [] if self.eqn is None else [a for a in self.inputs if isinstance(a, int)]


class _Flat:
    """A closed jaxpr as one list of ops, jit and custom-rule bodies inlined (nothing is differentiated)."""

    def __init__(self, closed: Any) -> None:
        self.ops: list[_Op] = []
        self.count = 0
        consts = [self._constant(value) for value in closed.consts]
        self.invars = [self._key() for _ in closed.jaxpr.invars]
        self.outputs = self._inline(closed.jaxpr, [*consts, *self.invars])

    def _key(self) -> int:
        self.count += 1
        return self.count - 1

    def _constant(self, value: Any) -> int:
        key = self._key()
        self.ops.append(_Op(None, [value], [key]))
        return key

    def _inline(self, jaxpr: Any, inputs: list[Any]) -> list[Any]:
        env: dict[Any, Any] = dict(zip([*jaxpr.constvars, *jaxpr.invars], inputs, strict=True))

        def read(atom: Any) -> Any:
            return atom if isinstance(atom, jax_core.Literal) else env[atom]

        for eqn in jaxpr.eqns:
            args = [read(atom) for atom in eqn.invars]
            body = eqn.params.get(_INLINE.get(eqn.primitive.name, ""))
            inner = getattr(body, "jaxpr", body)
            if inner is not None and hasattr(inner, "eqns") and len(inner.invars) == len(args):
                consts = [self._constant(value) for value in getattr(body, "consts", ())]
                outs = self._inline(inner, [*consts, *args])
            else:
                outs = [self._key() for _ in eqn.outvars]
                self.ops.append(_Op(eqn, args, outs))
            for var, out in zip(eqn.outvars, outs, strict=True):
                if not isinstance(var, jax_core.DropVar):
                    env[var] = out
        return [read(atom) for atom in jaxpr.outvars]


def _evaluate_ops(ops: Sequence[_Op], env: dict[Any, Any]) -> None:
    """Evaluates ``ops`` in order into ``env`` (key → value), each by its own primitive."""
    for op in ops:
        if op.eqn is None:
            env[op.outputs[0]] = op.inputs[0]
            continue
        values = [a.val if isinstance(a, jax_core.Literal) else env[a] for a in op.inputs]
        bind_params = op.eqn.primitive.get_bind_params(op.eqn.params)
        if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
            subfuns, bind_params = bind_params
            values = [*subfuns, *values]
        with op.eqn.ctx.manager:
            out = op.eqn.primitive.bind(*values, **bind_params)
        env.update(zip(op.outputs, list(out) if op.eqn.primitive.multiple_results else [out], strict=True))


def _out_aval(op: _Op) -> Any:
    return op.eqn.outvars[0].aval


def _reshapes_only(op: _Op, key: int, same_shape: bool = False) -> bool:
    """Whether ``op`` passes float32 ``key`` on in the same element order (singleton axes aside)."""
    if op.name not in _ORDER_KEEPING or op.inputs[:1] != [key] or len(op.outputs) != 1:
        return False
    source, out = op.eqn.invars[0].aval, _out_aval(op)
    if source.dtype != jnp.float32 or out.dtype != jnp.float32 or source.size != out.size:
        return False
    if op.name == "reshape" and op.eqn.params.get("dimensions") is not None:
        return False
    if op.name == "broadcast_in_dim" and list(op.eqn.params["broadcast_dimensions"]) != sorted(
        op.eqn.params["broadcast_dimensions"]
    ):
        return False
    if same_shape:
        return tuple(source.shape) == tuple(out.shape)
    return [d for d in source.shape if d != 1] == [d for d in out.shape if d != 1]


@dataclasses.dataclass
class _HeadPlan:
    """The traced suffix split as pooling → [dense] → tail, both halves compiled once.

    ``prepare(activations, arguments) -> (pooled (N, C), weight (C, F) or None)`` runs the
    model's own pooling (and the steps before the dense layer); ``tail(features (B, N, F),
    arguments) -> (B, N, K)`` the remaining equations, vmapped over the B copies.
    """

    prepare: Callable[..., Any]
    tail: Callable[..., Any]


def _dense_kernel(op: _Op | None, key: int, shape: tuple[int, ...], channels: int, constant: Callable) -> Any:
    """Returns (kernel key, kernel stored (F, C), output (F, N)) if ``op`` is a dense layer on ``key``, else None.

    ``key`` ``shape`` is (N, C), possibly with singleton axes between; the kernel is a 2-D value
    computed from the parameters. ``x @ kernel`` (Flax) contracts ``key`` as the left operand;
    ``kernel @ x`` under ``jax.vmap`` (Equinox's ``Linear``) as the right one, giving (F, N).
    """
    if op is None or op.name != "dot_general" or len(op.inputs) != 2 or key not in op.inputs:
        return None
    side = op.inputs.index(key)
    other = op.inputs[1 - side]
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = op.eqn.params["dimension_numbers"]
    mine, theirs = (lhs_contract, rhs_contract) if side == 0 else (rhs_contract, lhs_contract)
    kernel = op.eqn.invars[1 - side].aval
    preferred = op.eqn.params.get("preferred_element_type")
    if lhs_batch or rhs_batch or isinstance(other, jax_core.Literal) or other == key or not constant(other):
        return None
    if kernel.ndim != 2 or kernel.dtype != jnp.float32 or _out_aval(op).dtype != jnp.float32:
        return None
    if preferred not in (None, jnp.float32) or len(shape) < 2 or shape[-1] != channels:
        return None
    if any(d != 1 for d in shape[1:-1]) or (side == 1 and len(shape) != 2):
        return None
    if tuple(mine) != (len(shape) - 1,) or tuple(theirs) not in ((0,), (1,)):
        return None
    return other, tuple(theirs) == (1,), side == 1


def _plan_head(closed: Any, leading: int, early_count: int, channel_axis: int) -> _HeadPlan | None:
    """Splits ``closed`` — scores of (layer output, *arguments) — as pooling → [dense] → tail.

    The arguments are the params (``leading`` leaves), then the input (``early_count`` leaves),
    then the given class indices. None unless the layer output is read by one reduction (sum
    or max) over all its spatial axes, then only by zero-keeping entrywise steps up to the
    dense layer or the tail, and nothing after the layer reads a value computed from the input
    (a skip connection over the layer).
    """
    flat = _Flat(closed)
    rep, arguments = flat.invars[0], flat.invars[1:]
    down, early = {rep}, set(arguments[leading : leading + early_count])
    readers: dict[int, list[_Op]] = {}
    for op in flat.ops:
        reads = op.reads()
        for key in reads:
            readers.setdefault(key, []).append(op)
        if any(key in down for key in reads):
            if any(key in early for key in reads):
                return None  # a value from before the layer meets one from after it
            down.update(op.outputs)
        elif any(key in early for key in reads):
            early.update(op.outputs)
    outputs = flat.outputs
    if len(outputs) != 1 or not isinstance(outputs[0], int) or outputs[0] not in down:
        return None

    def only_reader(key: int) -> _Op | None:
        found = readers.get(key, [])
        return found[0] if len(found) == 1 and key not in outputs else None

    def constant(atom: Any) -> bool:
        return isinstance(atom, jax_core.Literal) or (atom not in down and atom not in early)

    layer = closed.jaxpr.invars[0].aval
    if layer.dtype != jnp.float32 or layer.ndim < 3:
        return None
    axis = channel_axis % layer.ndim
    spatial = tuple(i for i in range(1, layer.ndim) if i != axis)
    pooling: list[_Op] = []
    current, op = rep, only_reader(rep)
    while op is not None and _reshapes_only(op, current, same_shape=True):
        pooling.append(op)
        current, op = op.outputs[0], only_reader(op.outputs[0])
    if op is None or op.name not in _POOLINGS or op.inputs != [current]:
        return None
    if tuple(sorted(op.eqn.params["axes"])) != spatial or _out_aval(op).shape != (layer.shape[0], layer.shape[axis]):
        return None
    pooling.append(op)
    current, shape = op.outputs[0], _out_aval(op).shape
    while (op := only_reader(current)) is not None:
        if not _reshapes_only(op, current):
            at = [i for i, a in enumerate(op.inputs) if isinstance(a, int) and a == current]
            others = [a for i, a in enumerate(op.inputs) if i not in at]
            if op.name not in _SCALING or len(at) != 1 or (op.name == "div" and at != [0]):
                break
            if _out_aval(op).shape != shape or _out_aval(op).dtype != jnp.float32 or not all(map(constant, others)):
                break
        pooling.append(op)
        current, shape = op.outputs[0], _out_aval(op).shape
    dense = only_reader(current)
    kernel = _dense_kernel(dense, current, tuple(shape), layer.shape[axis], constant)
    cut, cut_shape, skip = current, tuple(shape), {id(o) for o in pooling}
    transposed = False
    if kernel is not None:
        assert dense is not None
        cut, cut_shape, transposed = dense.outputs[0], tuple(_out_aval(dense).shape), kernel[2]
        skip.add(id(dense))
    tail = [o for o in flat.ops if o.eqn is not None and id(o) not in skip and o.outputs[0] in down]
    needed = {a for o in [*pooling, *tail] for a in o.reads() if a not in down}
    needed |= {kernel[0]} if kernel is not None else set()
    constants: list[_Op] = []
    for o in reversed(flat.ops):
        if not set(o.outputs) & needed or o.outputs[0] in down:
            continue
        constants.append(o)
        needed |= set(o.reads())
    constants.reverse()
    batch, channels = layer.shape[0], layer.shape[axis]

    def environment(values: Sequence[Any]) -> dict[Any, Any]:
        env = dict(zip(arguments, values, strict=True))
        _evaluate_ops(constants, env)
        return env

    def prepare(activations: jax.Array, values: Sequence[Any]) -> tuple[jax.Array, jax.Array | None]:
        env = environment(values)
        env[rep] = activations
        _evaluate_ops(pooling, env)
        weight = None if kernel is None else (env[kernel[0]].T if kernel[1] else env[kernel[0]])
        return env[current].reshape(batch, channels), weight

    def run_tail(features: jax.Array, values: Sequence[Any]) -> jax.Array:
        env = environment(values)

        def one(z: jax.Array) -> jax.Array:
            local = {**env, cut: (z.T if transposed else z).reshape(cut_shape)}
            _evaluate_ops(tail, local)
            return local[outputs[0]]

        return jax.vmap(one)(features)

    return _HeadPlan(jax.jit(prepare), jax.jit(run_tail))


# -- model forms ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Model:
    """A resolved model: layer names, default layout, and its (program, params) for a call.

    ``family`` (``"linen"``, ``"nnx"``, ``"equinox"``, ``"functions"``) and ``source`` (the model
    in a form ``_resolve`` takes) are what a randomised copy starts from.
    """

    names: tuple[str, ...]
    layout: str
    snapshot: Callable[[], tuple[_Program, Any]]
    family: str = ""
    source: Any = None


def _listing(names: Sequence[str], limit: int = 25) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = len(names) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def _pick(layer: Any, paths: dict[str, tuple[Any, ...]], objects: dict[int, str], family: str, sep: str) -> str:
    """Returns the name in ``paths`` that ``layer`` (a path string/tuple or module) means."""
    canonical = [p for p in paths if not p.isdigit()]
    if layer is None:
        raise LayerError(
            f"name the layer to explain (layer=None fits only a (features, head) pair); the {family} "
            f"model's module paths: {_listing(canonical)}"
        )
    if isinstance(layer, str):
        for candidate in (layer, layer.replace("/", sep).replace(".", sep)):
            if candidate in paths:
                return candidate
        name = layer
    elif isinstance(layer, tuple) and layer and all(isinstance(p, (str, int)) for p in layer):
        name = sep.join(str(p) for p in layer)
        if name in paths:
            return name
    elif isinstance(layer, int) and not isinstance(layer, bool):
        name = str(layer)
        if name in paths:
            return name
    elif id(layer) in objects:
        return objects[id(layer)]
    elif objects:
        raise LayerError(
            f"the {type(layer).__name__} given as layer is not a module of the {family} model; "
            f"pass a module of it or its path, e.g. {next(iter(paths), 'layer')!r}"
        )
    else:
        raise LayerError(
            f"a {family} layer is a module path such as 'backbone{sep}layer4' or a tuple of names, "
            f"got {type(layer).__name__}"
        )
    raise LayerError(
        f"layer {name!r} not found in the {family} model{closest(name, canonical)}; module paths: {_listing(canonical)}"
    )


def _linen_paths(variables: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()

    def walk(tree: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                found.add((*path, key))
                walk(value, (*path, key))

    for collection in variables.values():
        if isinstance(collection, Mapping):
            walk(collection, ())
    return {"/".join(p): p for p in sorted(found)}


def _linen_setup_paths(module: Any, variables: Any) -> list[tuple[str, ...]]:
    """Returns the paths of the submodules registered in ``setup`` or as fields, recursively.

    These include modules without variables (an activation or pooling module), which the
    variables do not show; compact submodules exist only while the model runs, so only those
    with variables can be named.
    """
    try:
        bound = module.bind(variables)
    except Exception:  # variables that do not bind: the variables' paths alone
        return []
    found: list[tuple[str, ...]] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        for name, child in _linen_children(node).items():
            found.append((*path, name))
            walk(child, (*path, name))

    walk(bound, ())
    return found


def _linen(module: Any, variables: Any, layers: Sequence[Any], common: dict[str, Any]) -> _Model:
    if not isinstance(variables, Mapping):
        raise BackendError(
            "a Flax linen model is (module, variables), variables being what module.init returns; "
            f"got {type(variables).__name__} as variables"
        )
    if variables and "params" not in variables:
        raise BackendError(
            "the variables of a Flax linen model are a dict of collections, {'params': ..., "
            f"'batch_stats': ...}}; got one with keys {list(variables)[:5]}. If these are the "
            "parameters, pass (module, {'params': params})"
        )
    paths = _linen_paths(variables)
    for path in _linen_setup_paths(module, variables):
        paths.setdefault("/".join(path), path)
    names = tuple(_pick(layer, paths, {}, "Flax linen", "/") for layer in layers)
    labels = _labels(names, common)
    program = _LinenProgram(module, tuple(paths[n] for n in names), labels, **common)
    return _Model(labels, "channels_last", lambda: (program, variables), "linen", (module, variables))


def _nnx(model: Any, layers: Sequence[Any], common: dict[str, Any]) -> _Model:
    from flax import nnx

    modules = sorted(
        ((path, module) for path, module in nnx.iter_modules(model) if path),
        key=lambda item: tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in item[0]),
    )
    paths = {".".join(map(str, path)): tuple(path) for path, _ in modules}
    objects = {id(module): ".".join(map(str, path)) for path, module in reversed(modules)}
    chosen = tuple(paths[_pick(layer, paths, objects, "Flax NNX", ".")] for layer in layers)
    names = _labels(tuple(".".join(map(str, path)) for path in chosen), common)

    leaves, treedef = jax.tree_util.tree_flatten(model)
    # Tree mode copies a shared submodule, so its tap would see one of its calls only.
    tree_mode = len(leaves) == len(jax.tree_util.tree_leaves(nnx.state(model))) and _is_hashable(treedef)

    def snapshot() -> tuple[_Program, Any]:
        # Flattened per call: NNX modules are updated in place (optimiser steps), and an
        # unchanged structure flattens to an equal treedef, so the compiled capture is reused.
        if tree_mode:
            leaves, treedef = jax.tree_util.tree_flatten(model)
            return _NnxProgram(treedef, chosen, names, **common), leaves
        graphdef, state = nnx.split(model)
        return _NnxProgram(graphdef, chosen, names, **common), state

    return _Model(names, "channels_last", snapshot, "nnx", model)


def _equinox_modules(node: Any, path: tuple[Any, ...] = ()) -> Any:
    import equinox as eqx

    if isinstance(node, eqx.Module):
        if path:
            yield path, node
        for field in dataclasses.fields(node):
            yield from _equinox_modules(getattr(node, field.name, None), (*path, field.name))
    elif isinstance(node, (list, tuple)):
        for index, item in enumerate(node):
            yield from _equinox_modules(item, (*path, index))
    elif isinstance(node, dict):
        for key, item in node.items():
            yield from _equinox_modules(item, (*path, key))


def _equinox(model: Any, layers: Sequence[Any], common: dict[str, Any]) -> _Model:
    import equinox as eqx

    modules = list(_equinox_modules(model))
    paths = {".".join(map(str, path)): tuple(path) for path, _ in modules}
    objects = {id(module): ".".join(map(str, path)) for path, module in reversed(modules)}
    sequential = isinstance(model, eqx.nn.Sequential)
    if sequential:  # layer=3 or "3" means model.layers[3]
        paths.update({str(i): ("layers", i) for i in range(len(model.layers))})
    names = tuple(_pick(layer, paths, objects, "Equinox", ".") for layer in layers)
    chosen = tuple(paths[n] for n in names)
    names = _labels(tuple(".".join(map(str, path)) for path in chosen), common)
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten(static)
    key = _hashable((treedef, tuple(leaves)))
    sliced = sequential and len(chosen) == 1 and len(chosen[0]) == 2
    program = (_SequentialProgram if sliced else _EquinoxProgram)(static, chosen, names, key=key, **common)
    return _Model(names, "channels_first", lambda: (program, params), "equinox", model)


def _labels(names: Sequence[str], common: Mapping[str, Any]) -> tuple[str, ...]:
    """Returns the reported names: ``"name:input"`` where the layer's input is explained."""
    ports = common.get("ports") or ("output",) * len(names)
    return tuple(name if port == "output" else f"{name}:input" for name, port in zip(names, ports, strict=True))


def _functions(model: Sequence[Any], layers: Sequence[Any], common: dict[str, Any]) -> _Model:
    features, head, *rest = model
    if len(layers) != 1 or layers[0] not in (None, "features"):
        raise LayerError("a (features, head) pair is already cut at its layer, the output of features; pass layer=None")
    if common["kwargs"]:
        raise ConfigTypeError(
            "model_kwargs does not apply to a (features, head) pair; bind arguments with functools.partial"
        )
    program = _FunctionsProgram((features, head, bool(rest)), ((),), ("features",), **common)
    params = rest[0] if rest else None
    return _Model(("features",), "channels_first", lambda: (program, params), "functions", tuple(model))


def _all_layers(model: Any) -> list[str] | None:
    """Returns every module name of a Flax or Equinox model (``layer="auto"`` chooses among them).

    None for a ``(features, head)`` pair, which is already cut at its layer.
    """
    linen = sys.modules.get("flax.linen")
    nnx = sys.modules.get("flax.nnx")
    equinox = sys.modules.get("equinox")
    if linen is not None:
        pair = isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], linen.Module)
        if pair or (isinstance(model, linen.Module) and model.scope is not None):
            module, variables = model if pair else model.unbind()
            if not isinstance(variables, Mapping):
                return None
            paths = {"/".join(path) for path in _linen_setup_paths(module, variables)}
            return sorted(set(_linen_paths(variables)) | paths)
    if nnx is not None and isinstance(model, nnx.Module):
        return [".".join(map(str, path)) for path, _ in nnx.iter_modules(model) if path]
    if equinox is not None and isinstance(model, equinox.Module):
        return [".".join(map(str, path)) for path, _ in _equinox_modules(model)]
    return None


def _resolve(model: Any, layers: Sequence[Any], options: dict[str, Any], output: Any) -> _Model:
    linen = sys.modules.get("flax.linen")
    nnx = sys.modules.get("flax.nnx")
    equinox = sys.modules.get("equinox")
    kwargs = options.get("model_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigTypeError(f"model_kwargs must be a dict of keyword arguments, got {type(kwargs).__name__}")
    is_equinox = equinox is not None and isinstance(model, equinox.Module)
    vmap = bool(options.get("vmap", is_equinox))
    common: dict[str, Any] = {"output": output, "vmap": vmap, "kwargs": kwargs}
    if isinstance(model, (tuple, list)) and len(model) in (2, 3) and all(map(callable, model[:2])):
        if not (linen is not None and isinstance(model[0], linen.Module)):
            return _functions(model, [None if is_auto(layer) else layer for layer in layers], common)
    if any(is_auto(layer) for layer in layers) and len(layers) > 1:
        raise LayerError("layer='auto' (or None) chooses one layer; it cannot be part of a list")
    specs = [parse_layer(layer) for layer in layers]
    common["ports"] = tuple(spec.port for spec in specs)
    layers = [spec.layer for spec in specs]
    if linen is not None:
        if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], linen.Module):
            return _linen(model[0], model[1], layers, common)
        if isinstance(model, linen.Module):
            if model.scope is None:
                raise BackendError(
                    f"the Flax linen {type(model).__name__} is unbound and has no variables; "
                    "pass (module, variables) or module.bind(variables)"
                )
            module, variables = model.unbind()
            return _linen(module, variables, layers, common)
    if nnx is not None and isinstance(model, nnx.Module):
        return _nnx(model, layers, common)
    if is_equinox:
        return _equinox(model, layers, common)
    if isinstance(model, (tuple, list)) and len(model) in (2, 3) and all(map(callable, model[:2])):
        return _functions(model, layers, common)
    raise BackendError(
        f"the jax backend does not recognise a {type(model).__module__}.{type(model).__qualname__}; "
        f"it accepts {ACCEPTED}"
    )


# -- randomised copies (anycam.sanity_check) ----------------------------------------------------


def _natural(name: str) -> tuple[Any, ...]:
    """Returns a sort key that puts ``"Conv_2"`` before ``"Conv_10"``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _creation_order(names: list[str]) -> list[str]:
    """Returns a dict's keys in the order its entries were created, as far as the dict shows it.

    Flax and NNX create keys in definition order, but a tree that went through ``jax.tree_util``
    (``tree_map``, optax updates, a checkpoint restore) or NNX's split/merge comes back with
    sorted keys; those are put in natural order, so that ``"Conv_10"`` follows ``"Conv_9"``.
    """
    return sorted(names, key=_natural) if names == sorted(names) else names


def _layer_key(seed: int, name: str) -> jax.Array:
    # One key per layer, from its name: a layer's new values do not depend on which other
    # layers are randomised with it (the TensorFlow backend seeds the same way).
    return jax.random.key(zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF)


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def _rebuild(module: Any, name: str, key_argument: str, key: Any, family: str) -> Any:
    """Returns a new ``type(module)`` built from the constructor arguments ``module`` keeps.

    Equinox and NNX layers keep their configuration as attributes named like their
    ``__init__`` arguments (``in_features``, ``kernel_size``, ...): each argument is read from
    there, or left to its default, and ``key_argument`` gets the fresh random key. NNX layers
    do not keep the initialisers they were given, so theirs are the constructor's defaults.

    Raises:
        NotImplementedError: an argument without default is not kept, or the rebuild fails.
    """
    cls = type(module)
    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError) as exc:
        raise NotImplementedError(
            f"cannot re-initialise layer {name!r}: {cls.__name__}.__init__ has no signature"
        ) from exc
    kept = vars(module)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.name == key_argument:
            value = key
        elif parameter.name in kept:
            value = kept[parameter.name]
        elif parameter.default is not parameter.empty:
            value = parameter.default
        else:
            raise NotImplementedError(
                f"cannot re-initialise layer {name!r}: {cls.__name__}.__init__ takes {parameter.name!r}, which "
                f"the module does not keep as an attribute; randomise {family} layers that keep their "
                "constructor arguments (the built-in ones do), or pass layers= without this one"
            )
        if parameter.kind is parameter.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[parameter.name] = value
    try:
        return cls(*args, **kwargs)
    except Exception as exc:
        raise NotImplementedError(
            f"cannot re-initialise layer {name!r}: rebuilding {cls.__name__} from its attributes failed ({exc})"
        ) from exc


def _fresh_value(name: str, old: Any, new: Any) -> jax.Array:
    """Returns ``new`` in ``old``'s dtype, checking it is a new array of ``old``'s shape."""
    if not _is_array(new) or new.shape != old.shape:
        shape = getattr(new, "shape", type(new).__name__)
        raise NotImplementedError(
            f"cannot re-initialise layer {name!r}: rebuilt from its attributes it has a leaf of shape {shape} "
            f"where the model has {old.shape}"
        )
    if new is old:
        raise NotImplementedError(
            f"cannot re-initialise layer {name!r}: its constructor takes the arrays themselves, so a rebuild "
            "gives the same values; randomise layers whose constructor draws them"
        )
    return jnp.asarray(new, dtype=old.dtype)


# Flax linen: owners from the variables, one module.init for the fresh values.

_LINEN_STATE = ("params", "batch_stats")


def _linen_children(bound: Any) -> dict[str, Any]:
    """Returns the submodules a bound linen module registers (fields, then ``setup``), in order.

    Compact submodules exist only while a method runs, so they are not among them.
    """
    import flax.linen as nn

    if bound is None:
        return {}
    try:
        bound._try_setup()
        children = bound._state.children
    except Exception:  # a setup that cannot run outside apply: the variables' order stands
        return {}
    return {name: child for name, child in children.items() if isinstance(child, nn.Module)}


def _linen_owners(module: Any, variables: Mapping[str, Any]) -> list[str]:
    """Returns the paths of the modules that own ``params`` or ``batch_stats`` leaves directly.

    Definition order: the submodules a module registers through fields and ``setup``, in that
    order, then the others (compact ones) in the variables' order, which is the order Flax
    created them unless the keys were sorted (see ``_creation_order``).
    """
    try:
        bound = module.bind(variables)
    except Exception:  # variables that do not bind: the variables' order alone
        bound = None
    owners: list[str] = []

    def walk(nodes: list[Mapping[str, Any]], bound: Any, path: tuple[str, ...]) -> None:
        if path and any(not isinstance(value, Mapping) for node in nodes for value in node.values()):
            owners.append("/".join(path))
        names = list(dict.fromkeys(k for node in nodes for k, v in node.items() if isinstance(v, Mapping)))
        registered = _linen_children(bound)
        ordered = [n for n in registered if n in names] + _creation_order([n for n in names if n not in registered])
        for name in ordered:
            children = [node[name] for node in nodes if isinstance(node.get(name), Mapping)]
            walk(children, registered.get(name), (*path, name))

    walk([variables[c] for c in _LINEN_STATE if isinstance(variables.get(c), Mapping)], bound, ())
    return owners


def _linen_calls(program: _Program, variables: Any, x: jax.Array) -> list[str]:
    """Returns the paths of the linen modules in the order their methods are first entered."""
    import flax.linen as nn

    entered: dict[str, None] = {}

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        entered.setdefault("/".join(context.module.path), None)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda params, xs: program.run(params, xs, None)[1], variables, x)
    return list(entered)


@functools.partial(jax.jit, static_argnums=(0,))
def _linen_init(program: _Program, key: jax.Array, x: jax.Array) -> Any:
    """Returns the ``params`` and ``batch_stats`` of a fresh ``module.init``, compiled once."""
    variables = program.structure.init({"params": key}, x, **program.kwargs)
    return {collection: variables[collection] for collection in _LINEN_STATE if collection in variables}


def _replace_own(tree: Mapping[str, Any], fresh: Mapping[str, Any], path: Sequence[str], name: str) -> dict[str, Any]:
    """Returns ``tree`` with the leaves directly at ``path`` taken from ``fresh``."""
    if path:
        return {**tree, path[0]: _replace_own(tree[path[0]], fresh[path[0]], path[1:], name)}
    return {k: v if isinstance(v, Mapping) else _fresh_value(name, v, fresh[k]) for k, v in tree.items()}


def _linen_randomized(
    program: _Program, source: tuple[Any, Any], chosen: list[str], seed: int, example: Any
) -> tuple[Any, dict[str, Any]]:
    """Returns (module, variables) with the chosen modules' leaves from ``module.init`` with key ``seed``."""
    module, variables = source
    if example is None:
        raise InputError(
            "randomising a Flax linen model runs module.init, which needs an input to run on; explain a batch "
            "first (explainer(x)), or call parameter_layers(x)"
        )
    shape, dtype = example
    sample = shape[1:] if program.vmap else (1, *shape[1:])
    fresh = _linen_init(program, jax.random.key(seed), jnp.zeros(sample, dtype))
    new = dict(variables)
    for name in chosen:
        path = name.split("/")
        for collection in _LINEN_STATE:
            tree = new.get(collection)
            if not isinstance(tree, Mapping) or not isinstance(_get(tree, path), Mapping):
                continue
            try:
                new[collection] = _replace_own(tree, fresh.get(collection, {}), path, name)
            except KeyError as exc:
                raise LayerError(
                    f"module.init creates no {collection} leaf {exc} for layer {name!r}, which the variables "
                    "have; were they made by this module?"
                ) from exc
    return module, new


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for part in path:
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


# Flax NNX: owners hold Param or BatchStat variables; layers rebuilt with nnx.Rngs.


def _nnx_names(model: Any) -> dict[int, tuple[str, tuple[Any, ...]]]:
    """Returns ``id(module) → (name, path)`` for the submodules, named as the backend names them."""
    from flax import nnx

    modules = sorted(
        ((path, module) for path, module in nnx.iter_modules(model) if path),
        key=lambda item: tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in item[0]),
    )
    return {id(module): (".".join(map(str, path)), tuple(path)) for path, module in reversed(modules)}


def _nnx_in_order(model: Any) -> list[Any]:
    """Returns every submodule once, depth first, attributes in assignment order."""
    from flax import nnx

    seen = {id(model)}
    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, nnx.Module):
            attributes = vars(node)
            children = [attributes[k] for k in _creation_order([k for k in attributes if not k.startswith("_")])]
        elif isinstance(node, (list, tuple)):
            children = list(node)
        elif isinstance(node, dict):
            children = list(node.values())
        else:
            return
        for child in children:
            if isinstance(child, nnx.Module):
                if id(child) in seen:
                    continue
                seen.add(id(child))
                found.append(child)
            visit(child)

    visit(model)
    return found


def _nnx_owns(module: Any) -> list[str]:
    from flax import nnx

    return [k for k, v in vars(module).items() if isinstance(v, (nnx.Param, nnx.BatchStat))]


def _nnx_layers(model: Any) -> tuple[dict[str, tuple[Any, ...]], list[str]]:
    names = _nnx_names(model)
    owners = {names[id(m)][0]: names[id(m)][1] for m in _nnx_in_order(model) if id(m) in names and _nnx_owns(m)}
    return owners, [name for name, _ in names.values()]


def _record_nnx(module: Any, name: str, entered: dict[str, None]) -> None:
    """Gives one module of a private copy a ``__call__`` that notes when it first runs."""
    base = type(module)
    if not any("__call__" in vars(cls) for cls in base.__mro__[:-1]):
        return

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        entered.setdefault(name, None)
        return base.__call__(self, *args, **kwargs)

    module.__class__ = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__})


def _nnx_calls(model: Any, program: _Program, x: jax.Array) -> list[str]:
    """Returns the names of the NNX modules in the order they are first called on ``x``."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    entered: dict[str, None] = {}

    def run(state: Any, xs: jax.Array) -> None:
        def call(sample: jax.Array) -> None:
            private = nnx.merge(graphdef, state)
            private.eval()
            for name, path in _nnx_names(private).values():
                _record_nnx(_follow(private, path), name, entered)
            private(sample, **program.kwargs)

        jax.vmap(call)(xs) if program.vmap else call(xs)

    jax.eval_shape(run, state, x)
    return list(entered)


def _nnx_randomized(model: Any, chosen: list[tuple[str, tuple[Any, ...]]], seed: int) -> Any:
    """Returns a clone of ``model`` whose chosen modules have the variables of rebuilt twins."""
    from flax import nnx

    clone = nnx.clone(model)
    for name, path in chosen:
        module = _follow(clone, path)
        twin = _rebuild(module, name, "rngs", nnx.Rngs(_layer_key(seed, name)), "Flax NNX")
        for attribute in _nnx_owns(module):
            variable, fresh = getattr(module, attribute), vars(twin).get(attribute)
            if not isinstance(fresh, nnx.Variable):
                raise NotImplementedError(f"cannot re-initialise layer {name!r}: rebuilt, it has no {attribute!r}")
            variable.set_value(_fresh_value(name, variable.get_value(), fresh.get_value()))
    return clone


# Equinox: owners hold array leaves outside submodules; layers rebuilt with a key.


def _equinox_split(module: Any) -> tuple[list[Any], Any]:
    """Flattens ``module`` down to its own leaves: its submodules stay whole, as single leaves."""
    import equinox as eqx

    return jax.tree_util.tree_flatten(module, is_leaf=lambda n: n is not module and isinstance(n, eqx.Module))


def _equinox_layers(model: Any) -> tuple[dict[str, tuple[Any, ...]], list[str]]:
    modules = list(_equinox_modules(model))
    owners = {
        ".".join(map(str, path)): path for path, module in modules if any(map(_is_array, _equinox_split(module)[0]))
    }
    return owners, [".".join(map(str, path)) for path, _ in modules]


def _equinox_randomized(model: Any, chosen: list[tuple[str, tuple[Any, ...]]], seed: int) -> Any:
    """Returns ``model`` with the chosen modules' own arrays taken from rebuilt twins."""
    import equinox as eqx

    for name, path in chosen:
        module = _follow(model, path)
        twin = _rebuild(module, name, "key", _layer_key(seed, name), "Equinox")
        leaves, treedef = _equinox_split(module)
        fresh, fresh_treedef = _equinox_split(twin)
        if fresh_treedef != treedef:
            raise NotImplementedError(f"cannot re-initialise layer {name!r}: rebuilt, it has another structure")
        leaves = [
            _fresh_value(name, old, new) if _is_array(old) else old for old, new in zip(leaves, fresh, strict=True)
        ]
        where = functools.partial(_follow, path=path)
        model = eqx.tree_at(where, model, jax.tree_util.tree_unflatten(treedef, leaves))
    return model


# (features, head, params): the keys of a dict of parameters.


def _function_params(source: tuple[Any, ...]) -> Mapping[Any, Any]:
    params = source[2] if len(source) == 3 else None
    if not isinstance(params, Mapping) or not params:
        raise NotImplementedError(
            "a (features, head) pair is plain functions: anycam can neither find nor re-initialise its "
            "parameters; pass (features, head, params) with params a dict of layers, e.g. {'conv': ..., 'fc': ...}"
        )
    return params


def _function_layers(source: tuple[Any, ...]) -> tuple[dict[str, tuple[Any, ...]], list[str]]:
    params = _function_params(source)
    owners = {str(k): (k,) for k, v in params.items() if any(map(_is_array, jax.tree_util.tree_leaves(v)))}
    return owners, list(owners)


def _function_randomized(source: tuple[Any, ...], chosen: list[tuple[str, tuple[Any, ...]]], seed: int) -> Any:
    """Returns the triple with the chosen entries' float leaves redrawn as N(mean, std) of each leaf.

    Plain functions name no initialiser; a Gaussian with the leaf's own mean and spread keeps
    its scale whatever its layout (a kernel's fan-in axis is not known here).
    """
    features, head, params = source
    new = dict(params)
    for name, (key,) in chosen:
        leaves, treedef = jax.tree_util.tree_flatten(params[key])
        keys = jax.random.split(_layer_key(seed, name), max(len(leaves), 1))
        drawn = [
            jnp.mean(leaf) + jnp.std(leaf) * jax.random.normal(k, jnp.shape(leaf), jnp.result_type(leaf))
            if _is_array(leaf) and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
            else leaf
            for leaf, k in zip(leaves, keys, strict=False)
        ]
        new[key] = jax.tree_util.tree_unflatten(treedef, drawn)
    return features, head, new


# -- the backend ---------------------------------------------------------------------------------


def _is_spatial(value: Any) -> bool:
    """A floating input with spatial axes: the default carrier of the heatmap's grid."""
    return (
        isinstance(value, (np.ndarray, jax.Array)) and jnp.issubdtype(value.dtype, jnp.floating) and value.ndim >= 3
    )


def _to_numpy(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


class JaxBackend(Backend):
    """Adapter for JAX models: Flax linen and NNX, Equinox, or a (features, head) split.

    Model forms and layers:

    * Flax linen ``(module, variables)`` or a bound module: a layer is a module path,
      ``"backbone/layer4"`` or ``("backbone", "layer4")`` (``"backbone.layer4"`` works too).
      Paths are read from the variables, so a module must own variables, directly or through
      its submodules, to be named.
    * Flax NNX module: an attribute path, ``"layer4"``, ``"blocks.3"``, or the module object.
    * Equinox module: a pytree path, ``"blocks.3.conv"``, or the module object; for an
      ``eqx.nn.Sequential`` also the index (``3``, ``"3"`` or ``"layers.3"``), in which case the
      model is sliced there. Equinox layers take unbatched samples, so the model runs under
      ``jax.vmap`` (``vmap=False`` for a model that takes batches).
    * ``(features, head)``: ``head(features(x))`` with ``layer=None``; the explained layer is the
      output of ``features``. Parameters are closed over, or given as a third element,
      ``(features, head, params)``, called as ``features(params, x)`` and
      ``head(params, activations)``: then they are arguments of the compiled capture rather
      than constants, and new parameter values of the same shapes do not recompile.

    Options:
        model_kwargs: keyword arguments for every model call (linen ``apply``, NNX or Equinox
            ``__call__``), e.g. ``{"train": False}`` for a linen model with BatchNorm.
        vmap: run the model one sample at a time under ``jax.vmap`` (default: True for
            Equinox, False otherwise).

    Layouts: inputs and layer outputs are channels-last for Flax and channels-first for
    Equinox and functions; ``input_layout=`` sets the input's, and the layers' guess follows
    it; ``layout=`` sets the layers'. Callable targets are JAX functions of the model output,
    compiled with the capture: pass the same function object to reuse the compiled code.
    """

    name = "jax"
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
        check_options(self.name, options, ("model_kwargs", "vmap", "spatial_input"))
        self.output = output
        candidates = _all_layers(model) if len(layers) == 1 and is_auto(layers[0]) else None
        self.auto_layer = candidates is not None
        self._candidates = candidates or []
        self._choose_lock = threading.Lock()
        # With layer="auto", a program tapping every module until the first batch chooses one.
        self._model = _resolve(model, candidates or list(layers), options, output)
        self.layer_names = () if self.auto_layer else self._model.names
        self.input_layout = input_layout or self._model.layout
        self.layer_layout = input_layout or self._model.layout
        self._traced: dict[Any, tuple[int, tuple[int, ...]]] = {}
        # (program, callable, input shape) of the callable targets whose indexing was checked.
        self._checked: dict[Any, Callable[[Any], Any]] = {}
        self._options = dict(options)
        # (shape, dtype) of the last batch: a linen module's init needs an input to run on.
        self._example: tuple[tuple[int, ...], Any] | None = None

    def _as_input(self, inputs: Any) -> Any:
        """Returns one checked array, or several inputs (a tuple/list or dict) as one ``_Inputs`` pytree.

        With ``layer="auto"`` the first batch also chooses the layer.
        """
        x = self._structured(inputs)
        if self.auto_layer and not self.layer_names:
            self._choose(x)
        return x

    def _choose(self, x: Any) -> None:
        """Chooses the layer for ``layer="auto"`` from abstract passes (shapes only, no compute), once.

        One pass with every module tapped gives the call order, the call counts and the output
        shapes; the layers that run once with a floating output are then tapped with zero
        deltas, and the traced program says which deltas the model output depends on.
        """
        with self._choose_lock:
            if self.layer_names:
                return
            program, params = self._model.snapshot()
            record = _Record()
            token = _RECORDING.set(record)
            try:
                jax.eval_shape(lambda p, xs: program.run(p, xs, None)[0], params, x)
            finally:
                _RECORDING.reset(token)
            batch = x.shape[0]
            shapes = {
                i: None if shape is None else ((batch, *shape) if program.vmap else shape)
                for i, shape in record.shapes.items()
            }
            once = [i for i in record.order if record.calls[i] == 1 and shapes[i] is not None]
            reaches: dict[int, bool] = {}
            if once:
                tapped = [self._candidates[i] for i in once]
                sub, sub_params = _resolve(self._model.source, tapped, self._options, self.output).snapshot()
                found = jax.eval_shape(lambda p, xs: sub.run(p, xs, None)[1], sub_params, x)
                deltas = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in found)
                traced = jax.make_jaxpr(lambda d, p, xs: jax.tree_util.tree_leaves(sub.run(p, xs, d)[0]))(
                    deltas, sub_params, x
                )
                reaches = dict(zip(once, _reaching(traced.jaxpr, len(deltas)), strict=True))
            records = [
                LayerRecord(
                    self._candidates[i],
                    shapes[i],
                    layout=self.layer_layout,
                    calls=record.calls[i],
                    reaches_output=reaches.get(i, True),
                )
                for i in record.order
            ]
            chosen = choose_layer(records, spatial_shape(tuple(x.shape), self.input_layout))
            self._model = _resolve(self._model.source, [chosen], self._options, self.output)
            self.layer_names = self._model.names

    def _structured(self, inputs: Any) -> Any:
        structure = structure_inputs(inputs, is_spatial=_is_spatial, spatial_input=self._options.get("spatial_input"))
        if structure.kind == "single":
            return self._as_array(structure.args[0])

        def convert(key: Any, value: Any) -> Any:
            if key == structure.spatial:
                return self._as_array(value, f"input {key!r}")
            if not isinstance(value, (np.ndarray, jax.Array)):
                raise InputError(f"input {key!r} must be a jax.Array or a NumPy array, got {type(value).__name__}")
            return jnp.asarray(value)

        converted = structure.map(convert)
        return _Inputs(converted.args, converted.kwargs, converted.spatial, converted.kind)

    def _as_array(self, inputs: Any, what: str = "input") -> jax.Array:
        if not isinstance(inputs, (np.ndarray, jax.Array)):
            raise InputError(f"{what} must be a jax.Array or a NumPy array, got {type(inputs).__name__}")
        if not jnp.issubdtype(inputs.dtype, jnp.floating):
            raise InputError(
                f"{what} must be floating point, got dtype {inputs.dtype}; e.g. x.astype(jnp.float32) / 255"
            )
        shape = tuple(inputs.shape)
        spatial_shape(shape, self.input_layout)
        check_batch(shape)
        # A NaN or inf anywhere makes the sum NaN or inf: a finite sum (one pass) proves the input
        # finite; otherwise (a bad element, or an overflowing sum) it is checked element-wise.
        xp: Any = np if isinstance(inputs, np.ndarray) else jnp
        wide = np.float64 if inputs.dtype == np.float64 else np.float32
        if not bool(xp.isfinite(xp.sum(inputs, dtype=wide))):
            finite = xp.isfinite(inputs)
            if not bool(finite.all()):
                raise non_finite_input("input", bool(xp.isnan(inputs).any()), int((~finite).sum()))
        return jnp.asarray(inputs)

    def _run(self, call: Callable[[], Any], x: jax.Array) -> Any:
        """Runs ``call``; a failure of the traced model becomes an InputError with it as the cause."""
        try:
            return call()
        except AnycamError:
            raise
        except Exception as exc:  # flax, equinox and jax raise many kinds for a misfit input
            if isinstance(x, _Inputs):
                raise InputError(
                    f"the model does not accept the inputs given ({x.describe()}): {type(exc).__name__}: {exc}; "
                    "pass a dict with the keywords it takes, or a tuple in the order of its positional arguments"
                ) from exc
            raise forward_error(exc, tuple(x.shape), self.input_layout) from exc

    def _check_callable(self, program: _Program, params: Any, x: Any, fn: Callable[[Any], Any]) -> None:
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
        if key in self._checked:
            return
        shapes = self._run(lambda: jax.eval_shape(lambda p, xs: program.run(p, xs, None)[0], params, x), x)
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
        if len(self._checked) >= _TRACE_INFO_LIMIT:
            self._checked.clear()
        self._checked[key] = fn  # keeps fn alive, so its id is not reused while the key is kept

    @staticmethod
    def _mode(target: TargetSpec, batch: int) -> tuple[tuple[Any, ...], np.ndarray | None]:
        if target.kind == "argmax":
            return ("argmax",), None
        if target.kind == "topk":
            return ("topk", target.k), None
        if target.kind == "callable":
            return ("callable", target.fn), None
        assert target.indices is not None
        return ("given",), np.zeros((batch, target.indices.shape[1]), np.int32)

    def _with_gradients(self, program: _Program, params: Any, x: jax.Array, target: TargetSpec) -> Any:
        batch = x.shape[0]
        mode, given = self._mode(target, batch)
        key = (program, mode, _shape_key(x), None if given is None else given.shape)
        info = self._traced.get(key)
        if info is None:
            if mode[0] == "callable":
                self._check_callable(program, params, x, mode[1])
            traced = self._run(lambda: _capture.trace(program, mode, params, x, given), x)
            info = (traced.out_info[4].shape[1], _constant_gradients(traced, len(self.layer_names)))
            if len(self._traced) >= _TRACE_INFO_LIMIT:
                # pop(..., None): another thread sharing the Explainer may evict the same entry.
                self._traced.pop(next(iter(self._traced), None), None)
            self._traced[key] = info
        classes, constant = info
        indices = None
        if mode == ("given",):
            indices = resolve_indices(target, np.zeros((batch, classes), np.float32))
            given = indices.astype(np.int32)
        result = jax.device_get(_capture(program, mode, params, x, given)[:4])
        activations, gradients, scores, found = result
        for index in constant:
            if not np.any(gradients[index]):
                raise LayerError(
                    f"layer {self.layer_names[index]!r} does not reach the explained output: its "
                    "gradient is zero everywhere and depends on no input (no path from the layer "
                    "to the output); explain a layer on the path to the output"
                )
        if mode[0] != "callable":
            indices = np.asarray(found, dtype=np.int64)
        return activations, gradients, scores, indices

    def _without_gradients(self, program: _Program, params: Any, x: jax.Array, target: TargetSpec) -> Any:
        batch = x.shape[0]
        output, activations = self._run(lambda: _forward(program, params, x), x)
        if target.kind == "callable":
            assert target.fn is not None
            self._check_callable(program, params, x, target.fn)
            scores = _callable_scores(target.fn, output, batch)
            activations, scores = jax.device_get((activations, scores))
            return activations, scores, None
        activations, outputs = jax.device_get((activations, _class_outputs(output, batch)))
        outputs = _to_numpy(outputs)
        indices = resolve_indices(target, outputs)
        return activations, np.take_along_axis(outputs, indices, axis=1), indices

    def capture(self, inputs: Any, target: TargetSpec, *, gradients: bool = True) -> Capture:
        x = self._as_input(inputs)
        self._example = (tuple(x.shape), x.dtype)
        program, params = self._model.snapshot()
        grads_np: tuple[np.ndarray, ...] | None = None
        if gradients:
            activations, grads, scores, indices = self._with_gradients(program, params, x, target)
            grads_np = tuple(_to_numpy(g) for g in grads)
        else:
            activations, scores, indices = self._without_gradients(program, params, x, target)
        return Capture(
            activations=tuple(_to_numpy(a) for a in activations),
            gradients=grads_np,
            scores=_to_numpy(scores),
            target=indices,
            input_spatial=spatial_shape(tuple(x.shape), self.input_layout),
            layouts=(self.layer_layout,) * len(self.layer_names),
            input_shape=tuple(x.shape),
            input_layout=self.input_layout,
            layouts_follow_input=True,
        )

    # -- gradient-free and guided methods (Score-CAM, Ablation-CAM, Guided Backprop) ------------

    @staticmethod
    def _given(target: TargetSpec, indices: np.ndarray | None, batch: int) -> tuple[tuple[Any, ...], Any]:
        """Returns (mode, int32 ``(N, K)`` indices or None) for the resolved ``indices`` of a call."""
        if target.kind == "callable":
            return ("callable", target.fn), None
        if indices is None:
            raise TargetError("class-index targets need the (N, K) class indices the capture resolved; got None")
        indices = np.asarray(indices)
        if indices.ndim != 2 or indices.shape[0] != batch:
            raise TargetError(f"expected (N, K) class indices with N={batch}, got shape {indices.shape}")
        return ("given",), indices.astype(np.int32)

    def head_scores(
        self, inputs: Any, replacements: np.ndarray, target: TargetSpec, indices: np.ndarray | None
    ) -> np.ndarray:
        """Returns ``(B, N, K)`` float32 scores with the first layer's output replaced by each copy.

        Runs ``jax.vmap`` over the B copies with the input unbatched: the network up to the
        layer runs once per call, the rest on all B·N replaced samples, compiled once per
        (model, layer, target kind, shapes). A skip connection around the layer sees the
        original tensor, as it would in a model that recomputes everything.

        Args:
            inputs: the batch ``(N, ...)`` given to ``capture``.
            replacements: ``(B, N, *layer_shape)`` copies of the layer output in its layout.
            target: the call's target; indices: the ``(N, K)`` classes the capture resolved
                (None for a callable target, which is applied to each replaced output).

        Raises:
            anycam.InputError: replacements of another shape than the layer's output.
        """
        x = self._as_input(inputs)
        batch = x.shape[0]
        mode, given = self._given(target, indices, batch)
        copies = jnp.asarray(replacements, dtype=jnp.float32)
        if copies.ndim < 2 or copies.shape[1] != batch:
            raise InputError(
                f"replacements must be (B, N, *layer_shape) with N={batch}, got shape {tuple(copies.shape)}"
            )
        program, params = self._model.snapshot()
        return _to_numpy(jax.device_get(_head_scores(program, mode, params, x, copies, given)))

    def ablation_scorer(
        self,
        inputs: Any,
        target: TargetSpec,
        indices: np.ndarray | None,
        activations: np.ndarray,
        channel_axis: int,
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Returns ``f(channels (B,)) -> (B, N, K)``: scores with channel ``channels[b]`` zeroed.

        One compiled function per (model, layer, target kind, shapes) takes the activations once
        and the B channel indices, and makes each copy inside ``jax.vmap`` (see ``head_scores``).
        """
        x = self._as_input(inputs)
        mode, given = self._given(target, indices, x.shape[0])
        values = jnp.asarray(activations, dtype=jnp.float32)
        if values.ndim < 2 or values.shape[0] != x.shape[0]:
            raise InputError(
                f"activations must be (N, ...) with N={x.shape[0]}, got shape {tuple(values.shape)}"
            )
        program, params = self._model.snapshot()
        axis = int(channel_axis) % values.ndim

        def scores(channels: np.ndarray) -> np.ndarray:
            chosen = jnp.asarray(np.asarray(channels, dtype=np.int32))
            result = _ablation_scores(program, mode, axis, params, x, values, chosen, given)
            return _to_numpy(jax.device_get(result))

        return scores

    def ablation_head(
        self,
        inputs: Any,
        target: TargetSpec,
        indices: np.ndarray | None,
        activations: np.ndarray,
        channel_axis: int,
    ) -> AblationHead | None:
        """Returns the network after the layer as pooling → [dense] → tail when its jaxpr is one.

        The scores are traced as a function of the layer output (``{"replace": ...}``) and the
        jaxpr walked from it (``_plan_head``): the layer output must be read by one sum or max
        over all its spatial axes, then only by scaling and reshapes, optionally reaching a
        dense layer (``dot_general`` against a kernel computed from the parameters), and no
        equation after the layer may read a value computed from the input. ``pooled`` is the
        model's own pooling on ``activations``; ``tail`` evaluates the remaining equations
        (bias, activation, softmax, output selection, the targets) vmapped over the copies, one
        compiled function per (model, layer, target kind, shapes). None otherwise, and for
        several layers, a layer's input, or a non-float32 layer.
        """
        program, params = self._model.snapshot()
        values = np.asarray(activations)
        if len(program.names) != 1 or program.ports[0] != "output" or values.dtype != np.float32:
            return None
        x = self._as_input(inputs)
        mode, given = self._given(target, indices, x.shape[0])
        axis = int(channel_axis) % values.ndim
        leaves = jax.tree_util.tree_leaves(params)
        inputs_count = len(jax.tree_util.tree_leaves(x))
        given_shape = None if given is None else given.shape
        key = (program, mode, axis, _shape_key(params), _shape_key(x), values.shape, given_shape)
        if key not in _HEAD_PLANS:
            batch = x.shape[0]

            def scores_of(replacement: jax.Array, params: Any, x: Any, given: Any) -> jax.Array:
                output, _ = program.run(params, x, {"replace": replacement})
                return _selected_scores(mode, output, batch, given)

            layer = jax.ShapeDtypeStruct(values.shape, jnp.float32)
            try:
                closed = jax.make_jaxpr(scores_of)(layer, params, x, given)
            except Exception:  # a suffix that does not trace runs the slow path, which reports the error
                closed = None
            plan = None if closed is None else _plan_head(closed, len(leaves), inputs_count, axis)
            if len(_HEAD_PLANS) >= _TRACE_INFO_LIMIT:
                _HEAD_PLANS.pop(next(iter(_HEAD_PLANS), None), None)
            _HEAD_PLANS[key] = plan
        plan = _HEAD_PLANS[key]
        if plan is None:
            return None
        arguments = [*leaves, *jax.tree_util.tree_leaves(x), *([] if given is None else [jnp.asarray(given)])]
        pooled, weight = jax.device_get(plan.prepare(jnp.asarray(values), arguments))

        def tail(features: np.ndarray) -> np.ndarray:
            return _to_numpy(jax.device_get(plan.tail(jnp.asarray(features, jnp.float32), arguments)))

        return AblationHead(pooled=_to_numpy(pooled), tail=tail, weight=None if weight is None else _to_numpy(weight))

    def input_scores(
        self, inputs: Any, target: TargetSpec, indices: np.ndarray | None, *, probabilities: bool = False
    ) -> np.ndarray:
        """Returns ``(M, K)`` float32 scores of the targets on a batch of (modified) inputs.

        ``probabilities=True`` takes the softmax over the classes first (Score-CAM's weights),
        for class-index targets only. One compiled forward per (model, target kind, shapes).

        Raises:
            anycam.TargetError: ``probabilities=True`` with a callable target, or indices that
                do not fit the batch or the model's classes.
        """
        x = self._as_input(inputs)
        if probabilities and target.kind == "callable":
            raise TargetError(
                "Score-CAM weights by the softmax of class scores, and a callable target has no "
                "classes to take it over; pass class indices, or a callable that returns what to "
                "weight by and probabilities=False"
            )
        mode, given = self._given(target, indices, x.shape[0])
        program, params = self._model.snapshot()
        scores, outputs = jax.device_get(_input_scores(program, mode, bool(probabilities), params, x, given))
        if outputs is not None:
            resolve_indices(TargetSpec("indices", squeeze=False, indices=np.asarray(indices)), _to_numpy(outputs))
        return _to_numpy(scores).reshape(x.shape[0], -1)

    def guided_gradients(self, inputs: Any, target: TargetSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Returns Guided Backpropagation: (∂score/∂input ``(N, K, ...)``, scores ``(N, K)``, indices).

        The model is traced to a jaxpr and evaluated with every ReLU's backward replaced by the
        guided rule (a gradient passes where the ReLU's input and the incoming gradient are both
        positive): ``jax.nn.relu`` — what Flax's ``nn.relu`` and Equinox's activations are —
        and ``jnp.maximum(x, 0)``, in plain functions, Flax and Equinox modules alike, inside
        ``jit``, ``scan``, ``cond`` and ``while`` too. Only the traced copy of the program
        changes; nothing is patched, so the model and ``jax.nn.relu`` are untouched, also when
        the call fails. Compiled once per (model, target kind, shapes).

        Raises:
            anycam.TargetError: for targets that do not fit the output.
        Warns:
            UserWarning: the model has no ReLU, so the result equals plain input gradients.
        """
        x = self._as_input(inputs)
        _one_input(x, "guided backpropagation in JAX")
        batch = x.shape[0]
        mode, given = self._mode(target, batch)
        if mode == ("given",):
            assert target.indices is not None
            if target.kind == "indices" and target.indices.shape[0] != batch:
                resolve_indices(target, np.zeros((batch, 1), np.float32))  # raises: wrong count
            given = np.broadcast_to(target.indices, (batch, target.indices.shape[1])).astype(np.int32)
        program, params = self._model.snapshot()
        if mode[0] == "callable":
            self._check_callable(program, params, x, mode[1])
        gradients, scores, found, outputs, replaced = jax.device_get(_guided(program, mode, params, x, given))
        if int(replaced) == 0:
            warnings.warn(
                "guided backpropagation found no ReLU in the model (jax.nn.relu or jnp.maximum(x, 0)), "
                "so its result equals plain input gradients",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        indices: np.ndarray | None = None
        if mode == ("given",):
            indices = resolve_indices(target, _to_numpy(outputs))
        elif mode[0] != "callable":
            indices = np.asarray(found, dtype=np.int64)
        return _to_numpy(gradients), _to_numpy(scores), indices

    def _parameter_owners(self) -> tuple[dict[str, tuple[Any, ...]], list[str]]:
        """Returns the layers that own parameters (name → path, definition order) and all module names."""
        family, source = self._model.family, self._model.source
        if family == "linen":
            owners = _linen_owners(*source)
            return {name: tuple(name.split("/")) for name in owners}, list(_linen_paths(source[1]))
        if family == "nnx":
            return _nnx_layers(source)
        if family == "equinox":
            return _equinox_layers(source)
        return _function_layers(source)

    def parameter_layers(self, inputs: Any = None) -> tuple[str, ...]:
        """Returns the layers that own parameters directly, from the input to the output.

        Owning means holding linen ``params`` / ``batch_stats`` leaves, NNX ``Param`` /
        ``BatchStat`` variables or Equinox array fields itself, not through submodules; names
        are as layers are addressed. Without ``inputs`` the order is definition order (linen
        fields and ``setup``, NNX attribute assignments, Equinox field declarations; compact
        linen submodules as Flax created them, which variables that went through
        ``jax.tree_util`` no longer show, their keys being sorted). With ``inputs``, a batch,
        Flax modules come in the order they run on it, from one abstract trace (no compute);
        modules that run through other methods than ``__call__`` (NNX) or not at all follow in
        definition order. A ``(features, head, params)`` triple lists the keys of a dict
        ``params`` in its order.

        Raises:
            NotImplementedError: for a (features, head) pair without a dict of parameters.
        """
        owners = list(self._parameter_owners()[0])
        family = self._model.family
        if inputs is None or family not in ("linen", "nnx"):
            return tuple(owners)
        x = self._as_input(inputs)
        self._example = (tuple(x.shape), x.dtype)
        program, params = self._model.snapshot()
        calls = _linen_calls(program, params, x) if family == "linen" else _nnx_calls(self._model.source, program, x)
        ran = [name for name in calls if name in owners]
        return (*ran, *(name for name in owners if name not in ran))

    def _owner(self, layer: Any, owners: Mapping[str, Any], modules: Sequence[str]) -> str:
        """Returns the owner name ``layer`` means, or raises LayerError naming what fits."""
        family = self._model.family
        sep = "/" if family == "linen" else "."
        if isinstance(layer, tuple):
            layer = sep.join(map(str, layer))
        name = str(layer)
        if (
            family == "equinox"
            and name.isdigit()
            and isinstance(self._model.source, sys.modules["equinox"].nn.Sequential)
        ):
            name = f"layers.{name}"
        for candidate in (name, name.replace("/", sep).replace(".", sep)):
            if candidate in owners:
                return candidate
            if candidate in modules:
                inside = [owner for owner in owners if owner.startswith(candidate + sep)]
                hint = f"; randomise its layers: {', '.join(map(repr, inside))}" if inside else ""
                raise LayerError(f"layer {candidate!r} owns no parameters to randomise{hint}")
        raise LayerError(f"layer {name!r} not found among the layers with parameters{closest(name, list(owners))}")

    def randomized(self, layers: Sequence[str], seed: int = 0) -> JaxBackend:
        """Returns a backend over a copy of the model whose ``layers`` have fresh parameters.

        * Flax linen: the chosen modules' ``params`` and ``batch_stats`` leaves come from one
          ``module.init`` with ``jax.random.key(seed)``: every module's own initialisers, the
          variables of the other modules untouched. The init runs on the shape of the last
          explained batch (compiled once, then one call per copy).
        * Flax NNX and Equinox: each chosen layer is rebuilt from the constructor arguments it
          keeps as attributes (NNX with ``nnx.Rngs``, Equinox with ``key=``), seeded by ``seed``
          and its name, and its own variables / arrays are taken from the rebuilt twin; NNX
          modules keep no initialisers, so theirs are the constructor defaults.
        * ``(features, head, params)`` with a dict ``params``: the float leaves of the chosen
          entries are drawn from a Gaussian with each leaf's own mean and standard deviation.

        The model is only read: the copy is a new variables dict, an ``nnx.clone`` or a new
        Equinox pytree. It explains the same layers with the same options, and as weights are
        arguments of the compiled capture, it reuses it.

        Raises:
            anycam.LayerError: a layer is unknown or owns no parameters itself.
            anycam.InputError: a linen model has explained no batch yet (init needs an input).
            NotImplementedError: a (features, head) pair without a dict of parameters, or a
                layer that cannot be rebuilt from its attributes.
        """
        seed = operator.index(seed)
        owners, modules = self._parameter_owners()
        chosen = [
            (name, owners[name]) for name in dict.fromkeys(self._owner(layer, owners, modules) for layer in layers)
        ]
        family, source = self._model.family, self._model.source
        if family == "linen":
            program, _ = self._model.snapshot()
            model = _linen_randomized(program, source, [name for name, _ in chosen], seed, self._example)
        elif family == "nnx":
            model = _nnx_randomized(source, chosen, seed)
        elif family == "equinox":
            model = _equinox_randomized(source, chosen, seed)
        else:
            model = _function_randomized(source, chosen, seed)
        clone = copy.copy(self)
        clone._model = _resolve(model, list(self.layer_names), self._options, self.output)
        return clone

    def predict(self, inputs: Any) -> np.ndarray:
        x = self._as_input(inputs)
        self._example = (tuple(x.shape), x.dtype)
        program, params = self._model.snapshot()
        output, _ = self._run(lambda: _forward(program, params, x), x)
        return _to_numpy(jax.device_get(output))
