"""Keras 3 ``MultiHeadAttention`` on JAX and on PyTorch gives TensorFlow's attention capture and maps (issue 22).

Each Keras backend runs in its own process (``tests/parity/attention_keras_run.py`` under
``KERAS_BACKEND=tensorflow|jax|torch``) on one set of weights this test writes. The TensorFlow
capture is checked against a plain-TF oracle in ``tests/tensorflow/test_attention_keras.py``;
here the other two backends' probabilities, ∂score/∂A and maps must equal it, and on each
backend the explicit form must give the model's own (fused ``dot_product_attention``) outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")
pytest.importorskip("jax")
pytest.importorskip("torch")

from tests.parity.attention_keras_run import PATCH, SIDE, keras_vit  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("tensorflow", "jax", "torch")
ADAPTERS = {"tensorflow": "TensorFlowBackend", "jax": "KerasJaxBackend", "torch": "KerasTorchBackend"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("attention_keras")
    weights = keras_vit(seed=7).get_weights()
    x = np.random.default_rng(2).normal(size=(3, SIDE, SIDE, 3)).astype(np.float32)
    np.savez(folder / "weights.npz", *weights, x=x)
    results = {}
    for backend in BACKENDS:  # one at a time: the machine's cores are shared
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        command = [
            sys.executable,
            "-m",
            "tests.parity.attention_keras_run",
            str(folder / "weights.npz"),
            str(folder / f"{backend}.npz"),
        ]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"KERAS_BACKEND={backend} failed:\n{(done.stdout + done.stderr)[-4000:]}"
        with np.load(folder / f"{backend}.npz") as data:
            results[backend] = {key: data[key] for key in data.files}
    return results


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_attention_on_jax_and_torch_equals_tensorflows(
    runs: dict[str, dict[str, np.ndarray]], backend: str
) -> None:
    reference, result = runs["tensorflow"], runs[backend]
    assert str(result["adapter"]) == ADAPTERS[backend]
    keys = sorted(k for k in reference if k.startswith(("attention/", "gradient/", "rollout/", "attention-grad/")))
    assert keys and keys == sorted(
        k for k in result if k.startswith(("attention/", "gradient/", "rollout/", "attention-grad/"))
    )
    for key in [*keys, "scores"]:
        scale = float(np.abs(reference[key]).max())
        np.testing.assert_allclose(result[key], reference[key], rtol=1e-4, atol=1e-5 * scale, err_msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_keras_attention_gives_the_fused_outputs_on_every_backend(
    runs: dict[str, dict[str, np.ndarray]], backend: str
) -> None:
    # Keras 3 runs MultiHeadAttention through ops.dot_product_attention (no dropout, no scores
    # asked): tf's, jax.nn's or torch's fused kernel. The explicit form must reproduce it.
    np.testing.assert_allclose(runs[backend]["explicit"], runs[backend]["own"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_none_on_a_keras_vit_takes_the_tokens_the_last_attention_reads_on_every_backend(
    runs: dict[str, dict[str, np.ndarray]], backend: str
) -> None:
    # Before the token rule, layer=None took block1_attn/value: a (heads, head_dim) "map" of nothing.
    result = runs[backend]
    assert str(result["auto/layer"]) == "block1_ln1"
    assert result["auto/cam"].shape == (3, 2, SIDE // PATCH, SIDE // PATCH)
    np.testing.assert_array_equal(result["auto/cam"], result["named/cam"])
    scale = float(np.abs(runs["tensorflow"]["auto/cam"]).max())
    np.testing.assert_allclose(result["auto/cam"], runs["tensorflow"]["auto/cam"], rtol=1e-4, atol=1e-5 * scale)
