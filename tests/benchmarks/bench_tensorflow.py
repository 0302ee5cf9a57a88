"""TensorFlow/Keras 3: anycam against a compiled forward and the seed's ``make_gradcam_heatmap``.

``keras.applications.ResNet50(weights=None)`` (random weights, no download; they do not change
the cost), batch 8, 224×224, CPU. All cases are measured in one run, interleaved, as medians.
``python -m tests.benchmarks tensorflow`` or ``python -m tests.benchmarks.bench_tensorflow``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import anycam

from .timing import interleaved, row

LAYER = "conv5_block3_out"


def make_gradcam_heatmap(img, model, target_layer_name, pred_index=None):  # type: ignore[no-untyped-def]
    """The seed's code (the Keras example "Grad-CAM class activation visualization"), unchanged
    except for ``model.inputs``/``model.outputs[0]`` where it wrote ``[model.inputs]``/``model.output``
    (same graph; Keras 3 warns about the nested list on every call otherwise).

    Eager, a new sub-model per call, one image: its mean over axis 0 averages the gradients of
    the whole batch and ``[0]`` keeps only the first image's activations.
    """
    grad_model = keras.Model(model.inputs, [model.get_layer(target_layer_name).output, model.outputs[0]])
    with tf.GradientTape() as tape:
        target_layer_output, preds = grad_model(img)
        if pred_index is None:
            pred_index = tf.argmax(preds[0])
        class_channel = preds[:, pred_index]
    grads = tape.gradient(class_channel, target_layer_output)
    pooled_grads = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = target_layer_output[0] @ pooled_grads[..., tf.newaxis]
    heatmap = tf.squeeze(heatmap)
    heatmap = tf.maximum(heatmap, 0) / tf.math.reduce_max(heatmap)
    return heatmap.numpy()


def seed_per_image(model: keras.Model, images: tf.Tensor) -> list[np.ndarray]:
    """The seed's function handles one image: a batch is a loop over its images."""
    return [make_gradcam_heatmap(images[i : i + 1], model, LAYER) for i in range(images.shape[0])]


def tiny_model(size: int) -> keras.Model:
    inputs = keras.Input((size, size, 3))
    hidden = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    hidden = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name=LAYER)(hidden)
    pooled = keras.layers.GlobalAveragePooling2D()(hidden)
    return keras.Model(inputs, keras.layers.Dense(1000)(pooled))


def run(quick: bool = False) -> list[dict]:
    keras.utils.set_random_seed(0)
    size, batch, repeats = (32, 2, 2) if quick else (224, 8, 5)
    if quick:
        model, name = tiny_model(size), "tiny CNN (quick)"
    else:
        model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classifier_activation=None)
        name = "ResNet50 (keras.applications, weights=None)"
    x = tf.constant(np.random.default_rng(0).uniform(size=(batch, size, size, 3)), tf.float32)
    explainer = anycam.Explainer(model, LAYER)
    earlier = "conv4_block6_out" if not quick else None
    explainer_earlier = anycam.Explainer(model, earlier) if earlier else None
    top10 = anycam.top_k(10)
    forward = tf.function(
        lambda images: model(images, training=False),
        input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)],
    )

    cases = {
        "forward": lambda: forward(x).numpy(),
        "gradcam": lambda: explainer(x),
        "k10": lambda: explainer(x, target=top10),
        "seed": lambda: seed_per_image(model, x),
    }
    if explainer_earlier is not None:
        cases["earlier"] = lambda: explainer_earlier(x)
    times = interleaved(cases, repeats)
    spec = anycam.core.parse_target(None)
    capture = explainer.backend.capture(x, spec)
    core_time = interleaved({"core": lambda: explainer._explanation(capture, spec)}, repeats)["core"]

    base, label = times["forward"], "tf.function forward"
    rows = [
        row("tensorflow", name, f"Grad-CAM {LAYER}", batch, times["gradcam"], label, base),
        row(
            "tensorflow",
            name,
            f"Grad-CAM {LAYER}, K=10 maps per sample (top_k(10))",
            batch,
            times["k10"],
            label,
            base,
        ),
    ]
    if earlier:
        rows.append(row("tensorflow", name, f"Grad-CAM {earlier}", batch, times["earlier"], label, base))
    rows += [
        row(
            "tensorflow",
            name,
            f"core math (weights → {size}² heatmap), {LAYER}",
            batch,
            core_time,
            "whole Grad-CAM call",
            times["gradcam"],
        ),
        row(
            "tensorflow",
            name,
            "seed's make_gradcam_heatmap, per image (eager, sub-model per call)",
            batch,
            times["seed"],
            f"anycam Grad-CAM {LAYER}",
            times["gradcam"],
        ),
    ]
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
