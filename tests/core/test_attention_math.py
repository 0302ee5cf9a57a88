"""The attention methods' core (``anycam.core.attention``) against closed forms and plain loops."""

from __future__ import annotations

import numpy as np
import pytest

from anycam import InputError, UnsupportedError
from anycam.core import attention as att


def _softmax_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    logits = rng.normal(size=shape)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_rollout_of_identity_attention_is_identity() -> None:
    eye = np.broadcast_to(np.eye(5), (2, 3, 5, 5))
    np.testing.assert_array_equal(att.rollout([eye, eye, eye]), np.broadcast_to(np.eye(5), (2, 5, 5)))


def test_rollout_of_three_tokens_two_heads_matches_the_hand_computation() -> None:
    # Head 1 attends cyclically (token i → i+1), head 2 to itself: the head mean is
    # [[.5,.5,0],[0,.5,.5],[.5,0,.5]]; with the residual, (Â + I)/2 = [[.75,.25,0],[0,.75,.25],[.25,0,.75]];
    # two such blocks give its square, worked out by hand below.
    cyclic = np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]])
    block = np.stack([cyclic, np.eye(3)])[None]
    expected_one = np.array([[0.75, 0.25, 0.0], [0.0, 0.75, 0.25], [0.25, 0.0, 0.75]])
    expected_two = np.array([[0.5625, 0.375, 0.0625], [0.0625, 0.5625, 0.375], [0.375, 0.0625, 0.5625]])
    np.testing.assert_allclose(att.rollout([block])[0], expected_one, rtol=0, atol=1e-15)
    np.testing.assert_allclose(att.rollout([block, block])[0], expected_two, rtol=0, atol=1e-15)


def test_rollout_multiplies_the_blocks_last_on_the_left() -> None:
    rng = np.random.default_rng(0)
    blocks = [_softmax_rows(rng, (2, 4, 6, 6)) for _ in range(3)]
    # The recursion written element by element: R_b[i, j] = Σ_m Â_b[i, m] R_{b-1}[m, j].
    expected = np.zeros((2, 6, 6))
    for n in range(2):
        rolled = np.eye(6)
        for block in blocks:
            mean = sum(block[n, h] for h in range(4)) / 4
            step = [[(mean[i, j] + (i == j)) / 2 for j in range(6)] for i in range(6)]
            rolled = np.array([[sum(step[i][m] * rolled[m, j] for m in range(6)) for j in range(6)] for i in range(6)])
        expected[n] = rolled
    np.testing.assert_allclose(att.rollout(blocks), expected, rtol=1e-12, atol=1e-15)
    # Rows of a product of row-stochastic matrices sum to 1.
    np.testing.assert_allclose(att.rollout(blocks).sum(axis=-1), 1.0, rtol=1e-12)


def test_attention_relevance_equals_chefers_recursion_written_as_a_loop() -> None:
    rng = np.random.default_rng(1)
    n, k, h, t = 2, 3, 2, 5
    blocks = [_softmax_rows(rng, (n, h, t, t)) for _ in range(4)]
    grads = [rng.normal(size=(n, k, h, t, t)) for _ in range(4)]
    expected = np.zeros((n, k, t, t))
    for sample in range(n):
        for target in range(k):
            relevance = np.eye(t)
            for attention, gradient in zip(blocks, grads, strict=True):
                e = np.zeros((t, t))
                for head in range(h):
                    for i in range(t):
                        for j in range(t):
                            e[i, j] += (
                                max(gradient[sample, target, head, i, j] * attention[sample, head, i, j], 0.0) / h
                            )
                update = np.zeros((t, t))
                for i in range(t):
                    for j in range(t):
                        update[i, j] = sum(e[i, m] * relevance[m, j] for m in range(t))
                relevance = relevance + update
            expected[sample, target] = relevance
    np.testing.assert_allclose(att.attention_relevance(blocks, grads), expected, rtol=1e-12, atol=1e-15)


