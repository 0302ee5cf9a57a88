"""``arrays="native"`` on JAX: the Explanation's arrays are JAX arrays on the model's device, equal
to the NumPy mode's, and no activation, gradient or map is copied to the host (issue 21.2).

The proof of "no host copy" has two parts. ``jax.transfer_guard_device_to_host("disallow")``
makes every implicit device → host transfer raise (on an accelerator; on the CPU backend a
JAX array already is host memory and the guard never fires). And every read of a JAX array's
host value (``ArrayImpl._value``: what ``np.asarray``, ``jax.device_get``, ``bool``, ``float``
and ``.tolist()`` go through) is recorded with its size: allowed are the ``(N, K)`` int class
indices, the explicit way back of the target, and one boolean per finiteness or reachability
check; anything larger is an activation, gradient or map leaving the device and fails the test.
The control test shows the recorder catches exactly that (``np.asarray(activations)``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from anycam.backends.jax.backend import JaxBackend
from jax._src.array import ArrayImpl

import anycam
from anycam.core import parse_target
from tests.jax.split_models import FORMS, inputs

pytestmark = pytest.mark.jax

TARGET = np.array([0, 2, 1, 2])
METHODS = (
    "gradcam",
    "gradcam++",
    "xgradcam",
    "layercam",
    "hirescam",
    "gradcam-elementwise",
    "eigencam",
    "eigengradcam",
)


def _sizes(tree: object) -> list[int]:
    return [int(leaf.size) for leaf in jax.tree_util.tree_leaves(tree) if isinstance(leaf, jax.Array)]


@contextlib.contextmanager
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Records the size of every JAX array read on the host, under the device → host transfer guard.

    On the CPU backend NumPy takes a JAX array through the buffer protocol, which no Python hook
    sees, so the conversions are recorded where they are asked for: ``np.asarray`` / ``np.array``
    / ``np.ascontiguousarray`` / ``np.asanyarray`` and ``jax.device_get`` (module attributes, looked
    up at call time), and ``ArrayImpl._value`` (``bool``, ``float``, ``int``, ``.tolist()``).
    """
    sizes: list[int] = []
    value = ArrayImpl._value

    def recorded(self: ArrayImpl) -> np.ndarray:
        sizes.append(int(self.size))
        return value.fget(self)  # type: ignore[attr-defined]

    def counting(fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            sizes.extend(_sizes(args[:1]))
            return fn(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as patch:
        patch.setattr(ArrayImpl, "_value", property(recorded))
        for name in ("asarray", "array", "ascontiguousarray", "asanyarray"):
            patch.setattr(np, name, counting(getattr(np, name)))
        patch.setattr(jax, "device_get", counting(jax.device_get))
        with jax.transfer_guard_device_to_host("disallow"):
            yield sizes


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    from anycam.backends.jax.demo import build_demo_model

    from anycam.demo.data import load_demo

    data = load_demo()
    return build_demo_model(data["weights"]), jnp.asarray(data["images"][:4].transpose(0, 2, 3, 1))


@pytest.mark.parametrize("method", METHODS)
def test_native_explanations_are_jax_arrays_equal_to_the_numpy_mode(demo, method: str) -> None:  # type: ignore[no-untyped-def]
    model, x = demo
    expected = anycam.Explainer(model, layer="stage3", method=method).explain(np.asarray(x), TARGET)
    found = anycam.Explainer(model, layer="stage3", method=method, arrays="native").explain(x, TARGET)
    for name in ("heatmap", "cam", "weights", "scores"):
        array, reference = getattr(found, name), getattr(expected, name)
        if reference is None:
            assert array is None
            continue
        assert isinstance(array, jax.Array) and array.dtype == jnp.float32, name
        assert array.devices() == x.devices(), name
        # float32 on the device against the float64 NumPy reference: maps in [0, 1] to 1e-5,
        # raw values relative to their own scale.
        scale = max(float(np.abs(reference).max()), 1e-30)
        np.testing.assert_allclose(np.asarray(array) / scale, reference / scale, atol=1e-5, err_msg=name)
    assert isinstance(found.target, np.ndarray) and found.target.dtype == np.int64
    np.testing.assert_array_equal(found.target, expected.target)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "eigencam"])
