"""Contract kit for TensorFlow/Keras 3: small nets ``head(features(x))``, reference by GradientTape.

The model is a Functional ``keras.Model`` whose ``features`` and ``head`` are nested models, so
every contract case also explains a nested model addressed by name. The ``channels_last`` kind of
the suite is, for Keras, the *other* layout: a ``channels_first`` model (TensorFlow's CPU kernels
have no NCHW convolution, so its convolutions transpose around a channels-last kernel while
declaring ``data_format="channels_first"``, as a Keras layer does).
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from .kit import POSITIONS, Case

BATCH, CLASSES = 3, 5


class ChannelsFirstConv2D(keras.layers.Layer):
    """A ``channels_first`` 2-D convolution that runs on CPU."""

    def __init__(self, filters: int, kernel_size: int, strides: int = 1, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.data_format = "channels_first"
        self.conv = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same")

    def call(self, inputs):  # type: ignore[no-untyped-def]
        nhwc = keras.ops.transpose(inputs, (0, 2, 3, 1))
        return keras.ops.transpose(self.conv(nhwc), (0, 3, 1, 2))


class ClassToken(keras.layers.Layer):
    """Prepends a learned class token: (N, T, D) → (N, 1 + T, D)."""

    def build(self, input_shape) -> None:  # type: ignore[no-untyped-def]
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="random_normal")

    def call(self, tokens):  # type: ignore[no-untyped-def]
        batch = keras.ops.shape(tokens)[0]
        token = keras.ops.broadcast_to(self.token, (batch, 1, tokens.shape[-1]))
        return keras.ops.concatenate([token, tokens], axis=1)


class PoolTokens(keras.layers.Layer):
    """(N, 1 + T, D) → (N, 2D): the class token next to the mean of the patch tokens."""

    def call(self, tokens):  # type: ignore[no-untyped-def]
        patches = keras.ops.mean(tokens[:, 1:], axis=1)
        return keras.ops.concatenate([tokens[:, 0], patches], axis=1)


def _layers(spatial: int, channels_first: bool) -> tuple[type, type]:
    if channels_first:
        return ChannelsFirstConv2D, functools.partial(keras.layers.GlobalAveragePooling2D, data_format="channels_first")
    conv = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[spatial]
    pool = {
        1: keras.layers.GlobalAveragePooling1D,
        2: keras.layers.GlobalAveragePooling2D,
        3: keras.layers.GlobalAveragePooling3D,
    }[spatial]
    return conv, pool


def _features(input_shape: tuple[int, ...], conv: type, same: dict) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(input_shape),
            conv(6, 3, **same),
            keras.layers.ReLU(),
            conv(8, 3, strides=2, **same),
            keras.layers.ReLU(),
        ],
        name="features",
    )


def conv_net(input_shape: tuple[int, ...], channels_first: bool = False) -> keras.Model:
    conv, pool = _layers(len(input_shape) - 1, channels_first)
    same = {} if channels_first else {"padding": "same"}
    features = _features(input_shape, conv, same)
    head = keras.Sequential(
        [
            keras.Input(features.outputs[0].shape[1:]),
            conv(8, 1),
            keras.layers.Activation("tanh"),
            pool(),
            keras.layers.Dense(CLASSES),
        ],
        name="head",
    )
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, head(features(inputs)))


def pooled_net(input_shape: tuple[int, ...], kind: str) -> keras.Model:
    """The layer read by a global pooling alone: ``"pooled_head"`` mean pooling (keepdims) →
    Flatten → Dense → Softmax, ``"max_pooled_head"`` max pooling → Dense."""
    features = _features(input_shape, keras.layers.Conv2D, {"padding": "same"})
    if kind == "pooled_head":
        steps = [
            keras.layers.GlobalAveragePooling2D(keepdims=True),
            keras.layers.Flatten(),
            keras.layers.Dense(CLASSES),
            keras.layers.Softmax(),
        ]
    else:
        steps = [keras.layers.GlobalMaxPooling2D(), keras.layers.Dense(CLASSES)]
    head = keras.Sequential([keras.Input(features.outputs[0].shape[1:]), *steps], name="head")
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, head(features(inputs)))


def token_net(dim: int = 8) -> keras.Model:
    """Patch embedding + class token → (N, 1 + 16, D), a residual MLP block, then a token head."""
    image = keras.Input((16, 16, 3))
    patches = keras.layers.Conv2D(dim, 4, strides=4)(image)
    tokens = ClassToken()(keras.layers.Reshape((16, dim))(patches))
    mixed = keras.layers.Add()([tokens, keras.layers.Dense(dim, activation="gelu")(tokens)])
    features = keras.Model(image, mixed, name="features")
    token_input = keras.Input((17, dim))
    pooled = PoolTokens()(keras.layers.Dense(dim, activation="tanh")(token_input))
    head = keras.Model(token_input, keras.layers.Dense(CLASSES)(pooled), name="head")
    inputs = keras.Input((16, 16, 3))
    return keras.Model(inputs, head(features(inputs)))


@functools.cache
def _model_and_inputs(kind: str) -> tuple[keras.Model, tf.Tensor]:
    keras.utils.set_random_seed(0)
    if kind == "conv2d":
        shape: tuple[int, ...] = (12, 10, 3)
        model = conv_net(shape)
    elif kind == "conv1d":
        shape = (17, 3)
        model = conv_net(shape)
    elif kind == "conv3d":
        shape = (6, 8, 5, 3)
        model = conv_net(shape)
    elif kind == "channels_last":
        shape = (3, 12, 10)
        model = conv_net(shape, channels_first=True)
    elif kind == "tokens":
        shape = (16, 16, 3)
        model = token_net()
    elif kind in ("pooled_head", "max_pooled_head"):
        shape = (12, 10, 3)
        model = pooled_net(shape, kind)
    else:
        raise ValueError(kind)
    inputs = tf.constant(np.random.default_rng(0).normal(size=(BATCH, *shape)), tf.float32)
    return model, inputs


@functools.cache
def _odd_model(kind: str) -> tuple[keras.Model, tf.Tensor]:
    """``"signal_as_image"``: (N, 17, 3) → Reshape → Conv2D → features (N, 9, 1, 8);
    ``"image_to_signal"``: (N, 10, 10, 3) → Conv2D (10, 1) → Reshape → features (N, 10, 8)."""
    keras.utils.set_random_seed(0)
    if kind == "signal_as_image":
        shape: tuple[int, ...] = (17, 3)
        features = keras.Sequential(
            [
                keras.Input(shape),
                keras.layers.Reshape((17, 1, 3)),
                keras.layers.Conv2D(6, (3, 1), padding="same", activation="relu"),
                keras.layers.Conv2D(8, (3, 1), strides=(2, 1), padding="same"),
            ],
            name="features",
        )
        head_layers = [
            keras.layers.Conv2D(8, 1),
            keras.layers.Activation("tanh"),
            keras.layers.GlobalAveragePooling2D(),
        ]
    else:
        shape = (10, 10, 3)
        features = keras.Sequential(
            [keras.Input(shape), keras.layers.Conv2D(8, (10, 1)), keras.layers.Reshape((10, 8))], name="features"
        )
        head_layers = [
            keras.layers.Conv1D(8, 1),
            keras.layers.Activation("tanh"),
            keras.layers.GlobalAveragePooling1D(),
        ]
    head = keras.Sequential(
        [keras.Input(features.outputs[0].shape[1:]), *head_layers, keras.layers.Dense(CLASSES)], name="head"
    )
    inputs = keras.Input(shape)
    model = keras.Model(inputs, head(features(inputs)))
    return model, tf.constant(np.random.default_rng(0).normal(size=(BATCH, *shape)), tf.float32)


def _reference(features, head, inputs):  # type: ignore[no-untyped-def]
    def reference(cotangents: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        activations = features(inputs, training=False)
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            tape.watch(activations)
            outputs = head(activations, training=False)
        if cotangents is None:
            return activations.numpy(), None, outputs.numpy()
        grads = [tape.gradient(outputs, activations, output_gradients=tf.constant(c)) for c in cotangents]
        return activations.numpy(), tf.stack(grads, axis=1).numpy(), outputs.numpy()

    return reference


@tf.custom_gradient
def guided_relu(z: tf.Tensor):  # type: ignore[no-untyped-def]
    """ReLU whose gradient passes only where the input and the incoming gradient are positive."""

    def gradient(upstream: tf.Tensor) -> tf.Tensor:
        return upstream * tf.cast(z > 0, upstream.dtype) * tf.cast(upstream > 0, upstream.dtype)

    return tf.maximum(z, 0.0), gradient


def guided_by_hand(layers: list, inputs: tf.Tensor, cotangents: np.ndarray) -> np.ndarray:
    """Runs ``layers`` one after the other with every ReLU layer replaced by ``guided_relu``;
    returns the input gradients ``(N, K, ...)`` of the cotangents."""
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        tape.watch(inputs)
        hidden = inputs
        for layer in layers:
            relu = isinstance(layer, keras.layers.ReLU)
            hidden = guided_relu(hidden) if relu else layer(hidden, training=False)
    grads = [tape.gradient(hidden, inputs, output_gradients=tf.constant(c)) for c in cotangents]
    return tf.stack(grads, axis=1).numpy()


def upsample(maps: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """``(N, C, *S)`` → ``(N, C, *size)`` by ``tf.image.resize`` (bilinear, half-pixel), one axis
    at a time: linear interpolation is separable, so this is the N-d linear resize."""
    out = np.asarray(maps, dtype=np.float64)
    for axis, length in enumerate(size, start=2):
        moved = np.moveaxis(out, axis, -1)
        flat = moved.reshape(-1, moved.shape[-1], 1, 1)  # (rows, L, 1, 1) images
        resized = tf.image.resize(flat, (length, 1), method="bilinear", antialias=False).numpy()
        out = np.moveaxis(resized.reshape(*moved.shape[:-1], length), -1, axis)
    return out


# -- residual layer positions (kit.POSITIONS) ------------------------------------------------

# The explained layer of each position in ``residual_net``.
POSITION_LAYERS = {
    "skip_inplace": "block2_bn2",  # the identity is added to its output (ResNet's layerN.1.bn2)
    "inside_block": "block1_relu1",  # read only by block1_conv2
    "after_add": "block1_out",  # read by block 2's branch and its skip
    "before_pool": "block2_out",  # read only by the global pooling
}
RESIDUAL_CHANNELS = 8


def residual_net(shape: tuple[int, ...] = (8, 8, 3)) -> keras.Model:
    """A stem convolution, two blocks ``relu(bn2(conv2(relu(bn1(conv1 x)))) + x)``, mean pooling, dense.

    The BatchNormalization layers get random moving statistics and affine parameters, so
    inference-mode BN is not the identity.
    """
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(RESIDUAL_CHANNELS, 3, padding="same", name="stem")(inputs)
    for block in (1, 2):
        h = keras.layers.Conv2D(RESIDUAL_CHANNELS, 3, padding="same", name=f"block{block}_conv1")(x)
        h = keras.layers.BatchNormalization(name=f"block{block}_bn1")(h)
        h = keras.layers.ReLU(name=f"block{block}_relu1")(h)
        h = keras.layers.Conv2D(RESIDUAL_CHANNELS, 3, padding="same", name=f"block{block}_conv2")(h)
        h = keras.layers.BatchNormalization(name=f"block{block}_bn2")(h)
        h = keras.layers.Add(name=f"block{block}_add")([h, x])
        x = keras.layers.ReLU(name=f"block{block}_out")(h)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, name="logits")(pooled))
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = (RESIDUAL_CHANNELS,)
            layer.gamma.assign(rng.uniform(0.5, 1.5, size).astype(np.float32))
            layer.beta.assign(rng.normal(0, 0.3, size).astype(np.float32))
            layer.moving_mean.assign(rng.normal(0, 0.3, size).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size).astype(np.float32))
    return model


def residual_by_hand(model: keras.Model, inputs: tf.Tensor, at: str, edit) -> tf.Tensor:  # type: ignore[no-untyped-def]
    """Runs ``residual_net``'s layers one by one (not the Functional graph), with layer ``at``'s
    output passed through ``edit`` before the rest of the network reads it."""

    def step(name: str, value):  # type: ignore[no-untyped-def]
        out = model.get_layer(name)(value, training=False)
        return edit(out) if name == at else out

    x = step("stem", inputs)
    for block in (1, 2):
        h = step(f"block{block}_relu1", step(f"block{block}_bn1", step(f"block{block}_conv1", x)))
        h = step(f"block{block}_bn2", step(f"block{block}_conv2", h))
        x = step(f"block{block}_out", step(f"block{block}_add", [h, x]))
    return step("logits", step("pool", x))


@functools.cache
def _residual_model_and_inputs() -> tuple[keras.Model, tf.Tensor]:
    keras.utils.set_random_seed(0)
    model = residual_net()
    inputs = tf.constant(np.random.default_rng(0).normal(size=(BATCH, 8, 8, 3)), tf.float32)
    return model, inputs


def position_case(kind: str) -> Case:
    """One of kit.POSITIONS in ``residual_net``; the reference splits the network by hand at the layer."""
    model, inputs = _residual_model_and_inputs()
    at = POSITION_LAYERS[kind]

    def features(x: tf.Tensor) -> tf.Tensor:
        seen: list[tf.Tensor] = []
        residual_by_hand(model, x, at, lambda value: seen.append(value) or value)
        return seen[0]

    def head(activations: tf.Tensor) -> tf.Tensor:
        # The rest of the network with the layer's output replaced; what skips around the layer
        # (the block's input) is recomputed from the input and does not depend on the replacement.
        return residual_by_hand(model, inputs, at, lambda value: activations)

    def reference(cotangents: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        activations = features(inputs)
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            tape.watch(activations)
            outputs = head(activations)
        if cotangents is None:
            return activations.numpy(), None, outputs.numpy()
        grads = [tape.gradient(outputs, activations, output_gradients=tf.constant(c)) for c in cotangents]
        return activations.numpy(), tf.stack(grads, axis=1).numpy(), outputs.numpy()

    def linear_target(weights: np.ndarray):  # type: ignore[no-untyped-def]
        w = tf.constant(weights, tf.float32)
        return lambda output: tf.tensordot(output, w, axes=1)

    def ablated_outputs(channel: int) -> np.ndarray:
        keep = np.ones(RESIDUAL_CHANNELS, np.float32)
        keep[channel] = 0
        return residual_by_hand(model, inputs, at, lambda value: value * keep).numpy()

    return Case(
        model=model,
        layer=at,
        inputs=inputs,
        layout=None,
        true_layout="channels_last",
        input_spatial=(8, 8),
        reference=reference,
        linear_target=linear_target,
        head_reference=lambda replacement: head(tf.constant(replacement)).numpy(),
        ablated_outputs=ablated_outputs,
    )


class TensorFlowKit:
    name = "tensorflow"

    def odd_case(self, kind: str) -> Case:
        """``"signal_as_image"`` (1-D input, 2-D layer) or ``"image_to_signal"`` (the reverse)."""
        model, inputs = _odd_model(kind)
        return Case(
            model=model,
            layer="features",
            inputs=inputs,
            layout=None,
            true_layout="channels_last",
            input_spatial=tuple(inputs.shape[1:-1]),
            reference=_reference(model.get_layer("features"), model.get_layer("head"), inputs),
            linear_target=lambda w: None,
        )

    def case(self, kind: str) -> Case:
        if kind in POSITIONS:
            return position_case(kind)
        model, inputs = _model_and_inputs(kind)
        layout = "tokens" if kind == "tokens" else None
        true_layout = {"tokens": "tokens", "channels_last": "channels_first"}.get(kind, "channels_last")
        spatial = tuple(inputs.shape[2:]) if kind == "channels_last" else tuple(inputs.shape[1:-1])
        features, head = model.get_layer("features"), model.get_layer("head")

        def reference(
            cotangents: np.ndarray | None,
        ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
            activations = features(inputs, training=False)
            with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                tape.watch(activations)
                outputs = head(activations, training=False)
            if cotangents is None:
                return activations.numpy(), None, outputs.numpy()
            grads = [tape.gradient(outputs, activations, output_gradients=tf.constant(c)) for c in cotangents]
            return activations.numpy(), tf.stack(grads, axis=1).numpy(), outputs.numpy()

        def linear_target(weights: np.ndarray):  # type: ignore[no-untyped-def]
            w = tf.constant(weights, tf.float32)
            return lambda output: tf.tensordot(output, w, axes=1)

        channel_axis = 1 if kind == "channels_last" else -1  # of the input and of the layer

        def head_reference(replacement: np.ndarray) -> np.ndarray:
            # The model is head(features(x)): run again with features' output replaced.
            return head(tf.constant(replacement), training=False).numpy()

        def ablated_outputs(channel: int) -> np.ndarray:
            activations = features(inputs, training=False).numpy()
            np.moveaxis(activations, channel_axis, 0)[channel] = 0
            return head_reference(activations)

        def masked_outputs(masks: np.ndarray) -> np.ndarray:
            masked = inputs * tf.constant(np.expand_dims(masks, channel_axis), tf.float32)
            return model(masked, training=False).numpy()

        def guided(cotangents: np.ndarray) -> np.ndarray:
            if kind == "tokens":  # no ReLU: guided backprop is the plain input gradient
                with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                    tape.watch(inputs)
                    outputs = model(inputs, training=False)
                grads = tf.stack([tape.gradient(outputs, inputs, output_gradients=c) for c in cotangents], 1)
                grads = grads.numpy()
            else:
                grads = guided_by_hand([*features.layers, *head.layers], inputs, cotangents)
            return grads if kind == "channels_last" else np.moveaxis(grads, -1, 2)  # (N, K, C_in, *S)

        return Case(
            model=model,
            layer="features",
            inputs=inputs,
            layout=layout,
            true_layout=true_layout,
            input_spatial=spatial,
            reference=reference,
            linear_target=linear_target,
            head_reference=head_reference,
            ablated_outputs=ablated_outputs,
            masked_outputs=masked_outputs,
            upsample=upsample,
            guided=guided,
            has_relu=kind != "tokens",
        )


KIT = TensorFlowKit()
