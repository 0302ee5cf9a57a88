"""Guided backpropagation in JAX: the ReLUs of the traced program rewritten with the guided rule.

The model is traced to a jaxpr once and evaluated again with every ReLU (``jax.nn.relu``,
``max(x, 0)``, ``jnp.clip(x, 0)``, ``jnp.where(x > 0, x, 0)``, ``x * (x > 0)``) replaced by
``_guided_relu``, inside ``jit``, ``jax.checkpoint``, ``scan``, ``cond`` and ``while`` bodies too;
nothing is patched. The count of ReLUs replaced, and the bodies that could not be rewritten,
are the coverage report.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from anycam._errors import AnycamWarning, user_stacklevel
from anycam.core import TargetSpec, resolve_indices

from .capture import (
    _TRACE_INFO_LIMIT,
    _callable_scores,
    _class_outputs,
    _indices,
    _to_numpy,
    check_callable,
    target_mode,
)
from .inputs import _one_input
from .models import _Program

if TYPE_CHECKING:
    from .backend import JaxBackend


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
# ``remat2`` is ``jax.checkpoint``: inlined, its ReLUs are guided and only its memory saving is lost.
_INLINE = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}
# Of those, the ones that only draw a boundary: always inlined, so a ReLU written across the
# boundary (``jnp.where(x > 0, x, 0)`` puts ``x > 0`` outside and the select inside) is seen whole.
_BOUNDARIES = ("jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint")
# Primitives a ReLU spelling may be made of: a body with none of them holds no ReLU.
_RELU_PARTS = ("max", "select_n", "mul")
_COMPARISONS = {"gt": "pos", "ge": "pos", "lt": "neg", "le": "neg"}


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
    """Whether ``jaxpr`` calls ``jax.nn.relu`` or ``max(x, 0)`` literally: what opens a custom rule."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return any(
        _is_relu(eqn) or any(_holds_relu(inner) for inner in jax_core.jaxprs_in_params(eqn.params))
        for eqn in jaxpr.eqns
    )


