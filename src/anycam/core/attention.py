"""Transformer-native maps from attention probabilities: rollout and gradient-weighted attention.

A backend hands the core, per attention call (block) in execution order, the attention
probabilities ``A_b`` ``(N, H, T, T)`` (rows sum to 1) and, for the gradient method, their
gradients ``G_b = ∂ score_k / ∂ A_b`` ``(N, K, H, T, T)``. Everything here is NumPy, in float64.

* :func:`rollout` — attention rollout (Abnar & Zuidema, ACL 2020): per block the head mean
  ``Â_b = mean_h A_b``, the residual added and rows renormalised, ``(Â_b + I) / 2`` (rows of
  ``Â_b`` sum to 1), and the blocks multiplied first → last, ``R = Â_L ⋯ Â_1``. Target-free.
* :func:`attention_relevance` — gradient-weighted attention (Chefer, Gur & Wolf, ICCV 2021,
  "Generic Attention-model Explainability", the self-attention rule): ``R = I``, then per block
  ``R ← R + Ē_b R`` with ``Ē_b = mean_h ReLU(G_b ⊙ A_b)``. One relevance per target.
* :func:`token_map` — a relevance ``(…, T, T)`` to a map on the patch grid: the class token's
  row when the model has leading non-patch tokens, the mean over all rows when it has none.
* :func:`token_rows` and :func:`row_map` — what the driver computes: only that row, as a row
  vector multiplied through the blocks last → first (both recursions are products of per-block
  matrices, ``R = (Â_L) ⋯ (Â_1)`` and ``R = (I + Ē_L) ⋯ (I + Ē_1)``), which costs O(L·T²) per
  sample instead of the O(L·T³) of the full matrices, on the arrays' own namespace (NumPy in
  float64, the reference; torch/JAX arrays in float32 where they live).

LeGrad (Bousselham et al. 2024) needs each block's class token scored through the model's head,
which the attention capture does not provide; it is not offered.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import ConfigError, InputError, UnsupportedError
from ._namespace import as_float, compute_dtype, constant, device_of, namespace
from .layout import token_grid

_F = np.float64

GRADIENT_ATTENTION_METHODS = {"rollout": False, "attention-grad": True}
"""The attention methods (``anycam.core.METHODS`` entries of kind ``"attention"``) and whether
each needs the gradients ∂score/∂A."""


@dataclass(frozen=True)
class AttentionRequest:
    """What the driver asks of ``Backend.attention_capture`` besides ``gradients``, for the call's duration.

    Set by :func:`requesting` around the call (a context variable, so a backend that does not
    read it — and every direct caller of ``attention_capture`` — keeps the protocol's whole
    blocks on the host). An adapter that reads it (:func:`requested`) may:

    * ``reduced``: hand what the method reads, reduced on its device as the pass goes, so that
      neither all heads' A nor their gradients are kept or copied: without gradients the head
      mean ``(N, 1, T, T)``; with them, per block ``Ē_b = mean_h ReLU(∂score/∂A_b ⊙ A_b)`` as
      ``gradients`` ``(N, K, 1, T, T)`` beside all-ones ``attentions`` ``(N, 1, T, T)``, for
      which the core's formula gives back ``Ē_b`` (:func:`token_rows`);
    * ``native``: leave the arrays as the framework's, on the model's device.
    """

    reduced: bool = False
    native: bool = False


_REQUEST: ContextVar[AttentionRequest | None] = ContextVar("anycam_attention_request", default=None)
_WHOLE = AttentionRequest()


def requested() -> AttentionRequest:
    """Returns the request of the attention capture in progress (whole blocks on the host by default)."""
    return _REQUEST.get() or _WHOLE


@contextlib.contextmanager
def requesting(request: AttentionRequest) -> Iterator[None]:
    """Makes :func:`requested` answer ``request`` while the block runs (this thread / task only)."""
    token = _REQUEST.set(request)
    try:
        yield
    finally:
        _REQUEST.reset(token)


def check_attentions(attentions: Sequence[np.ndarray], batch: int, names: Sequence[str] = ()) -> tuple[int, int]:
    """Checks that every block's attention is ``(N, H, T, T)`` with one N and one T; returns ``(N, T)``.

    Raises:
        anycam.InputError: no attention call was seen.
        anycam.UnsupportedError: attention over windows or pooled tokens (Swin, PVT, MViT): a
            block whose batch axis is not the batch, or whose token count differs from the
            first block's. Rollout multiplies the blocks' ``T × T`` matrices, which needs one
            token set through the whole network.
    """
    if not attentions:
        raise InputError(
            "the model made no attention call that anycam can read (F.scaled_dot_product_attention, "
            "nn.MultiheadAttention or an explicit softmax(q kᵀ) @ v); the attention methods need one"
        )
    first = np.shape(attentions[0])
    for index, attention in enumerate(attentions):
        shape = np.shape(attention)
        name = names[index] if index < len(names) else f"attention call {index}"
        if len(shape) != 4 or shape[-1] != shape[-2]:
            raise UnsupportedError(
                f"{name} has attention of shape {shape}; the attention methods need self-attention "
                "(N, heads, T, T) over one token sequence"
            )
        if shape[0] != batch or shape[-1] != first[-1]:
            raise UnsupportedError(
                f"{name} attends over {shape[-1]} tokens in {shape[0]} groups, the first block over "
                f"{first[-1]} tokens for a batch of {batch}: windowed or pooled attention (Swin, PVT, "
                "MViT) has no single token sequence to roll out; explain such a model with a CAM "
                "method at a layer instead"
            )
    return batch, int(first[-1])


def rollout(attentions: Sequence[np.ndarray]) -> np.ndarray:
    """Returns the attention rollout ``(N, T, T)``: ``Â_L ⋯ Â_1`` with ``Â_b = (mean_h A_b + I) / 2``.

    Args:
        attentions: per block ``(N, H, T, T)``, rows summing to 1, first block first.

    >>> a = np.array([[[[0.5, 0.5], [0.0, 1.0]]]])  # one sample, one head, 2 tokens
    >>> rollout([a])[0]
    array([[0.75, 0.25],
           [0.  , 1.  ]])
    >>> rollout([a, a])[0]  # (Â)² for two identical blocks
    array([[0.5625, 0.4375],
           [0.    , 1.    ]])
    """
    result: np.ndarray | None = None
    for attention in attentions:
        mean = np.mean(np.asarray(attention), axis=1, dtype=_F)
        eye = np.eye(mean.shape[-1], dtype=_F)
        step = mean + eye
        step /= step.sum(axis=-1, keepdims=True)
        result = step if result is None else np.matmul(step, result)
    if result is None:
        raise InputError("attention rollout needs at least one attention block")
    return result


def attention_relevance(attentions: Sequence[np.ndarray], gradients: Sequence[np.ndarray]) -> np.ndarray:
    """Returns Chefer et al.'s relevance ``(N, K, T, T)``: ``R ← R + Ē_b R`` from ``R = I``.

    ``Ē_b = mean_h ReLU(G_b ⊙ A_b)``, blocks first → last.

    Args:
        attentions: per block ``(N, H, T, T)``.
        gradients: per block ``(N, K, H, T, T)``, ∂score_k/∂A_b.

    >>> a = np.array([[[[0.5, 0.5], [0.0, 1.0]]]])
    >>> g = np.array([[[[[2.0, -1.0], [1.0, 1.0]]]]])  # K = 1
    >>> attention_relevance([a], [g])[0, 0]  # I + [[1, 0], [0, 1]]
    array([[2., 0.],
           [0., 2.]])
    """
    if len(attentions) != len(gradients):
        raise InputError(f"{len(attentions)} attention blocks but {len(gradients)} gradients")
    result: np.ndarray | None = None
    for attention, gradient in zip(attentions, gradients, strict=True):
        grad = np.asarray(gradient)
        attn = np.asarray(attention, dtype=_F)[:, None]
        # Ē = mean over heads of ReLU(∇A ⊙ A): (N, K, T, T).
        weighted = np.mean(np.maximum(grad * attn, 0.0), axis=2, dtype=_F)
        if result is None:
            result = np.broadcast_to(np.eye(attn.shape[-1], dtype=_F), weighted.shape).copy()
        result = result + np.matmul(weighted, result)
    if result is None:
        raise InputError("gradient-weighted attention needs at least one attention block")
    return result


def relevance(
    method: str,
    attentions: Sequence[np.ndarray],
    gradients: Sequence[np.ndarray] | None,
    count: int,
) -> np.ndarray:
    """Returns the relevance ``(N, K, T, T)`` of an attention method for ``count`` targets.

    Rollout does not depend on the target: its one matrix is repeated for the K targets.
    """
    if method not in GRADIENT_ATTENTION_METHODS:
        raise ConfigError(
            f"{method!r} is not an attention method; choose one of {', '.join(GRADIENT_ATTENTION_METHODS)}"
        )
    if GRADIENT_ATTENTION_METHODS[method]:
        if gradients is None:
            raise InputError(f"{method} needs the gradients of the scores with respect to the attention")
        return attention_relevance(attentions, gradients)
    rolled = rollout(attentions)
    return np.broadcast_to(rolled[:, None], (rolled.shape[0], count, *rolled.shape[1:]))


def patch_tokens(
    tokens: int,
    prefix: int | None,
    grid: tuple[int, ...] | None,
    input_spatial: tuple[int, ...] = (),
) -> tuple[int, tuple[int, ...]]:
    """Returns ``(prefix, grid)`` for ``tokens`` tokens: leading non-patch tokens and the patch grid.

    Known values are checked, unknown ones inferred: with neither known, the largest square
    grid that leaves at most 8 prefix tokens (``anycam.core.token_grid``); with the prefix
    known, a square grid or, for a non-square input, the factorisation with the input's aspect
    ratio; with the grid known, the prefix is what remains.

    >>> patch_tokens(197, 1, None)
    (1, (14, 14))
    >>> patch_tokens(13, 1, None, (30, 40))
    (1, (3, 4))
    >>> patch_tokens(261, None, None)
    (5, (16, 16))
    """
    if grid is not None:
        grid = tuple(int(g) for g in grid)
        rest = tokens - math.prod(grid)
        if rest < 0 or (prefix is not None and rest != prefix):
            raise InputError(
                f"a patch grid of {grid} does not fit {tokens} tokens"
                + (f" with {prefix} leading class/register tokens" if prefix is not None else "")
            )
        return rest, grid
    if prefix is None:
        return token_grid(tokens)
    patches = tokens - prefix
    side = math.isqrt(max(patches, 0))
    if patches > 0 and side * side == patches and (len(input_spatial) != 2 or input_spatial[0] == input_spatial[1]):
        return prefix, (side, side)
    if len(input_spatial) == 2 and patches > 0:
        height, width = input_spatial
        for rows in range(1, patches + 1):
            cols, remainder = divmod(patches, rows)
            if remainder == 0 and rows * width == cols * height:
                return prefix, (rows, cols)
    raise InputError(
        f"cannot infer the patch grid of {patches} patch tokens ({tokens} tokens, {prefix} leading); "
        "pass token_grid=(rows, cols)"
    )


def token_map(relevance: np.ndarray, *, prefix: int, grid: tuple[int, ...]) -> np.ndarray:
    """Returns the map ``(..., *grid)`` of a relevance ``(..., T, T)`` over the patch tokens.

    With leading non-patch tokens (``prefix`` ≥ 1: class, distillation, register tokens) the map
    is the class token's row (token 0) — what the classifier reads; with none (``prefix == 0``,
    a model that pools its tokens) it is the mean over all rows. The prefix columns are dropped
    and the rest reshaped to ``grid``.

    >>> r = np.arange(25.0).reshape(5, 5)
    >>> token_map(r, prefix=1, grid=(2, 2))
    array([[1., 2.],
           [3., 4.]])
    >>> token_map(np.arange(16.0).reshape(4, 4), prefix=0, grid=(2, 2))
    array([[6., 7.],
           [8., 9.]])
    """
    relevance = np.asarray(relevance)
    tokens = relevance.shape[-1]
    if prefix + math.prod(grid) != tokens:
        raise InputError(f"{prefix} leading tokens and a {grid} grid do not make {tokens} tokens")
    rows = relevance[..., 0, :] if prefix > 0 else relevance.mean(axis=-2)
    return rows[..., prefix:].reshape(*rows.shape[:-1], *grid)


def token_rows(
    method: str,
    attentions: Sequence[Any],
    gradients: Sequence[Any] | None,
    count: int,
    prefix: int,
) -> Any:
    """Returns the rows ``(N, K, T)`` of the relevance that :func:`token_map` reads, on the arrays' namespace.

    Equal to ``relevance(method, …)[..., 0, :]`` (``prefix`` ≥ 1: the class token's row) or its
    mean over rows (``prefix == 0``), computed as a row vector ``v`` times the blocks from the
    last to the first: rollout ``v ← v Â_b``, gradient-weighted attention ``v ← v + v Ē_b``.
    ``Ē_b = mean_h ReLU(G_b ⊙ A_b)`` is formed here from what the backend hands over: whole
    ``(N, H, T, T)`` / ``(N, K, H, T, T)`` blocks, or blocks a backend reduced on its device as
    the gradients arrived (one "head" with ``A = 1`` and ``G = Ē_b ≥ 0``: the same formula then
    returns ``Ē_b``; :class:`AttentionRequest`). NumPy arrays are computed in float64
    (the reference); other arrays with their own namespace in float32 (float64 stays).

    >>> a = np.array([[[[0.5, 0.5], [0.0, 1.0]]]])
    >>> token_rows("rollout", [a, a], None, 1, prefix=1)[0, 0]  # row 0 of (Â)²
    array([0.5625, 0.4375])
    """
    if method not in GRADIENT_ATTENTION_METHODS:
        raise ConfigError(
            f"{method!r} is not an attention method; choose one of {', '.join(GRADIENT_ATTENTION_METHODS)}"
        )
    if not attentions:
        raise InputError(f"{method} needs at least one attention block")
    weighted = GRADIENT_ATTENTION_METHODS[method]
    if weighted and gradients is None:
        raise InputError(f"{method} needs the gradients of the scores with respect to the attention")
    if weighted and gradients is not None and len(attentions) != len(gradients):
        raise InputError(f"{len(attentions)} attention blocks but {len(gradients)} gradients")
    xp = namespace(*attentions, *(gradients or ()))
    dtype = compute_dtype(xp, attentions[0])
    batch, tokens = attentions[0].shape[0], attentions[0].shape[-1]
    targets = count if weighted else 1
    if xp is np:
        unit = np.full(tokens, 1.0 / tokens) if prefix == 0 else np.eye(1, tokens)[0]
        row = np.broadcast_to(unit.astype(dtype), (batch, targets, 1, tokens))
    else:
        first = as_float(xp, attentions[0], dtype)
        if prefix > 0:
            unit = xp.astype(xp.arange(tokens, device=device_of(first)) == 0, dtype)
        else:
            unit = xp.ones((tokens,), dtype=dtype, device=device_of(first)) / tokens
        row = xp.broadcast_to(xp.reshape(unit, (1, 1, 1, tokens)), (batch, targets, 1, tokens))
    for index in reversed(range(len(attentions))):
        attention = as_float(xp, attentions[index], dtype)
        if weighted:
            assert gradients is not None
            gradient = as_float(xp, gradients[index], dtype)
            product = gradient * xp.expand_dims(attention, axis=1)
            block = xp.mean(xp.maximum(product, constant(xp, 0.0, product)), axis=2)  # Ē: (N, K, T, T)
            row = row + xp.matmul(row, block)
        else:
            mean = xp.mean(attention, axis=1, keepdims=True)  # (N, 1, T, T)
            # (Â + I) with each row i divided by its sum s_i: v (Â + I)/s = (v/s) Â + v/s.
            sums = xp.sum(mean, axis=-1) + 1.0  # (N, 1, T)
            scaled = row / xp.expand_dims(sums, axis=2)
            row = xp.matmul(scaled, mean) + scaled
    rows = row[:, :, 0, :]
    if not weighted:
        rows = xp.broadcast_to(rows, (batch, count, tokens))
    return rows


def row_map(rows: Any, *, prefix: int, grid: tuple[int, ...]) -> Any:
    """Returns the map ``(..., *grid)`` of token rows ``(..., T)``: prefix columns dropped, reshaped.

    >>> row_map(np.arange(5.0)[None], prefix=1, grid=(2, 2))
    array([[[1., 2.],
            [3., 4.]]])
    """
    tokens = rows.shape[-1]
    if prefix + math.prod(grid) != tokens:
        raise InputError(f"{prefix} leading tokens and a {grid} grid do not make {tokens} tokens")
    xp = namespace(rows)
    return xp.reshape(rows[..., prefix:], (*rows.shape[:-1], *grid))
