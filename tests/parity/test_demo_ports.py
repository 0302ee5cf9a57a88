"""One weight dict, three frameworks: the Keras and Flax ports compute torch's demo CNN, layer by layer.

For the shipped 2-D model and for 1-D/3-D variants with ``random_demo_weights``, the logits and
the outputs of the layers to explain (``stage1``, ``stage3``: torch forward hooks, a Keras
sub-model on the named layers, Flax's intercepted module paths) agree within 1e-4. The 1-D/3-D
inputs have odd sizes, so a port whose stride-2 convs padded differently from torch would be off
by a pixel and fail.
"""

from __future__ import annotations

import flax.linen as nn
import keras
import numpy as np
import pytest
import torch
from anycam.backends.jax import demo as demo_jax
from anycam.backends.tensorflow import demo as demo_tensorflow
from anycam.backends.torch import demo as demo_torch

from anycam.demo.data import EXPLAIN_LAYERS, load_demo
from anycam.demo.weights import random_demo_weights

pytestmark = pytest.mark.parity

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def torch_run(weights, x: np.ndarray, spatial_dims: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Logits and channels-last stage outputs of the PyTorch definition on channels-first ``x``."""
    model = demo_torch.build_demo_model(weights, spatial_dims=spatial_dims, in_channels=x.shape[1])
    modules = dict(model.named_modules())
    found: dict[str, np.ndarray] = {}
    hooks = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: found.__setitem__(name, np.moveaxis(out.numpy(), 1, -1))
        )
        for name in EXPLAIN_LAYERS
    ]
    try:
        with torch.no_grad():
            found["logits"] = model(torch.from_numpy(x)).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return found


def keras_run(weights, x: np.ndarray, spatial_dims: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """The same from the Keras port on channels-last ``x``, through a sub-model on the named layers."""
    model = demo_tensorflow.build_demo_model(weights, spatial_dims=spatial_dims, in_channels=x.shape[-1])
    probe = keras.Model(model.input, [model.output, *(model.get_layer(name).output for name in EXPLAIN_LAYERS)])
    return {name: np.asarray(out) for name, out in zip(("logits", *EXPLAIN_LAYERS), probe(x), strict=True)}


def flax_run(weights, x: np.ndarray, spatial_dims: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """The same from the Flax port on channels-last ``x``, intercepting module paths ``stage1``/``stage3``."""
    module, variables = demo_jax.build_demo_model(weights, spatial_dims=spatial_dims, in_channels=x.shape[-1])
    found: dict[str, np.ndarray] = {}

    def record(next_fun, args, kwargs, context):  # type: ignore[no-untyped-def]
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path in {(name,) for name in EXPLAIN_LAYERS}:
            found[context.module.path[0]] = np.asarray(out)
        return out

    with nn.intercept_methods(record):
        found["logits"] = np.asarray(module.apply(variables, x))
    return found


def assert_same(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], port: str) -> None:
    assert set(actual) == set(expected) == {"logits", *EXPLAIN_LAYERS}
    for name, value in expected.items():
        assert actual[name].shape == value.shape, (port, name)
        np.testing.assert_allclose(actual[name], value, **TOLERANCE, err_msg=f"{port} {name}")


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def shipped(demo):
    images = demo["images"]
    return torch_run(demo["weights"], images, 2), np.moveaxis(images, 1, -1)


def test_torch_reproduces_the_npz_oracle(demo, shipped):
    expected, _ = shipped
    np.testing.assert_allclose(expected["logits"], demo["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("port", ["keras", "flax"])
def test_the_shipped_model_matches_torch_layer_by_layer(demo, shipped, port):
    expected, images = shipped
    run = keras_run if port == "keras" else flax_run
    actual = run(demo["weights"], images, 2)
    assert_same(actual, expected, port)
    np.testing.assert_allclose(actual["logits"], demo["logits"], **TOLERANCE)
    assert expected["stage1"].shape == (48, 32, 32, 32) and expected["stage3"].shape == (48, 16, 16, 64)


@pytest.mark.parametrize(
    ("spatial_dims", "in_channels", "size"),
    [(1, 3, (67,)), (2, 2, (21, 18)), (3, 2, (13, 16, 11))],
    ids=["1d", "2d", "3d"],
)
def test_every_variant_matches_torch_with_shared_random_weights(spatial_dims, in_channels, size):
    weights = random_demo_weights(spatial_dims, in_channels, seed=spatial_dims)
    x = np.random.default_rng(spatial_dims).random((4, in_channels, *size), dtype=np.float32)
    expected = torch_run(weights, x, spatial_dims)
    assert np.abs(expected["logits"]).max() > 0.1  # not a degenerate all-zero network
    x_last = np.moveaxis(x, 1, -1)
    assert_same(keras_run(weights, x_last, spatial_dims), expected, "keras")
    assert_same(flax_run(weights, x_last, spatial_dims), expected, "flax")
