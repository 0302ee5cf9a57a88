"""Captures the Keras ViT's attention on the backend KERAS_BACKEND names; run by test_attention_keras_backends.py.

``python -m tests.parity.attention_keras_run WEIGHTS.npz OUT.npz``: builds the ViT below, loads
the weights the test wrote (``arr_i`` in the order of ``model.get_weights()``), and writes the
attention capture (probabilities, ∂score/∂A for an ``(N, K)`` target), the rollout and
attention-grad maps for ``top_k(2)``, and the model's own output next to the explicit form's.
Keras fixes its backend at import, hence one process per backend.
"""

from __future__ import annotations

import sys
from typing import Any

import keras
import numpy as np

import anycam
from anycam.core import parse_target

DIM, HEADS, BLOCKS, CLASSES, PATCH, SIDE = 16, 2, 2, 5, 4, 16
TOKENS = 1 + (SIDE // PATCH) ** 2
PICKED = np.array([[0, 3], [1, 2], [4, 4]])


def _gelu(x: Any) -> Any:
    return keras.activations.gelu(x, approximate=True)


class Tokens(keras.layers.Layer):
    """Prepends a learned class token and adds learned positions."""

    def build(self, input_shape: Any) -> None:
        init = keras.initializers.RandomNormal(stddev=1.0, seed=3)
        self.cls = self.add_weight(shape=(1, 1, DIM), initializer=init, name="cls")
        self.pos = self.add_weight(shape=(1, TOKENS, DIM), initializer=init, name="pos")

    def call(self, x: Any) -> Any:
        cls = keras.ops.broadcast_to(self.cls, (keras.ops.shape(x)[0], 1, DIM))
        return keras.ops.concatenate([cls, x], axis=1) + self.pos


def keras_vit(seed: int = 0) -> Any:
    """A small ViT of Keras 3 layers: conv patch embedding, class token, 2 MultiHeadAttention blocks."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((SIDE, SIDE, 3))
    x = layers.Conv2D(DIM, PATCH, strides=PATCH, name="embed")(inputs)
    x = Tokens(name="tokens")(layers.Reshape(((SIDE // PATCH) ** 2, DIM))(x))
    for i in range(BLOCKS):
        h = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln1")(x)
        h = layers.MultiHeadAttention(HEADS, DIM // HEADS, name=f"block{i}_attn")(h, h)
        x = layers.Add()([x, h])
        h = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln2")(x)
        h = layers.Dense(2 * DIM, name=f"block{i}_fc1")(h)
        h = layers.Dense(DIM, name=f"block{i}_fc2")(layers.Activation(_gelu)(h))
        x = layers.Add()([x, h])
    x = layers.LayerNormalization(epsilon=1e-6, name="ln")(x[:, 0])
    return keras.Model(inputs, layers.Dense(CLASSES, name="head")(x))


def main(weights: str, out: str) -> None:
    model = keras_vit()
    with np.load(weights) as data:
        model.set_weights([data[f"arr_{i}"] for i in range(len(data.files) - 1)])
        x = data["x"]
    explainer = anycam.Explainer(model, None, method="attention-grad")
    capture = explainer.backend.attention_capture(x, parse_target(PICKED), gradients=True)
    results: dict[str, Any] = {"adapter": np.array(type(explainer.backend).__name__), "scores": capture.scores}
    for i, (a, g) in enumerate(zip(capture.attentions, capture.gradients or (), strict=True)):
        results[f"attention/{i}"], results[f"gradient/{i}"] = a, g
    for method in ("rollout", "attention-grad"):
        results[f"{method}/cam"] = anycam.Explainer(model, None, method=method).explain(x, anycam.top_k(2)).cam
    auto = anycam.Explainer(model, None).explain(x, anycam.top_k(2))  # Grad-CAM, the token rule's layer
    results["auto/layer"], results["auto/cam"] = np.array(auto.layer), auto.cam
    named = anycam.Explainer(model, "block1_ln1", layout="tokens").explain(x, anycam.top_k(2))
    results["named/cam"] = named.cam
    results["own"] = keras.ops.convert_to_numpy(model(x, training=False))
    explicit = explainer.backend.attention_capture(x, parse_target(lambda out: out), gradients=False)
    results["explicit"] = explicit.scores
    np.savez(out, **results)


if __name__ == "__main__":
    main(*sys.argv[1:3])