@pytest.mark.parametrize("target", [None, TARGET], ids=["argmax", "given"])
def test_native_mode_copies_no_activation_gradient_or_map_to_the_host(demo, monkeypatch, method, target) -> None:  # type: ignore[no-untyped-def]
    model, x = demo
    explainer = anycam.Explainer(model, layer="stage3", method=method, arrays="native")
    explainer.explain(x, target)  # compiled outside the guard: tracing reads nothing either, but keep it apart
    with host_reads(monkeypatch) as sizes:
        found = explainer.explain(x, target)
    allowed = x.shape[0]  # N × K with K = 1: the class indices; booleans are size 1
    assert all(size <= allowed for size in sizes), f"host reads of sizes {sizes} (allowed ≤ {allowed})"
    assert isinstance(found.heatmap, jax.Array)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_perturbation_methods_in_native_mode_copy_no_input_activation_or_map_to_the_host(  # type: ignore[no-untyped-def]
    demo, monkeypatch, method
) -> None:
    """Score-CAM's input and Ablation-CAM's layer output stay on the device, and so do the maps.

    Their weights are computed on the host from the scores of the perturbed copies, so those
    rows may be read: with ``batch_size=8``, 8 copies × 10 classes = 80 values per model call.
    Ablation-CAM's fast head (pooling → dense) works on the host from the pooled features
    (2 samples × 64 channels = 128 values) and the dense kernel (64 × 10 = 640), both reductions
    or parameters. The input (8192 values), the layer's activations (32768) and the maps (512)
    are each of another size, and none may be read.
    """
    model, x = demo
    x = x[:2]
    explainer = anycam.Explainer(model, layer="stage3", method=method, arrays="native", batch_size=8)
    explainer.explain(x, TARGET[:2])  # compiled outside the guard
    with host_reads(monkeypatch) as sizes:
        found = explainer.explain(x, TARGET[:2])
    allowed = {128, 640} if method == "ablationcam" else set()
    assert all(size <= 80 or size in allowed for size in sizes), f"host reads of sizes {sizes} (allowed ≤ 80)"
    assert isinstance(found.heatmap, jax.Array) and isinstance(found.cam, jax.Array)


