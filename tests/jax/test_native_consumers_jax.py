"""What consumes native outputs in JAX: TTA on the device, the metrics, the dataset runner (issue 21.2).

Oracles: the NumPy mode of the same explainer (TTA), the same values given as NumPy arrays (the
metrics, the runner), and the host-read recorder of tests/jax/test_native_jax.py (every
``np.asarray`` / ``jax.device_get`` / ``_value`` of a JAX array, with its size).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anycam
from tests.core.test_metrics_native import all_metrics, assert_same, boxes
from tests.jax.test_native_jax import host_reads

pytestmark = [pytest.mark.jax, pytest.mark.filterwarnings("ignore::anycam.ZeroMapWarning")]
TTA = {"scales": (1.0, 0.75), "flip": True}


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    from anycam.backends.jax.demo import build_demo_model

    from anycam.demo.data import load_demo

    data = load_demo()
    return build_demo_model(data["weights"]), np.ascontiguousarray(data["images"][:4].transpose(0, 2, 3, 1))


def test_native_tta_gives_jax_arrays_equal_to_the_numpy_tta(demo) -> None:  # type: ignore[no-untyped-def]
    """Channels-last views (the demo model takes (N, H, W, C)), rescaled and flipped with jnp."""
    model, x = demo
    reference = anycam.TTAExplainer(anycam.Explainer(model, "stage3"), **TTA).explain(x, anycam.top_k(2))
    native = anycam.TTAExplainer(anycam.Explainer(model, "stage3", arrays="native"), **TTA).explain(
        jnp.asarray(x), anycam.top_k(2)
    )
    assert isinstance(native.heatmap, jax.Array) and native.heatmap.dtype == jnp.float32
    assert isinstance(native.cam, jax.Array) and isinstance(native.scores, jax.Array)
    np.testing.assert_array_equal(native.target, reference.target)
    # float32 against the float64 reference: raw maps to 1e-5 of their own scale, heatmaps to 1e-5.
    scale = np.abs(reference.cam).max(axis=(-2, -1), keepdims=True) + 1e-30
    np.testing.assert_allclose(np.asarray(native.cam) / scale, reference.cam / scale, atol=1e-5)
    np.testing.assert_allclose(np.asarray(native.heatmap), reference.heatmap, atol=1e-5)


def test_native_tta_reads_nothing_but_the_target_indices_to_the_host(demo, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, x = demo
    x = jnp.asarray(x)
    tta = anycam.TTAExplainer(anycam.Explainer(model, "stage3", arrays="native"), **TTA)
    tta.explain(x, anycam.top_k(2))  # compiled outside the recorder
    with host_reads(monkeypatch) as sizes:
        explanation = tta.explain(x, anycam.top_k(2))
    allowed = 4 * 2  # the (N, K) class indices; booleans are size 1
    assert all(size <= allowed for size in sizes), f"host reads of sizes {sizes} (allowed ≤ {allowed})"
    assert isinstance(explanation.heatmap, jax.Array)


def test_the_metrics_give_the_numpy_numbers_for_jax_heatmaps(demo) -> None:  # type: ignore[no-untyped-def]
    model, x = demo
    explainer = anycam.Explainer(model, "stage3", arrays="native")
    explanation = explainer.explain(x)
    regions = boxes(4, x.shape[1])
    reference = all_metrics(explainer, x, np.asarray(explanation.heatmap), explanation.target, regions)
    assert_same(all_metrics(explainer, x, explanation.heatmap, explanation.target, regions), reference)
    as_jax = (jnp.asarray(x), explanation, jnp.asarray(explanation.target), jnp.asarray(regions))
    assert_same(all_metrics(explainer, *as_jax), reference)


def test_bfloat16_jax_heatmaps_and_a_predict_returning_jax_arrays_are_read_as_numpy(demo) -> None:  # type: ignore[no-untyped-def]
    model, x = demo
    explainer = anycam.Explainer(model, "stage3")
    maps = explainer(x)
    low = jnp.asarray(maps, dtype=jnp.bfloat16)
    regions = boxes(4, x.shape[1])
    want = anycam.metrics.energy_pointing_game(np.asarray(low).astype(np.float32), regions)
    np.testing.assert_array_equal(anycam.metrics.energy_pointing_game(low, regions), want)
    plain = anycam.metrics.deletion(explainer, x, maps, 1, steps=4, progress=False).curves
    jax_outputs = anycam.metrics.deletion(
        lambda images: jnp.asarray(explainer.backend.predict(images)),
        x,
        maps,
        1,
        steps=4,
        progress=False,
        input_layout="channels_last",
    ).curves
    np.testing.assert_array_equal(jax_outputs, plain)


def test_the_metrics_refuse_a_tracer_clearly(demo) -> None:  # type: ignore[no-untyped-def]
    regions = boxes(2, 8)

    @jax.jit
    def inside(maps):  # type: ignore[no-untyped-def]
        anycam.metrics.energy_pointing_game(maps, regions)
        return maps

    with pytest.raises(anycam.InputError, match="outside a trace"):
        inside(jnp.ones((2, 8, 8)))


@pytest.mark.parametrize("with_metrics", [False, True], ids=["no-metrics", "metrics"])
def test_the_runner_reads_each_kept_map_once_and_nothing_else(demo, monkeypatch, with_metrics: bool) -> None:  # type: ignore[no-untyped-def]
    model, x = demo
    explainer = anycam.Explainer(model, "stage3", arrays="native")
    streaming = anycam.StreamingMetrics(explainer, ("energy_pointing_game",)) if with_metrics else None
    data = [{"image": x, "regions": boxes(4, x.shape[1])}]
    explainer.explain(x)  # compiled outside the recorder
    with host_reads(monkeypatch) as sizes:
        results = list(anycam.explain_dataset(explainer, data, fields=("heatmap",), metrics=streaming, progress=False))
    heatmap = results[0]["heatmap"]
    # One read of the heatmap (shared with the metrics); no cam (a different size) nor anything large.
    large = [size for size in sizes if size > 4]
    assert large == [heatmap.size], sizes
    np.testing.assert_array_equal(heatmap, np.asarray(explainer.explain(x).heatmap))
