"""Ablation-CAM's closed form for a network that pools the layer (``core.ablated_head_features``)
and the Explainer's use of a backend's ``AblationHead``, with a NumPy backend as the framework.

The oracle everywhere: the layer output with channel k really zeroed, pooled and pushed through
the head.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import anycam
from anycam import Backend, Capture, backends, core

RNG = np.random.default_rng(3)
N, C, H, W, CLASSES = 3, 5, 4, 6, 7
ACTS = RNG.random((N, C, H, W)).astype(np.float32)
DENSE = RNG.standard_normal((C, CLASSES)).astype(np.float32)
BIAS = RNG.standard_normal(CLASSES).astype(np.float32)


def _zeroed(acts: np.ndarray, k: int) -> np.ndarray:
    out = acts.copy()
    out[:, k] = 0.0
    return out


@pytest.mark.parametrize("pool", [np.mean, np.max, np.sum])
def test_ablated_head_features_equal_pooling_the_zeroed_layer(pool) -> None:  # type: ignore[no-untyped-def]
    pooled = pool(ACTS, axis=(2, 3))
    channels = np.array([4, 0, 2, 2])
    got = core.ablated_head_features(pooled, channels, DENSE, BIAS)
    want = np.stack([pool(_zeroed(ACTS, k), axis=(2, 3)).astype(np.float64) @ DENSE + BIAS for k in channels])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    plain = core.ablated_head_features(pooled, channels)
    np.testing.assert_array_equal(plain, np.stack([pool(_zeroed(ACTS, k), axis=(2, 3)) for k in channels]))
    np.testing.assert_allclose(core.head_features(pooled, DENSE, BIAS), pooled.astype(np.float64) @ DENSE + BIAS)
    np.testing.assert_array_equal(core.head_features(pooled), pooled)


def test_ablated_head_features_refuse_shapes_that_do_not_fit() -> None:
    pooled = ACTS.mean(axis=(2, 3))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        core.ablated_head_features(ACTS, [0])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        core.ablated_head_features(pooled, [5])
    with pytest.raises(ValueError, match=r"\(C, F\) with C=5"):
        core.ablated_head_features(pooled, [0], DENSE.T)
    assert core.ablated_head_features(pooled, [], DENSE).shape == (0, N, CLASSES)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _model(acts: np.ndarray) -> np.ndarray:
    """The network after the layer: mean pooling → dense → softmax, in float64."""
    return _softmax(acts.astype(np.float64).mean(axis=(-2, -1)) @ DENSE + BIAS)


class PooledHeadBackend(Backend):
    """The 'framework' is NumPy: the layer output is ACTS, the head is pooling → dense → softmax."""

    name = "numpy"
    capabilities = frozenset({"head_scores", "ablation_head"})
    broken_tail = False
    offers_head = True

    def __init__(self, model, layers, *, output=None, input_layout=None):  # type: ignore[no-untyped-def]
        self.layer_names = tuple(layers)
        self.input_layout = "channels_first"

    def capture(self, inputs, target, *, gradients=True):  # type: ignore[no-untyped-def]
        outputs = _model(ACTS)
        indices = core.resolve_indices(target, outputs)
        return Capture(
            activations=(ACTS,),
            gradients=None,
            scores=np.take_along_axis(outputs, indices, axis=1).astype(np.float32),
            target=indices,
            input_spatial=(H, W),
            layouts=("channels_first",),
        )

    def predict(self, inputs):  # type: ignore[no-untyped-def]
        return _model(ACTS).astype(np.float32)

    def head_scores(self, inputs, replacements, target, indices):  # type: ignore[no-untyped-def]
        outputs = _model(np.asarray(replacements))  # (B, N, classes)
        return np.take_along_axis(outputs, np.broadcast_to(indices, (len(outputs), *indices.shape)), axis=2)

    def ablation_head(self, inputs, target, indices, activations, channel_axis):  # type: ignore[no-untyped-def]
        if not self.offers_head:
            return None

        def tail(features: np.ndarray) -> np.ndarray:
            outputs = _softmax(features.astype(np.float64) + (1.0 if self.broken_tail else 0.0) * np.arange(CLASSES))
            return np.take_along_axis(outputs, np.broadcast_to(indices, (len(features), *indices.shape)), axis=2)

        return anycam.AblationHead(pooled=activations.mean(axis=(2, 3)), tail=tail, weight=DENSE, bias=BIAS)


@pytest.fixture()
def explainer(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(backends, "load", lambda name, model=None: PooledHeadBackend)
    return anycam.Explainer(object(), "features", backend="torch", method="ablationcam", progress=False)


def _paper_weights(target: np.ndarray) -> np.ndarray:
    """w_k = (y − y_k)/y with y_k from the model run on the really zeroed layer (eq. 3)."""
    y = np.take_along_axis(_model(ACTS), target, axis=1)
    drops = np.stack([np.take_along_axis(_model(_zeroed(ACTS, k)), target, axis=1) for k in range(C)], axis=-1)
    return (y[..., None] - drops) / y[..., None]


@pytest.mark.parametrize("batch_size", [None, 4, 100])
def test_explainer_takes_ablation_scores_from_the_head_and_they_are_the_papers(explainer, batch_size) -> None:  # type: ignore[no-untyped-def]
    explainer.batch_size = batch_size
    target = np.array([[1, 5], [0, 0], [6, 2]])
    calls: list[int] = []
    explainer.backend.head_scores = lambda *a: calls.append(1)  # the suffix must not run
    with warnings.catch_warnings():
        warnings.simplefilter("error", anycam.AnycamWarning)
        result = explainer.explain(np.zeros((N, 1, H, W), np.float32), target=target)
    assert not calls
    np.testing.assert_allclose(result.weights, _paper_weights(target), rtol=1e-4, atol=1e-6)


def test_a_head_that_disagrees_with_the_model_warns_and_runs_the_suffix(explainer) -> None:  # type: ignore[no-untyped-def]
    target = np.array([[3], [1], [4]])
    inputs = np.zeros((N, 1, H, W), np.float32)
    explainer.backend.offers_head = False
    honest = explainer.explain(inputs, target=target)
    explainer.backend.offers_head, explainer.backend.broken_tail = True, True
    with pytest.warns(anycam.AnycamWarning, match="differ from the model's") as record:
        fallback = explainer.explain(inputs, target=target)
    assert [w.filename for w in record] == [__file__]  # the user's line, not anycam's
    np.testing.assert_array_equal(fallback.weights, honest.weights)
    np.testing.assert_allclose(honest.weights, _paper_weights(target), rtol=1e-4, atol=1e-6)
