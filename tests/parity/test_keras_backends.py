"""Keras 3 on JAX and on PyTorch gives the maps Keras on TensorFlow gives, with the same call.

Keras fixes its backend when it is first imported, so each backend runs in its own process
(``tests/parity/keras_maps.py`` under ``KERAS_BACKEND=tensorflow|jax|torch``, the three at
once). Each builds the demo net from one ``.npz`` of weights that this test writes, explains it
with ``anycam.Explainer(model, layer, method=...)`` for every target form, method and layer spec,
and returns the maps. The TensorFlow maps are in turn compared with the PyTorch port of the same
net (``torch.demo``) explained in this process: three frameworks' autodiff, one answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from anycam.backends.torch import demo as demo_torch

import anycam
from anycam.demo.data import load_demo
from anycam.demo.weights import random_demo_weights
from tests.parity import keras_maps

ROOT = Path(__file__).resolve().parents[2]
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
ADAPTERS = {"tensorflow": "TensorFlowBackend", "jax": "KerasJaxBackend", "torch": "KerasTorchBackend"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("keras_backends")
    rng = np.random.default_rng(11)
    weights = random_demo_weights(seed=5)
    cases = {
        "x": load_demo()["images"][:3].transpose(0, 2, 3, 1),
        "per_sample": rng.integers(0, 10, 3),
        "k_per_sample": rng.integers(0, 10, (3, 3)),
        "score_weights": rng.normal(size=10).astype(np.float32),
        **{f"w/{name}": value for name, value in weights.items()},
    }
    # keras.applications.MobileNetV2 (the smallest width), built here on TensorFlow: its weights
    # travel to the other backends as arrays, in the order of model.weights.
    keras.utils.set_random_seed(3)
    application = keras.applications.MobileNetV2(alpha=0.35, weights=None, input_shape=(64, 64, 3), classes=10)
    cases.update({f"app/{i}": np.asarray(w) for i, w in enumerate(application.get_weights())})
    cases["app_x"] = rng.uniform(-1, 1, size=(2, 64, 64, 3)).astype(np.float32)
    joint = keras_maps.two_inputs()
    cases.update({f"two/{i}": np.asarray(w) for i, w in enumerate(joint.get_weights())})
    cases["two_image"] = rng.normal(size=(2, 16, 16, 1)).astype(np.float32)
    cases["two_meta"] = rng.normal(size=(2, 4)).astype(np.float32)
    np.savez(folder / "cases.npz", **cases)
    processes = {}
    for backend in KERAS_BACKENDS:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        paths = [str(folder / "cases.npz"), str(folder / f"{backend}.npz")]
        command = [sys.executable, "-m", "tests.parity.keras_maps", *paths]
        processes[backend] = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    results = {}
    for backend, process in processes.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"KERAS_BACKEND={backend} failed:\n{output[-4000:]}"
        with np.load(folder / f"{backend}.npz") as data:
            results[backend] = {key: data[key] for key in data.files}
    results["cases"] = cases
    return results


def test_each_keras_backend_gets_its_framework_adapter(runs: dict[str, dict[str, np.ndarray]]) -> None:
    for backend in KERAS_BACKENDS:
        info = json.loads(str(runs[backend]["info"]))
        assert info["keras_backend"] == backend
        assert info["picked"] == [[backend, ADAPTERS[backend]]]
        # Explaining a Keras model imports no framework Keras does not run on.
        if backend != "tensorflow":
            assert "tensorflow" not in info["imported"], info
        if backend == "jax":
            assert "torch" not in info["imported"], info
        assert info["app_auto"] == ["out_relu"], info
        # A dict key the model does not take: an InputError with Keras's message and the keys given.
        refused = info["refused"]
        assert "does not accept the inputs given ('image'" in refused and "'extra'" in refused, info


def _map_keys(result: dict[str, np.ndarray]) -> list[str]:
    # Not the randomised copies: each framework's random generator draws other weights.
    fields = ("cam", "heatmap", "scores", "target")
    return sorted(k for k in result if k.rsplit("/", 1)[-1] in fields and not k.startswith("randomized/"))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_on_jax_and_torch_gives_the_tensorflow_maps(runs: dict[str, dict[str, np.ndarray]], backend: str) -> None:
    reference, result = runs["tensorflow"], runs[backend]
    keys = _map_keys(reference)
    assert len(keys) > 60 and keys == _map_keys(result)
    for key in keys:
        expected, got = reference[key], result[key]
        assert got.shape == expected.shape, key
        if key.endswith("/target"):
            np.testing.assert_array_equal(got, expected, err_msg=key)
        elif key.endswith("/cam"):
            scale = max(float(np.abs(expected).max()), 1e-12)
            np.testing.assert_allclose(got / scale, expected / scale, rtol=1e-4, atol=1e-5, err_msg=key)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=key)
    np.testing.assert_allclose(result["predict"], reference["predict"], rtol=1e-4, atol=1e-4)
    assert result["parameter_layers"].tolist() == reference["parameter_layers"].tolist()
    # A randomised copy explains differently; the model itself is untouched by making it.
    assert not np.allclose(result["randomized/cam"], result["randomized/unchanged"], atol=1e-3)
    np.testing.assert_allclose(result["randomized/unchanged"], result["gradcam/argmax/stage3/cam"], rtol=1e-6)


@pytest.mark.parametrize("backend", KERAS_BACKENDS)
def test_native_keras_maps_equal_the_numpy_mode(runs: dict[str, dict[str, np.ndarray]], backend: str) -> None:
    """``arrays="native"`` on each Keras backend against its NumPy mode (docs/devices.md, Precision).

    Raw maps within 1e-5 relative + 1e-5 of each map's largest value (5e-5 of it for the Eigen
    methods), heatmaps within 1e-5 (5e-5) plus min-max scaling's 4·e/span, scores and targets
    equal, finite wherever the NumPy mode is. (The cross-backend comparison above covers the
    native keys too.)
    """
    result = runs[backend]
    keys = sorted(k for k in result if k.startswith("native/"))
    assert len(keys) >= 4 * len(anycam.core.CAPTURE_METHODS), keys
    for key in keys:
        method, field = key.split("/")[1], key.rsplit("/", 1)[-1]
        got, want = result[key].astype(np.float64), result[key[len("native/") :]].astype(np.float64)
        assert got.shape == want.shape, key
        assert np.isfinite(got[np.isfinite(want)]).all(), key
        eigen = method in ("eigencam", "eigengradcam", "kpcacam")
        if field in ("target", "scores"):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=key)
        elif field == "cam":
            top = np.abs(want).max(axis=(-2, -1), keepdims=True)
            allowed = 5e-5 * top if eigen else 1e-5 * np.abs(want) + 1e-5 * top
            assert np.all(np.abs(got - want) <= allowed), key
        elif field == "heatmap":
            cam_key = key[: -len("heatmap")] + "cam"
            cam, cam_want = result[cam_key], result[cam_key[len("native/") :]]
            error = np.abs(cam.astype(np.float64) - cam_want).max(axis=(-2, -1))
            span = cam_want.max(axis=(-2, -1)) - cam_want.min(axis=(-2, -1))
            amplified = np.where(span > 0, 4 * error / np.where(span > 0, span, 1), 0)
            base = 5e-5 if eigen else 1e-5
            assert np.all(np.abs(got - want).max(axis=(-2, -1)) <= base + amplified), key


def test_mobilenet_maps_are_nonzero_and_auto_is_the_last_stage(runs: dict[str, dict[str, np.ndarray]]) -> None:
    reference = runs["tensorflow"]
    assert np.abs(reference["app/argmax/cam"]).max() > 0
    np.testing.assert_array_equal(reference["app/auto/cam"], reference["app/argmax/cam"])


@pytest.mark.parametrize("form", ["argmax", "k_per_sample", "top_k", "callable"])
@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_keras_maps_equal_the_pytorch_port(runs: dict[str, dict[str, np.ndarray]], method: str, form: str) -> None:
    cases = runs["cases"]
    weights = {key[len("w/") :]: value for key, value in cases.items() if key.startswith("w/")}
    model = demo_torch.build_demo_model(weights)
    target = {
        "argmax": None,
        "k_per_sample": cases["k_per_sample"],
        "top_k": anycam.top_k(2),
        "callable": lambda out: out @ torch.as_tensor(cases["score_weights"]),
    }[form]
    explained = anycam.Explainer(model, "stage3", method=method).explain(cases["x"].transpose(0, 3, 1, 2), target)
    reference = runs["tensorflow"]
    scale = max(float(np.abs(explained.cam).max()), 1e-12)
    cam = reference[f"{method}/{form}/stage3/cam"]
    np.testing.assert_allclose(cam / scale, explained.cam / scale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reference[f"{method}/{form}/stage3/heatmap"], explained.heatmap, atol=1e-4)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_keras_model_on_tensorflow_is_not_taken_for_another_framework(backend: str) -> None:
    from anycam.backends.tensorflow import demo as demo_tensorflow

    model = demo_tensorflow.build_demo_model()
    assert anycam.Explainer(model, "stage3").backend.name == "tensorflow"
    with pytest.raises(anycam.BackendError, match=rf"runs on 'tensorflow'.*KERAS_BACKEND={backend}"):
        anycam.Explainer(model, "stage3", backend=backend)
