"""TensorFlow/Keras 3: anycam against a compiled forward, the seed's ``make_gradcam_heatmap`` and tf-keras-vis.

``keras.applications.ResNet50(weights=None)`` (random weights, no download; they do not change
the cost), batch 8, 224×224, CPU. All cases are measured in one run, interleaved, as medians.
tf-keras-vis's ``Gradcam`` (which returns maps at input resolution, min-max normalised) is
measured in the same run where it imports; ``nox -s bench`` installs it.
``python -m tests.benchmarks tensorflow`` or ``python -m tests.benchmarks.bench_tensorflow``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

import anycam
from anycam.explain.assembly import explanation

from .timing import DeviceUnavailable, interleaved, memory_row, peak_in_subprocess, peak_of, phase_rows, row

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


def _setup(quick: bool, batch: int | None = None) -> tuple[keras.Model, tf.Tensor, int, str]:
    keras.utils.set_random_seed(0)
    size, default_batch, repeats = (32, 2, 2) if quick else (224, 8, 5)
    if quick:
        model, name = tiny_model(size), "tiny CNN (quick)"
    else:
        model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classifier_activation=None)
        name = "ResNet50 (keras.applications, weights=None)"
    shape = (batch or default_batch, size, size, 3)
    return model, tf.constant(np.random.default_rng(0).uniform(size=shape), tf.float32), repeats, name


def _compiled_forward(model: keras.Model, size: int) -> Callable[[tf.Tensor], tf.Tensor]:
    return tf.function(
        lambda images: model(images, training=False),
        input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)],
    )


def _scope(device: str) -> contextlib.AbstractContextManager:
    if device == "cpu":
        return contextlib.nullcontext()
    if not tf.config.list_physical_devices("GPU"):
        raise DeviceUnavailable(f"TensorFlow {tf.__version__} sees no GPU")
    return tf.device("/GPU:0")


def memory_case(case: str, quick: bool) -> int:
    """The peak resident memory (bytes) one call of ``case`` adds, after a warm-up call."""
    model, x, _, _ = _setup(quick)
    sample = x[:1]  # traces the same signatures (the batch axis is open), allocates little
    if case == "forward":
        forward = _compiled_forward(model, x.shape[1])
        return peak_of(lambda: forward(x).numpy(), warmup=lambda: forward(sample).numpy())
    explainer = anycam.Explainer(model, LAYER)
    return peak_of(lambda: explainer(x), warmup=lambda: explainer(sample))


def _keras_vis(model: keras.Model, x: tf.Tensor) -> tuple[dict[str, Callable[[], object]], list[str]]:
    try:
        from tf_keras_vis.gradcam import Gradcam
        from tf_keras_vis.utils.scores import CategoricalScore
    except Exception as exc:  # any import failure: the peer is skipped with its reason
        return {}, [f"tf-keras-vis: {type(exc).__name__}: {exc}"]
    # clone=False: the benchmark model already has a linear head; cloning once would not
    # change the per-call cost.
    gradcam = Gradcam(model, clone=False)

    def case() -> object:
        classes = np.argmax(model(x, training=False).numpy(), axis=1)
        return gradcam(CategoricalScore(list(classes)), x, penultimate_layer=LAYER)

    return {"tf-keras-vis Gradcam": case}, []


def _copier(shapes: Sequence[tuple[int, ...]]) -> Callable[[], object]:
    tensors = [tf.random.normal(shape) for shape in shapes]
    # What the adapter does to every captured tensor (a view on a CPU, a copy off an accelerator).
    return lambda: [np.asarray(np.asarray(t), dtype=np.float32) for t in tensors]


def phases(
    quick: bool = False, device: str = "cpu", batch: int | None = None, repeats: int | None = None
) -> list[dict]:
    """Where a Grad-CAM call's time goes (forward, tapping, gradients, copy, core) at the last stage."""
    with _scope(device):
        model, x, default_repeats, name = _setup(quick, batch)
        repeats = repeats or default_repeats
        forward = _compiled_forward(model, x.shape[1])
        explainer = anycam.Explainer(model, LAYER)
        return phase_rows(
            "tensorflow",
            name + ("" if device == "cpu" else f", {device}"),
            x.shape[0],
            forward=lambda: forward(x).numpy(),
            explainer=explainer,
            inputs=x,
            copier=_copier,
            repeats=repeats,
        )


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    with _scope(device):
        return _run(quick, device)


def _run(quick: bool, device: str) -> list[dict]:
    memory = device == "cpu"
    mem = (
        {case: peak_in_subprocess("bench_tensorflow", case, (quick,)) for case in ("forward", "gradcam")}
        if memory
        else {}
    )
    model, x, repeats, name = _setup(quick)
    name += "" if device == "cpu" else f", {device}"
    size, batch = x.shape[1], x.shape[0]
    explainer = anycam.Explainer(model, LAYER)
    earlier = "conv4_block6_out" if not quick else None
    explainer_earlier = anycam.Explainer(model, earlier) if earlier else None
    top10 = anycam.top_k(10)
    forward = _compiled_forward(model, size)
    peers, skipped = _keras_vis(model, x)
    for reason in skipped:
        print(f"skipped peer {reason}", flush=True)

    cases = {
        "forward": lambda: forward(x).numpy(),
        "gradcam": lambda: explainer(x),
        "k10": lambda: explainer(x, target=top10),
        "seed": lambda: seed_per_image(model, x),
        **peers,
    }
    if explainer_earlier is not None:
        cases["earlier"] = lambda: explainer_earlier(x)
        cases["earlier k10"] = lambda: explainer_earlier(x, target=top10)
    times = interleaved(cases, repeats)
    spec = anycam.core.parse_target(None)
    capture = explainer.backend.capture(x, spec)
    core_time = interleaved({"core": lambda: explanation(explainer, capture, spec)}, repeats)["core"]

    base, label = times["forward"], "tf.function forward"
    rows = [
        row("tensorflow", name, f"Grad-CAM {LAYER}", batch, times["gradcam"], label, base),
        row(
            "tensorflow",
            name,
            f"Grad-CAM {LAYER}, K=10 maps per sample (top_k(10))",
            batch,
            times["k10"],
            f"one map ({LAYER})",
            times["gradcam"],
        ),
    ]
    if earlier:
        rows.append(row("tensorflow", name, f"Grad-CAM {earlier}", batch, times["earlier"], label, base))
        rows.append(
            row(
                "tensorflow",
                name,
                f"Grad-CAM {earlier}, K=10 maps per sample (top_k(10))",
                batch,
                times["earlier k10"],
                f"one map ({earlier})",
                times["earlier"],
            )
        )
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
    for peer in peers:
        rows.append(
            row(
                "tensorflow",
                name,
                f"peer: {peer} ({LAYER})",
                batch,
                times[peer],
                f"anycam Grad-CAM {LAYER}",
                times["gradcam"],
            )
        )
    if memory:
        rows.append(
            memory_row(
                "tensorflow", name, f"Grad-CAM {LAYER}", batch, mem["gradcam"], "compiled forward", mem["forward"]
            )
        )
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
