"""The core on any namespace without host copies: finiteness checks, cached resize matrices, float32 overflow.

Oracle: the NumPy core (float64, the reference) on the same values. Each namespace (array-api-strict,
torch CPU, JAX) is skipped when it cannot be imported.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pytest

from anycam import NonFiniteError, core

pytest.importorskip("array_api_compat")

from .test_array_api import NAMESPACES, SUM_METHODS, leading_component, to_numpy


@pytest.fixture(params=sorted(NAMESPACES))
def kind(request: pytest.FixtureRequest) -> Any:
    """(to the namespace, is an array of it) for each namespace that can be imported."""
    return NAMESPACES[request.param]()


def _message(array: Any) -> str:
    with pytest.raises(NonFiniteError) as info:
        core.check_finite(array, "gradients", "layer4")
    return str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_on_any_namespace_names_what_numpy_names(kind, bad):
    convert, _ = kind
    values = np.ones((2, 3, 4, 5), np.float32)
    values[1, 2, 0, 3] = bad
    values[1, 2, 3, 4] = np.nan
    assert _message(convert(values)) == _message(values)
    core.check_finite(convert(np.ones((2, 3), np.float32)), "gradients", "layer4")  # finite: no error


def test_check_finite_on_torch_reads_one_boolean_and_copies_nothing():
    """A finite tensor costs one boolean read (``__bool__``) and no copy to NumPy or the host."""
    torch = pytest.importorskip("torch")
    from torch.overrides import TorchFunctionMode

    calls: list[str] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = getattr(func, "__name__", str(func))
            # .to(dtype) converts on the device; .to("cpu"/a device) is a copy.
            if name != "to" or any(isinstance(a, (str, torch.device)) for a in (*args, *(kwargs or {}).values())):
                calls.append(name)
            return func(*args, **(kwargs or {}))

    tensor = torch.ones(4, 8, 7, 7)
    with Record():
        core.check_finite(tensor, "activations", "layer4")
    host = {"numpy", "__array__", "cpu", "tolist", "item", "to", "__float__", "__int__"}
    assert not host & set(calls), calls
    assert calls.count("__bool__") == 1, calls


def test_resize_copies_its_matrix_to_the_device_once():
    """The second resize of the same sizes, mode, dtype and device builds no new device array."""
    torch = pytest.importorskip("torch")
    from torch.overrides import TorchFunctionMode

    made: list[str] = []
    factories = {"asarray", "tensor", "as_tensor", "from_numpy"}

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if getattr(func, "__name__", "") in factories:
                made.append(func.__name__)
            return func(*args, **(kwargs or {}))

    maps = torch.rand(2, 3, 5, 7)
    expected = core.resize(maps.numpy(), (11, 13))
    with Record():
        first = core.resize(maps, (11, 13))
    assert made, "the first call copies the matrices over"
    made.clear()
    with Record():
        second = core.resize(maps, (11, 13))
    assert made == []
    for result in (first, second):
        np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6, atol=1e-6)
    # Keyed by dtype: a float64 map gets float64 matrices, not the float32 ones.
    assert core.resize(maps.double(), (11, 13)).dtype == torch.float64


def test_resize_under_jax_jit_caches_no_tracer():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    resize_module = importlib.import_module("anycam.core.resize")

    maps = np.random.default_rng(3).random((1, 2, 4, 6)).astype(np.float32)
    jitted = jax.jit(lambda m: core.resize(m, (9, 17)))
    for _ in range(2):
        np.testing.assert_allclose(np.asarray(jitted(jnp.asarray(maps))), core.resize(maps, (9, 17)), atol=1e-6)
    assert all("Tracer" not in type(m).__name__ for m in resize_module._DEVICE_MATRICES.values())
    # After the traces, an eager call still works (a leaked tracer would raise here).
    np.testing.assert_allclose(
        np.asarray(core.resize(jnp.asarray(maps), (9, 17))), core.resize(maps, (9, 17)), atol=1e-6
    )


def overflowing_capture(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns activations and gradients whose products overflow float32 with both signs, yet whose maps do not.

    Two channels share the activation a ∈ [1, 1.3]·2⁶⁴; their gradients are p ∈ [1.5, 2]·2⁶⁴ and
    −q, q ∈ [1.25, 1.75]·2⁶⁴: every product a·p ≥ 1.5·2¹²⁸ exceeds float32's max (≈ 2¹²⁸), while
    a·(p − q) stays within ±0.98·2¹²⁸. NumPy's float64 sums are finite; cancellation is at most
    ~7×, so float32 keeps about 1e-6 relative accuracy once nothing overflows.
    """
    rng = np.random.default_rng(seed)
    a = rng.uniform(1.0, 1.3, size=(2, 1, 5, 6)) * 2.0**64
    acts = np.concatenate([a, a], axis=1).astype(np.float32)
    p = rng.uniform(1.5, 2.0, size=(2, 3, 1, 5, 6)) * 2.0**64
    q = rng.uniform(1.25, 1.75, size=(2, 3, 1, 5, 6)) * 2.0**64
    return acts, np.concatenate([p, -q], axis=2).astype(np.float32)


