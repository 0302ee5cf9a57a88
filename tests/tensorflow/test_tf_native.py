"""TensorFlow native and differentiable maps (issue 21, items 2 and 3).

Native: ``Explainer(..., arrays="native")`` returns ``tf.Tensor`` maps equal to the NumPy mode's,
and no activation, gradient or map is read back to the host on the way. Differentiable: a user's
outer ``tf.GradientTape`` sees the map; the oracle is Grad-CAM and its kin written here by hand
with nested tapes (second-order gradients through the layer's gradient), with plain TF ops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("array_api_compat")

import anycam  # noqa: E402

DIFFERENTIABLE = ("gradcam", "hirescam", "layercam", "xgradcam", "gradcam++", "gradcam-elementwise")


def network() -> Any:
    """A small seeded CNN: conv → conv → GAP → dense (3 classes), channels last."""
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="features"),
            keras.layers.Conv2D(5, 3, padding="same", activation="tanh", name="mix"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, name="logits"),
        ]
    )


def batch(seed: int = 0) -> Any:
    return tf.constant(np.random.default_rng(seed).normal(size=(2, 10, 10, 3)).astype(np.float32))


@pytest.fixture(scope="module")
def model() -> Any:
    return network()


def _numpy(array: Any) -> np.ndarray:
    return array.numpy() if isinstance(array, tf.Tensor) else np.asarray(array)


@pytest.mark.parametrize("method", anycam.core.CAPTURE_METHODS)
def test_native_maps_are_tf_tensors_equal_to_the_numpy_mode(model, method):
    x = batch()
    native = anycam.Explainer(model, "features", method=method, arrays="native").explain(x, target=anycam.top_k(2))
    reference = anycam.Explainer(model, "features", method=method).explain(x.numpy(), target=anycam.top_k(2))
    assert isinstance(native.heatmap, tf.Tensor) and isinstance(native.cam, tf.Tensor)
    assert native.heatmap.dtype == tf.float32
    np.testing.assert_array_equal(native.target, reference.target)
    np.testing.assert_allclose(native.heatmap.numpy(), reference.heatmap, atol=1e-5)
    scale = float(np.max(np.abs(reference.cam))) or 1.0
    np.testing.assert_allclose(native.cam.numpy(), reference.cam, rtol=1e-5, atol=1e-5 * scale)


class HostReads:
    """Counts reads of eager tensors to the host, with their shapes and dtypes.

    Two doors: the tensor's ``numpy()`` / ``__array__``, and NumPy's constructors given a tensor
    (``np.asarray(tensor)`` reads it through the buffer protocol, past ``__array__``).
    """

    CONSTRUCTORS = ("asarray", "array", "asanyarray", "ascontiguousarray", "from_dlpack")

    def __init__(self) -> None:
        self.reads: list[tuple[str, tuple[int, ...], str]] = []

    def __enter__(self) -> HostReads:
        eager = type(tf.constant(0.0))
        self._eager = eager
        self._originals = {name: getattr(eager, name) for name in ("numpy", "__array__")}

        def spy(name: str) -> Callable[..., Any]:
            original = self._originals[name]

            def read(tensor: Any, *args: Any, **kwargs: Any) -> Any:
                self.reads.append((name, tuple(tensor.shape), tensor.dtype.name))
                return original(tensor, *args, **kwargs)

            return read

        for name in self._originals:
            setattr(eager, name, spy(name))
        self._numpy = {name: getattr(np, name) for name in self.CONSTRUCTORS}

        def constructor(name: str) -> Callable[..., Any]:
            original = self._numpy[name]

            def make(value: Any, *args: Any, **kwargs: Any) -> Any:
                if isinstance(value, tf.Tensor):
                    self.reads.append((f"np.{name}", tuple(value.shape), value.dtype.name))
                return original(value, *args, **kwargs)

            return make

        for name in self.CONSTRUCTORS:
            setattr(np, name, constructor(name))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._originals.items():
            setattr(self._eager, name, original)
        for name, original in self._numpy.items():
            setattr(np, name, original)


@pytest.mark.parametrize("method", anycam.core.CAPTURE_METHODS)
@pytest.mark.parametrize("target", ["topk", "indices"])
def test_native_mode_reads_nothing_but_the_target_indices_to_the_host(model, method, target):
    """No activation, gradient, score or map is read back (``numpy()`` / ``__array__``) in native mode.

    Allowed: the (N, K) int64 class indices (the Explanation's ``target``, NumPy by design) and
    the one boolean per finiteness check (``__bool__``, not counted). A given index target reads
    nothing at all: its range is checked against the output's shape.
    """
    explainer = anycam.Explainer(model, "features", method=method, arrays="native")
    x = batch(1)
    spec = anycam.top_k(2) if target == "topk" else np.array([[0, 2], [1, 1]])
    explainer.explain(x, target=spec)  # compiled outside the count
    with HostReads() as host:
        explained = explainer.explain(x, target=spec)
    assert isinstance(explained.heatmap, tf.Tensor)
    allowed = [("numpy", (2, 2), "int64")] if target == "topk" else []
    assert host.reads == allowed


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_perturbation_methods_in_native_mode_read_no_input_activation_or_map_to_the_host(model, method):
    """Score-CAM's input and Ablation-CAM's layer output stay on the device, and so do the maps.

    Their weights are computed on the host from the scores of the perturbed copies, so those
    rows may be read: at most N·C copies × 3 classes = 36 values per model call. The input
    (600 values), the layer's activations (1200) and the maps (400) are each larger.
    """
    explainer = anycam.Explainer(model, "features", method=method, arrays="native")
    x = batch(1)
    explainer.explain(x, target=anycam.top_k(2))  # compiled outside the count
    with HostReads() as host:
        explained = explainer.explain(x, target=anycam.top_k(2))
    assert isinstance(explained.heatmap, tf.Tensor) and isinstance(explained.cam, tf.Tensor)
    large = [read for read in host.reads if int(np.prod(read[1])) > 36]
    assert not large, large


def test_the_host_read_counter_sees_a_copy():
    """The counter used above fails when something copies a tensor to NumPy (as the NumPy mode does)."""
    explainer = anycam.Explainer(network(), "features", method="gradcam")
    with HostReads() as host:
        explainer.explain(batch(1), target=1)
    assert any(dtype == "float32" and len(shape) == 4 for _, shape, dtype in host.reads), host.reads


# --- differentiable maps: the oracle, by hand with nested tapes -----------------------------------


def hand_written_cam(model: Any, x: Any, target: int, method: str) -> Any:
    """Returns the (N, H, W) raw map of ``method`` for class ``target``, kept on the outer tape.

    Written with TF ops only: the inner tape gives G = ∂score/∂A (recorded by the caller's tape,
    so the map's gradient includes the second-order term through G).
    """
    features, mix, logits = model.get_layer("features"), model.get_layer("mix"), model.get_layer("logits")
    with tf.GradientTape() as inner:
        a = features(x)
        inner.watch(a)
        score = tf.reduce_sum(logits(tf.reduce_mean(mix(a), axis=(1, 2)))[:, target])
    g = inner.gradient(score, a)  # (N, H, W, C), channels last
    if method == "gradcam":
        cam = tf.reduce_sum(tf.reduce_mean(g, axis=(1, 2), keepdims=True) * a, axis=-1)
    elif method == "hirescam":
        cam = tf.reduce_sum(g * a, axis=-1)
    elif method == "layercam":
        cam = tf.reduce_sum(tf.nn.relu(g) * a, axis=-1)
    elif method == "gradcam-elementwise":
        cam = tf.reduce_sum(tf.nn.relu(g * a), axis=-1)
    elif method == "xgradcam":
        weights = tf.reduce_sum(g * a, axis=(1, 2), keepdims=True) / (
            tf.reduce_sum(a, axis=(1, 2), keepdims=True) + 1e-7
        )
        cam = tf.reduce_sum(weights * a, axis=-1)
    elif method == "gradcam++":
        sums = tf.reduce_sum(a, axis=(1, 2), keepdims=True)
        denominator = 2.0 * g**2 + sums * g**3
        alpha = tf.where((g != 0) & (denominator != 0), g**2 / tf.where(denominator != 0, denominator, 1.0), 0.0)
        weights = tf.reduce_sum(alpha * tf.nn.relu(g), axis=(1, 2), keepdims=True)
        cam = tf.reduce_sum(weights * a, axis=-1)
    else:  # pragma: no cover
        raise AssertionError(method)
    return tf.nn.relu(cam)


def loss_of(cam: Any) -> Any:
    """A loss on the map that weighs positions unequally (so no gradient vanishes by symmetry)."""
    ramp = tf.reshape(tf.linspace(0.5, 1.5, 100), (1, 10, 10))
    return tf.reduce_sum(tf.square(tf.reshape(cam, (-1, 10, 10))) * ramp)


@pytest.mark.parametrize("method", DIFFERENTIABLE)
def test_differentiable_maps_carry_the_hand_written_gradient_to_the_weights(method):
    model = network()
    x = batch(2)
    explainer = anycam.Explainer(model, "features", method=method, differentiable=True)
    with tf.GradientTape() as tape:
        cam = explainer.explain(x, target=1).cam
        ours = tape.gradient(loss_of(cam), model.trainable_variables)
    with tf.GradientTape() as tape:
        expected_cam = hand_written_cam(model, x, 1, method)
        expected = tape.gradient(loss_of(expected_cam), model.trainable_variables)
    np.testing.assert_allclose(tf.reshape(cam, (-1, 10, 10)).numpy(), expected_cam.numpy(), rtol=1e-5, atol=1e-6)
    checked = 0
    for variable, got, want in zip(model.trainable_variables, ours, expected, strict=True):
        if want is None:  # the logits' bias: ∂score/∂A does not depend on it
            assert got is None or not np.any(_numpy(got)), variable.path
            continue
        want = _numpy(want)
        scale = float(np.max(np.abs(want))) or 1.0
        np.testing.assert_allclose(_numpy(got), want, rtol=1e-5, atol=1e-5 * scale, err_msg=variable.path)
        checked += int(np.any(want))
    assert checked >= 4  # the gradient reaches both conv layers and the dense weights


def test_differentiable_heatmap_reaches_the_input():
    """The normalised heatmap is differentiable with respect to a watched input, too."""
    model = network()
    x = tf.Variable(batch(4))
    explainer = anycam.Explainer(model, "features", method="gradcam", differentiable=True)
    with tf.GradientTape() as tape:
        heat = explainer.explain(x, target=0).heatmap
        total = tf.reduce_sum(heat * tf.reshape(tf.linspace(0.0, 1.0, 100), (1, 10, 10)))
    grad = tape.gradient(total, x)
    assert grad is not None and np.isfinite(grad.numpy()).all() and np.any(grad.numpy())
