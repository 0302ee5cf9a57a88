"""The core on TensorFlow tensors (issue 21): every namespace test of tests/core, run on ``tf.Tensor``.

``anycam.backends.tensorflow.namespace`` gives the core the array-API functions it calls; the
tests of ``tests/core/test_array_api*.py`` that take the ``kind`` fixture are imported here and run
with TF tensors in place of torch/JAX/strict arrays. Oracle: the NumPy core on the same values,
to the same tolerances as for the other namespaces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("array_api_compat")

from anycam.backends.tensorflow import namespace as tf_namespace  # noqa: E402  (registers the namespace)

from anycam import InputError, core  # noqa: E402
from anycam.core import _namespace  # noqa: E402

from ..core import test_array_api as shared  # noqa: E402
from ..core import test_array_api_device as device_tests  # noqa: E402
from ..core.test_array_api import (  # noqa: E402,F401  (collected here, run with TF tensors)
    test_eigen_map_of_an_all_zero_sample_is_zero_on_any_namespace,
    test_eigen_methods_on_any_namespace_equal_numpy,
    test_gradcampp_weights_survive_gradients_whose_cube_overflows_float32,
    test_heatmaps_follow_the_alignment_on_any_namespace,
    test_heatmaps_on_any_namespace_equal_numpy,
    test_host_weights_with_native_activations_give_native_maps,
    test_layer_cam_on_any_namespace_equals_numpy,
    test_normalize_on_any_namespace_equals_numpy,
    test_randomcam_on_any_namespace_uses_numpys_seeded_weights,
    test_resize_on_any_namespace_equals_numpy,
    test_saturation_matches_numpy_when_products_overflow_float32,
    test_the_pipeline_keeps_nan_visible,
    test_tokens_on_any_namespace_equal_numpy,
)
from ..core.test_array_api_device import (  # noqa: E402,F401
    test_check_finite_on_any_namespace_names_what_numpy_names,
    test_maps_equal_numpy_when_float32_products_of_both_signs_overflow,
)


def _to_numpy(array: Any) -> np.ndarray:
    return array.numpy() if isinstance(array, tf.Tensor) else np.asarray(np.from_dlpack(array))


@pytest.fixture(autouse=True)
def _tf_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The shared tests read results back with to_numpy; TF tensors have no __dlpack__.
    monkeypatch.setattr(shared, "to_numpy", _to_numpy)
    monkeypatch.setattr(device_tests, "to_numpy", _to_numpy)


@pytest.fixture
def kind() -> tuple[Callable[[np.ndarray], Any], Callable[[Any], bool]]:
    """(to a TF tensor, is a TF tensor): the shared tests' namespace, here TensorFlow's."""
    return (lambda a: tf.constant(np.asarray(a))), (lambda a: isinstance(a, tf.Tensor))


def test_the_core_finds_the_tf_namespace_once_the_backend_registers_it():
    assert _namespace.namespace(tf.zeros(2)) is tf_namespace
    assert _namespace.device_of(tf.zeros(2)).endswith("CPU:0")
    assert _namespace.namespace(tf.zeros(2), np.zeros(2)) is tf_namespace  # NumPy may accompany


def test_tf_tensors_with_another_librarys_arrays_are_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(InputError, match="different libraries"):
        _namespace.namespace(tf.zeros(2), torch.zeros(2))


@pytest.mark.parametrize("method", core.CAPTURE_METHODS)
def test_the_core_runs_inside_a_tf_function(method):
    """layer_cam → heatmaps compiled by tf.function equals the NumPy core (as jax.jit does)."""
    if method.startswith("eigen") or method == "kpcacam":
        acts, grads = shared.leading_component(4)
    else:
        acts, grads = shared.capture("channels_first")
    k = grads.shape[1]

    @tf.function
    def explain(a: Any, g: Any) -> Any:
        result = core.layer_cam(method, a, g, "channels_first", count=k)
        return result.cam, core.heatmaps([result.cam], (9, 11))

    cam, heat = explain(tf.constant(acts), tf.constant(grads))
    expected = core.layer_cam(method, acts, grads, "channels_first", count=k)
    scale = (
        shared.scale_of(method, acts, grads) if method in shared.SUM_METHODS else float(np.max(np.abs(expected.cam)))
    )
    np.testing.assert_allclose(cam.numpy(), expected.cam, rtol=shared.RTOL, atol=1e-5 * scale)
    np.testing.assert_allclose(heat.numpy(), core.heatmaps([expected.cam], (9, 11)), atol=1e-5)


def test_check_finite_on_tf_reads_one_boolean_and_no_array():
    """A finite tensor: one scalar read (``__bool__``), no ``numpy()`` / ``__array__`` of the tensor."""
    reads: list[str] = []
    eager = type(tf.constant(0.0))
    originals = {name: getattr(eager, name) for name in ("numpy", "__array__", "__bool__")}

    def spy(name: str) -> Callable[..., Any]:
        def read(self: Any, *args: Any, **kwargs: Any) -> Any:
            reads.append(f"{name}{tuple(self.shape)}")
            return originals[name](self, *args, **kwargs)

        return read

    tensor = tf.ones((4, 8, 7, 7))
    try:
        for name in originals:
            setattr(eager, name, spy(name))
        core.check_finite(tensor, "activations", "layer4")
    finally:
        for name, original in originals.items():
            setattr(eager, name, original)
    assert reads == ["__bool__()"], reads
