"""Layers of a JAX model as taps: the explained outputs (or inputs) collected while a program runs.

``_Taps`` adds a zero delta to each explained layer output (what Flax's ``Module.perturb``
does), so ``jax.vjp`` with respect to the deltas is ∂output/∂layer and nothing before the layer is
differentiated. Here too: how a layer name, path or module object is matched (``_pick``), and the
automatic choice of ``layer="auto"`` from abstract passes (shapes only, no compute).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from anycam._errors import InputError, LayerError
from anycam.core import spatial_shape
from anycam.protocol.layers import LayerRecord, choose_layer, layer_not_found

if TYPE_CHECKING:
    from .backend import JaxBackend


class _Record:
    """What ``layer="auto"`` reads from one abstract pass with every module tapped: order, calls, shapes.

    ``inner``: the modules that ran inside a transformation of their own within the model (an
    Equinox block's ``jax.vmap(self.norm)``, a ``lax.scan``): their outputs are that
    transformation's tracers and cannot be read out of it, so they are no candidates.
    """

    def __init__(self) -> None:
        self.order: list[int] = []
        self.calls: dict[int, int] = {}
        self.shapes: dict[int, tuple[int, ...] | None] = {}
        self.inner: set[int] = set()
        self.trace: Any = None  # the trace the model's own call runs in (set by _Taps)

    def note(self, index: int, value: Any) -> Any:
        self.calls[index] = self.calls.get(index, 0) + 1
        if self.calls[index] == 1:
            self.order.append(index)
            floating = isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.floating)
            self.shapes[index] = tuple(value.shape) if floating else None
            if floating and _inner(value, self.trace):
                self.inner.add(index)
        return value


def _current_trace() -> Any:
    """The trace JAX is tracing in now (None where this JAX does not say)."""
    try:
        from jax._src import core as jax_src_core  # no public API names the current trace

        return jax_src_core.trace_ctx.trace
    except (ImportError, AttributeError):
        return None


def _inner(value: Any, trace: Any) -> bool:
    """Whether ``value`` belongs to a transformation inside the model's call (not to its ``trace``).

    Looked up, not computed: an operation on such a tracer would be recorded in the outer program
    and fail there, later. Where JAX does not say, nothing counts as inner (the old behaviour).
    """
    own = getattr(value, "_trace", None)
    return trace is not None and own is not None and own is not trace


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
        if self.record is not None:
            self.record.trace = _current_trace()

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


def _first_input(name: str, args: Sequence[Any]) -> Any:
    if not args:
        raise LayerError(
            f"layer {name!r}: the module is called with no positional input to capture; explain the "
            "output of the module before it"
        )
    return args[0]


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
    missing = layer_not_found(name, canonical, model=f"the {family} model")
    raise LayerError(f"{missing}; module paths: {_listing(canonical)}")


def _labels(names: Sequence[str], common: Mapping[str, Any]) -> tuple[str, ...]:
    """Returns the reported names: ``"name:input"`` where the layer's input is explained."""
    ports = common.get("ports") or ("output",) * len(names)
    return tuple(name if port == "output" else f"{name}:input" for name, port in zip(names, ports, strict=True))


def choose(backend: JaxBackend, x: Any) -> None:
    """Chooses the layer for ``layer="auto"`` from abstract passes (shapes only, no compute), once.

    One pass with every module tapped gives the call order, the call counts and the output
    shapes; the layers that run once with a floating output are then tapped with zero
    deltas, and the traced program says which deltas the model output depends on.
    """
    # models builds its programs from this module's taps, so it is imported here, not above.
    from .models import _resolve

    with backend._choose_lock:
        if backend.layer_names:
            return
        program, params = backend._model.snapshot()
        record = _Record()
        token = _RECORDING.set(record)
        try:
            with _linen_attention_calls() as linen_attention:
                jax.eval_shape(lambda p, xs: program.run(p, xs, None)[0], params, x)
        finally:
            _RECORDING.reset(token)
        batch = x.shape[0]
        shapes = {
            i: None if shape is None else ((batch, *shape) if program.vmap else shape)
            for i, shape in record.shapes.items()
        }
        order = [i for i in record.order if i not in record.inner]
        once = [i for i in order if record.calls[i] == 1 and shapes[i] is not None]
        reaches: dict[int, bool] = {}
        if once:
            tapped = [backend._candidates[i] for i in once]
            sub, sub_params = _resolve(backend._model.source, tapped, backend._options, backend.output).snapshot()
            found = jax.eval_shape(lambda p, xs: sub.run(p, xs, None)[1], sub_params, x)
            deltas = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in found)
            traced = jax.make_jaxpr(lambda d, p, xs: jax.tree_util.tree_leaves(sub.run(p, xs, d)[0]))(
                deltas, sub_params, x
            )
            reaches = dict(zip(once, _reaching(traced.jaxpr, len(deltas)), strict=True))
        records = [
            LayerRecord(
                backend._candidates[i],
                shapes[i],
                layout=backend.layer_layout,
                calls=record.calls[i],
                reaches_output=reaches.get(i, True),
            )
            for i in order
        ]
        attention = _attention_modules(backend._model.source) | set(linen_attention)
        chosen = _before_last_attention(records, attention, batch)
        if chosen is not None:
            # The rule chose it for holding the attention's (N, T, C) tokens: that is its layout
            # (a tiny ViT's 17 tokens of 16 channels read as channels-last as well).
            backend.layer_layout = "tokens"
            backend.auto_note = (
                f"a token model: {chosen!r} holds the tokens the last attention reads (the last module with "
                "them before it); the attention methods (rollout, attention-grad) need no layer"
            )
        else:
            chosen = choose_layer(records, spatial_shape(tuple(x.shape), backend.input_layout))
        backend._model = _resolve(backend._model.source, [chosen], backend._options, backend.output)
        backend.layer_names = backend._model.names


