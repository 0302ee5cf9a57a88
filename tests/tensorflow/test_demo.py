"""The Keras port of the demo CNN reproduces torch's logits (the npz oracle) without importing torch."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from anycam.backends.tensorflow.demo import INPUT_LAYOUT, build_demo_model

import anycam
from anycam.demo.data import BN_EPS, EXPLAIN_LAYERS, load_demo
from anycam.demo.weights import demo_weight_shapes, random_demo_weights

pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def model(demo):
    return build_demo_model(demo["weights"])


def channels_last(images: np.ndarray) -> np.ndarray:
    return np.moveaxis(images, 1, -1)


def stage_outputs(model, x: np.ndarray) -> dict[str, np.ndarray]:
    probe = keras.Model(model.input, [model.get_layer(name).output for name in EXPLAIN_LAYERS])
    return {name: np.asarray(out) for name, out in zip(EXPLAIN_LAYERS, probe(x), strict=True)}


def test_logits_match_torchs_and_the_reported_accuracy(demo, model):
    assert INPUT_LAYOUT == "channels_last"
    logits = np.asarray(model(channels_last(demo["images"])))
    np.testing.assert_allclose(logits, demo["logits"], rtol=1e-4, atol=1e-4)
    assert float((logits.argmax(1) == demo["labels"]).mean()) == demo["accuracy"]


def test_batch_norms_stay_in_inference_mode_even_when_training(demo, model):
    x = channels_last(demo["images"][:8])
    np.testing.assert_allclose(np.asarray(model(x, training=True)), demo["logits"][:8], rtol=1e-4, atol=1e-4)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 7
    assert all(layer.epsilon == BN_EPS and not layer.trainable for layer in norms)


def test_every_conv_is_an_explicit_pad_then_a_valid_bias_free_conv(model):
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 7
    for conv in convs:
        assert conv.padding == "valid" and not conv.use_bias and conv.kernel_size == (3, 3)
        pad = model.get_layer(f"{conv.name}_pad")
        assert isinstance(pad, keras.layers.ZeroPadding2D) and pad.padding == ((1, 1), (1, 1))
        assert conv.input is pad.output
    assert sorted(conv.strides[0] for conv in convs) == [1, 1, 1, 1, 1, 2, 2]


def test_layers_are_named_after_torch_paths_and_weights_load_exactly(demo, model):
    weights = demo["weights"]
    for name, array in weights.items():
        path, field = name.rsplit(".", 1)
        layer = model.get_layer(path.replace(".", "_"))
        if field != "weight":
            continue
        loaded = [np.asarray(w) for w in layer.get_weights()]
        if path == "fc":
            np.testing.assert_array_equal(loaded[0], array.T)
            np.testing.assert_array_equal(loaded[1], weights["fc.bias"])
        elif array.ndim == 4:
            np.testing.assert_array_equal(loaded[0], array.transpose(2, 3, 1, 0))
        else:
            fields = ("weight", "bias", "running_mean", "running_var")
            for value, field_name in zip(loaded, fields, strict=True):
                np.testing.assert_array_equal(value, weights[f"{path}.{field_name}"])


def test_the_stages_to_explain_are_layers_with_the_documented_shapes(demo, model):
    outputs = stage_outputs(model, channels_last(demo["images"][:2]))
    assert {name: out.shape for name, out in outputs.items()} == {
        "stage1": (2, 32, 32, 32),
        "stage3": (2, 64 // 4, 64 // 4, 64),
    }
    assert all(out.min() >= 0 for out in outputs.values())  # each is a ReLU's output
    assert [model.get_layer(name).__class__ for name in ("stem", "stage2")] == [keras.layers.ReLU] * 2


@pytest.mark.parametrize(("spatial_dims", "in_channels", "size"), [(1, 3, (37,)), (3, 2, (9, 12, 10))])
def test_1d_and_3d_variants_build_with_the_same_names(spatial_dims, in_channels, size):
    weights = random_demo_weights(spatial_dims, in_channels, seed=1)
    variant = build_demo_model(weights, spatial_dims=spatial_dims, in_channels=in_channels)
    x = np.random.default_rng(0).random((2, *size, in_channels), dtype=np.float32)
    half = tuple((s - 1) // 2 + 1 for s in size)
    quarter = tuple((s - 1) // 2 + 1 for s in half)
    outputs = stage_outputs(variant, x)
    assert outputs["stage1"].shape == (2, *half, 32)
    assert outputs["stage3"].shape == (2, *quarter, 64)
    assert np.asarray(variant(x)).shape == (2, 10)
    paths = {name.rsplit(".", 1)[0].replace(".", "_") for name in demo_weight_shapes(spatial_dims, in_channels)}
    assert paths <= {layer.name for layer in variant.layers}
    conv_type = getattr(keras.layers, f"Conv{spatial_dims}D")
    kernel = variant.get_layer("stem_conv")
    assert isinstance(kernel, conv_type)
    np.testing.assert_array_equal(
        np.asarray(kernel.kernel), weights["stem.conv.weight"].transpose(*range(2, 2 + spatial_dims), 1, 0)
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
    with pytest.raises(anycam.InputError, match="spatial_dims"):
        build_demo_model(spatial_dims=4)
