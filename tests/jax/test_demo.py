"""The Flax linen port of the demo CNN reproduces torch's logits (the npz oracle) without importing torch."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from anycam.backends.jax.demo import INPUT_LAYOUT, build_demo_model

import anycam
from anycam.demo.data import BN_EPS, EXPLAIN_LAYERS, load_demo
from anycam.demo.weights import random_demo_weights

pytestmark = pytest.mark.jax


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def port(demo):
    return build_demo_model(demo["weights"])


def channels_last(images: np.ndarray) -> np.ndarray:
    return np.moveaxis(images, 1, -1)


def module_outputs(module, variables, x: np.ndarray) -> dict[tuple[str, ...], np.ndarray]:
    """Every submodule's ``__call__`` output by module path, as an interceptor sees it."""
    outputs = {}

    def record(next_fun, args, kwargs, context):  # type: ignore[no-untyped-def]
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            outputs[context.module.path] = np.asarray(out)
        return out

    with nn.intercept_methods(record):
        module.apply(variables, x)
    return outputs


def shapes(tree) -> dict:  # type: ignore[no-untyped-def]
    return jax.tree_util.tree_map(lambda leaf: tuple(np.shape(leaf)), tree)


def test_logits_match_torchs_and_the_reported_accuracy(demo, port):
    module, variables = port
    assert INPUT_LAYOUT == "channels_last"
    logits = np.asarray(module.apply(variables, channels_last(demo["images"])))
    np.testing.assert_allclose(logits, demo["logits"], rtol=1e-4, atol=1e-4)
    assert float((logits.argmax(1) == demo["labels"]).mean()) == demo["accuracy"]
    jitted = jax.jit(module.apply)(variables, channels_last(demo["images"][:4]))
    np.testing.assert_allclose(np.asarray(jitted), demo["logits"][:4], rtol=1e-4, atol=1e-4)


def test_variables_have_flax_init_structure_and_the_torch_values(demo, port):
    module, variables = port
    initialised = jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
    assert set(variables) == {"params", "batch_stats"}
    assert shapes(variables) == shapes(dict(initialised))
    assert shapes(build_demo_model()[1]) == shapes(variables)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(variables))
    weights, params, stats = demo["weights"], variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(
        params["stage3"]["block"]["conv1"]["kernel"], weights["stage3.block.conv1.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(params["stage2"]["bn2"]["scale"], weights["stage2.bn2.weight"])
    np.testing.assert_array_equal(params["stage2"]["bn2"]["bias"], weights["stage2.bn2.bias"])
    np.testing.assert_array_equal(stats["stage1"]["bn"]["mean"], weights["stage1.bn.running_mean"])
    np.testing.assert_array_equal(stats["stage1"]["bn"]["var"], weights["stage1.bn.running_var"])
    np.testing.assert_array_equal(params["fc"]["kernel"], weights["fc.weight"].T)
    np.testing.assert_array_equal(params["fc"]["bias"], weights["fc.bias"])


def test_every_conv_pads_one_explicitly_and_every_bn_is_in_inference_mode(port):
    module, variables = port
    bound = module.bind(variables)
    convs, norms = [], []

    def record(next_fun, args, kwargs, context):  # type: ignore[no-untyped-def]
        if isinstance(context.module, nn.Conv):
            convs.append(context.module)
        elif isinstance(context.module, nn.BatchNorm):
            norms.append(context.module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        bound(np.zeros((1, 8, 8, 1), np.float32))
    assert len(convs) == len(norms) == 7
    assert all(c.padding == ((1, 1), (1, 1)) and not c.use_bias and tuple(c.kernel_size) == (3, 3) for c in convs)
    assert sorted(c.strides[0] for c in convs) == [1, 1, 1, 1, 1, 2, 2]
    assert all(n.use_running_average is True and n.epsilon == BN_EPS for n in norms)


def test_the_stages_to_explain_are_module_paths_with_the_documented_shapes(demo, port):
    outputs = module_outputs(*port, channels_last(demo["images"][:2]))
    assert {name: outputs[(name,)].shape for name in EXPLAIN_LAYERS} == {
        "stage1": (2, 32, 32, 32),
        "stage3": (2, 16, 16, 64),
    }
    # Each stage's output is its final ReLU: the last inner module's output, rectified (and residual-added).
    np.testing.assert_array_equal(outputs[("stage1",)], np.maximum(outputs[("stage1", "bn")], 0))
    block_sum = outputs[("stage3", "block", "bn2")] + outputs[("stage3", "down")]
    np.testing.assert_allclose(outputs[("stage3",)], np.maximum(block_sum, 0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("spatial_dims", "in_channels", "size"), [(1, 3, (37,)), (3, 2, (9, 12, 10))])
def test_1d_and_3d_variants_build_with_the_same_paths(spatial_dims, in_channels, size):
    weights = random_demo_weights(spatial_dims, in_channels, seed=1)
    module, variables = build_demo_model(weights, spatial_dims=spatial_dims, in_channels=in_channels)
    x = np.random.default_rng(0).random((2, *size, in_channels), dtype=np.float32)
    half = tuple((s - 1) // 2 + 1 for s in size)
    quarter = tuple((s - 1) // 2 + 1 for s in half)
    outputs = module_outputs(module, variables, x)
    assert outputs[("stage1",)].shape == (2, *half, 32)
    assert outputs[("stage3",)].shape == (2, *quarter, 64)
    assert outputs[()].shape == (2, 10)
    probe = np.zeros((1, *[4] * spatial_dims, in_channels), np.float32)
    assert shapes(variables) == shapes(dict(jax.eval_shape(module.init, jax.random.key(0), probe)))
    np.testing.assert_array_equal(
        variables["params"]["stem"]["conv"]["kernel"],
        weights["stem.conv.weight"].transpose(*range(2, 2 + spatial_dims), 1, 0),
    )


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda w: w.pop("fc.bias"), "missing"),
        (lambda w: w.__setitem__("fc.extra", np.zeros(1)), "unknown"),
        (lambda w: w.__setitem__("fc.bias", np.zeros(3, np.float32)), "shape"),
    ],
)
def test_bad_weights_are_named(demo, edit, match):
    weights = dict(demo["weights"])
    edit(weights)
    with pytest.raises(anycam.InputError, match=match):
        build_demo_model(weights)


def test_a_bad_variant_is_named():
    with pytest.raises(anycam.InputError, match="in_channels"):
        build_demo_model(in_channels=0)
