"""Every method on a Keras model with several inputs (issues 19.14 and 19.4).

The spatial input is masked (Score-CAM), the layer ablated (Ablation-CAM) or guided (the guided
methods) while the other inputs pass through with their own rows. Each result is checked against
the same network run layer by layer here, with plain TF ops and no anycam.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import anycam

pytestmark = pytest.mark.tensorflow

BATCH, CLASSES, SIZE = 3, 4, 8
TARGET = [0, 2, 1]


@functools.cache
def gated_net() -> tuple[keras.Model, dict[str, keras.Layer]]:
    """image → conv → ReLU → conv "features" → ReLU → mean pool, gated by sigmoid(dense(meta)) → dense.

    The gate multiplies: a pooled row of batch 1 and metadata rows of batch 3 broadcast silently.
    """
    keras.utils.set_random_seed(11)
    layers = {
        "conv1": keras.layers.Conv2D(5, 3, padding="same", name="conv1"),
        "relu1": keras.layers.ReLU(name="relu1"),
        "features": keras.layers.Conv2D(6, 3, padding="same", name="features"),
        "relu2": keras.layers.ReLU(name="relu2"),
        "pool": keras.layers.GlobalAveragePooling2D(name="pool"),
        "gate": keras.layers.Dense(6, activation="sigmoid", name="gate"),
        "gated": keras.layers.Multiply(name="gated"),
        "logits": keras.layers.Dense(CLASSES, name="logits"),
    }
    image = keras.Input((SIZE, SIZE, 3), name="image")
    meta = keras.Input((4,), name="meta")
    pooled = layers["pool"](layers["relu2"](layers["features"](layers["relu1"](layers["conv1"](image)))))
    output = layers["logits"](layers["gated"]([pooled, layers["gate"](meta)]))
    return keras.Model({"image": image, "meta": meta}, output), layers


def by_hand(image, meta, edit=None, relu=None):  # type: ignore[no-untyped-def]
    """The network layer by layer; ``edit`` changes the "features" output, ``relu`` replaces the ReLUs."""
    _, layers = gated_net()
    h = layers["conv1"](image, training=False)
    h = relu(h) if relu else layers["relu1"](h)
    h = layers["features"](h, training=False)
    h = edit(h) if edit else h
    h = relu(h) if relu else layers["relu2"](h)
    pooled = layers["pool"](h)
    return layers["logits"](pooled * layers["gate"](meta))


def features_by_hand(image):  # type: ignore[no-untyped-def]
    seen = []
    by_hand(image, tf.zeros((image.shape[0], 4)), edit=lambda a: seen.append(a) or a)
    return seen[0].numpy()


def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "image": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
        "meta": rng.normal(scale=2.0, size=(BATCH, 4)).astype(np.float32),
    }


def forms(inputs: dict[str, np.ndarray]) -> list:  # type: ignore[type-arg]
    """The same inputs as a dict, as a list in the order of model.inputs, and as tensors."""
    return [inputs, [inputs["image"], inputs["meta"]], {k: tf.constant(v) for k, v in inputs.items()}]


def picked(outputs: np.ndarray) -> np.ndarray:
    return outputs[np.arange(BATCH), TARGET]


def assert_maps(result, cam: np.ndarray, weights: np.ndarray | None = None) -> None:  # type: ignore[no-untyped-def]
    scale = max(float(np.abs(cam).max()), 1e-12)
    np.testing.assert_allclose(result.cam / scale, cam / scale, rtol=1e-4, atol=1e-5)
    if weights is not None:
        np.testing.assert_allclose(result.weights, weights, rtol=1e-4, atol=1e-5)


def test_the_metadata_changes_the_scores() -> None:
    """Else passing the other inputs through would be untested: a model deaf to them passes anyway."""
    inputs = batch()
    model, _ = gated_net()
    plain = model(inputs, training=False).numpy()
    shifted = model({**inputs, "meta": inputs["meta"][::-1].copy()}, training=False).numpy()
    assert np.abs(plain - shifted).max() > 0.1 * np.abs(plain).max()
    np.testing.assert_allclose(by_hand(inputs["image"], inputs["meta"]).numpy(), plain, rtol=1e-5, atol=1e-6)


def test_scorecam_with_several_inputs_masks_the_image_and_keeps_each_samples_metadata() -> None:
    inputs = batch()
    image, meta = inputs["image"], inputs["meta"]
    acts = features_by_hand(image)  # (N, H, W, C)
    up = tf.image.resize(acts, (SIZE, SIZE), method="bilinear").numpy()
    low, high = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
    masks = np.where(high > low, (up - low) / np.where(high > low, high - low, 1), 0)
    weights = np.zeros((BATCH, acts.shape[-1]))
    for channel in range(acts.shape[-1]):
        masked = image * masks[..., channel : channel + 1]
        probabilities = tf.nn.softmax(by_hand(masked, meta), axis=1).numpy()
        weights[:, channel] = picked(probabilities)
    cam = np.maximum(np.einsum("nc,nhwc->nhw", weights, acts), 0)
    model, _ = gated_net()
    explainer = anycam.Explainer(model, "features", method="scorecam", batch_size=4)
    for given in forms(inputs):
        assert_maps(explainer.explain(given, target=TARGET), cam, weights)


def test_ablationcam_with_several_inputs_equals_zeroing_each_channel() -> None:
    inputs = batch()
    image, meta = inputs["image"], inputs["meta"]
    acts = features_by_hand(image)
    y = picked(by_hand(image, meta).numpy())
    weights = np.zeros((BATCH, acts.shape[-1]))
    for channel in range(acts.shape[-1]):
        keep = np.ones(acts.shape[-1], np.float32)
        keep[channel] = 0
        weights[:, channel] = (y - picked(by_hand(image, meta, edit=lambda a, keep=keep: a * keep).numpy())) / y
    cam = np.maximum(np.einsum("nc,nhwc->nhw", weights, acts), 0)
    model, _ = gated_net()
    explainer = anycam.Explainer(model, "features", method="ablationcam", batch_size=4)
    for given in forms(inputs):
        assert_maps(explainer.explain(given, target=TARGET), cam, weights)


@tf.custom_gradient
def guided_relu(z: tf.Tensor):  # type: ignore[no-untyped-def]
    def gradient(upstream: tf.Tensor) -> tf.Tensor:
        return upstream * tf.cast(z > 0, upstream.dtype) * tf.cast(upstream > 0, upstream.dtype)

    return tf.maximum(z, 0.0), gradient


def guided_by_hand(image: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """(N, H, W, C_in) guided input gradients of the targets, the ReLUs replaced by hand."""
    x = tf.constant(image)
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = by_hand(x, tf.constant(meta), relu=guided_relu)
        scores = tf.gather(outputs, tf.constant(TARGET)[:, None], batch_dims=1)
    return tape.gradient(scores, x).numpy()


def test_guided_backprop_with_several_inputs_equals_a_hand_guided_network() -> None:
    inputs = batch()
    expected = np.moveaxis(guided_by_hand(inputs["image"], inputs["meta"]), -1, 1)  # (N, C_in, H, W)
    model, _ = gated_net()
    explainer = anycam.Explainer(model, "features", method="guided-backprop")
    scale = float(np.abs(expected).max())
    assert scale > 0
    for given in forms(inputs):
        result = explainer.explain(given, target=TARGET)
        np.testing.assert_allclose(result.attribution / scale, expected / scale, rtol=1e-4, atol=1e-6)


def test_guided_gradcam_with_several_inputs_is_guided_gradients_times_gradcam() -> None:
    inputs = batch()
    image, meta = inputs["image"], inputs["meta"]
    activations = tf.constant(features_by_hand(image))
    with tf.GradientTape() as tape:
        tape.watch(activations)
        outputs = by_hand(image, meta, edit=lambda a: activations)
        scores = tf.gather(outputs, tf.constant(TARGET)[:, None], batch_dims=1)
    gradients = tape.gradient(scores, activations).numpy()
    alpha = gradients.mean(axis=(1, 2))
    gradcam = np.maximum(np.einsum("nc,nhwc->nhw", alpha, activations.numpy()), 0)
    up = tf.image.resize(gradcam[..., None], (SIZE, SIZE), method="bilinear").numpy()[..., 0]
    expected = np.moveaxis(guided_by_hand(image, meta), -1, 1) * up[:, None]
    model, _ = gated_net()
    explainer = anycam.Explainer(model, "features", method="guided-gradcam")
    scale = float(np.abs(expected).max())
    for given in forms(inputs):
        result = explainer.explain(given, target=TARGET)
        np.testing.assert_allclose(result.attribution / scale, expected / scale, rtol=1e-4, atol=1e-6)
        assert_maps(result, gradcam)


@pytest.mark.parametrize("method", [m for m in anycam.core.METHODS if m not in anycam.core.methods.ATTENTION_METHODS])
def test_inputs_with_different_batch_sizes_are_refused_naming_each(method: str) -> None:
    """Issue 19.4: one image with three metadata rows broadcasts silently in the model."""
    inputs = batch()
    model, _ = gated_net()
    uneven = {"image": inputs["image"][:1], "meta": inputs["meta"]}
    assert model(uneven, training=False).shape[0] == BATCH  # what the model itself does with them
    explainer = anycam.Explainer(model, "features", method=method)
    with pytest.raises(anycam.InputError, match=r"(?s)'image'.*\b1\b.*'meta'.*\b3\b"):
        explainer.explain(uneven, target=1)
    with pytest.raises(anycam.InputError, match=r"(?s)\b1\b.*\b3\b"):
        explainer.explain([inputs["image"][:1], inputs["meta"]], target=1)