# -- the token rule (issue 22): layer=None on a vision transformer ------------------------------


def _attention_modules(model: Any) -> set[str]:
    """Returns the names of an NNX or Equinox model's attention modules (linen's are recorded as they run)."""
    nnx = sys.modules.get("flax.nnx")
    equinox = sys.modules.get("equinox")
    if nnx is not None and isinstance(model, nnx.Module):
        found = nnx.iter_modules(model)
        return {".".join(map(str, path)) for path, m in found if path and isinstance(m, nnx.MultiHeadAttention)}
    if equinox is not None and isinstance(model, equinox.Module):
        from .models import _equinox_modules

        kind = equinox.nn.MultiheadAttention
        return {".".join(map(str, path)) for path, m in _equinox_modules(model) if isinstance(m, kind)}
    return set()


@contextlib.contextmanager
def _linen_attention_calls() -> Iterator[list[str]]:
    """Records the paths of the linen attention modules called inside the block (none without linen)."""
    found: list[str] = []
    linen = sys.modules.get("flax.linen")
    if linen is None:
        yield found
        return

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        if context.method_name == "__call__" and isinstance(module, linen.MultiHeadDotProductAttention):
            found.append("/".join(module.path))
        return next_fun(*args, **kwargs)

    with linen.intercept_methods(interceptor):
        yield found


def _before_last_attention(records: Sequence[LayerRecord], attention: set[str], batch: int) -> str | None:
    """The token rule: the last module with the ``(N, T, C)`` tokens of the last attention, ended before it.

    As in torch (``backends/torch/layers.py``): the last block's input normalisation where the
    block calls it directly, else the previous block's output — the tokens the last attention
    reads. A module inside the attention (its projections) does not count. None when the model
    has no attention module over the batch's whole token sequence: the general rule applies.
    """
    ends = [k for k, record in enumerate(records) if record.name in attention]
    if not ends:
        return None
    last = records[ends[-1]]
    if last.shape is None or len(last.shape) != 3 or last.shape[0] != batch:
        return None
    inside = (last.name + ".", last.name + "/")
    for record in reversed(records[: ends[-1]]):
        if record.name.startswith(inside):
            continue
        fits = record.shape is not None and len(record.shape) == 3 and record.shape[:2] == last.shape[:2]
        if fits and record.calls == 1 and record.reaches_output:
            return record.name
    return None
