"""One network, three frameworks, one answer.

The demo network is defined once in each framework (backends/demo_*.py) and loaded from one
weight dict (the shipped ``demo.npz``, or seeded random weights for the 1-D and 3-D variants).
For every method × target form × layer, PyTorch, Keras and Flax must give the same raw maps and
the same heatmaps; PyTorch's autograd is the reference only in the sense that it is compared
with two independent implementations of the same math.
"""

from __future__ import annotations

import importlib

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import torch

import anycam
from anycam import core
from anycam.demo.data import load_demo
from anycam.demo.weights import random_demo_weights

BACKENDS = ("torch", "tensorflow", "jax")
TARGETS = ("int", "per_sample", "k_per_sample", "top_k", "callable")


def _to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    return x if layout == "channels_first" else np.ascontiguousarray(np.moveaxis(x, 1, -1))


def _linear_score(backend: str, weights: np.ndarray):  # type: ignore[no-untyped-def]
    """``output @ weights`` written in each framework's own ops."""
    if backend == "torch":
        w = torch.as_tensor(weights)
        return lambda out: out @ w
    if backend == "tensorflow":
        w = tf.constant(weights)
        return lambda out: tf.linalg.matvec(out, w)
    w = jnp.asarray(weights)
    return lambda out: out @ w


class Family:
    """The same network in all three frameworks."""

    def __init__(self, weights: dict[str, np.ndarray], spatial_dims: int = 2, in_channels: int = 1) -> None:
        self.models = {}
        for backend in BACKENDS:
            module = importlib.import_module(f"anycam.backends.{backend}.demo")
            model = module.build_demo_model(weights, spatial_dims=spatial_dims, in_channels=in_channels)
            self.models[backend] = (model, module.INPUT_LAYOUT)

    def explain(self, backend: str, x: np.ndarray, layer: str, method: str, target: object) -> anycam.Explanation:
        model, layout = self.models[backend]
        explainer = anycam.Explainer(model, layer, method=method, backend=backend)
        return explainer.explain(_to_layout(x, layout), target=target)

    def predict(self, backend: str, x: np.ndarray) -> np.ndarray:
        model, layout = self.models[backend]
        return anycam.Explainer(model, "stage3", backend=backend).backend.predict(_to_layout(x, layout))


@pytest.fixture(scope="module")
def demo() -> tuple[Family, np.ndarray]:
    data = load_demo()
    return Family(data["weights"]), data["images"][:6]


def test_outputs_agree(demo: tuple[Family, np.ndarray]) -> None:
    family, x = demo
    reference = family.predict("torch", x)
    np.testing.assert_allclose(reference, load_demo()["logits"][:6], rtol=1e-4, atol=1e-4)
    for backend in ("tensorflow", "jax"):
        np.testing.assert_allclose(family.predict(backend, x), reference, rtol=1e-4, atol=1e-4)


def _target(form: str, backend: str, batch: int, classes: int = 10) -> object:
    rng = np.random.default_rng(7)
    if form == "int":
        return 3
    if form == "per_sample":
        return rng.integers(0, classes, size=batch).tolist()
    if form == "k_per_sample":
        return rng.integers(0, classes, size=(batch, 3))
    if form == "top_k":
        return anycam.top_k(2)
    return _linear_score(backend, rng.normal(size=classes).astype(np.float32))


# Float32's unit roundoff: the tolerances of Ablation-CAM's comparisons are counted in it.
EPS32 = float(np.finfo(np.float32).eps)


def _score_scaled(result: anycam.Explanation, array: np.ndarray) -> np.ndarray:
    """``|y| · array`` per (sample, target): undoes Ablation-CAM's division by the score y.

    Ablation-CAM's weight w_k = (y − y_k)/y (Desai & Ramaswamy, eq. 3). Each framework's y and
    y_k are float32 sums over the network whose rounding is a few ulps of the scores' scale S,
    |δy|, |δy_k| ≤ c·ε·S, so |δw_k| ≤ (|δ(y − y_k)| + |w_k|·|δy|)/|y| ≈ c·ε·S·(2 + |w_k|)/|y|: the
    error grows as 1/|y| where a score is small (1.7e-5 against atol 1e-5 at y ≈ 0.015, seen on a
    fresh machine). Multiplied back by |y|, the weights are the drops y − y_k = y·w_k and the map
    is ReLU(±Σ_k (y − y_k) A_k), whose rounding is c·ε·S, independent of y.
    """
    scores = np.abs(np.asarray(result.scores, np.float64))
    return array * scores.reshape(scores.shape + (1,) * (array.ndim - scores.ndim))