def test_the_host_read_recorder_catches_a_copied_activation(demo, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The control: one ``np.asarray`` of the activations is what the test above must catch."""
    model, x = demo
    backend = JaxBackend(model, ["stage3"])
    spec = parse_target(None)
    backend.capture(x, spec, native=True)
    with host_reads(monkeypatch) as sizes:
        capture = backend.capture(x, spec, native=True)
        assert all(size <= x.shape[0] for size in sizes)
        np.asarray(capture.activations[0])
    assert max(sizes) == capture.activations[0].size


@pytest.mark.parametrize("gradients", [True, False])
def test_native_capture_gives_float32_device_arrays_and_numpy_indices(gradients: bool) -> None:
    form = FORMS["functions"]()
    # A bfloat16 model: the capture casts to float32 on the device.
    low = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), form.weights)
    features, head = form.model[:2]
    backend = JaxBackend((features, head, low), [None])
    x = inputs(form).astype(jnp.bfloat16)
    capture = backend.capture(x, parse_target(TARGET), gradients=gradients, native=True)
    arrays = [*capture.activations, *(capture.gradients or ()), capture.scores]
    assert all(isinstance(a, jax.Array) and a.dtype == jnp.float32 for a in arrays)
    assert (capture.gradients is None) != gradients
    assert capture.target is not None and capture.target.dtype == np.int64
    np.testing.assert_array_equal(capture.target[:, 0], TARGET)
    reference = backend.capture(x, parse_target(TARGET), gradients=gradients)
    np.testing.assert_array_equal(np.asarray(capture.activations[0]), reference.activations[0])
    np.testing.assert_array_equal(np.asarray(capture.scores), reference.scores)


def test_to_native_puts_host_arrays_on_the_weights_device() -> None:
    form = FORMS["functions"]()
    backend = JaxBackend(form.model, [None])
    moved = backend.to_native(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert isinstance(moved, jax.Array) and moved.devices() == form.weights["k1"].devices()
    np.testing.assert_array_equal(moved, np.arange(6).reshape(2, 3))


def test_jax_refuses_differentiable_explainers_and_names_explain_fn_and_jax_grad() -> None:
    form = FORMS["functions"]()
    with pytest.raises(anycam.BackendError, match="differentiable=True") as refused:
        anycam.Explainer(form.model, layer=None, method="gradcam", backend="jax", differentiable=True)
    message = str(refused.value)
    assert "anycam.backends.jax.explain_fn" in message and "jax.grad" in message, message


def _count_core_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every Python call of ``core.layer_cam`` (a jitted core calls it only while tracing)."""
    calls: list[str] = []
    layer_cam = anycam.core.layer_cam

    def counted(method, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(method)
        return layer_cam(method, *args, **kwargs)

    monkeypatch.setattr(anycam.core, "layer_cam", counted)
    return calls


def test_native_core_runs_as_one_compiled_program_reused_across_calls(demo, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Op by op, jax.numpy pays a dispatch per operation (the native mode was 1.10× the NumPy mode)."""
    model, x = demo
    explainer = anycam.Explainer(model, layer="stage3", arrays="native")
    calls = _count_core_calls(monkeypatch)
    first = explainer.explain(x, TARGET)
    assert calls == ["gradcam"]  # traced once
    for _ in range(3):
        again = explainer.explain(x, TARGET)
    assert calls == ["gradcam"], "the core ran in Python again: not compiled, or compiled anew per call"
    np.testing.assert_array_equal(np.asarray(again.heatmap), np.asarray(first.heatmap))
    explainer.explain(x, np.stack([TARGET, TARGET], axis=1))  # K = 2: a new program
    assert calls == ["gradcam", "gradcam"]


@pytest.mark.parametrize(
    ("start", "change"),
    [
        ({}, {"relu": False}),
        ({"relu": False}, {"normalize": "max"}),
        ({}, {"normalize": None}),
        ({}, {"upsample": "nearest"}),
        ({}, {"upsample": None}),
        ({}, {"method": "layercam"}),
        ({}, {"method": "eigencam"}),
        ({"method": "randomcam"}, {"seed": 3}),
    ],
    ids=lambda setting: "-".join(f"{k}={v}" for k, v in setting.items()) or "defaults",
)
def test_compiled_native_maps_follow_every_setting_changed_between_calls(demo, start, change) -> None:  # type: ignore[no-untyped-def]
    """The jitted core is keyed by every setting it closes over: a setting changed on the same
    Explainer (its attributes are public) gives that setting's map, equal to the NumPy mode's."""
    model, x = demo
    native = anycam.Explainer(model, layer="stage3", arrays="native", **start)
    native.explain(x, TARGET)  # compiled with the first settings
    for name, value in change.items():
        setattr(native, name, value)
    reference = anycam.Explainer(model, layer="stage3", **start, **change).explain(np.asarray(x), TARGET)
    found = native.explain(x, TARGET)
    assert found.heatmap.shape == reference.heatmap.shape
    np.testing.assert_allclose(np.asarray(found.heatmap), reference.heatmap, atol=1e-5)
    scale = float(np.abs(reference.cam).max())
    np.testing.assert_allclose(np.asarray(found.cam) / scale, reference.cam / scale, atol=1e-5)


def test_compiled_native_maps_follow_a_new_input_size_and_batch(demo) -> None:  # type: ignore[no-untyped-def]
    model, x = demo
    native = anycam.Explainer(model, layer="stage3", arrays="native")
    native.explain(x, TARGET)
    smaller = x[:3, 4:-4, 4:-4, :]
    reference = anycam.Explainer(model, layer="stage3").explain(np.asarray(smaller), TARGET[:3])
    found = native.explain(smaller, TARGET[:3])
    assert found.heatmap.shape == reference.heatmap.shape == (3, *smaller.shape[1:3])
    np.testing.assert_allclose(np.asarray(found.heatmap), reference.heatmap, atol=1e-5)


def test_native_mode_names_a_non_finite_value_as_the_numpy_mode_does(demo) -> None:  # type: ignore[no-untyped-def]
    model, x = demo
    native = anycam.Explainer(model, layer="stage3", arrays="native")
    native.explain(x, TARGET)  # compiled on finite values first
    bad = x.at[1, 3, 5, 0].set(jnp.nan)
    with pytest.raises(anycam.NonFiniteError) as expected:
        anycam.Explainer(model, layer="stage3").explain(np.asarray(bad), TARGET)
    with pytest.raises(anycam.NonFiniteError) as found:
        native.explain(bad, TARGET)
    assert str(found.value) == str(expected.value)


def test_native_mode_warns_of_a_flat_map_once_as_the_numpy_mode_does(demo) -> None:  # type: ignore[no-untyped-def]
    model, x = demo

    def flat(output: jax.Array) -> jax.Array:  # a score the layer does not move: zero gradient, zero map
        return output[:, 0] * 0.0

    messages = []
    for arrays, batch in (("numpy", np.asarray(x)), ("native", x)):
        explainer = anycam.Explainer(model, layer="stage3", arrays=arrays)
        explainer.explain(batch, TARGET)
        with pytest.warns(anycam.ZeroMapWarning) as record:
            found = explainer.explain(batch, flat)
        with warnings.catch_warnings():
            warnings.simplefilter("error", anycam.ZeroMapWarning)
            explainer.explain(batch, flat)  # once per Explainer
        messages.append([str(w.message) for w in record])
        assert not np.asarray(found.heatmap).any()
    assert messages[0] == messages[1] and len(messages[0]) == 1


def test_a_core_step_that_reads_a_value_on_the_host_runs_op_by_op_instead_of_failing(demo, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A core step that cannot be traced (it reads a value) falls back to the uncompiled core, for good."""
    model, x = demo
    layer_cam = anycam.core.layer_cam
    calls = []

    def reads_a_value(method, activations, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(bool(jnp.any(activations > 0)))  # a host read: refused while jax.jit traces
        return layer_cam(method, activations, *args, **kwargs)

    monkeypatch.setattr(anycam.core, "layer_cam", reads_a_value)
    explainer = anycam.Explainer(model, layer="stage3", arrays="native")
    reference = anycam.Explainer(model, layer="stage3").explain(np.asarray(x), TARGET)
    for _ in range(2):
        found = explainer.explain(x, TARGET)
        np.testing.assert_allclose(np.asarray(found.heatmap), reference.heatmap, atol=1e-5)
    assert len(calls) == 3  # the reference, then once per native call: op by op
