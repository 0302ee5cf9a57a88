"""A Keras model forced onto another framework's backend: the error says where it belongs.

Keras runs on TensorFlow in this session; the jax and torch backends are importable here (all
three frameworks are installed), so each refusal comes from that backend's own Keras adapter.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import anycam


@pytest.mark.parametrize(("forced", "framework"), [("jax", "JAX"), ("torch", "PyTorch")])
def test_keras_model_forced_onto_another_frameworks_backend(forced: str, framework: str) -> None:
    assert keras.config.backend() == "tensorflow"
    inputs = keras.Input((8, 8, 3))
    features = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(features)))
    model(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(
        anycam.BackendError,
        match=rf"only when Keras runs on {framework}, but it runs on 'tensorflow'; pass backend='tensorflow'",
    ):
        anycam.Explainer(model, "conv", backend=forced)