# array_api_strict runs NumPy underneath, which warns where a result saturates on purpose.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("method", SUM_METHODS)
def test_maps_equal_numpy_when_float32_products_of_both_signs_overflow(kind, method):
    convert, _ = kind
    acts, grads = overflowing_capture(5)
    assert np.isinf(acts[:, None].astype(np.float32) * grads).any()  # the trap is armed
    expected = core.layer_cam(method, acts, grads, "channels_first", count=3)
    result = core.layer_cam(method, convert(acts), convert(grads), "channels_first", count=3)
    cam = to_numpy(result.cam)
    assert np.isfinite(expected.cam).all() and np.isfinite(cam).all()
    scale = float(np.max(np.abs(expected.cam))) or 1.0
    np.testing.assert_allclose(cam, expected.cam, rtol=1e-5, atol=1e-5 * scale)
    heat = to_numpy(core.heatmaps([result.cam], (10, 12)))
    np.testing.assert_allclose(heat, core.heatmaps([expected.cam], (10, 12)), atol=1e-5)


@pytest.mark.parametrize("method", SUM_METHODS)
def test_power_of_two_scaling_leaves_ordinary_maps_bit_identical(method):
    """Scaling by powers of two is exact: with it the float32 maps equal plain float32 arithmetic bit for bit."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    acts = torch.from_numpy(rng.gamma(2.0, 1.0, size=(2, 1, 4, 3, 3)).astype(np.float32))
    grads = torch.from_numpy(rng.normal(size=(2, 2, 4, 3, 3)).astype(np.float32))
    if method == "hirescam":
        plain = torch.relu((grads * acts).sum(dim=2))
        torch.testing.assert_close(core.hirescam(acts, grads, channel_axis=2), plain, rtol=0, atol=0)
    else:
        cam = core.layer_cam(method, acts[:, 0], grads, "channels_first", count=2).cam
        assert torch.isfinite(cam).all()


def test_kpcacam_builds_its_kernels_in_chunks_that_fit_the_budget(kind, monkeypatch):
    """B × Z × Z kernels are built a few samples at a time; the maps equal NumPy's per-sample loop."""
    convert, _ = kind
    methods = importlib.import_module("anycam.core.methods")
    acts, _ = leading_component(9)
    acts = np.concatenate([acts, leading_component(10)[0], acts[:1]])  # 5 samples, Z = 35
    kernel = 35 * 35 * 4
    monkeypatch.setattr(methods, "KPCA_KERNEL_BYTES", 2 * kernel)  # 2 samples per chunk: 3 chunks
    expected = core.kpcacam(acts, rectify=False)
    result = core.kpcacam(convert(acts), rectify=False)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(to_numpy(result), expected, rtol=1e-5, atol=1e-5 * scale)


def test_kpcacam_chunks_call_eigh_once_per_chunk(monkeypatch):
    torch = pytest.importorskip("torch")
    from torch.overrides import TorchFunctionMode

    methods = importlib.import_module("anycam.core.methods")
    sizes: list[int] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if getattr(func, "__name__", "") == "linalg_eigh":
                sizes.append(int(args[0].shape[0]))
            return func(*args, **(kwargs or {}))

    acts = torch.from_numpy(np.concatenate([leading_component(9)[0]] * 3))  # 6 samples, Z = 35
    monkeypatch.setattr(methods, "KPCA_KERNEL_BYTES", 4 * 35 * 35 * 4)
    with Record():
        core.kpcacam(acts)
    assert sizes == [4, 2]