def test_attention_relevance_of_identity_attention_is_the_product_of_diagonals() -> None:
    # A = I: Ē_b = diag(mean_h ReLU(G_b,ii)), so R = Π_b (I + Ē_b), a diagonal matrix.
    rng = np.random.default_rng(2)
    eye = np.broadcast_to(np.eye(4), (1, 2, 4, 4))
    grads = [rng.normal(size=(1, 1, 2, 4, 4)) for _ in range(3)]
    diagonal = np.ones(4)
    for grad in grads:
        diagonal *= 1 + np.maximum(np.diagonal(grad[0, 0], axis1=-2, axis2=-1), 0).mean(axis=0)
    np.testing.assert_allclose(att.attention_relevance([eye] * 3, grads)[0, 0], np.diag(diagonal), rtol=1e-12)


def test_rollout_is_repeated_for_every_target_and_gradients_are_required_where_used() -> None:
    rng = np.random.default_rng(3)
    blocks = [_softmax_rows(rng, (2, 2, 5, 5))]
    repeated = att.relevance("rollout", blocks, None, 3)
    assert repeated.shape == (2, 3, 5, 5)
    for target in range(3):
        np.testing.assert_array_equal(repeated[:, target], att.rollout(blocks))
    with pytest.raises(InputError, match="gradients"):
        att.relevance("attention-grad", blocks, None, 1)


def test_token_map_reads_the_class_row_over_the_patch_tokens() -> None:
    relevance = np.arange(2 * 7 * 7, dtype=float).reshape(2, 7, 7)
    # Two prefix tokens (class + distillation), a 1 × 5 grid: row 0, columns 2..6.
    np.testing.assert_array_equal(att.token_map(relevance, prefix=2, grid=(1, 5)), relevance[:, 0, None, 2:])


def test_token_map_without_a_class_token_is_the_mean_over_rows() -> None:
    relevance = np.random.default_rng(4).random((3, 4, 4))
    expected = np.array([[relevance[n, :, j].sum() / 4 for j in range(4)] for n in range(3)]).reshape(3, 2, 2)
    np.testing.assert_allclose(att.token_map(relevance, prefix=0, grid=(2, 2)), expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("tokens", "prefix", "grid", "spatial", "expected"),
    [
        (197, None, None, (224, 224), (1, (14, 14))),
        (198, 2, None, (224, 224), (2, (14, 14))),  # DeiT: class + distillation
        (261, None, None, (224, 224), (5, (16, 16))),  # DINOv2 with 4 registers
        (16, 7, None, (12, 12), (7, (3, 3))),  # a square count: only the known prefix tells
        (13, 1, None, (30, 40), (1, (3, 4))),
        (13, None, (3, 4), (30, 40), (1, (3, 4))),
    ],
)
def test_patch_tokens_checks_what_is_known_and_infers_the_rest(
    tokens: int, prefix: int | None, grid: tuple[int, ...] | None, spatial: tuple[int, ...], expected: tuple
) -> None:
    assert att.patch_tokens(tokens, prefix, grid, spatial) == expected


def test_patch_tokens_refuses_a_grid_that_does_not_fit() -> None:
    with pytest.raises(InputError, match="does not fit"):
        att.patch_tokens(13, 2, (3, 4), (30, 40))
    with pytest.raises(InputError, match="token_grid"):
        att.patch_tokens(14, 1, None, (30, 40))


def test_windowed_attention_is_refused_with_a_clear_error() -> None:
    # Swin: (N · windows, H, w², w²) per block, fewer tokens after each patch merging.
    windows = [np.full((8, 2, 4, 4), 0.25), np.full((2, 2, 4, 4), 0.25)]
    with pytest.raises(UnsupportedError, match="windowed or pooled attention"):
        att.check_attentions(windows, 2, ("swin.layer0",))
    with pytest.raises(InputError, match="no attention call"):
        att.check_attentions([], 2)


def _loop_matrices(blocks: list[np.ndarray], grads: list[np.ndarray] | None) -> np.ndarray:
    """Both recursions as plain per-sample loops over the full T × T matrices: (N, K, T, T)."""
    n, t = blocks[0].shape[0], blocks[0].shape[-1]
    k = 1 if grads is None else grads[0].shape[1]
    out = np.zeros((n, k, t, t))
    for sample in range(n):
        for target in range(k):
            relevance = np.eye(t)
            for index, block in enumerate(blocks):
                mean = block[sample].mean(axis=0)
                if grads is None:
                    step = (mean + np.eye(t)) / (mean.sum(axis=1, keepdims=True) + 1)
                    relevance = step @ relevance
                else:
                    e = np.maximum(grads[index][sample, target] * block[sample], 0).mean(axis=0)
                    relevance = relevance + e @ relevance
            out[sample, target] = relevance
    return out


