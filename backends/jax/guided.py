"""Guided backpropagation in JAX: the ReLUs of the traced program rewritten with the guided rule.

The model is traced to a jaxpr once and evaluated again with every ReLU (``jax.nn.relu``,
``max(x, 0)``) replaced by ``_guided_relu``, inside ``jit``, ``scan``, ``cond`` and ``while``
bodies too; nothing is patched, and the count of ReLUs replaced is the coverage report.
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

from anycam._errors import user_stacklevel
from anycam.core import TargetSpec, resolve_indices

from .capture import _callable_scores, _class_outputs, _indices, _to_numpy, check_callable, target_mode
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
        UserWarning: the model has no ReLU, so the result equals plain input gradients.
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
