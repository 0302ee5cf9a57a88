"""What consumes native outputs in TensorFlow: TTA on the device, the metrics, the dataset runner (issue 21.2).

Oracles: the NumPy mode of the same explainer (TTA), the same values given as NumPy arrays (the
metrics, the runner), and the host-read counter of tests/tensorflow/test_tf_native.py (every
``numpy()`` / ``__array__`` of an eager tensor and every NumPy constructor given one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf

import anycam
from tests.core.test_metrics_native import all_metrics, assert_same, boxes
from tests.tensorflow.test_tf_native import HostReads, batch, network

pytestmark = [pytest.mark.tensorflow, pytest.mark.filterwarnings("ignore::anycam.ZeroMapWarning")]
TTA: dict[str, Any] = {"scales": (1.0, 0.6, 1.5), "flip": True}


@pytest.fixture(scope="module")
def model() -> Any:
    return network()


@pytest.fixture(scope="module")
def any_size() -> Any:
    """The network of test_tf_native.py on inputs of any size (TTA's rescaled views), seeded."""
    keras = tf.keras
    keras.utils.set_random_seed(4)
    return keras.Sequential(
        [
            keras.Input((None, None, 3)),
            keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="features"),
            keras.layers.Conv2D(5, 3, padding="same", activation="tanh", name="mix"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, name="logits"),
        ]
    )


@pytest.mark.parametrize("combine", ["mean", "max"])
def test_native_tta_gives_tf_tensors_equal_to_the_numpy_tta(any_size: Any, combine: str) -> None:
    """Channels-last views (the network takes (N, H, W, C)), rescaled and flipped with TF ops (TF's
    namespace has no flip: the gather path)."""
    x = batch(2)
    host = anycam.TTAExplainer(anycam.Explainer(any_size, "features"), combine=combine, **TTA)
    device = anycam.TTAExplainer(anycam.Explainer(any_size, "features", arrays="native"), combine=combine, **TTA)
    reference = host.explain(x.numpy(), anycam.top_k(2))
    native = device.explain(x, anycam.top_k(2))
    assert isinstance(native.heatmap, tf.Tensor) and native.heatmap.dtype == tf.float32
    assert isinstance(native.cam, tf.Tensor) and isinstance(native.scores, tf.Tensor)
    np.testing.assert_array_equal(native.target, reference.target)
    # float32 against the float64 reference: raw maps to 1e-5 of their own scale, heatmaps to 1e-5.
    scale = np.abs(reference.cam).max(axis=(-2, -1), keepdims=True) + 1e-30
    np.testing.assert_allclose(native.cam.numpy() / scale, reference.cam / scale, atol=1e-5)
    np.testing.assert_allclose(native.heatmap.numpy(), reference.heatmap, atol=1e-5)


def test_native_tta_reads_nothing_but_the_target_indices_to_the_host(any_size: Any) -> None:
    x = batch(3)
    tta = anycam.TTAExplainer(anycam.Explainer(any_size, "features", arrays="native"), **TTA)
    tta.explain(x, anycam.top_k(2))  # compiled outside the count
    with HostReads() as host:
        explanation = tta.explain(x, anycam.top_k(2))
    assert isinstance(explanation.heatmap, tf.Tensor)
    # The (N, K) class indices, read once by the first view (the later views are given them).
    assert host.reads == [("numpy", (2, 2), "int64")]


def test_the_metrics_give_the_numpy_numbers_for_tf_heatmaps(model: Any) -> None:
    x = batch(4).numpy()
    explainer = anycam.Explainer(model, "features", arrays="native")
    explanation = explainer.explain(x)
    regions = boxes(2, 10)
    reference = all_metrics(explainer, x, explanation.heatmap.numpy(), explanation.target, regions)
    assert_same(all_metrics(explainer, x, explanation.heatmap, explanation.target, regions), reference)
    as_tf = (tf.constant(x), explanation, tf.constant(explanation.target), tf.Variable(regions))
    assert_same(all_metrics(explainer, *as_tf), reference)


def test_a_predict_returning_tf_tensors_scores_as_its_numpy_outputs(model: Any) -> None:
    x = batch(5).numpy()
    maps = anycam.Explainer(model, "features")(x)
    want = anycam.metrics.deletion(lambda b: model(b).numpy(), x, maps, 1, steps=4, progress=False, input_layout="nhwc")
    got = anycam.metrics.deletion(lambda b: model(b), x, maps, 1, steps=4, progress=False, input_layout="nhwc")
    np.testing.assert_array_equal(got.curves, want.curves)


def test_the_metrics_refuse_a_symbolic_tensor_clearly() -> None:
    regions = boxes(2, 8)

    @tf.function(autograph=False)  # autograph would wrap the error in its own
    def inside(maps: tf.Tensor) -> tf.Tensor:
        anycam.metrics.energy_pointing_game(maps, regions)
        return maps

    with pytest.raises(anycam.InputError, match="outside a trace"):
        inside(tf.ones((2, 8, 8)))


@pytest.mark.parametrize("with_metrics", [False, True], ids=["no-metrics", "metrics"])
def test_the_runner_reads_each_kept_map_once_and_nothing_else(model: Any, with_metrics: bool) -> None:
    x = batch(6).numpy()
    explainer = anycam.Explainer(model, "features", arrays="native")
    streaming = anycam.StreamingMetrics(explainer, ("energy_pointing_game",)) if with_metrics else None
    data = [{"image": x, "regions": boxes(2, 10)}]
    explainer.explain(x)  # compiled outside the count
    with HostReads() as host:
        results = list(anycam.explain_dataset(explainer, data, fields=("heatmap",), metrics=streaming, progress=False))
    maps = [read for read in host.reads if read[2] == "float32"]
    assert [shape for _, shape, _ in maps] == [(2, 10, 10)], host.reads  # the heatmap, once; no cam
    np.testing.assert_array_equal(results[0]["heatmap"], explainer.explain(x).heatmap.numpy())
