"""Every way people build Keras models, each checked against an independent GradientTape."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import anycam
from anycam import core

pytestmark = pytest.mark.tensorflow

RNG = np.random.default_rng(0)


def images(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def reference_cam(features, head, x, classes: np.ndarray, layout: str = "channels_last"):  # type: ignore[no-untyped-def]
    """Grad-CAM of ``head(features(x))`` by a plain tape: per-sample α, ReLU, no normalisation."""
    activations = tf.convert_to_tensor(features(x))
    with tf.GradientTape() as tape:
        tape.watch(activations)
        outputs = head(activations)
        scores = tf.gather(outputs, classes[:, None], batch_dims=1)
    gradients = tape.gradient(scores, activations)
    acts = core.to_channels_first(np.asarray(activations, np.float32), layout)
    grads = core.to_channels_first(np.asarray(gradients, np.float32), layout)
    alpha = grads.mean(axis=tuple(range(2, grads.ndim)))
    return np.maximum(np.einsum("nc...,nc->n...", acts, alpha), 0)


def assert_cam(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = max(float(np.abs(expected).max()), 1e-12)
    np.testing.assert_allclose(actual / scale, expected / scale, atol=1e-5)


def test_sequential_by_name() -> None:
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((10, 9, 3)),
            keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.Conv2D(8, 3, padding="same", name="conv2"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4),
        ]
    )
    x = images(3, 10, 9, 3)
    classes = np.array([0, 3, 1])
    result = anycam.Explainer(model, "conv2").explain(x, target=classes)
    layers = model.layers
    expected = reference_cam(
        lambda t: layers[1](layers[0](t)),
        lambda a: layers[4](layers[3](layers[2](a))),
        x,
        classes,
    )
    assert_cam(result.cam, expected)
    assert result.heatmap.shape == (3, 10, 9)
    np.testing.assert_array_equal(result.target, classes)
    np.testing.assert_allclose(result.scores, model(x).numpy()[np.arange(3), classes], rtol=1e-5)


def residual_model() -> keras.Model:
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 3))
    stem = keras.layers.Conv2D(6, 3, padding="same", name="stem")(inputs)
    branch = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="branch")(stem)
    merged = keras.layers.Add(name="merge")([stem, branch])
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Activation("tanh")(merged))
    return keras.Model(inputs, keras.layers.Dense(5, name="logits")(pooled))


def test_functional_with_a_skip_connection_around_the_layer() -> None:
    # A sub-model from the branch to the output would be "Graph disconnected" (the skip path).
    model = residual_model()
    x = images(2, 8, 8, 3)
    classes = np.array([4, 1])
    result = anycam.Explainer(model, "branch").explain(x, target=classes)
    stem, branch, merge = (model.get_layer(n) for n in ("stem", "branch", "merge"))
    stem_out = stem(x)

    def head(a):  # type: ignore[no-untyped-def]
        merged = merge([stem_out, a])
        return model.get_layer("logits")(model.layers[-2](model.layers[-3](merged)))

    assert_cam(result.cam, reference_cam(lambda t: branch(stem(t)), head, x, classes))


def two_output_model() -> keras.Model:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    features = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="features")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    side = keras.layers.Conv2D(4, 3, padding="same", name="side")(inputs)
    side_pooled = keras.layers.GlobalAveragePooling2D()(side)
    logits = keras.layers.Dense(5, name="logits")(pooled)
    aux = keras.layers.Dense(3, name="aux")(keras.layers.Concatenate()([pooled, side_pooled]))
    return keras.Model(inputs, [logits, aux])


def test_multi_output_functional_needs_and_uses_an_output_selector() -> None:
    model = two_output_model()
    x = images(2, 8, 8, 3)
    with pytest.raises(anycam.TargetError, match="output=0"):
        anycam.Explainer(model, "features")(x)
    logits, aux = (np.asarray(o) for o in model(x))
    first = anycam.Explainer(model, "features", output=0).explain(x)
    second = anycam.Explainer(model, "features", output=1).explain(x)
    np.testing.assert_array_equal(first.target, logits.argmax(1))
    np.testing.assert_array_equal(second.target, aux.argmax(1))
    np.testing.assert_allclose(second.scores, aux.max(1), rtol=1e-5)
    assert first.heatmap.shape == second.heatmap.shape == (2, 8, 8)


def test_output_that_does_not_depend_on_the_layer_is_an_error() -> None:
    model = two_output_model()
    explainer = anycam.Explainer(model, "side", output=0)
    with pytest.raises(anycam.LayerError, match="does not reach the explained output"):
        explainer(images(2, 8, 8, 3))
    assert "call" not in model.get_layer("side").__dict__


def nested_model() -> keras.Model:
    keras.utils.set_random_seed(4)
    inner = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(6, 3, padding="same", name="conv"),
            keras.layers.ReLU(name="relu"),
        ],
        name="inner",
    )
    inputs = keras.Input((8, 8, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inner(inputs))
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(pooled))


def test_nested_model_by_path_bare_name_and_object() -> None:
    model = nested_model()
    inner = model.get_layer("inner")
    x = images(2, 8, 8, 3)
    by_path = anycam.Explainer(model, "inner/conv")
    by_name = anycam.Explainer(model, "conv")
    by_object = anycam.Explainer(model, inner.get_layer("conv"))
    assert by_path.layer_names == by_name.layer_names == by_object.layer_names == ("inner/conv",)
    classes = np.array([2, 0])
    expected = reference_cam(
        inner.get_layer("conv"),
        lambda a: model.get_layer("logits")(model.layers[-2](inner.get_layer("relu")(a))),
        x,
        classes,
    )
    for explainer in (by_path, by_name, by_object):
        assert_cam(explainer.explain(x, target=classes).cam, expected)


def test_resnet50_backbone_nested_in_a_classifier() -> None:
    keras.utils.set_random_seed(5)
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    inputs = keras.Input((64, 64, 3))
    pooling = keras.layers.GlobalAveragePooling2D()
    dense = keras.layers.Dense(3)
    model = keras.Model(inputs, dense(pooling(base(inputs))))
    x = images(2, 64, 64, 3)
    by_path = anycam.Explainer(model, "resnet50/conv5_block3_out")
    by_object = anycam.Explainer(model, base.get_layer("conv5_block3_out"))
    assert by_object.layer_names == ("resnet50/conv5_block3_out",)
    classes = np.array([1, 2])
    expected = reference_cam(lambda t: base(t, training=False), lambda a: dense(pooling(a)), x, classes)
    result = by_path.explain(x, target=classes)
    assert_cam(result.cam, expected)
    assert_cam(by_object.explain(x, target=classes).cam, expected)
    assert result.cam.shape == (2, 2, 2) and result.heatmap.shape == (2, 64, 64)


class Subclassed(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.features = keras.Sequential([keras.layers.Conv2D(6, 3, padding="same"), keras.layers.ReLU()], name="body")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.fc = keras.layers.Dense(4)
        self.fail = False

    def call(self, x):  # type: ignore[no-untyped-def]
        hidden = self.features(x)
        if self.fail:
            raise RuntimeError("the model failed")
        return self.fc(self.pool(hidden))


def test_subclassed_model_by_attribute_name_and_call_restored() -> None:
    keras.utils.set_random_seed(6)
    model = Subclassed()
    x = images(3, 9, 7, 3)
    model(x)
    explainer = anycam.Explainer(model, "features")
    assert explainer.layer_names == ("features",)
    assert anycam.Explainer(model, "body").layer_names == ("body",)
    classes = np.array([3, 0, 1])
    result = explainer.explain(x, target=classes)
    expected = reference_cam(model.features, lambda a: model.fc(model.pool(a)), x, classes)
    assert_cam(result.cam, expected)
    assert "call" not in model.features.__dict__


def test_subclassed_model_that_raises_leaves_nothing_patched() -> None:
    keras.utils.set_random_seed(6)
    model = Subclassed()
    x = images(2, 9, 7, 3)
    model(x)
    explainer = anycam.Explainer(model, model.features)
    model.fail = True
    with pytest.raises(RuntimeError, match="the model failed"):
        explainer(x)
    assert "call" not in model.features.__dict__
    model.fail = False
    assert explainer(x).shape == (2, 9, 7)
    assert "call" not in model.features.__dict__


def test_unbuilt_subclassed_model_is_built_on_first_use() -> None:
    model = Subclassed()
    explainer = anycam.Explainer(model, "features")
    assert explainer(images(2, 9, 7, 3)).shape == (2, 9, 7)


def test_frozen_model_gives_the_same_maps() -> None:
    model = residual_model()
    x = images(2, 8, 8, 3)
    before = anycam.Explainer(model, "stem").explain(x, target=1)
    model.trainable = False
    after = anycam.Explainer(model, "stem").explain(x, target=1)
    np.testing.assert_allclose(after.cam, before.cam, rtol=1e-6)
    assert after.cam.max() > 0


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_gives_float32_maps_close_to_float32(policy: str) -> None:
    reference = residual_model()
    keras.mixed_precision.set_global_policy(policy)
    try:
        mixed = residual_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(reference.get_weights())
    assert mixed.get_layer("branch").compute_dtype != "float32"
    x = images(2, 8, 8, 3)
    expected = anycam.Explainer(reference, "branch").explain(x, target=[0, 2])
    result = anycam.Explainer(mixed, "branch").explain(x, target=[0, 2])
    for array in (result.cam, result.heatmap, result.scores, result.weights):
        assert array.dtype == np.float32 and np.isfinite(array).all()
    tolerance = 0.05 if policy == "mixed_bfloat16" else 0.01
    np.testing.assert_allclose(result.heatmap, expected.heatmap, atol=tolerance * 4)
    np.testing.assert_allclose(result.scores, expected.scores, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_conv_nd_maps_have_the_input_resolution(spatial: int) -> None:
    conv = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[spatial]
    pool = {
        1: keras.layers.GlobalAveragePooling1D,
        2: keras.layers.GlobalAveragePooling2D,
        3: keras.layers.GlobalAveragePooling3D,
    }[spatial]
    shape = (9, 7, 5)[:spatial]
    model = keras.Sequential(
        [keras.Input((*shape, 2)), conv(4, 3, strides=2, name="conv"), pool(), keras.layers.Dense(3)]
    )
    explainer = anycam.Explainer(model, "conv")
    assert explainer.backend.layouts == ("channels_last",)
    assert explainer(images(2, *shape, 2), target=1).shape == (2, *shape)


def test_channels_first_layout_is_read_from_the_layers() -> None:
    # TensorFlow's CPU kernels cannot run NCHW convolutions; the layout guess needs no forward.
    model = keras.Sequential(
        [
            keras.Input((3, 16, 16)),
            keras.layers.Conv2D(4, 3, data_format="channels_first", name="conv"),
            keras.layers.ReLU(name="relu"),
            keras.layers.GlobalAveragePooling2D(data_format="channels_first"),
            keras.layers.Dense(2),
        ]
    )
    for layer in ("conv", "relu"):
        explainer = anycam.Explainer(model, layer)
        assert explainer.backend.layouts == ("channels_first",)
        assert explainer.backend.input_layout == "channels_first"
    assert anycam.Explainer(model, "conv", input_layout="NHWC").backend.input_layout == "channels_last"


@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="NCHW convolutions need a GPU")
def test_channels_first_conv_on_gpu() -> None:
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((3, 12, 10)),
            keras.layers.Conv2D(4, 3, padding="same", data_format="channels_first", name="conv"),
            keras.layers.GlobalAveragePooling2D(data_format="channels_first"),
            keras.layers.Dense(2),
        ]
    )
    x = images(2, 3, 12, 10)
    result = anycam.Explainer(model, "conv").explain(x, target=[0, 1])
    expected = reference_cam(
        model.get_layer("conv"),
        lambda a: model.layers[-1](model.layers[-2](a)),
        x,
        np.array([0, 1]),
        layout="channels_first",
    )
    assert_cam(result.cam, expected)
    assert result.heatmap.shape == (2, 12, 10)


def vit_like() -> keras.Model:
    keras.utils.set_random_seed(8)
    image = keras.Input((16, 16, 3))
    patches = keras.layers.Conv2D(8, 4, strides=4, name="patchify")(image)
    tokens = keras.layers.Reshape((16, 8), name="tokens")(patches)
    attention = keras.layers.MultiHeadAttention(2, 4, name="attention")(tokens, tokens)
    block = keras.layers.Add(name="block")([tokens, attention])
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization()(block))
    return keras.Model(image, keras.layers.Dense(3)(pooled))


def test_token_layout_of_a_vit_style_model() -> None:
    model = vit_like()
    x = images(2, 16, 16, 3)
    result = anycam.Explainer(model, "block", layout="tokens").explain(x, target=[2, 0])
    assert result.cam.shape == (2, 4, 4)
    assert result.heatmap.shape == (2, 16, 16)
    assert result.weights.shape == (2, 8)
    block = model.get_layer("block")
    features = keras.Model(model.inputs[0], block.output)
    head_input = keras.Input((16, 8))
    head = head_input
    for layer in model.layers[model.layers.index(block) + 1 :]:
        head = layer(head)
    head_model = keras.Model(head_input, head)
    expected = reference_cam(features, head_model, x, np.array([2, 0]), layout="tokens")
    assert_cam(result.cam, expected)


class Features(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kernel = tf.Variable(RNG.normal(size=(3, 3, 3, 5)).astype(np.float32))

    @tf.function
    def __call__(self, x):  # type: ignore[no-untyped-def]
        return tf.nn.relu(tf.nn.conv2d(x, self.kernel, 1, "SAME"))


def test_plain_tf_module_and_function_as_a_features_head_pair() -> None:
    features = Features()
    weights = tf.constant(RNG.normal(size=(5, 4)).astype(np.float32))

    @tf.function
    def head(a):  # type: ignore[no-untyped-def]
        return tf.tanh(tf.reduce_mean(a, axis=(1, 2))) @ weights

    x = images(3, 8, 6, 3)
    classes = np.array([0, 3, 2])
    expected = reference_cam(features, head, x, classes)
    for layer in (None, "features"):
        explainer = anycam.Explainer((features, head), layer, backend="tensorflow")
        result = explainer.explain(x, target=classes)
        assert_cam(result.cam, expected)
        assert result.heatmap.shape == (3, 8, 6)
    np.testing.assert_allclose(explainer.backend.predict(x), head(features(x)).numpy(), rtol=1e-6)
    with pytest.raises(anycam.LayerError, match="features"):
        anycam.Explainer((features, head), "conv", backend="tensorflow")
    with pytest.raises(TypeError, match=r"\(features, head\)"):
        anycam.Explainer(features, None)


class _SavedFeatures(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kernel = tf.Variable(RNG.normal(size=(3, 3, 3, 5)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec((None, 8, 6, 3), tf.float32)])
    def __call__(self, x):  # type: ignore[no-untyped-def]
        return tf.nn.relu(tf.nn.conv2d(x, self.kernel, 1, "SAME"))


class _SavedHead(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weights = tf.Variable(RNG.normal(size=(5, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec((None, 8, 6, 5), tf.float32)])
    def __call__(self, a):  # type: ignore[no-untyped-def]
        return tf.tanh(tf.reduce_mean(a, axis=(1, 2))) @ self.weights


class _SavedNet(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _SavedFeatures()
        self.classifier = _SavedHead()

    @tf.function(input_signature=[tf.TensorSpec((None, 8, 6, 3), tf.float32)])
    def __call__(self, x):  # type: ignore[no-untyped-def]
        return self.classifier(self.encoder(x))


@pytest.fixture(scope="module")
def saved_net(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = str(tmp_path_factory.mktemp("saved_net"))
    tf.saved_model.save(_SavedNet(), path)
    return tf.saved_model.load(path)


def test_a_loaded_saved_model_is_refused_with_the_pair_recipe_that_works(saved_net) -> None:  # type: ignore[no-untyped-def]
    assert not isinstance(saved_net, (tf.Module, keras.Layer))  # an AutoTrackable
    with pytest.raises(anycam.ConfigTypeError) as info:
        anycam.Explainer(saved_net, None, backend="tensorflow")
    message = str(info.value)
    assert "SavedModel" in message and "Explainer((features, head), None, backend='tensorflow')" in message
    assert "'classifier', 'encoder'" in message  # the parts it holds, to split it with
    # The recipe the message gives works on the loaded parts, and equals a plain tape's Grad-CAM.
    x = images(3, 8, 6, 3)
    classes = np.array([1, 3, 0])
    explainer = anycam.Explainer((saved_net.encoder, saved_net.classifier), None, backend="tensorflow")
    expected = reference_cam(saved_net.encoder, saved_net.classifier, x, classes)
    assert_cam(explainer.explain(x, target=classes).cam, expected)
    np.testing.assert_allclose(explainer.backend.predict(x), saved_net(tf.constant(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_a_loaded_saved_model_is_detected_as_tensorflow(saved_net) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(anycam.ConfigTypeError, match=r"SavedModel.*\(features, head\)"):
        anycam.Explainer(saved_net, None)
