"""Bad layers, bad inputs, the wrong Keras backend: clear errors, and the model untouched."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import anycam

pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def model() -> keras.Model:
    keras.utils.set_random_seed(21)
    inner = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="conv"), keras.layers.ReLU(name="relu")],
        name="inner",
    )
    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.GlobalAveragePooling2D(name="pool")(inner(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(hidden))


def x(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=shape or (2, 8, 8, 3)).astype(np.float32)


def test_unknown_layer_lists_close_names(model: keras.Model) -> None:
    with pytest.raises(anycam.LayerError, match=r"'lgits' not found.*closest: 'logits'"):
        anycam.Explainer(model, "lgits")
    with pytest.raises(anycam.LayerError, match=r"closest: 'inner/conv'"):
        anycam.Explainer(model, "inner/cnv")


def test_foreign_layer_object_and_the_model_itself(model: keras.Model) -> None:
    with pytest.raises(anycam.LayerError, match="not part of the model"):
        anycam.Explainer(model, keras.layers.Conv2D(2, 3, name="stranger"))
    with pytest.raises(anycam.LayerError, match="model itself"):
        anycam.Explainer(model, model)
    with pytest.raises(anycam.LayerError, match="a Keras layer is a layer name"):
        anycam.Explainer(model, 3.5)


def test_ambiguous_bare_name_asks_for_a_path() -> None:
    def block(name: str) -> keras.Model:
        return keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(2, 1, name="conv")], name=name)

    inputs = keras.Input((6, 6, 2))
    hidden = block("second")(block("first")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(hidden)))
    with pytest.raises(anycam.LayerError, match=r"ambiguous.*'first/conv', 'second/conv'"):
        anycam.Explainer(model, "conv")
    assert anycam.Explainer(model, "second/conv").layer_names == ("second/conv",)


def test_layer_without_spatial_output(model: keras.Model) -> None:
    with pytest.raises(anycam.InputError, match="no spatial axis"):
        anycam.Explainer(model, "pool")(x())


def test_layer_that_never_runs() -> None:
    keras.utils.set_random_seed(22)
    spare = keras.layers.Conv2D(2, 3, name="spare")

    class Model(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.conv = keras.layers.Conv2D(2, 3)
            self.spare = spare
            self.head = keras.layers.Dense(2)

        def call(self, inputs):  # type: ignore[no-untyped-def]
            return self.head(keras.ops.mean(self.conv(inputs), axis=(1, 2)))

    subclassed = Model()
    spare.build((None, 8, 8, 3))
    subclassed(x())
    with pytest.raises(anycam.LayerError, match="did not run"):
        anycam.Explainer(subclassed, "spare")(x())
    assert "call" not in spare.__dict__


def test_shared_layer_that_runs_twice() -> None:
    keras.utils.set_random_seed(23)
    shared = keras.layers.Conv2D(3, 1, name="shared")
    inputs = keras.Input((6, 6, 3))
    twice = shared(shared(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(twice)))
    with pytest.raises(anycam.LayerError, match="more than once"):
        anycam.Explainer(model, "shared")(x(2, 6, 6, 3))
    assert "call" not in shared.__dict__


def test_keras_on_another_backend(model: keras.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    # Detection sends a Keras model on JAX to the jax backend; forcing tensorflow says where it goes.
    monkeypatch.setattr(keras.config, "backend", lambda: "jax")
    with pytest.raises(anycam.BackendError, match=r"'jax' backend.*backend='jax'.*KERAS_BACKEND=tensorflow"):
        anycam.Explainer(model, "logits", backend="tensorflow")


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (np.zeros((2, 8, 8), np.float32), r"does not fit the model's input \(None, 8, 8, 3\)"),
        (np.zeros((2, 8, 8, 4), np.float32), r"does not fit"),
        (np.zeros((2, 8, 8, 3), np.int32), "floating point"),
        (tf.zeros((2, 8, 8, 3), tf.int32), "floating point"),
        ([[0.0]], "floating-point array with spatial axes; the inputs are 0: list"),  # a list is several inputs
        ({"x": np.zeros((2, 8, 8, 3), np.float32), "y": "text"}, "input .y. must be a tf.Tensor or a NumPy array"),
    ],
)
def test_wrong_input(model: keras.Model, inputs: object, message: str) -> None:
    with pytest.raises(anycam.InputError, match=message):
        anycam.Explainer(model, "inner/conv")(inputs)


def test_subclassed_model_input_without_spatial_axes() -> None:
    inputs = tf.zeros((2, 5))
    features = tf.function(lambda t: t * 2.0)
    head = tf.function(lambda a: a[:, :2])
    with pytest.raises(anycam.InputError, match="no spatial axis"):
        anycam.Explainer((features, head), None, backend="tensorflow")(inputs)


def test_bad_targets(model: keras.Model) -> None:
    explainer = anycam.Explainer(model, "inner/conv")
    with pytest.raises(anycam.TargetError, match="for a batch of"):
        explainer(x(), target=[0, 1, 2])
    with pytest.raises(anycam.TargetError, match="out of range"):
        explainer(x(), target=[[0, 3], [1, 1]])
    with pytest.raises(anycam.TargetError, match="more classes than the model has"):
        explainer(x(), target=anycam.top_k(4))
    with pytest.raises(anycam.TargetError, match=r"\(N,\) or \(N, K\)"):
        explainer(x(), target=lambda output: tf.reduce_sum(output))


def test_unknown_option_and_model_type(model: keras.Model) -> None:
    with pytest.raises(TypeError, match="unknown option"):
        anycam.Explainer(model, "inner/conv", backend="tensorflow", jit=True)
    with pytest.raises(TypeError, match="Keras 3 model"):
        anycam.Explainer(object(), "conv", backend="tensorflow")


class SubclassedNet(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3)
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.dense = keras.layers.Dense(2)

    def call(self, x):  # type: ignore[no-untyped-def]
        return self.dense(self.pool(self.conv(x)))


def test_a_subclassed_model_that_fails_on_the_input_is_an_input_error() -> None:
    """Issue 10, item 8: Keras's raw ValueError (no model.inputs to check against) is wrapped."""
    model = SubclassedNet()
    model(tf.zeros((1, 8, 8, 3)))
    explainer = anycam.Explainer(model, "conv")
    assert explainer(tf.zeros((2, 8, 8, 3))).shape == (2, 8, 8)
    with pytest.raises(anycam.InputError, match=r"shape \(2, 8, 8, 5\), read as channels_last") as info:
        explainer(tf.zeros((2, 8, 8, 5)))
    assert isinstance(info.value.__cause__, ValueError)


