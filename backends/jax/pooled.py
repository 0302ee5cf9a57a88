"""Ablation-CAM's pooled head in JAX: the network after the layer, read from its jaxpr.

When the layer output is read by one pooling over all its spatial axes, then only by scaling
and reshapes up to an optional dense layer, the traced suffix splits as pooling → [dense] →
tail, and each copy's scores follow in closed form (``anycam.protocol.backend.AblationHead``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from anycam.core import TargetSpec
from anycam.protocol.backend import AblationHead

from .capture import _TRACE_INFO_LIMIT, _selected_scores, _to_numpy, given_mode
from .guided import _INLINE
from .inputs import _shape_key

if TYPE_CHECKING:
    from .backend import JaxBackend


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
    op: _Op | None  # each op here; below, the only reader of a value, if there is one
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


def ablation_head(
    backend: JaxBackend,
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
    program, params = backend._model.snapshot()
    values = activations  # a native capture's array stays on the device (only .dtype, .shape, .ndim are read)
    if len(program.names) != 1 or program.ports[0] != "output" or values.dtype != np.float32:
        return None
    x = backend._as_input(inputs)
    mode, given = given_mode(target, indices, x.shape[0])
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
