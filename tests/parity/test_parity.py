"""One network, three frameworks, one answer.

The demo network is defined once in each framework (backends/demo_*.py) and loaded from one
weight dict (the shipped ``demo.npz``, or seeded random weights for the 1-D and 3-D variants).
For every method × target form × layer, PyTorch, Keras and Flax must give the same raw maps and
the same heatmaps; PyTorch's autograd is the reference only in the sense that it is compared
with two independent implementations of the same math.

Each comparison runs twice: with NumPy outputs (the core on the host, float64) and with
``arrays="native"`` (the core on each framework's own arrays, float32; issue 21). A native map
must also equal the same framework's NumPy-mode map to the precision docs/devices.md states
(checked against terms computed here with plain torch), and be finite wherever that one is.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import jax
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
ARRAYS = ("numpy", "native")
NATIVE_TYPES: dict[str, Any] = {"torch": torch.Tensor, "tensorflow": tf.Tensor, "jax": jax.Array}
FIELDS = ("heatmap", "cam", "weights", "scores", "attribution")


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

        # NumPy-mode results by (backend, layer, method, target form, batch): the native run of
        # a case compares with them, so each is computed once.
        self.numpy_results: dict[tuple[object, ...], anycam.Explanation] = {}

    def explain(
        self, backend: str, x: np.ndarray, layer: str, method: str, target: object, arrays: str = "numpy"
    ) -> anycam.Explanation:
        model, layout = self.models[backend]
        explainer = anycam.Explainer(model, layer, method=method, backend=backend, arrays=arrays)
        return explainer.explain(_to_layout(x, layout), target=target)

    def case(self, backend: str, x: np.ndarray, layer: str, method: str, form: str, arrays: str) -> anycam.Explanation:
        """One case's Explanation in ``arrays`` mode; the NumPy mode's is kept for the native run."""
        target = _target(form, backend, len(x))
        if arrays == "native":
            return self.explain(backend, x, layer, method, target, arrays="native")
        key = (backend, layer, method, form, len(x))
        if key not in self.numpy_results:
            self.numpy_results[key] = self.explain(backend, x, layer, method, target)
        return self.numpy_results[key]

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
    if form == "argmax":
        return None
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


def _host(array: Any) -> Any:
    """A framework array as NumPy, with each framework's own conversion (None stays None)."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    if isinstance(array, tf.Tensor):
        return array.numpy()
    return None if array is None else np.asarray(array)


def _on_host(result: anycam.Explanation) -> anycam.Explanation:
    changes = {name: _host(getattr(result, name)) for name in FIELDS}
    return dataclasses.replace(result, cams=tuple(_host(c) for c in result.cams), **changes)


# Per-pixel channel sums, Σ_c term_c: their float32 rounding is relative to Σ_c |term_c|.
PER_PIXEL_GRADIENT = ("hirescam", "layercam", "gradcam-elementwise")
# An SVD or eigendecomposition: its float32 error is set by the spectral gap, not a term count.
EIGEN = ("eigencam", "eigengradcam", "kpcacam")


def _channel_terms(family: Family, x: np.ndarray, layer: str, method: str, form: str, ref: anycam.Explanation) -> Any:
    """Σ_c |term_c| of the map's channel sum at every (sample, target, position), float64.

    Written with plain torch on the PyTorch port (a forward hook and ``autograd.grad``, no
    anycam); the three ports compute the same layer, so it is each framework's scale too. The
    terms are |G_c·A_c| for the per-pixel methods, |w_c·A_c| for the weighted ones (w the NumPy
    mode's weights), and for guided backprop the map itself (Σ_c |attribution_c|).
    """
    if method == "guided-backprop":
        return np.abs(ref.cam.astype(np.float64))
    model = family.models["torch"][0]
    kept: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda module, args, out: kept.append(out))
    try:
        out = model(torch.from_numpy(np.ascontiguousarray(x)))
    finally:
        handle.remove()
    acts = kept[0].detach().double().abs()
    if method in PER_PIXEL_GRADIENT:
        if form == "callable":
            scores = _target(form, "torch", len(x))(out).reshape(len(x), -1)  # type: ignore[operator]
        else:
            scores = out.gather(1, torch.as_tensor(ref.target).reshape(len(x), -1))
        grads = [torch.autograd.grad(scores[:, k].sum(), kept[0], retain_graph=True)[0] for k in range(scores.shape[1])]
        terms = (acts[:, None] * torch.stack(grads, 1).detach().double().abs()).sum(2).numpy()
    else:
        weights = np.abs(np.asarray(ref.weights, np.float64)).reshape(len(x), -1, acts.shape[1])
        terms = np.einsum("nkc,nc...->nk...", weights, acts.numpy())
    return terms.reshape(ref.cam.shape)


