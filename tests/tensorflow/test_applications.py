"""Real architectures: ``keras.applications`` nets at their last conv layer, against a plain tape.

Randomly initialised (``weights=None``, no download), 64 × 64 inputs (the smallest size at
which their last stage keeps a 2 × 2 map), batch 2, 10 classes. The reference is the Keras
Grad-CAM example's own recipe, independent of anycam's interception: a sub-model
``keras.Model(model.inputs, [layer.output, model.output])`` under a ``GradientTape``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import anycam

pytestmark = pytest.mark.tensorflow

# The output of each model's last convolutional stage, after its activation: the layer the Keras
# Grad-CAM example explains. ConvNeXt's last stage ends in a residual sum that is no layer, so
# it is the input of the global pooling (``"<layer>:input"``).
ZOO = {
    "ResNet50": "conv5_block3_out",
    "MobileNetV2": "out_relu",
    "EfficientNetB0": "top_activation",
    "DenseNet121": "relu",
    "ConvNeXtTiny": "convnext_tiny_head_gap:input",
}


def tape_gradcam(model: keras.Model, layer: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (raw Grad-CAM ``(N, h, w)``, argmax classes) by a sub-model and a GradientTape."""
    name, _, port = layer.partition(":")
    tensor = model.get_layer(name).input if port == "input" else model.get_layer(name).output
    split = keras.Model(model.input, [tensor, model.output])
    with tf.GradientTape() as tape:
        activations, outputs = split(x, training=False)
        classes = tf.argmax(outputs, axis=1)
        scores = tf.gather(outputs, classes[:, None], batch_dims=1)
    gradients = tape.gradient(scores, activations)
    alpha = tf.reduce_mean(gradients, axis=(1, 2))  # (N, C), channels last
    cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", activations, alpha))
    return cam.numpy(), classes.numpy()


@pytest.mark.parametrize("name", list(ZOO))
def test_application_matches_a_plain_tape(name: str) -> None:
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=10)
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 64, 64, 3)).astype(np.float32)
    expected, classes = tape_gradcam(model, ZOO[name], x)
    result = anycam.Explainer(model, ZOO[name]).explain(x)
    assert result.cam.shape == (2, 2, 2) and expected.shape == (2, 2, 2)
    np.testing.assert_array_equal(result.target, classes)
    scale = max(float(np.abs(expected).max()), 1e-12)
    assert scale > 0, "a dead reference map checks nothing"
    np.testing.assert_allclose(result.cam / scale, expected / scale, atol=1e-5)
    assert result.heatmap.shape == (2, 64, 64)
