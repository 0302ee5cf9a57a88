"""``anycam explain`` with a Keras model from a factory: channels-last inputs, no C++ log noise."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import anycam

FACTORY = textwrap.dedent(
    """
    import keras
    from anycam.cli import ModelSpec


    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((10, 12, 3))
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        return ModelSpec(keras.Model(inputs, keras.layers.Dense(3, name="dense")(x)), layer="conv", size=(10, 12))


    def bare():
        return build().model
    """
)


@pytest.mark.parametrize("factory", ["build", "bare"])
def test_explain_a_keras_factory_in_a_clean_subprocess(tmp_path: Path, factory: str) -> None:
    # A bare Keras model declares its input size: the photo is resized to it, and the first line says so.
    (tmp_path / "keras_models.py").write_text(FACTORY)
    image = np.random.default_rng(1).integers(0, 256, (15, 18, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    command = [
        sys.executable,
        "-m",
        "anycam",
        "explain",
        "photo.png",
        "--model",
        f"keras_models:{factory}",
        "--out",
        "maps",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # TensorFlow's C++ start-up lines (oneDNN, cpu_feature_guard, absl's preamble) are hidden.
    assert "oneDNN" not in result.stderr and "absl::InitializeLog" not in result.stderr, result.stderr
    assert "cpu_feature_guard" not in result.stderr
    assert "top classes:" in result.stdout
    first = result.stdout.splitlines()[0]
    if factory == "bare":
        assert "bare model" in first and "resized to 10 x 12, the model's input size" in first
    else:
        assert "bare model" not in result.stdout

    # Reference: Grad-CAM with TensorFlow's own tape on the channels-last, resized image.
    sys.modules.pop("keras_models", None)  # each run writes its own file
    sys.path.insert(0, str(tmp_path))
    try:
        import keras_models
    finally:
        sys.path.remove(str(tmp_path))
    model = keras_models.build().model
    resized = np.asarray(Image.fromarray(image).resize((12, 10), Image.Resampling.BILINEAR), dtype=np.float32)
    x = tf.constant((resized / 255.0)[None])
    conv, pool, dense = (model.get_layer(name) for name in ("conv", "pool", "dense"))
    with tf.GradientTape() as tape:
        activations = conv(x)
        tape.watch(activations)
        logits = dense(pool(activations))
        score = tf.reduce_max(logits[0])
    gradients = tape.gradient(score, activations)
    alpha = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(alpha * activations, axis=-1, keepdims=True))
    up = tf.image.resize(cam, (10, 12), method="bilinear", antialias=False).numpy()[0, ..., 0].astype(np.float64)
    heat = (up - up.min()) / (up.max() - up.min())
    expected = anycam.overlay(image, heat.astype(np.float32))
    written = np.asarray(Image.open(tmp_path / "maps" / "photo_gradcam.png"))
    assert written.shape == image.shape
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