# -- issue 19.15: a model's own exception keeps its type -----------------------------------------


class Refusing(keras.Model):
    """A subclassed model that raises in its own ``call``: ``how`` says what it raises."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = keras.layers.Conv2D(4, 3, name="conv")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.dense = keras.layers.Dense(2)

    def call(self, x):  # type: ignore[no-untyped-def]
        if self.how == "assertion":
            # The model's own check; the test inputs are all 200.
            tf.debugging.assert_less(tf.reduce_max(x), 100.0, message="pixel values must be below 100")
        elif self.how == "value":
            raise ValueError("the model refuses: calibration table not loaded")
        elif self.how == "runtime":
            raise RuntimeError("the model refuses: calibration table not loaded")
        return self.dense(self.pool(self.conv(x)))


REFUSALS = {"value": ValueError, "runtime": RuntimeError, "assertion": tf.errors.InvalidArgumentError}


@pytest.mark.parametrize("method", [m for m in anycam.core.METHODS if m not in anycam.core.methods.ATTENTION_METHODS])
@pytest.mark.parametrize("how", sorted(REFUSALS))
def test_a_models_own_exception_keeps_its_type(how: str, method: str) -> None:
    model = Refusing("none")
    model(tf.zeros((1, 8, 8, 3)))  # built: the failure comes from anycam's own forward pass
    model.how = how
    explainer = anycam.Explainer(model, "conv", method=method)
    with pytest.raises(REFUSALS[how]) as info:
        explainer(np.full((2, 8, 8, 3), 200.0, np.float32), target=1)
    assert not isinstance(info.value, anycam.AnycamError)
    assert "pixel values must be below 100" in str(info.value) or "calibration table" in str(info.value)


def test_a_multi_input_models_own_exception_keeps_its_type() -> None:
    class TwoInputs(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3, name="conv")
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):  # type: ignore[no-untyped-def]
            raise ValueError("the model refuses: metadata version 1 is not supported")

    model = TwoInputs()
    with pytest.raises(ValueError, match="metadata version 1") as info:
        anycam.Explainer(model, "conv")({"image": x(), "meta": np.zeros((2, 4), np.float32)}, target=1)
    assert not isinstance(info.value, anycam.AnycamError)


@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 8, 8, 5), (2, 1, 8, 8, 3)])
def test_a_wrong_rank_or_channel_count_is_still_an_input_error(shape: tuple[int, ...]) -> None:
    """The subclassed model declares no input shape, so Keras's own failure is what anycam reads."""
    model = Refusing("none")
    model(tf.zeros((1, 8, 8, 3)))
    with pytest.raises(anycam.InputError, match=rf"shape \({', '.join(map(str, shape))}\)"):
        anycam.Explainer(model, "conv")(np.zeros(shape, np.float32))


def test_token_ids_are_not_advised_to_be_scaled_like_pixels() -> None:
    """Issue 19.14: integer (N, T) ids get the embeddings recipe, an integer image the /255 one."""
    keras.utils.set_random_seed(2)
    ids = keras.Input((6,), dtype="int32")
    hidden = keras.layers.Conv1D(4, 3, name="conv")(keras.layers.Embedding(10, 5)(ids))
    model = keras.Model(ids, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(hidden)))
    with pytest.raises(anycam.InputError, match=r"token ids.*embeddings") as info:
        anycam.Explainer(model, "conv")(np.zeros((2, 6), np.int32))
    assert "255" not in str(info.value)
    image = keras.Input((8, 8, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="conv")(image))
    with pytest.raises(anycam.InputError, match=r"/ 255"):
        anycam.Explainer(keras.Model(image, pooled), "conv")(np.zeros((2, 8, 8, 3), np.uint8))
