"""Per-sample maps, compiled once, and a model left exactly as it was found."""

from __future__ import annotations

import gc
import weakref

import keras
import numpy as np
import pytest

import anycam

pytestmark = pytest.mark.tensorflow


def batchnorm_model(spatial: tuple[int | None, int | None] = (10, 8)) -> keras.Model:
    keras.utils.set_random_seed(11)
    inputs = keras.Input((*spatial, 3))
    hidden = keras.layers.Conv2D(6, 3, padding="same", name="conv")(inputs)
    hidden = keras.layers.BatchNormalization(name="bn")(hidden)
    hidden = keras.layers.ReLU(name="relu")(hidden)
    hidden = keras.layers.Dropout(0.5)(keras.layers.GlobalAveragePooling2D()(hidden))
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(hidden))


def images(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def snapshot(model: keras.Model) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in model.variables]


def assert_unchanged(model: keras.Model, before: list[np.ndarray]) -> None:
    after = snapshot(model)
    assert len(after) == len(before)
    for old, new in zip(before, after, strict=True):
        assert old.tobytes() == new.tobytes()
    for layer in model._flatten_layers():
        assert "call" not in layer.__dict__


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "eigencam"])
def test_batch_equals_each_sample_alone(method: str) -> None:
    model = batchnorm_model()
    x = images(4, 10, 8, 3)
    explainer = anycam.Explainer(model, "relu", method=method)
    targets = np.array([[0, 3], [1, 1], [2, 0], [3, 2]])
    batch = explainer.explain(x, target=targets)
    for index in range(len(x)):
        alone = explainer.explain(x[index : index + 1], target=targets[index : index + 1])
        np.testing.assert_allclose(alone.heatmap[0], batch.heatmap[index], atol=1e-5)
        np.testing.assert_allclose(alone.cam[0], batch.cam[index], rtol=1e-5, atol=1e-6)


def test_repeated_calls_with_the_same_shapes_do_not_retrace() -> None:
    model = batchnorm_model(spatial=(None, None))
    explainer = anycam.Explainer(model, "conv")
    x = images(3, 10, 8, 3)
    explainer(x)
    traces = explainer.backend.trace_count
    assert traces == 1
    for _ in range(3):
        explainer(x)
    explainer(images(5, 10, 8, 3, seed=1))  # another batch size: the batch axis is open
    assert explainer.backend.trace_count == traces
    # Another Explainer of the same model and layer shares the compiled capture.
    other = anycam.Explainer(model, "conv", method="gradcam++")
    other(x)
    assert other.backend.trace_count == traces
    explainer(x, target=[0, 1, 2])  # given indices: one more trace, then none
    explainer(x, target=[3, 2, 1])
    explainer(x, target=1)
    assert explainer.backend.trace_count == traces + 1
    explainer(images(2, 12, 12, 3))  # another spatial size traces once
    explainer(images(2, 12, 12, 3, seed=2))
    assert explainer.backend.trace_count == traces + 2
    target = lambda output: output[:, 0] - output[:, 1]  # noqa: E731
    explainer(x, target=target)
    explainer(x, target=target)
    assert explainer.backend.trace_count == traces + 3


def test_variables_bit_identical_after_a_call_and_after_exceptions() -> None:
    model = batchnorm_model()
    x = images(3, 10, 8, 3)
    before = snapshot(model)
    for method in ("gradcam", "eigencam"):
        anycam.Explainer(model, "conv", method=method)(x, target=anycam.top_k(2))
    assert_unchanged(model, before)
    explainer = anycam.Explainer(model, "conv")
    with pytest.raises(anycam.TargetError, match="out of range"):
        explainer(x, target=7)
    with pytest.raises(anycam.TargetError, match="callable target"):
        explainer(x, target=lambda output: 3.0)
    assert_unchanged(model, before)


def test_training_flag_and_trainable_state_untouched() -> None:
    model = batchnorm_model()
    model.get_layer("conv").trainable = False
    anycam.Explainer(model, "conv")(images(2, 10, 8, 3))
    assert model.get_layer("conv").trainable is False
    assert model.get_layer("bn").trainable is True


def test_explainer_does_not_keep_the_model_alive() -> None:
    model = batchnorm_model()
    anycam.Explainer(model, "conv")(images(2, 10, 8, 3))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_predict_returns_the_selected_output() -> None:
    model = batchnorm_model()
    x = images(2, 10, 8, 3)
    explainer = anycam.Explainer(model, "conv")
    np.testing.assert_allclose(explainer.backend.predict(x), model(x, training=False).numpy(), rtol=1e-6)