def _assert_native_equals_numpy(
    native: anycam.Explanation, ref: anycam.Explanation, backend: str, method: str, terms: Any, spatial_ndim: int
) -> None:
    """The native Explanation against the same framework's NumPy-mode one (docs/devices.md, Precision).

    Framework arrays for every field the NumPy mode fills; finite wherever the NumPy mode is;
    scores and targets equal; raw maps within 1e-5 relative + 1e-5 × Σ_c |term_c| per pixel
    (float32 rounding of a C-term sum with cancellation), or, for the Eigen methods, within 5e-5
    of each map's largest value; heatmaps within 1e-5 (5e-5 for the Eigen methods) plus the
    amplification of min-max scaling, 4·e/span for a raw-map error e and span.
    """
    for name in FIELDS:
        value = getattr(native, name)
        assert (value is None) == (getattr(ref, name) is None), (backend, name)
        assert value is None or isinstance(value, NATIVE_TYPES[backend]), (backend, name, type(value))
    assert all(isinstance(c, NATIVE_TYPES[backend]) for c in native.cams), backend
    got = _on_host(native)
    if ref.target is None:
        assert got.target is None, backend
    else:
        assert isinstance(got.target, np.ndarray) and got.target.dtype == np.int64, backend
        np.testing.assert_array_equal(got.target, ref.target, err_msg=backend)
    for name in FIELDS:
        want = getattr(ref, name)
        if want is not None:
            value = getattr(got, name)
            assert value.shape == want.shape, (backend, name)
            assert np.isfinite(value[np.isfinite(want)]).all(), f"{backend} {name}: not finite where NumPy is"
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-6, atol=0, err_msg=backend)
    cam, want = got.cam.astype(np.float64), ref.cam.astype(np.float64)
    spatial = tuple(range(-spatial_ndim, 0))
    error = np.abs(cam - want)
    if method in EIGEN:
        allowed = 5e-5 * np.abs(want).max(axis=spatial, keepdims=True)
    else:
        allowed = 1e-5 * np.abs(want) + 1e-5 * terms
    worst = float(np.max(error - allowed))
    assert worst <= 0, f"{backend} {method}: native map off by up to {float(error.max()):.3g} ({worst:.3g} over)"
    base = 5e-5 if method in EIGEN else 1e-5
    span = want.max(axis=spatial) - want.min(axis=spatial)
    amplified = np.where(span > 0, 4 * error.max(axis=spatial) / np.where(span > 0, span, 1), 0)
    heat = np.abs(got.heatmap.astype(np.float64) - ref.heatmap).max(axis=spatial)
    assert np.all(heat <= base + amplified), f"{backend} {method}: heatmaps off by {float(heat.max()):.3g}"
    for name in ("weights", "attribution"):
        if getattr(ref, name) is not None:
            w, w_ref = getattr(got, name).astype(np.float64), getattr(ref, name).astype(np.float64)
            scale = np.abs(w_ref).max(axis=-1, keepdims=True) if name == "weights" else np.abs(w_ref).max()
            assert np.all(np.abs(w - w_ref) <= 1e-5 * np.abs(w_ref) + 1e-5 * scale), f"{backend} {name}"


def _results(
    family: Family, x: np.ndarray, layer: str, method: str, form: str, arrays: str
) -> dict[str, anycam.Explanation]:
    """Each framework's Explanation of one case; in native mode checked against its NumPy mode, then on the host."""
    results = {b: family.case(b, x, layer, method, form, arrays) for b in BACKENDS}
    if arrays == "native":
        for backend, native in results.items():
            ref = family.case(backend, x, layer, method, form, "numpy")
            terms = None if method in EIGEN else _channel_terms(family, x, layer, method, form, ref)
            _assert_native_equals_numpy(native, ref, backend, method, terms, x.ndim - 2)
        results = {b: _on_host(r) for b, r in results.items()}
    return results


@pytest.mark.parametrize("arrays", ARRAYS)
@pytest.mark.parametrize("layer", ["stage1", "stage3"])
@pytest.mark.parametrize("form", TARGETS)
@pytest.mark.parametrize("method", core.CAPTURE_METHODS)
def test_maps_agree(demo: tuple[Family, np.ndarray], method: str, form: str, layer: str, arrays: str) -> None:
    family, x = demo
    _assert_same(_results(family, x, layer, method, form, arrays))


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


@pytest.mark.parametrize("arrays", ARRAYS)
@pytest.mark.parametrize(("method", "form", "layer"), BEYOND)
def test_methods_beyond_gradients_agree(
    demo: tuple[Family, np.ndarray], method: str, form: str, layer: str, arrays: str
) -> None:
    """Score-CAM, Ablation-CAM, Guided Backprop and Guided Grad-CAM: one answer in three frameworks.

    Score-CAM runs C masked forwards per sample, so it gets 3 of the 6 images.
    """
    assert {m for m, _, _ in BEYOND} == {*core.SCORE_METHODS, *core.GUIDED_METHODS}
    family, x = demo
    if method == "scorecam":
        x = x[:3]
    results = _results(family, x, layer, method, form, arrays)
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


@pytest.mark.parametrize("arrays", ARRAYS)
@pytest.mark.parametrize(("spatial_dims", "shape"), [(1, (3, 2, 96)), (3, (2, 1, 12, 16, 10))])
def test_signal_and_volume_variants_agree(spatial_dims: int, shape: tuple[int, ...], arrays: str) -> None:
    weights = random_demo_weights(spatial_dims=spatial_dims, in_channels=shape[1], seed=spatial_dims)
    family = Family(weights, spatial_dims=spatial_dims, in_channels=shape[1])
    x = np.random.default_rng(spatial_dims).random(shape, dtype=np.float32)
    reference = family.predict("torch", x)
    for backend in ("tensorflow", "jax"):
        np.testing.assert_allclose(family.predict(backend, x), reference, rtol=1e-4, atol=1e-4)
    results = {b: family.case(b, x, "stage3", "gradcam", "argmax", arrays) for b in BACKENDS}
    if arrays == "native":
        for backend, native in results.items():
            ref = family.case(backend, x, "stage3", "gradcam", "argmax", "numpy")
            terms = _channel_terms(family, x, "stage3", "gradcam", "argmax", ref)
            _assert_native_equals_numpy(native, ref, backend, "gradcam", terms, spatial_dims)
        results = {b: _on_host(r) for b, r in results.items()}
    assert results["torch"].heatmap.shape == (shape[0], *shape[2:])
    _assert_same(results)