def _assert_same(results: dict[str, anycam.Explanation], *, divided_by_score: bool = False) -> None:
    reference = results["torch"]

    def raw(result: anycam.Explanation) -> np.ndarray:
        return _score_scaled(result, result.cam) if divided_by_score else result.cam

    scale = max(float(np.abs(raw(reference)).max()), 1e-12)
    for backend, result in results.items():
        np.testing.assert_allclose(raw(result) / scale, raw(reference) / scale, rtol=1e-4, atol=1e-5, err_msg=backend)
        np.testing.assert_allclose(result.heatmap, reference.heatmap, atol=1e-4, err_msg=backend)
        np.testing.assert_allclose(result.scores, reference.scores, rtol=1e-4, atol=1e-4, err_msg=backend)
        if reference.target is None:
            assert result.target is None
        else:
            np.testing.assert_array_equal(result.target, reference.target)


@pytest.mark.parametrize("layer", ["stage1", "stage3"])
@pytest.mark.parametrize("form", TARGETS)
@pytest.mark.parametrize("method", core.CAPTURE_METHODS)
def test_maps_agree(demo: tuple[Family, np.ndarray], method: str, form: str, layer: str) -> None:
    family, x = demo
    results = {b: family.explain(b, x, layer, method, _target(form, b, len(x))) for b in BACKENDS}
    _assert_same(results)


def _assert_same_attribution(results: dict[str, anycam.Explanation]) -> None:
    reference = results["torch"].attribution
    assert reference is not None
    scale = max(float(np.abs(reference).max()), 1e-12)
    for backend, result in results.items():
        assert result.attribution is not None and result.attribution.shape == reference.shape, backend
        np.testing.assert_allclose(result.attribution / scale, reference / scale, rtol=1e-4, atol=1e-5, err_msg=backend)


BEYOND = [
    # Each method at both layers and with one- and K-target forms, not the full product: every
    # case compiles its own programs in three frameworks (guided-backprop has no layer at all).
    ("scorecam", "int", "stage3"),
    ("ablationcam", "k_per_sample", "stage3"),
    ("ablationcam", "callable", "stage1"),
    ("guided-backprop", "k_per_sample", "stage3"),
    ("guided-gradcam", "k_per_sample", "stage1"),
    ("guided-gradcam", "callable", "stage3"),
]


@pytest.mark.parametrize(("method", "form", "layer"), BEYOND)
def test_methods_beyond_gradients_agree(demo: tuple[Family, np.ndarray], method: str, form: str, layer: str) -> None:
    """Score-CAM, Ablation-CAM, Guided Backprop and Guided Grad-CAM: one answer in three frameworks.

    Score-CAM runs C masked forwards per sample, so it gets 3 of the 6 images.
    """
    assert {m for m, _, _ in BEYOND} == {*core.SCORE_METHODS, *core.GUIDED_METHODS}
    family, x = demo
    if method == "scorecam":
        x = x[:3]
    results = {b: family.explain(b, x, layer, method, _target(form, b, len(x))) for b in BACKENDS}
    _assert_same(results, divided_by_score=method == "ablationcam")
    if method in core.GUIDED_METHODS:
        _assert_same_attribution(results)
    elif method == "ablationcam":
        # The drops y − y_k (see _score_scaled) agree to the float32 rounding of the scores'
        # scale S: 5.5e-7·S (4.6 ulps) measured; 64 ulps leaves room for other kernels and
        # summation orders while a wrong channel (an error of order |y − y_k|) still fails.
        reference = results["torch"]
        drops = _score_scaled(reference, reference.weights)
        size = max(float(np.abs(reference.scores).max()), float(np.abs(reference.scores[..., None] - drops).max()))
        for backend, result in results.items():
            np.testing.assert_allclose(
                _score_scaled(result, result.weights), drops, rtol=0, atol=64 * EPS32 * size, err_msg=backend
            )
    else:
        scale = max(float(np.abs(results["torch"].weights).max()), 1e-12)
        for backend, result in results.items():
            np.testing.assert_allclose(
                result.weights / scale, results["torch"].weights / scale, rtol=1e-4, atol=1e-5, err_msg=backend
            )


@pytest.mark.parametrize(("spatial_dims", "shape"), [(1, (3, 2, 96)), (3, (2, 1, 12, 16, 10))])
def test_signal_and_volume_variants_agree(spatial_dims: int, shape: tuple[int, ...]) -> None:
    weights = random_demo_weights(spatial_dims=spatial_dims, in_channels=shape[1], seed=spatial_dims)
    family = Family(weights, spatial_dims=spatial_dims, in_channels=shape[1])
    x = np.random.default_rng(spatial_dims).random(shape, dtype=np.float32)
    reference = family.predict("torch", x)
    for backend in ("tensorflow", "jax"):
        np.testing.assert_allclose(family.predict(backend, x), reference, rtol=1e-4, atol=1e-4)
    results = {b: family.explain(b, x, "stage3", "gradcam", None) for b in BACKENDS}
    assert results["torch"].heatmap.shape == (shape[0], *shape[2:])
    _assert_same(results)
