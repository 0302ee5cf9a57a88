"""Keras 3 on TensorFlow, the attention methods against inference (run from ``bench_attention``).

A ViT-B/16-shaped functional Keras model built from ``MultiHeadAttention`` (Keras uses its fused
``dot_product_attention`` at dropout 0), NHWC input. Baselines: the model called in one
``tf.function`` (inference), and one ``tf.function`` with a tape taking the top score's
gradient to the input (forward+backward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from .bench_attention import memory_of, report, vit_shape
from .timing import DeviceUnavailable


def build(quick: bool) -> tuple[Any, np.ndarray]:
    import keras

    s = vit_shape(quick)
    width, heads, grid = s["width"], s["heads"], s["side"] // s["patch"]
    tokens = 1 + grid * grid

    class Tokens(keras.layers.Layer):
        def build(self, input_shape: Any) -> None:
            init = keras.initializers.RandomNormal(stddev=0.02, seed=1)
            self.cls = self.add_weight(shape=(1, 1, width), initializer=init, name="cls")
            self.pos = self.add_weight(shape=(1, tokens, width), initializer=init, name="pos")

        def call(self, x: Any) -> Any:
            cls = keras.ops.broadcast_to(self.cls, (keras.ops.shape(x)[0], 1, width))
            return keras.ops.concatenate([cls, x], axis=1) + self.pos

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((s["side"], s["side"], 3))
    x = layers.Conv2D(width, s["patch"], strides=s["patch"], name="embed")(inputs)
    x = Tokens(name="tokens")(layers.Reshape((grid * grid, width))(x))
    for i in range(s["blocks"]):
        h = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln1")(x)
        h = layers.MultiHeadAttention(heads, width // heads, name=f"block{i}_attn")(h, h)
        x = layers.Add()([x, h])
        h = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln2")(x)
        h = layers.Dense(s["mlp"], activation="gelu", name=f"block{i}_fc1")(h)
        x = layers.Add()([x, layers.Dense(width, name=f"block{i}_fc2")(h)])
    x = layers.LayerNormalization(epsilon=1e-6, name="ln")(x[:, 0])
    model = keras.Model(inputs, layers.Dense(s["classes"], name="head")(x))
    images = np.random.default_rng(0).normal(size=(s["batch"], s["side"], s["side"], 3)).astype(np.float32)
    return model, images


def calls(model: Any, images: np.ndarray) -> dict[str, Callable[[np.ndarray], object]]:
    """The four cases as functions of the input (one set of compiled functions and Explainers)."""
    import anycam

    spec = [tf.TensorSpec((None, *images.shape[1:]), tf.float32)]  # one trace for any batch
    forward = tf.function(lambda x: model(x, training=False), input_signature=spec)

    @tf.function(input_signature=spec)
    def forward_backward(x: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(x)
            top = tf.reduce_sum(tf.reduce_max(model(x, training=False), axis=1))
        return tape.gradient(top, x)

    rollout = anycam.Explainer(model, None, method="rollout")
    grad = anycam.Explainer(model, None, method="attention-grad")
    return {
        "inference": lambda data: forward(tf.constant(data)).numpy(),
        "forward+backward": lambda data: forward_backward(tf.constant(data)).numpy(),
        "rollout": lambda data: rollout.explain(data).heatmap,
        "attention-grad": lambda data: grad.explain(data).heatmap,
    }


def memory_case(case: str, quick: bool) -> int:
    """The peak resident memory (bytes) one call of ``case`` adds, in this fresh interpreter.

    TensorFlow's allocator keeps its blocks, so the warm-up (tracing, compiling) runs on one
    sample and the measured call on the batch, through the same compiled functions.
    """
    from .timing import peak_of

    model, images = build(quick)
    fn = calls(model, images)[case]
    return peak_of(lambda: fn(images), warmup=lambda: fn(images[:1]))


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    if device != "cpu" and not tf.config.list_physical_devices("GPU"):
        raise DeviceUnavailable("TensorFlow sees no GPU")
    s = vit_shape(quick)
    memory = memory_of("bench_attention_keras", quick) if device == "cpu" else {}
    model, images = build(quick)
    name = ("ViT-B/16-shaped" if not quick else "tiny ViT") + f" {s['side']}², Keras MultiHeadAttention (TF)"
    cases = {case: (lambda fn=fn: fn(images)) for case, fn in calls(model, images).items()}
    return report("keras-tf", name, s["batch"], cases, s["repeats"], memory)
