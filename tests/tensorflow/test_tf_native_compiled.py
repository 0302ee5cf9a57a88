"""TensorFlow native mode runs the core as one ``tf.function`` per setting (issue 21: native ≤ NumPy mode).

Op by op, every TF operation of the core pays an eager dispatch (about 35 ms a call on this
project's CPU, more than the map's arithmetic). The backend's ``compiled(key, fn)`` traces the
core once per key; these tests count the Python calls of ``core.layer_cam`` (made only while
tracing) and check every setting the trace closes over against the NumPy mode.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("array_api_compat")

import anycam  # noqa: E402
from tests.tensorflow.test_tf_native import batch, network  # noqa: E402


@pytest.fixture(scope="module")
def model() -> Any:
    return network()


def _count_core_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    layer_cam = anycam.core.layer_cam

    def counted(method, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(method)
        return layer_cam(method, *args, **kwargs)

    monkeypatch.setattr(anycam.core, "layer_cam", counted)
    return calls


def test_the_native_core_is_traced_once_and_reused_across_calls(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = anycam.Explainer(model, "features").explain(batch(3).numpy(), [0, 2])
    explainer = anycam.Explainer(model, "features", arrays="native")
    calls = _count_core_calls(monkeypatch)
    first = explainer.explain(batch(), [0, 2])
    assert calls == ["gradcam"]
    for seed in (1, 2, 3):
        again = explainer.explain(batch(seed), [0, 2])
    assert calls == ["gradcam"], "the core ran in Python again: not compiled, or compiled anew per call"
    np.testing.assert_allclose(again.heatmap.numpy(), reference.heatmap, atol=1e-5)
    assert not np.array_equal(again.heatmap.numpy(), first.heatmap.numpy())  # new inputs, new maps
    explainer.explain(batch(), [[0, 1], [2, 1]])  # K = 2: another key
    assert calls == ["gradcam", "gradcam"]


@pytest.mark.parametrize(
    ("start", "change"),
    [
        ({}, {"relu": False}),
        ({}, {"normalize": None}),
        ({}, {"upsample": "nearest"}),
        ({}, {"upsample": None}),
        ({}, {"method": "layercam"}),
        ({}, {"method": "eigencam"}),
        ({"method": "randomcam"}, {"seed": 3}),
    ],
    ids=lambda setting: "-".join(f"{k}={v}" for k, v in setting.items()) or "defaults",
)
def test_compiled_native_maps_follow_every_setting_changed_between_calls(
    model: Any, start: dict[str, Any], change: dict[str, Any]
) -> None:
    native = anycam.Explainer(model, "features", arrays="native", **start)
    native.explain(batch(), [0, 2])  # compiled with the first settings
    for name, value in change.items():
        setattr(native, name, value)
    reference = anycam.Explainer(model, "features", **start, **change).explain(batch().numpy(), [0, 2])
    found = native.explain(batch(), [0, 2])
    assert tuple(found.heatmap.shape) == reference.heatmap.shape
    np.testing.assert_allclose(found.heatmap.numpy(), reference.heatmap, atol=1e-5)
    scale = float(np.abs(reference.cam).max())
    np.testing.assert_allclose(found.cam.numpy() / scale, reference.cam / scale, atol=1e-5)


def test_a_non_finite_activation_is_named_as_in_the_numpy_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    keras = pytest.importorskip("keras")
    model = network()
    kernel = model.get_layer("features").kernel
    kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0, 0, 0]], [np.inf]))
    with pytest.raises(anycam.NonFiniteError) as numpy_mode:
        anycam.Explainer(model, "features").explain(batch().numpy(), [0, 2])
    with pytest.raises(anycam.NonFiniteError) as native:
        anycam.Explainer(model, "features", arrays="native").explain(batch(), [0, 2])
    assert str(native.value) == str(numpy_mode.value)
    del keras