@pytest.mark.parametrize("prefix", [0, 1, 3])
@pytest.mark.parametrize("method", ["rollout", "attention-grad"])
def test_token_rows_are_the_rows_token_map_reads_of_the_loop_recursions(method: str, prefix: int) -> None:
    """The driver's row-vector form (last block first, O(L·T²)) against the full matrices built in loops:
    the class token's row with leading tokens, the mean over rows without."""
    rng = np.random.default_rng(4)
    n, k, h, t = 2, 3, 2, 6
    blocks = [_softmax_rows(rng, (n, h, t, t)) for _ in range(3)]
    grads = [rng.normal(size=(n, k, h, t, t)) for _ in range(3)] if method == "attention-grad" else None
    full = _loop_matrices(blocks, grads)
    expected = full[..., 0, :] if prefix else full.mean(axis=-2)
    got = att.token_rows(method, blocks, grads, k, prefix)
    assert got.shape == (n, k, t) and got.dtype == np.float64
    np.testing.assert_allclose(got, np.broadcast_to(expected, (n, k, t)), rtol=1e-12, atol=1e-15)


def test_token_rows_of_blocks_reduced_by_an_adapter_equal_those_of_whole_blocks() -> None:
    """``AttentionRequest(reduced=True)``: an adapter hands Ē_b (N, K, 1, T, T) beside all-ones A; the same
    formula gives the whole blocks' rows (Ē ≥ 0, so ReLU(Ē·1) = Ē); rollout takes head means alike."""
    rng = np.random.default_rng(5)
    blocks = [_softmax_rows(rng, (2, 3, 5, 5)) for _ in range(3)]
    grads = [rng.normal(size=(2, 2, 3, 5, 5)) for _ in range(3)]
    reduced = [np.maximum(g * a[:, None], 0).mean(axis=2, keepdims=True) for a, g in zip(blocks, grads, strict=True)]
    ones = [np.ones((2, 1, 5, 5))] * 3
    whole = att.token_rows("attention-grad", blocks, grads, 2, 1)
    np.testing.assert_allclose(att.token_rows("attention-grad", ones, reduced, 2, 1), whole, rtol=1e-12)
    means = [b.mean(axis=1, keepdims=True) for b in blocks]
    np.testing.assert_allclose(
        att.token_rows("rollout", means, None, 2, 1), att.token_rows("rollout", blocks, None, 2, 1), rtol=1e-12
    )


def test_row_map_drops_the_prefix_and_reshapes_like_token_map() -> None:
    relevance = np.arange(2 * 7 * 7, dtype=np.float64).reshape(2, 7, 7)
    rows = relevance[:, 0]
    np.testing.assert_array_equal(
        att.row_map(rows, prefix=3, grid=(2, 2)), att.token_map(relevance, prefix=3, grid=(2, 2))
    )
    with pytest.raises(InputError, match="do not make"):
        att.row_map(rows, prefix=1, grid=(2, 2))


@pytest.mark.parametrize("method", ["rollout", "attention-grad"])
def test_token_rows_on_another_namespace_compute_there_in_float32(method: str) -> None:
    """Arrays of another library (array-api-strict stands in for torch/JAX) stay in it, in float32; the
    float64 NumPy result is the reference, to float32's rounding over 3 blocks of 6-term sums."""
    xp = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(6)
    blocks = [_softmax_rows(rng, (2, 2, 6, 6)) for _ in range(3)]
    grads = [rng.normal(size=(2, 2, 2, 6, 6)) for _ in range(3)] if method == "attention-grad" else None
    expected = att.token_rows(method, blocks, grads, 2, 1)
    got = att.token_rows(
        method,
        [xp.asarray(b, dtype=xp.float32) for b in blocks],
        None if grads is None else [xp.asarray(g, dtype=xp.float32) for g in grads],
        2,
        1,
    )
    assert got.dtype == xp.float32 and not isinstance(got, np.ndarray)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
