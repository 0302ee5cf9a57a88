"""Attention capture in JAX (issue 22): Flax linen, Flax NNX and Equinox ViTs against a plain-jnp oracle.

The oracle (``attention_vits.oracle``) is the same ViT written with ``jnp`` and an explicit
softmax, run on the weights read out of each model; ∂score/∂A is ``jax.grad`` over a zero delta
added to its probabilities. The maps are checked against rollout and Chefer's recursion written
here in NumPy.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("flax")
pytest.importorskip("equinox")

import anycam  # noqa: E402
from anycam.core import parse_target  # noqa: E402

from . import attention_vits as V  # noqa: E402

FAMILIES = ("linen", "nnx", "equinox")


@functools.cache
def _built(family: str) -> tuple[Any, dict[str, Any], np.ndarray, np.ndarray]:
    """Returns (model as anycam takes it, canonical weights, input for anycam, the same input NHWC)."""
    if family == "linen":
        module, variables = V.linen_vit()
        x = V.images()
        return (module, variables), V.canonical_linen(variables), x, x
    if family == "nnx":
        model = V.nnx_vit()
        x = V.images()
        return model, V.canonical_nnx(model), x, x
    model = V.equinox_vit()
    x = V.images(channels_first=True)
    return model, V.canonical_equinox(model), x, x.transpose(0, 2, 3, 1)


def _oracle_gradients(weights: dict[str, Any], x: np.ndarray, score: Any) -> list[np.ndarray]:
    """∂score_k/∂A per block (N, K, H, T, T) for ``score(logits) -> (N, K)``, by jax.jacrev over deltas."""
    zeros = [jnp.zeros((x.shape[0], V.HEADS, V.TOKENS, V.TOKENS), jnp.float32) for _ in weights["blocks"]]

    def totals(deltas: Any) -> jax.Array:  # (K,): samples are independent, so the batch sum is exact
        return score(V.oracle(weights, jnp.asarray(x), deltas)[0]).sum(axis=0)

    jacobian = jax.jit(jax.jacrev(totals))(zeros)  # per block (K, N, H, T, T)
    return [np.moveaxis(np.asarray(block), 0, 1) for block in jacobian]


def _rollout(attentions: list[np.ndarray]) -> np.ndarray:
    """Abnar & Zuidema: R = Â_L … Â_1, Â = rows-renormalised (mean_h A + I) / 2; (N, T, T)."""
    n, _, t, _ = attentions[0].shape
    result = np.broadcast_to(np.eye(t), (n, t, t)).astype(np.float64)
    for a in attentions:
        mixed = (a.astype(np.float64).mean(axis=1) + np.eye(t)) / 2
        mixed /= mixed.sum(-1, keepdims=True)
        result = mixed @ result
    return result


def _chefer(attentions: list[np.ndarray], gradients: list[np.ndarray]) -> np.ndarray:
    """Chefer, Gur & Wolf 2021: R = I; R ← R + Ē R, Ē = mean_h ReLU(∇A ⊙ A); (N, K, T, T)."""
    n, k = gradients[0].shape[:2]
    t = attentions[0].shape[-1]
    result = np.broadcast_to(np.eye(t), (n, k, t, t)).astype(np.float64)
    for a, g in zip(attentions, gradients, strict=True):
        e = np.maximum(g.astype(np.float64) * a[:, None].astype(np.float64), 0).mean(axis=2)
        result = result + e @ result
    return result


def _class_row(relevance: np.ndarray) -> np.ndarray:
    """The class token's row over the 16 patch tokens, as the 4×4 grid."""
    return relevance[..., 0, 1:].reshape(*relevance.shape[:-2], 4, 4)


PICKED = np.array([[0, 3], [1, 2], [4, 4]])
TARGETS = {
    "int": (2, lambda logits: logits[:, 2:3]),
    "per-sample": ([0, 4, 1], lambda logits: jnp.take_along_axis(logits, jnp.array([[0], [4], [1]]), 1)),
    "(N,K)": (PICKED, lambda logits: jnp.take_along_axis(logits, jnp.asarray(PICKED), 1)),
    "callable": (lambda out: out[:, 1] - out[:, 0], lambda logits: (logits[:, 1] - logits[:, 0])[:, None]),
}  # fmt: skip


