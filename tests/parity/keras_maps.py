"""Explains the Keras demo net on the Keras backend named by KERAS_BACKEND; run by test_keras_backends.py.

``python -m tests.parity.keras_maps CASES.npz OUT.npz``: the test writes the weights, the batch
and the targets to ``CASES.npz``; this script builds the same Functional model (and a subclassed
model that nests it) from them, explains every case with the one call a user writes,
``anycam.Explainer(model, layer, method=...)``, and writes each case's ``cam``, ``heatmap``,
``scores`` and ``target`` to ``OUT.npz``, plus which backend and adapter were picked and which
frameworks the process imported. Keras fixes its backend at import, hence one process each.
"""

from __future__ import annotations

import json
import sys

import keras
import numpy as np
from anycam.backends.demo_keras import build_demo_model

import anycam
from anycam import core

LAYERS = {"stage1": "stage1", "stage3": "stage3", "two": ["stage2", "stage3"]}


class Wrapped(keras.Model):
    """A subclassed model: ``scale`` (layer name ``times_two``), then the Functional demo net."""

    def __init__(self, backbone: keras.Model) -> None:
        super().__init__(name="wrapped")
        self.scale = keras.layers.Rescaling(2.0, name="times_two")
        self.backbone = backbone

    def call(self, inputs, training=None):  # type: ignore[no-untyped-def]
        return self.backbone(self.scale(inputs), training=training)


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
    cases += [(method, "top_k", "stage3") for method in core.METHODS if method not in ("gradcam", "eigencam")]
    cases += [("gradcam", form, label) for form in ("argmax", "k_per_sample") for label in ("stage1", "two")]
    for method, form, label in cases:
        explainer = anycam.Explainer(model, LAYERS[label], method=method)
        picked.add((explainer.backend.name, type(explainer.backend).__name__))
        record(f"{method}/{form}/{label}", explainer.explain(x, forms[form]))
    nested = Wrapped(model)
    nested(x[:1])
    for layer in ("demo_net_2d/stage3", "stage2", "scale"):
        record(f"nested/{layer}", anycam.Explainer(nested, layer).explain(x))
    results["predict"] = anycam.Explainer(model, "stage3").backend.predict(x)
    # Before the sanity-check part: Keras's own get_config imports TensorFlow where it is installed.
    imported = sorted(name for name in ("tensorflow", "torch", "jax") if name in sys.modules)
    # The sanity check's randomised copies: same layers listed, the copy's maps differ.
    explainer = anycam.Explainer(model, "stage3")
    results["parameter_layers"] = np.array(explainer.backend.parameter_layers())
    copy = explainer.backend.randomized(["fc", "stage3_block_conv2"], seed=1)
    argmax = core.parse_target(None)
    results["randomized/cam"] = explainer._explanation(copy.capture(x, argmax), argmax).cam
    results["randomized/unchanged"] = explainer.explain(x).cam
    info = {
        "keras_backend": keras.config.backend(),
        "picked": sorted(picked),
        "imported": imported,
    }
    results["info"] = np.array(json.dumps(info))
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
