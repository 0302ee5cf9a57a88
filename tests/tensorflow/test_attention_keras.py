"""Attention capture for Keras 3 ``MultiHeadAttention`` on TensorFlow (issue 22), against explicit oracles.

The Keras ViT (a conv patch embedding, a class token, learned positions, 2 pre-norm blocks of
``MultiHeadAttention``, 5 classes) is checked two ways: its probabilities and ∂score/∂A against
the same ViT written with plain TF ops (explicit softmax, a zero delta on A differentiated by
``tf.GradientTape``), and the maps against rollout and Chefer's recursion written in NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import anycam  # noqa: E402
from anycam.core import parse_target  # noqa: E402
from tests.parity.attention_keras_run import BLOCKS, DIM, HEADS, SIDE, TOKENS, keras_vit  # noqa: E402


def oracle(model: Any, x: np.ndarray, deltas: Any = None) -> tuple[Any, list[Any]]:
    """The ViT in plain TF ops from the model's weights: (logits, probabilities per block)."""

    def w(name: str, index: int = 0) -> Any:
        return tf.constant(model.get_layer(name).get_weights()[index])

    def norm(t: Any, name: str) -> Any:
        mean, var = tf.nn.moments(t, axes=[-1], keepdims=True)
        return (t - mean) / tf.sqrt(var + 1e-6) * w(name, 0) + w(name, 1)

    n = x.shape[0]
    patches = tf.reshape(tf.transpose(tf.reshape(x, (n, 4, 4, 4, 4, 3)), (0, 1, 3, 2, 4, 5)), (n, 16, 48))
    tokens = patches @ tf.reshape(w("embed"), (48, DIM)) + w("embed", 1)
    cls, pos = (tf.constant(v) for v in model.get_layer("tokens").get_weights())
    tokens = tf.concat([tf.broadcast_to(cls, (n, 1, DIM)), tokens], axis=1) + pos
    probabilities = []
    for i in range(BLOCKS):
        h = norm(tokens, f"block{i}_ln1")
        wq, bq, wk, bk, wv, bv, wo, bo = (tf.constant(v) for v in model.get_layer(f"block{i}_attn").get_weights())
        q, k, v = (tf.einsum("ntd,dhk->nthk", h, m) + b for m, b in ((wq, bq), (wk, bk), (wv, bv)))
        logits = tf.einsum("nqhk,nshk->nhqs", q, k) / np.sqrt(DIM // HEADS)
        shifted = tf.exp(logits - tf.reduce_max(logits, -1, keepdims=True))
        a = shifted / tf.reduce_sum(shifted, -1, keepdims=True)
        probabilities.append(a)
        if deltas is not None:
            a = a + deltas[i]
        tokens = tokens + tf.einsum("nqhk,hkd->nqd", tf.einsum("nhqs,nshk->nqhk", a, v), wo) + bo
        h = norm(tokens, f"block{i}_ln2")
        h = tf.nn.gelu(h @ w(f"block{i}_fc1") + w(f"block{i}_fc1", 1), approximate=True)
        tokens = tokens + h @ w(f"block{i}_fc2") + w(f"block{i}_fc2", 1)
    return norm(tokens[:, 0], "ln") @ w("head") + w("head", 1), probabilities


def oracle_gradients(model: Any, x: np.ndarray, score: Any) -> list[np.ndarray]:
    """∂score_k/∂A per block (N, K, H, T, T) by tf.GradientTape over zero deltas on the oracle's A."""
    deltas = [tf.Variable(tf.zeros((x.shape[0], HEADS, TOKENS, TOKENS))) for _ in range(BLOCKS)]
    with tf.GradientTape() as tape:
        totals = tf.reduce_sum(score(oracle(model, x, deltas)[0]), axis=0)
    jacobian = tape.jacobian(totals, deltas)
    return [np.moveaxis(j.numpy(), 0, 1) for j in jacobian]


def _rollout(attentions: list[np.ndarray]) -> np.ndarray:
    n, _, t, _ = attentions[0].shape
    result = np.broadcast_to(np.eye(t), (n, t, t)).astype(np.float64)
    for a in attentions:
        mixed = (a.astype(np.float64).mean(axis=1) + np.eye(t)) / 2
        result = (mixed / mixed.sum(-1, keepdims=True)) @ result
    return result


def _chefer(attentions: list[np.ndarray], gradients: list[np.ndarray]) -> np.ndarray:
    n, k = gradients[0].shape[:2]
    t = attentions[0].shape[-1]
    result = np.broadcast_to(np.eye(t), (n, k, t, t)).astype(np.float64)
    for a, g in zip(attentions, gradients, strict=True):
        result = result + np.maximum(g.astype(np.float64) * a[:, None], 0).mean(axis=2) @ result
    return result


@pytest.fixture(scope="module")
def vit() -> tuple[Any, np.ndarray]:
    model = keras_vit()
    return model, np.random.default_rng(0).normal(size=(3, SIDE, SIDE, 3)).astype(np.float32)


PICKED = np.array([[0, 3], [1, 2], [4, 4]])
TARGETS = {
    "int": (2, lambda out: out[:, 2:3], np.full((3, 1), 2)),
    "per-sample": ([0, 4, 1], lambda out: tf.gather(out, [[0], [4], [1]], batch_dims=1), np.array([[0], [4], [1]])),
    "(N,K)": (PICKED, lambda out: tf.gather(out, PICKED, batch_dims=1), PICKED),
    "callable": (lambda out: out[:, 1] - out[:, 0], lambda out: (out[:, 1] - out[:, 0])[:, None], None),
}  # fmt: skip


@pytest.mark.parametrize("form", [*TARGETS, "top_k"])
def test_keras_attention_gradients_and_maps_equal_the_explicit_tf_oracle(vit: Any, form: str) -> None:
    model, x = vit
    logits, probabilities = oracle(model, x)
    if form == "top_k":
        classes = np.argsort(-logits.numpy(), axis=1, kind="stable")[:, :2]
        target: Any = anycam.top_k(2)
        score: Any = lambda out: tf.gather(out, classes, batch_dims=1)  # noqa: E731
    else:
        target, score, classes = TARGETS[form]
    capture = anycam.Explainer(model, None, method="attention-grad").backend.attention_capture(
        x, parse_target(target), gradients=True
    )
    assert capture.names == ("block0_attn", "block1_attn")
    attentions = [a.numpy() for a in probabilities]
    for got, expected in zip(capture.attentions, attentions, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    gradients = oracle_gradients(model, x, score)
    assert capture.gradients is not None
    for got, expected in zip(capture.gradients, gradients, strict=True):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(capture.scores, score(logits).numpy(), rtol=1e-5, atol=1e-5)
    if classes is None:
        assert capture.target is None
    else:
        np.testing.assert_array_equal(capture.target, classes)
    k = gradients[0].shape[1]
    expected_maps = {
        "rollout": np.broadcast_to(_rollout(attentions)[:, None, 0, 1:], (3, k, 16)),
        "attention-grad": _chefer(attentions, gradients)[:, :, 0, 1:],
    }
    for method, oracle_map in expected_maps.items():
        ex = anycam.Explainer(model, None, method=method).explain(x, target=target)
        cam = (ex.cam if ex.cam.ndim == 4 else ex.cam[:, None]).reshape(3, k, 16)
        np.testing.assert_allclose(cam, oracle_map, rtol=1e-5, atol=1e-5 * np.abs(oracle_map).max())
        assert ex.heatmap.shape[-2:] == (SIDE, SIDE)


def test_explicit_attention_outputs_equal_keras_fused_path(vit: Any) -> None:
    # With no dropout and no scores asked for, Keras 3 runs MultiHeadAttention through
    # ops.dot_product_attention (the fused kernel); anycam's explicit form must give its outputs.
    model, x = vit
    own = model(x, training=False).numpy()
    capture = anycam.Explainer(model, None, method="rollout").backend.attention_capture(
        x, parse_target(lambda out: out), gradients=False
    )
    np.testing.assert_allclose(capture.scores, own, rtol=1e-5, atol=1e-5)
    assert capture.gradients is None


def test_keras_model_unchanged_also_when_the_capture_raises(vit: Any) -> None:
    model, x = vit
    attention = [layer for layer in model.layers if isinstance(layer, keras.layers.MultiHeadAttention)]
    before = [w.copy() for w in model.get_weights()]
    explainer = anycam.Explainer(model, None, method="attention-grad")

    def failing(out: Any) -> Any:
        raise ZeroDivisionError("the target's own error")

    with pytest.raises(ZeroDivisionError, match="own error"):
        explainer.explain(x, target=failing)
    explainer.explain(x)
    assert all("_compute_attention" not in vars(layer) for layer in attention)
    assert all(
        layer._compute_attention.__func__ is keras.layers.MultiHeadAttention._compute_attention for layer in attention
    )
    for b, a in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(b, a)


def test_a_keras_model_without_multi_head_attention_is_refused() -> None:
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    with pytest.raises(anycam.AnycamError, match="no keras.layers.MultiHeadAttention"):
        anycam.Explainer(model, None, method="rollout")(np.zeros((1, 8, 8, 3), np.float32))


def test_reduced_capture_hands_chefers_block_terms_and_head_means(vit: Any) -> None:
    """What the driver asks for (issue 22, speed): per block Ē = mean_h ReLU(∂score/∂A ⊙ A) reduced in the
    graph, and the head means for rollout; the oracle is the plain-TF ViT reduced here in NumPy."""
    model, x = vit
    _, probabilities = oracle(model, x)
    attentions = [a.numpy() for a in probabilities]
    gradients = oracle_gradients(model, x, lambda out: tf.gather(out, PICKED, batch_dims=1))
    backend = anycam.Explainer(model, None, method="attention-grad").backend
    capture = _reduced(backend, x, parse_target(PICKED), True)
    assert capture.gradients is not None
    for a, g, kept, ones in zip(attentions, gradients, capture.gradients, capture.attentions, strict=True):
        expected = np.maximum(g * a[:, None], 0).mean(axis=2, keepdims=True)
        assert kept.shape == expected.shape == (3, 2, 1, TOKENS, TOKENS)
        np.testing.assert_allclose(kept, expected, atol=1e-5 * np.abs(expected).max())
        np.testing.assert_array_equal(ones, np.ones((3, 1, TOKENS, TOKENS)))
    means = _reduced(backend, x, parse_target(None), False).attentions
    for a, kept in zip(attentions, means, strict=True):
        np.testing.assert_allclose(kept, a.mean(axis=1, keepdims=True), atol=1e-6)


def test_an_attention_that_does_not_reach_the_score_raises_layer_error(vit: Any) -> None:
    """The rule of every framework: no gradient path from an attention's probabilities to the score is a
    LayerError (the tape gives None for it), never a map built on silent zeros."""
    inner, x = vit

    class Discards(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.extra = keras.layers.MultiHeadAttention(2, 4, name="extra")

        def call(self, images: Any, training: Any = None) -> Any:
            tokens = keras.ops.reshape(images, (-1, SIDE * SIDE // 16, 48))
            self.extra(tokens, tokens)  # the result is thrown away
            return self.inner(images)

    model = Discards()
    model(x)
    with pytest.raises(anycam.LayerError, match=r"\['extra'\] do not reach the explained output"):
        anycam.Explainer(model, None, method="attention-grad").explain(x)


def _reduced(backend: Any, x: Any, target: Any, gradients: bool) -> Any:
    """The capture as the attention driver asks for it: reduced on the device as the pass goes."""
    from anycam.core.attention import AttentionRequest, requesting

    with requesting(AttentionRequest(reduced=True)):
        return backend.attention_capture(x, target, gradients=gradients)