# Every target form on one family; the forms that exercise the K axis and callables on the others.
CASES = [("nnx", form) for form in (*TARGETS, "top_k")] + [
    (family, form) for family in ("linen", "equinox") for form in ("(N,K)", "callable", "top_k")
]


@pytest.mark.parametrize(("family", "form"), CASES)
def test_attention_gradients_and_maps_equal_the_explicit_jnp_oracle(family: str, form: str) -> None:
    model, weights, x, x_nhwc = _built(family)
    logits, probabilities = V.oracle(weights, jnp.asarray(x_nhwc))
    if form == "top_k":
        target: Any = anycam.top_k(2)
        classes = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :2]
        score: Any = lambda out: jnp.take_along_axis(out, jnp.asarray(classes), 1)  # noqa: E731
    else:
        target, score = TARGETS[form]
    backend = anycam.Explainer(model, None, method="attention-grad").backend
    capture = backend.attention_capture(x, parse_target(target), gradients=True)
    assert len(capture.attentions) == V.BLOCKS
    for got, expected in zip(capture.attentions, probabilities, strict=True):
        np.testing.assert_allclose(got, np.asarray(expected), atol=1e-6)
    assert capture.gradients is not None
    oracle_gradients = _oracle_gradients(weights, x_nhwc, score)
    for got, expected in zip(capture.gradients, oracle_gradients, strict=True):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(capture.scores, np.asarray(score(logits)), rtol=1e-5, atol=1e-5)
    expected_classes = {
        "int": np.full((3, 1), 2),
        "per-sample": np.array([[0], [4], [1]]),
        "(N,K)": np.array([[0, 3], [1, 2], [4, 4]]),
        "top_k": classes if form == "top_k" else None,
        "callable": None,
    }[form]
    if expected_classes is None:
        assert capture.target is None
    else:
        np.testing.assert_array_equal(capture.target, expected_classes)
    # The maps: rollout and Chefer's recursion, written above in NumPy, on the oracle's A and ∇A.
    attentions = [np.asarray(a) for a in probabilities]
    k = oracle_gradients[0].shape[1]
    expected = {
        "rollout": np.broadcast_to(_class_row(_rollout(attentions))[:, None], (3, k, 4, 4)),
        "attention-grad": _class_row(_chefer(attentions, oracle_gradients)),
    }
    for method, oracle in expected.items():
        ex = anycam.Explainer(model, None, method=method).explain(x, target=target)
        cam = ex.cam if ex.cam.ndim == 4 else ex.cam[:, None]
        np.testing.assert_allclose(cam, oracle, rtol=1e-5, atol=1e-5 * np.abs(oracle).max())
        assert ex.heatmap.shape[-2:] == (16, 16)


def _fused_linen() -> tuple[Any, Any]:
    """The linen ViT with jax.nn.dot_product_attention (XLA's fused kernel) as every attention_fn."""
    import flax.linen as nn

    _, variables = V.linen_vit()  # the same parameters fit
    fused = functools.partial(jax.nn.dot_product_attention)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = x + nn.MultiHeadDotProductAttention(num_heads=V.HEADS, attention_fn=fused, name="attn")(
                nn.LayerNorm(name="ln1")(x)
            )
            h = nn.Dense(2 * V.DIM, name="fc1")(nn.LayerNorm(name="ln2")(x))
            return x + nn.Dense(V.DIM, name="fc2")(jax.nn.gelu(h))

    class ViT(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            tokens = nn.Dense(V.DIM, name="embed")(V.patchify(x))
            cls = self.param("cls", nn.initializers.normal(1.0), (1, 1, V.DIM))
            pos = self.param("pos", nn.initializers.normal(1.0), (1, V.TOKENS, V.DIM))
            tokens = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, V.DIM)), tokens], axis=1) + pos
            for index in range(V.BLOCKS):
                tokens = Block(name=f"block{index}")(tokens)
            return nn.Dense(V.CLASSES, name="head")(nn.LayerNorm(name="ln")(tokens[:, 0]))

    return ViT(), variables


