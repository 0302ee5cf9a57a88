"""The model's inputs in JAX: one checked array, or several inputs as one ``_Inputs`` pytree.

The boundary checks (array type, floating dtype, rank and layout, batch size, non-finite values)
run here, before anything is traced; a failure of the traced model on a misfit input becomes an
``InputError`` naming the input's shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from anycam._errors import AnycamError, InputError
from anycam.core import (
    check_batch,
    forward_error,
    integer_input_error,
    is_input_failure,
    non_finite_input,
    spatial_shape,
)
from anycam.protocol.inputs import structure_inputs

if TYPE_CHECKING:
    from .backend import JaxBackend


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


def _is_spatial(value: Any) -> bool:
    """A floating input with spatial axes: the default carrier of the heatmap's grid."""
    return isinstance(value, (np.ndarray, jax.Array)) and jnp.issubdtype(value.dtype, jnp.floating) and value.ndim >= 3


def structured(backend: JaxBackend, inputs: Any) -> Any:
    """Returns one checked array, or several inputs (a tuple/list or dict) as one ``_Inputs`` pytree."""
    structure = structure_inputs(inputs, is_spatial=_is_spatial, spatial_input=backend._options.get("spatial_input"))
    if structure.kind == "single":
        return as_array(backend, structure.args[0])

    def convert(key: Any, value: Any) -> Any:
        if key == structure.spatial:
            return as_array(backend, value, f"input {key!r}")
        if not isinstance(value, (np.ndarray, jax.Array)):
            raise InputError(f"input {key!r} must be a jax.Array or a NumPy array, got {type(value).__name__}")
        return jnp.asarray(value)

    converted = structure.map(convert)
    return _Inputs(converted.args, converted.kwargs, converted.spatial, converted.kind)


def as_array(backend: JaxBackend, inputs: Any, what: str = "input") -> jax.Array:
    """Returns ``inputs`` as a JAX array after the boundary checks (type, dtype, layout, batch, finite)."""
    if not isinstance(inputs, (np.ndarray, jax.Array)):
        raise InputError(f"{what} must be a jax.Array or a NumPy array, got {type(inputs).__name__}")
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
        raise integer_input_error(what, inputs.dtype, "x.astype(jnp.float32) / 255")
    shape = tuple(inputs.shape)
    spatial_shape(shape, backend.input_layout, what)
    check_batch(shape)
    # A NaN or inf anywhere makes the sum NaN or inf: a finite sum (one pass) proves the input
    # finite; otherwise (a bad element, or an overflowing sum) it is checked element-wise.
    xp: Any = np if isinstance(inputs, np.ndarray) else jnp
    wide = np.float64 if inputs.dtype == np.float64 else np.float32
    # jax.device_get: one boolean, an explicit transfer (allowed under jax.transfer_guard("disallow")).
    if not bool(jax.device_get(xp.isfinite(xp.sum(inputs, dtype=wide)))):
        finite = xp.isfinite(inputs)
        if not bool(finite.all()):
            raise non_finite_input("input", bool(xp.isnan(inputs).any()), int((~finite).sum()))
    return jnp.asarray(inputs)


def run(backend: JaxBackend, call: Callable[[], Any], x: jax.Array) -> Any:
    """Runs ``call``; a failure of the traced model becomes an InputError with it as the cause."""
    try:
        return call()
    except AnycamError:
        raise
    except Exception as exc:  # flax, equinox and jax raise many kinds for a misfit input
        if isinstance(x, _Inputs):
            # A signature mismatch (TypeError from the call itself) or a shape failure is the
            # inputs'; anything else is the model's own exception and keeps its type.
            if not (isinstance(exc, TypeError) and "argument" in str(exc)) and not is_input_failure(exc):
                exc.add_note(f"anycam: raised by the model on the inputs {x.describe()}")
                raise
            raise InputError(
                f"the model does not accept the inputs given ({x.describe()}): {type(exc).__name__}: {exc}; "
                "pass a dict with the keywords it takes, or a tuple in the order of its positional arguments"
            ) from exc
        error = forward_error(exc, tuple(x.shape), backend.input_layout)
        if error is None:  # the model's own exception: its type, with a note
            raise
        raise error from exc
