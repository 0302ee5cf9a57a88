"""TensorFlow/Keras 3, the methods beyond one capture: Ablation-CAM, Guided Grad-CAM, Score-CAM.

* Ablation-CAM and Guided Grad-CAM on ``keras.applications.ResNet50(weights=None)`` at its last
  stage (``conv5_block3_out``), batch 8 at 224², CPU: Ablation-CAM against a ``tf.function``
  forward (the layer is read only by ``avg_pool``, so ``ablation_head`` takes the closed form:
  one capture, then the 2048→1000 dense as z − p_k W_k in NumPy and the tail, here only the
  class gather, on the 8·2048 feature rows; no ablated copy of the layer runs through the
  network), Guided Grad-CAM against a ``tf.function`` forward plus a full input-gradient
  backward.
* Score-CAM on a narrower ResNet-50-shaped Functional model defined here (width 16, 512
  channels at ``layer4``, one 224² image) at ``batch_size=16``, against the floor: a
  ``tf.function`` forward over the same 512 masked images in chunks of 16 written by hand. Its
  peak memory, in fresh interpreters, is compared with that of one forward of a 16-image chunk.

``python -m tests.benchmarks tensorflow_methods``.
"""

from __future__ import annotations

import gc

import keras
import numpy as np
import tensorflow as tf

import anycam

from .timing import _high_water_mark, interleaved, memory_row, peak_in_subprocess, row, rss

LAYER = "conv5_block3_out"
SCORECAM_BATCH = 16


def narrow_resnet50(size: int, width: int, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> keras.Model:
    """A ResNet-50-shaped Functional model (bottlenecks, BatchNorm) of any width; ``layer4`` is its last stage."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(width, 7, strides=2, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same")(x)
    for stage, count in enumerate(blocks):
        planes = width * 2**stage
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            shortcut = x
            if stride != 1 or x.shape[-1] != planes * 4:
                shortcut = keras.layers.Conv2D(planes * 4, 1, strides=stride, use_bias=False)(x)
                shortcut = keras.layers.BatchNormalization()(shortcut)
            y = keras.layers.ReLU()(
                keras.layers.BatchNormalization()(keras.layers.Conv2D(planes, 1, use_bias=False)(x))
            )
            y = keras.layers.Conv2D(planes, 3, strides=stride, padding="same", use_bias=False)(y)
            y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
            y = keras.layers.BatchNormalization()(keras.layers.Conv2D(planes * 4, 1, use_bias=False)(y))
            last = stage == len(blocks) - 1 and index == count - 1
            x = keras.layers.ReLU(name="layer4" if last else None)(keras.layers.Add()([y, shortcut]))
    outputs = keras.layers.Dense(1000)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def _scorecam_config(quick: bool) -> tuple[int, int, int]:
    return (8, 64, 1) if quick else (16, 224, 1)


def _scorecam_setup(quick: bool) -> tuple[keras.Model, tf.Tensor]:
    keras.utils.set_random_seed(0)
    width, size, batch = _scorecam_config(quick)
    model = narrow_resnet50(size, width, (1, 1, 1, 1) if quick else (3, 4, 6, 3))
    return model, tf.constant(np.random.default_rng(0).uniform(size=(batch, size, size, 3)), tf.float32)


def memory_case(case: str, quick: bool) -> int:
    """Returns the peak resident memory (bytes) one Score-CAM call (or one chunk's forward) adds.

    Warmed up on smaller work (one image's forward; Score-CAM of one channel), not on the same
    call: TensorFlow's allocator keeps the blocks of a call, and a repeat of the same call would
    report almost nothing.
    """
    model, x = _scorecam_setup(quick)
    forward = tf.function(lambda images: model(images, training=False))
    chunk = tf.repeat(x, SCORECAM_BATCH, axis=0)
    if case == "forward":  # one chunk's forward: what Score-CAM's peak should be bounded by
        warm, call = (lambda: forward(x).numpy()), (lambda: forward(chunk).numpy())
    else:
        options = {"method": "scorecam", "batch_size": SCORECAM_BATCH, "progress": False}
        one = anycam.Explainer(model, "layer4", scorecam_top_k=1, **options)
        warm, call = (lambda: one(x)), (lambda: anycam.Explainer(model, "layer4", **options)(x))
    warm()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = rss()
    call()
    return _high_water_mark() - before


def run(quick: bool = False) -> list[dict]:
    mem = {case: peak_in_subprocess("bench_tensorflow_methods", case, (quick,)) for case in ("forward", "scorecam")}
    rows: list[dict] = []
    keras.utils.set_random_seed(0)
    size, batch, repeats = (32, 2, 2) if quick else (224, 8, 3)
    if quick:
        model, layer, name = narrow_resnet50(size, 8, (1, 1, 1, 1)), "layer4", "narrow ResNet (quick)"
    else:
        model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classifier_activation=None)
        layer, name = LAYER, "ResNet50 (keras.applications, weights=None)"
    x = tf.constant(np.random.default_rng(0).uniform(size=(batch, size, size, 3)), tf.float32)
    signature = [tf.TensorSpec((None, size, size, 3), tf.float32)]
    forward = tf.function(lambda images: model(images, training=False), input_signature=signature)

    @tf.function(input_signature=signature)
    def input_gradient(images: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(images)
            out = model(images, training=False)
            score = tf.reduce_sum(tf.reduce_max(out, axis=1))
        return tape.gradient(score, images)

    ablation = anycam.Explainer(model, layer, method="ablationcam", progress=False)
    guided = anycam.Explainer(model, layer, method="guided-gradcam")
    times = interleaved(
        {
            "forward": lambda: forward(x).numpy(),
            "ablationcam": lambda: ablation(x),
            "input gradient": lambda: input_gradient(x).numpy(),
            "guided-gradcam": lambda: guided(x),
        },
        repeats,
    )
    rows.append(
        row(
            "tensorflow",
            name,
            f"Ablation-CAM {layer}",
            batch,
            times["ablationcam"],
            "tf.function forward",
            times["forward"],
        )
    )
    rows.append(
        row(
            "tensorflow",
            name,
            f"Guided Grad-CAM {layer}",
            batch,
            times["guided-gradcam"],
            "tf.function forward + full input-gradient backward",
            times["input gradient"],
        )
    )

    model, x = _scorecam_setup(quick)
    width, size, batch = _scorecam_config(quick)
    name = f"Keras ResNet-50-shaped, width {width}, {size}²"
    chunk_forward = tf.function(lambda images: model(images, training=False))
    explainer = anycam.Explainer(model, "layer4", method="scorecam", batch_size=SCORECAM_BATCH, progress=False)
    capture = explainer.backend.capture(x, anycam.core.parse_target(None), gradients=False)
    channels = capture.activations[0].shape[-1]
    masked = tf.repeat(x, SCORECAM_BATCH, axis=0)  # the floor's inputs: same shapes

    def floor() -> None:
        for _ in range(0, channels, SCORECAM_BATCH):
            chunk_forward(masked).numpy()

    times = interleaved({"scorecam": lambda: explainer(x), "floor": floor}, 1 if quick else 2)
    rows.append(
        row(
            "tensorflow",
            name,
            f"Score-CAM layer4 ({channels} channels), batch_size={SCORECAM_BATCH}",
            batch,
            times["scorecam"],
            f"{channels} masked forwards in tf.function chunks of {SCORECAM_BATCH} (the floor)",
            times["floor"],
        )
    )
    label = f"tf.function forward of one chunk ({SCORECAM_BATCH} images)"
    rows.append(memory_row("tensorflow", name, "Score-CAM", batch, mem["scorecam"], label, mem["forward"]))
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