@pytest.mark.parametrize("family", ["linen-fused", "nnx", "equinox"])
def test_explicit_attention_outputs_equal_the_models_own_fused_path(family: str) -> None:
    # NNX's default dot_product_attention takes jax.nn.dot_product_attention (no dropout, no
    # sow); the linen variant is given it as attention_fn; Equinox's own per-head form.
    if family == "linen-fused":
        model: Any = _fused_linen()
        x = V.images()
        own = np.asarray(model[0].apply(model[1], x))
        weights = V.canonical_linen(model[1])
    else:
        model, weights, x, _ = _built(family)
        own = np.asarray(jax.vmap(model)(x) if family == "equinox" else model(x))
    backend = anycam.Explainer(model, None, method="rollout").backend
    capture = backend.attention_capture(x, parse_target(lambda out: out), gradients=False)
    np.testing.assert_allclose(capture.scores, own, rtol=1e-5, atol=1e-5)
    probabilities = V.oracle(weights, jnp.asarray(x if family != "equinox" else x.transpose(0, 2, 3, 1)))[1]
    np.testing.assert_allclose(capture.attentions[-1], np.asarray(probabilities[-1]), atol=1e-6)


def _state(family: str, model: Any) -> Any:
    """Everything a capture could touch: the weights, the attention functions, Flax's module functions."""
    import equinox as eqx
    import flax.linen as nn
    from flax import nnx

    functions = (nn.dot_product_attention, nnx.dot_product_attention, nn.attention.dot_product_attention)
    if family == "linen":
        leaves = jax.tree_util.tree_leaves(model[1])
        fns: tuple[Any, ...] = (model[0],)
    elif family == "nnx":
        leaves = jax.tree_util.tree_leaves(nnx.state(model))
        fns = tuple(block.attn.attention_fn for block in model.blocks)
        fns += tuple(type(block.attn) for block in model.blocks)
    else:
        leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
        fns = tuple(type(block.attn) for block in model.blocks)
    return [np.asarray(leaf).copy() for leaf in leaves], fns, functions


@pytest.mark.parametrize("family", FAMILIES)
def test_model_and_flax_functions_unchanged_also_when_the_capture_raises(family: str) -> None:
    model, _, x, _ = _built(family)
    before = _state(family, model)
    explainer = anycam.Explainer(model, None, method="attention-grad")

    def failing(out: Any) -> Any:
        raise ZeroDivisionError("the target's own error")

    with pytest.raises(ZeroDivisionError, match="own error"):
        explainer.explain(x, target=failing)
    explainer.explain(x)
    after = _state(family, model)
    for b, a in zip(before[0], after[0], strict=True):
        np.testing.assert_array_equal(b, a)
    assert all(b is a for b, a in zip(before[1], after[1], strict=True))
    assert all(b is a for b, a in zip(before[2], after[2], strict=True))


def test_direct_dot_product_attention_calls_are_read_in_linen_and_nnx() -> None:
    import flax.linen as nn
    from flax import nnx

    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            tokens = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, T, C)
            q = nn.DenseGeneral((2, 4), name="q")(tokens)
            k = nn.DenseGeneral((2, 4), name="k")(tokens)
            v = nn.DenseGeneral((2, 4), name="v")(tokens)
            y = nn.dot_product_attention(q, k, v)
            return nnx.dot_product_attention(q, k, y).mean(axis=(1, 2, 3))[:, None] * jnp.arange(3.0)

    x = np.random.default_rng(1).normal(size=(2, 2, 3, 3)).astype(np.float32)
    module = Linen()
    variables = module.init(jax.random.key(0), x)
    capture = anycam.Explainer((module, variables), None, method="rollout").backend.attention_capture(
        x, parse_target(2), gradients=True
    )
    p = variables["params"]
    tokens = x.reshape(2, 6, 3)
    q, k = (jnp.einsum("ntc,chd->nthd", tokens, p[n]["kernel"]) + p[n]["bias"] for n in ("q", "k"))
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / 2.0
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    assert len(capture.attentions) == 2
    np.testing.assert_allclose(capture.attentions[0], expected, atol=1e-6)
    np.testing.assert_allclose(capture.attentions[1], expected, atol=1e-6)  # same q and k
    assert capture.gradients is not None and np.any(capture.gradients[0])


def test_an_unknown_attention_fn_is_refused_by_name() -> None:
    import flax.linen as nn

    def mine(query: Any, key: Any, value: Any, **kwargs: Any) -> Any:
        return nn.dot_product_attention(query, key, value)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            tokens = x.reshape(x.shape[0], -1, x.shape[-1])
            return nn.MultiHeadDotProductAttention(num_heads=1, attention_fn=mine, name="attn")(tokens).mean(1)

    x = np.ones((1, 2, 2, 3), np.float32)
    module = Model()
    variables = module.init(jax.random.key(0), x)
    with pytest.raises(anycam.AnycamError, match="attn.*attention_fn='mine'"):
        anycam.Explainer((module, variables), None, method="rollout")(x)


