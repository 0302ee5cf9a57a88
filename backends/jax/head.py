"""Ablation-CAM's copies in JAX: the network after the layer, run on B replaced layer outputs.

``jax.vmap`` over the copies with the input unbatched: the part before the layer does not depend
on the mapped axis, so it runs once; everything after the layer runs batched over the copies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from anycam._errors import InputError
from anycam.core import TargetSpec

from .capture import _selected_scores, _to_numpy, given_mode
from .models import _Program

if TYPE_CHECKING:
    from .backend import JaxBackend


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


def head_scores(
    backend: JaxBackend, inputs: Any, replacements: np.ndarray, target: TargetSpec, indices: np.ndarray | None
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
    x = backend._as_input(inputs)
    batch = x.shape[0]
    mode, given = given_mode(target, indices, batch)
    copies = jnp.asarray(replacements, dtype=jnp.float32)
    if copies.ndim < 2 or copies.shape[1] != batch:
        raise InputError(f"replacements must be (B, N, *layer_shape) with N={batch}, got shape {tuple(copies.shape)}")
    program, params = backend._model.snapshot()
    return _to_numpy(jax.device_get(_head_scores(program, mode, params, x, copies, given)))


def ablation_scorer(
    backend: JaxBackend,
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
    x = backend._as_input(inputs)
    mode, given = given_mode(target, indices, x.shape[0])
    values = jnp.asarray(activations, dtype=jnp.float32)
    if values.ndim < 2 or values.shape[0] != x.shape[0]:
        raise InputError(f"activations must be (N, ...) with N={x.shape[0]}, got shape {tuple(values.shape)}")
    program, params = backend._model.snapshot()
    axis = int(channel_axis) % values.ndim

    def scores(channels: np.ndarray) -> np.ndarray:
        chosen = jnp.asarray(np.asarray(channels, dtype=np.int32))
        result = _ablation_scores(program, mode, axis, params, x, values, chosen, given)
        return _to_numpy(jax.device_get(result))

    return scores
