"""TTAExplainer and explain_dataset on the tensorflow demo model (channels-last inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow  # noqa: F401  (a broken install fails here, never skips)
from anycam.backends.tensorflow.demo import build_demo_model

import anycam
from anycam.demo.data import load_demo

pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def setup():
    demo = load_demo()
    explainer = anycam.Explainer(build_demo_model(demo["weights"]), "stage3")
    return explainer, np.ascontiguousarray(demo["images"][:4].transpose(0, 2, 3, 1))


def test_identity_view_is_exact_and_a_flipped_input_gives_the_flipped_map(setup):
    explainer, images = setup
    assert explainer.backend.input_layout == "channels_last"
    np.testing.assert_array_equal(anycam.TTAExplainer(explainer)(images), explainer(images))
    tta = anycam.TTAExplainer(explainer, scales=(1.0, 0.75), flip=True)  # each size compiles once
    mirrored = np.ascontiguousarray(images[:, :, ::-1])  # (N, H, W, C): the width is axis 2
    np.testing.assert_allclose(tta(mirrored, target=3), tta(images, target=3)[..., ::-1], atol=1e-6)


def test_the_dataset_runner_yields_the_explainer_maps(setup):
    explainer, images = setup
    results = list(anycam.explain_dataset(explainer, [images[:2], images[2:]], fields=("heatmap", "target")))
    # Against the explainer on the same batches: TensorFlow's CPU convolutions block their float32
    # sums by batch size, so one batch of 4 differs from two of 2 in the last bit (3e-8, seen on a
    # fresh machine). Batch for batch, the runner must give the explainer's maps exactly.
    expected = np.concatenate([explainer(images[:2]), explainer(images[2:])])
    np.testing.assert_array_equal(np.concatenate([r["heatmap"] for r in results]), expected)
    np.testing.assert_array_equal(np.concatenate([r["target"] for r in results]), explainer.explain(images).target)
