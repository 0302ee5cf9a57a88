"""Explains the Keras demo net on the Keras backend named by KERAS_BACKEND; run by test_keras_backends.py.

``python -m tests.parity.keras_maps CASES.npz OUT.npz``: the test writes the weights, the batch
and the targets to ``CASES.npz``; this script builds the same Functional model (and a subclassed
model that nests it) from them, explains every case with the one call a user writes,
``anycam.Explainer(model, layer, method=...)``, and writes each case's ``cam``, ``heatmap``,
``scores`` and ``target`` to ``OUT.npz``, plus which backend and adapter were picked and which
frameworks the process imported. Keras fixes its backend at import, hence one process each.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import keras
import numpy as np
from anycam.backends._keras.demo import build_demo_model

import anycam
from anycam import core
from anycam.explain.assembly import explanation

LAYERS = {"stage1": "stage1", "stage3": "stage3", "two": ["stage2", "stage3"]}


class Wrapped(keras.Model):
    """A subclassed model: ``scale`` (layer name ``times_two``), then the Functional demo net."""

    def __init__(self, backbone: keras.Model) -> None:
        super().__init__(name="wrapped")
        self.scale = keras.layers.Rescaling(2.0, name="times_two")
        self.backbone = backbone

    def call(self, inputs, training=None):  # type: ignore[no-untyped-def]
        return self.backbone(self.scale(inputs), training=training)


def two_inputs() -> keras.Model:
    """An image branch (conv "features") and a metadata branch, as a dict-input Functional model."""
    image = keras.Input((16, 16, 1), name="image")
    meta = keras.Input((4,), name="meta")
    features = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="features")(image)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    joined = keras.layers.Concatenate(name="join")([pooled, keras.layers.Dense(5, name="meta_dense")(meta)])
    return keras.Model({"image": image, "meta": meta}, keras.layers.Dense(3, name="fc")(joined))


def targets(data: np.lib.npyio.NpzFile) -> dict[str, object]:
    score_weights = keras.ops.convert_to_tensor(data["score_weights"])
    return {
        "argmax": None,
        "int": 3,
        "per_sample": data["per_sample"].tolist(),
        "k_per_sample": data["k_per_sample"],
        "top_k": anycam.top_k(2),
        # keras.ops runs on whichever framework Keras runs on: one callable for all three.
        "callable": lambda out: keras.ops.sum(out * score_weights, axis=1),
    }


def on_host(explained: anycam.Explanation) -> anycam.Explanation:
    """A native Explanation with its arrays as NumPy, after checking they are the framework's."""
    fields = ("heatmap", "cam", "weights", "scores")
    arrays = {name: getattr(explained, name) for name in fields if getattr(explained, name) is not None}
    assert all(keras.ops.is_tensor(a) and not isinstance(a, np.ndarray) for a in arrays.values()), arrays
    host = {name: keras.ops.convert_to_numpy(a) for name, a in arrays.items()}
    return dataclasses.replace(explained, **host)


def main(cases: str, out: str) -> None:
    data = np.load(cases)
    weights = {key[len("w/") :]: data[key] for key in data.files if key.startswith("w/")}
    model = build_demo_model(weights)
    x = data["x"]
    results: dict[str, np.ndarray] = {}

    def record(case: str, explanation: anycam.Explanation) -> None:
        results[f"{case}/cam"] = explanation.cam
        results[f"{case}/heatmap"] = explanation.heatmap
        results[f"{case}/scores"] = explanation.scores
        if explanation.target is not None:
            results[f"{case}/target"] = explanation.target

    picked = set()
    forms = targets(data)
    # The capture is what differs between frameworks (the method math is the core's): every
    # target form with and without gradients, every method once, more layer specs with one.
    cases = [(method, form, "stage3") for method in ("gradcam", "eigencam") for form in forms]
    cases += [
        (method, "top_k", "stage3")
        for method in core.METHODS
        if method not in ("gradcam", "eigencam", *core.methods.ATTENTION_METHODS)
    ]
    cases += [("gradcam", form, label) for form in ("argmax", "k_per_sample") for label in ("stage1", "two")]
    for method, form, label in cases:
        explainer = anycam.Explainer(model, LAYERS[label], method=method)
        picked.add((explainer.backend.name, type(explainer.backend).__name__))
        record(f"{method}/{form}/{label}", explainer.explain(x, forms[form]))
    # arrays="native": the core on the framework's own arrays (issue 21), every method and form
    # at stage3; the test compares them with the NumPy mode's above and across backends.
    for method, form, label in cases:
        if label == "stage3":
            native = anycam.Explainer(model, label, method=method, arrays="native").explain(x, forms[form])
            record(f"native/{method}/{form}/{label}", on_host(native))
    nested = Wrapped(model)
    nested(x[:1])
    for layer in ("demo_net_2d/stage3", "stage2", "scale"):
        record(f"nested/{layer}", anycam.Explainer(nested, layer).explain(x))
    results["predict"] = anycam.Explainer(model, "stage3").backend.predict(x)
    # A real architecture: keras.applications.MobileNetV2 with the test's weights.
    application = keras.applications.MobileNetV2(alpha=0.35, weights=None, input_shape=(64, 64, 3), classes=10)
    application.set_weights([data[f"app/{i}"] for i in range(len(application.weights))])
    for form in ("argmax", "top_k"):
        explained = anycam.Explainer(application, "out_relu").explain(data["app_x"], forms[form])
        record(f"app/{form}", explained)
    # Several inputs, as Keras takes them: a dict by name, a list in the order of model.inputs.
    joint = two_inputs()
    joint.set_weights([data[f"two/{i}"] for i in range(len(joint.weights))])
    inputs = {"image": data["two_image"], "meta": data["two_meta"]}
    record("two/dict", anycam.Explainer(joint, "features").explain(inputs, forms["top_k"]))
    ordered = [inputs[tensor.name] for tensor in joint.inputs]
    record("two/list", anycam.Explainer(joint, "pool:input").explain(ordered))
    try:
        anycam.Explainer(joint, "features").explain({"image": data["two_image"], "extra": data["two_meta"]})
        refused = "accepted"
    except anycam.InputError as exc:
        refused = str(exc)
    chosen = anycam.Explainer(application, "auto")
    record("app/auto", chosen.explain(data["app_x"]))
    # Before the sanity-check part: Keras's own get_config imports TensorFlow where it is installed.
    imported = sorted(name for name in ("tensorflow", "torch", "jax") if name in sys.modules)
    # The sanity check's randomised copies: same layers listed, the copy's maps differ.
    explainer = anycam.Explainer(model, "stage3")
    results["parameter_layers"] = np.array(explainer.backend.parameter_layers())
    copy = explainer.backend.randomized(["fc", "stage3_block_conv2"], seed=1)
    argmax = core.parse_target(None)
    results["randomized/cam"] = explanation(explainer, copy.capture(x, argmax), argmax).cam
    results["randomized/unchanged"] = explainer.explain(x).cam
    info = {
        "keras_backend": keras.config.backend(),
        "picked": sorted(picked),
        "imported": imported,
        "app_auto": list(chosen.layer_names),
        "refused": refused,
    }
    results["info"] = np.array(json.dumps(info))
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