def _may_hold_relu(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` has a primitive some ReLU spelling is made of (a loop or branch body to rewrite)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return any(
        eqn.primitive.name in _RELU_PARTS
        or _is_relu(eqn)
        or any(_may_hold_relu(inner) for inner in jax_core.jaxprs_in_params(eqn.params))
        for eqn in jaxpr.eqns
    )


class _Guide:
    """What one guided evaluation knows: ReLUs replaced, bodies it could not reach, facts of values.

    Facts are keyed by the identity of the traced values (kept alive here), so they follow a
    value into an inlined body: ``"zero"`` for a constant zero (a literal, converted or
    broadcast), ``("pos", x)`` / ``("neg", x)`` for the mask ``x > 0`` / ``x < 0``, and
    ``("step", x)`` for that mask converted to a number.
    """

    def __init__(self) -> None:
        self.replaced = 0
        self.missed: list[str] = []
        self._facts: dict[int, tuple[Any, Any]] = {}

    def fact(self, value: Any) -> Any:
        if isinstance(value, (int, float, np.number, np.ndarray)) and not isinstance(value, bool):
            return "zero" if np.size(value) and not np.any(value) else None
        found = self._facts.get(id(value))
        return found[1] if found is not None and found[0] is value else None

    def note(self, value: Any, fact: Any) -> None:
        if fact is not None:
            self._facts[id(value)] = (value, fact)

    def relu(self, x: Any) -> Any:
        self.replaced += 1
        return _guided_relu(x)


def _relu_input(name: str, inputs: list[Any], guide: _Guide) -> Any:
    """Returns ``x`` where an equation computes ``relu(x)`` by one of its spellings, else None.

    ``max(x, 0)`` with any constant zero (``jnp.clip(x, 0)``, ``jnp.maximum``),
    ``select_n(x > 0, 0, x)`` and ``select_n(x < 0, x, 0)`` (``jnp.where``), ``x * (x > 0)``.
    """
    facts = [guide.fact(value) for value in inputs]
    if name == "max" and len(inputs) == 2:
        shape = np.broadcast_shapes(np.shape(inputs[0]), np.shape(inputs[1]))
        for operand in (0, 1):
            other = inputs[1 - operand]
            if facts[operand] == "zero" and facts[1 - operand] != "zero" and isinstance(other, jax.Array):
                return other if np.shape(other) == shape else None
    if name == "select_n" and len(inputs) == 3 and isinstance(facts[0], tuple):
        sign, x = facts[0]
        kept, dropped = (2, 1) if sign == "pos" else (1, 2)
        if inputs[kept] is x and facts[dropped] == "zero" and np.shape(inputs[dropped]) == np.shape(x):
            return x
    if name == "mul" and len(inputs) == 2:
        for operand in (0, 1):
            fact = facts[1 - operand]
            if isinstance(fact, tuple) and fact[0] == "step" and fact[1] is inputs[operand]:
                return inputs[operand]
    return None


def _facts_of(eqn: Any, inputs: list[Any], outputs: list[Any], guide: _Guide) -> None:
    """Notes what the outputs of an ordinary equation are, for a ReLU spelled over several."""
    name = eqn.primitive.name
    if len(outputs) != 1:
        return
    facts = [guide.fact(value) for value in inputs]
    if name in ("convert_element_type", "broadcast_in_dim", "reshape", "copy", "copy_p") and facts[0] == "zero":
        guide.note(outputs[0], "zero")
    elif name in _COMPARISONS and len(inputs) == 2:
        sign = _COMPARISONS[name]
        if facts[1] == "zero" and facts[0] != "zero":
            guide.note(outputs[0], (sign, inputs[0]))
        elif facts[0] == "zero" and facts[1] != "zero":  # 0 < x is x > 0
            guide.note(outputs[0], ("neg" if sign == "pos" else "pos", inputs[1]))
    elif name == "convert_element_type" and isinstance(facts[0], tuple) and facts[0][0] == "pos":
        guide.note(outputs[0], ("step", facts[0][1]))


def _evaluate_guided(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], guide: _Guide) -> list[Any]:
    """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``, with each ReLU replaced by ``_guided_relu``.

    A ReLU is ``jax.nn.relu`` (Flax's ``nn.relu``, Equinox's default activations), ``max`` with
    a constant zero (``jnp.maximum(x, 0)``, ``jnp.clip(x, 0, None)``), ``jnp.where(x > 0, x, 0)``
    or ``x * (x > 0)``. Call boundaries (``jit``, ``jax.checkpoint``) are evaluated inline,
    custom-rule bodies that call ``jax.nn.relu`` or ``max(x, 0)`` too; loops and conditionals
    (``scan``, ``while``, ``cond``) get their bodies rewritten the same way.
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
        for var, value in zip(eqn.outvars, _apply_guided(eqn, inputs, guide), strict=True):
            write(var, value)
    return [read(atom) for atom in jaxpr.outvars]


def _apply_guided(eqn: Any, inputs: list[Any], guide: _Guide) -> list[Any]:
    name = eqn.primitive.name
    if name == "custom_jvp_call" and _is_relu_body(eqn.params["call_jaxpr"]):
        return [guide.relu(inputs[-1])]
    x = _relu_input(name, inputs, guide)
    if x is not None:
        return [guide.relu(x)]
    params = eqn.params
    key = _INLINE.get(name)
    body = params.get(key) if key is not None else None
    if body is not None and (name in _BOUNDARIES or _holds_relu(body)):
        closed = isinstance(body, jax_core.ClosedJaxpr)
        inner, consts = (body.jaxpr, body.consts) if closed else (body, ())
        if len(inner.invars) == len(inputs):
            return _evaluate_guided(inner, consts, inputs, guide)
    if name not in _INLINE and any(_may_hold_relu(inner) for inner in jax_core.jaxprs_in_params(params)):
        params = {key: _rewritten(name, value, guide) for key, value in params.items()}
    bind_params = eqn.primitive.get_bind_params(params)
    if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
        subfuns, bind_params = bind_params
        inputs = [*subfuns, *inputs]
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*inputs, **bind_params)
    outputs = list(out) if eqn.primitive.multiple_results else [out]
    _facts_of(eqn, inputs, outputs, guide)
    return outputs


def _rewritten(name: str, value: Any, guide: _Guide) -> Any:
    """Returns a primitive's parameter with the ReLUs in its jaxprs made guided.

    A body that cannot be rewritten (an open jaxpr with constants) is noted in ``guide.missed``
    when it holds a ReLU, so the warning can say what was not reached.
    """
    if isinstance(value, (jax_core.ClosedJaxpr, jax_core.Jaxpr)):
        if not _may_hold_relu(value):
            return value
        jaxpr, consts = (value.jaxpr, value.consts) if isinstance(value, jax_core.ClosedJaxpr) else (value, ())
        before = guide.replaced
        avals = [var.aval for var in jaxpr.invars]
        rewritten = jax.make_jaxpr(lambda *args: _evaluate_guided(jaxpr, consts, args, guide))(*avals)
        if isinstance(value, jax_core.ClosedJaxpr):
            return rewritten
        if not rewritten.consts:
            return rewritten.jaxpr
        guide.replaced = before
        if _holds_relu(value):
            guide.missed.append(name)
        return value
    if isinstance(value, (tuple, list)) and any(
        isinstance(item, (jax_core.ClosedJaxpr, jax_core.Jaxpr)) for item in value
    ):
        return type(value)(_rewritten(name, item, guide) for item in value)
    return value


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
    guide = _Guide()

    def guided(x: jax.Array) -> jax.Array:
        return _evaluate_guided(closed.jaxpr, closed.consts, [*leaves, x], guide)[0]

    outputs, vjp_fn = jax.vjp(guided, x)
    indices = _indices(outputs, mode, None if given is None else jnp.clip(given, 0, outputs.shape[1] - 1))
    cotangents = jax.nn.one_hot(indices.T, outputs.shape[1], dtype=outputs.dtype)
    if cotangents.shape[0] == 1:
        gradients = vjp_fn(cotangents[0])[0][:, None]
    else:
        gradients = jnp.moveaxis(jax.vmap(vjp_fn)(cotangents)[0], 0, 1)
    scores = jnp.take_along_axis(outputs, indices, axis=1)
    if len(_MISSED) >= _TRACE_INFO_LIMIT:
        _MISSED.pop(next(iter(_MISSED), None), None)
    _MISSED[(program, mode)] = tuple(dict.fromkeys(guide.missed))
    return gradients, scores, indices, outputs, jnp.asarray(guide.replaced, jnp.int32)


# (program, target mode) → the primitives whose ReLUs the guided trace could not reach: written
# while ``_guided`` traces, read after each call (the names cannot leave the compiled function).
_MISSED: dict[Any, tuple[str, ...]] = {}


def guided_gradients(
    backend: JaxBackend, inputs: Any, target: TargetSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
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
        anycam.AnycamWarning: the model has no ReLU, so the result equals plain input gradients;
            or some ReLUs sit in a body that cannot be rewritten (named in the warning).
    """
    x = backend._as_input(inputs)
    _one_input(x, "guided backpropagation in JAX")
    batch = x.shape[0]
    mode, given = target_mode(target, batch)
    if mode == ("given",):
        assert target.indices is not None
        if target.kind == "indices" and target.indices.shape[0] != batch:
            resolve_indices(target, np.zeros((batch, 1), np.float32))  # raises: wrong count
        given = np.broadcast_to(target.indices, (batch, target.indices.shape[1])).astype(np.int32)
    program, params = backend._model.snapshot()
    if mode[0] == "callable":
        check_callable(backend, program, params, x, mode[1])
    gradients, scores, found, outputs, replaced = jax.device_get(_guided(program, mode, params, x, given))
    missed = _MISSED.get((program, mode), ())
    if missed:
        warnings.warn(
            f"guided backpropagation could not reach the ReLUs inside {', '.join(missed)} (a body anycam "
            f"cannot rewrite); {int(replaced)} ReLU(s) elsewhere were guided, those inside pass plain gradients",
            AnycamWarning,
            stacklevel=user_stacklevel(),
        )
    elif int(replaced) == 0:
        warnings.warn(
            "guided backpropagation found no ReLU in the model (jax.nn.relu, jnp.maximum(x, 0), "
            "jnp.clip(x, 0), jnp.where(x > 0, x, 0) or x * (x > 0)), so its result equals plain input gradients",
            AnycamWarning,
            stacklevel=user_stacklevel(),
        )
    indices: np.ndarray | None = None
    if mode == ("given",):
        indices = resolve_indices(target, _to_numpy(outputs))
    elif mode[0] != "callable":
        indices = np.asarray(found, dtype=np.int64)
    return _to_numpy(gradients), _to_numpy(scores), indices