def test_attention_dropout_in_training_mode_is_refused() -> None:
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self) -> None:
            self.attn = nnx.MultiHeadAttention(1, 3, dropout_rate=0.5, decode=False, rngs=nnx.Rngs(0))

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.attn(x.reshape(x.shape[0], -1, 3), deterministic=False).mean(1)

    x = np.ones((1, 2, 2, 3), np.float32)
    with pytest.raises(anycam.AnycamError, match="training mode"):
        anycam.Explainer(Model(), None, method="rollout")(x)


def test_reduced_capture_hands_chefers_block_terms_and_head_means() -> None:
    """What the driver asks for (issue 22, speed): per block Ē = mean_h ReLU(∂score/∂A ⊙ A) reduced in the
    compiled program, and the head means for rollout; the oracle is the plain-jnp ViT reduced in NumPy."""
    model, weights, x, nhwc = _built("nnx")
    _, probabilities = V.oracle(weights, jnp.asarray(nhwc))
    attentions = [np.asarray(a) for a in probabilities]
    gradients = _oracle_gradients(weights, nhwc, TARGETS["(N,K)"][1])
    backend = anycam.Explainer(model, None, method="attention-grad").backend
    capture = _reduced(backend, x, parse_target(PICKED), True)
    assert capture.gradients is not None
    for a, g, kept, ones in zip(attentions, gradients, capture.gradients, capture.attentions, strict=True):
        expected = np.maximum(g * a[:, None], 0).mean(axis=2, keepdims=True)
        assert kept.shape == expected.shape == (3, 2, 1, V.TOKENS, V.TOKENS)
        np.testing.assert_allclose(kept, expected, atol=1e-5 * np.abs(expected).max())
        np.testing.assert_array_equal(ones, np.ones((3, 1, V.TOKENS, V.TOKENS)))
    means = _reduced(backend, x, parse_target(None), False).attentions
    for a, kept in zip(attentions, means, strict=True):
        np.testing.assert_allclose(kept, a.mean(axis=1, keepdims=True), atol=1e-6)


def test_an_attention_that_does_not_reach_the_score_raises_layer_error() -> None:
    """The rule of every framework: no differentiable path from an attention's probabilities to the score
    is a LayerError (as torch's autograd and TensorFlow's tape say), never a map built on silent zeros."""
    from flax import nnx

    inner = V.nnx_vit()

    class Discards(nnx.Module):
        def __init__(self) -> None:
            self.inner = inner
            self.extra = nnx.MultiHeadAttention(num_heads=2, in_features=48, decode=False, rngs=nnx.Rngs(1))

        def __call__(self, images: jax.Array) -> jax.Array:
            self.extra(V.patchify(images))  # the result is thrown away
            return self.inner(images)

    x = V.images()
    with pytest.raises(anycam.LayerError, match=r"\['extra'\] do not reach the explained output"):
        anycam.Explainer(Discards(), None, method="attention-grad").explain(x)


def test_an_attention_behind_stop_gradient_raises_layer_error() -> None:
    """``jax.lax.stop_gradient`` cuts the path, as ``detach`` does in torch."""
    from flax import nnx

    class Stopped(nnx.Module):
        def __init__(self) -> None:
            self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=48, decode=False, rngs=nnx.Rngs(1))
            self.head = nnx.Linear(48, 3, rngs=nnx.Rngs(2))

        def __call__(self, images: jax.Array) -> jax.Array:
            tokens = V.patchify(images)
            mixed = jax.lax.stop_gradient(self.attn(tokens))
            return self.head((tokens + mixed).mean(axis=1))

    with pytest.raises(anycam.LayerError, match=r"\['attn'\] do not reach"):
        anycam.Explainer(Stopped(), None, method="attention-grad").explain(V.images())


def _reduced(backend: Any, x: Any, target: Any, gradients: bool) -> Any:
    """The capture as the attention driver asks for it: reduced on the device as the pass goes."""
    from anycam.core.attention import AttentionRequest, requesting

    with requesting(AttentionRequest(reduced=True)):
        return backend.attention_capture(x, target, gradients=gradients)
