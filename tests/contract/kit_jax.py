"""Contract kit for JAX: small Flax linen nets with a nonlinear head, reference by plain jax.vjp.

Flax is channels-last, so the ``channels_last`` kind is the *other* layout here: a linen model
that takes NCHW input and keeps its feature map NCHW (``input_layout`` and ``layout`` given).
Cases are built once per kind: JAX models are immutable, and sharing them lets the suite
reuse compiled captures instead of compiling 200 identical ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .kit import Case

BATCH, CLASSES = 3, 5


class Features(nn.Module):
    spatial: int
    channels_first: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.channels_first:
            x = jnp.moveaxis(x, 1, -1)
        x = nn.relu(nn.Conv(6, (3,) * self.spatial, padding="SAME")(x))
        x = nn.relu(nn.Conv(8, (3,) * self.spatial, strides=2, padding="SAME")(x))
        return jnp.moveaxis(x, -1, 1) if self.channels_first else x


class Head(nn.Module):
    channels_first: bool = False

    @nn.compact
    def __call__(self, a: jax.Array) -> jax.Array:
        if self.channels_first:
            a = jnp.moveaxis(a, 1, -1)
        a = jnp.tanh(nn.Conv(8, (1,) * (a.ndim - 2))(a))
        return nn.Dense(CLASSES)(a.mean(axis=tuple(range(1, a.ndim - 1))))


class PooledHead(nn.Module):
    """Global mean pooling → flatten → dense → softmax, or global max pooling → dense."""

    pool: str = "mean"

    @nn.compact
    def __call__(self, a: jax.Array) -> jax.Array:
        if self.pool == "max":
            return nn.Dense(CLASSES)(a.max(axis=(1, 2)))
        pooled = a.mean(axis=(1, 2), keepdims=True)
        return jax.nn.softmax(nn.Dense(CLASSES)(pooled.reshape(pooled.shape[0], -1)))


class Tokens(nn.Module):
    """Patch embedding + class token → (N, 1 + 16, D), then a residual MLP block."""

    dim: int = 8

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        patches = nn.Conv(self.dim, (4, 4), strides=4, padding="VALID")(x)
        tokens = patches.reshape(x.shape[0], -1, self.dim)
        cls = self.param("cls", nn.initializers.normal(1.0), (1, 1, self.dim))
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), tokens], axis=1)
        return tokens + nn.gelu(nn.Dense(self.dim)(tokens))


class TokenHead(nn.Module):
    dim: int = 8

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        mixed = jnp.tanh(nn.Dense(self.dim)(tokens))
        return nn.Dense(CLASSES)(jnp.concatenate([mixed[:, 0], mixed[:, 1:].mean(1)], axis=1))


class Split(nn.Module):
    """``head(features(x))``; the explained layer is ``features``."""

    features: nn.Module
    head: nn.Module

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def numpy_fill(tree, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """Replaces the ``jax.ShapeDtypeStruct`` leaves of ``tree`` by NumPy-drawn float32 arrays.

    Kernels get fan-in scaled normals; leaves whose path names a variance or scale get values
    near 1. Building models abstractly (``jax.eval_shape``, ``nnx.eval_shape``,
    ``eqx.filter_eval_shape``) and filling them here avoids compiling the frameworks' random
    initialisers, which takes seconds per model on a small CPU, longer than the tests.
    """

    def draw(path: tuple, leaf: object) -> object:
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        values = rng.normal(size=leaf.shape).astype(np.float32)
        if any(word in jax.tree_util.keystr(path) for word in ("var", "scale")):
            return jnp.asarray(1 + 0.1 * np.abs(values))
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 10
        return jnp.asarray(values / np.sqrt(fan_in))

    return jax.tree_util.tree_map_with_path(draw, tree)


def numpy_init(model: nn.Module, inputs: jax.Array, rng: np.random.Generator, **kwargs: object) -> dict:
    """Returns the variables of a linen ``model`` with NumPy-drawn values (see ``numpy_fill``)."""
    return numpy_fill(jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), inputs), rng)


@functools.cache
def _build(kind: str) -> tuple[Split, dict, jax.Array, str | None, str, tuple[int, ...], dict]:
    layout: str | None = None
    true_layout = "channels_last"
    options: dict = {}
    if kind == "conv2d":
        model, shape = Split(Features(2), Head()), (BATCH, 12, 10, 3)
    elif kind == "conv1d":
        model, shape = Split(Features(1), Head()), (BATCH, 17, 3)
    elif kind == "conv3d":
        model, shape = Split(Features(3), Head()), (BATCH, 6, 8, 5, 3)
    elif kind == "channels_last":  # the other layout for Flax: channels first
        model, shape = Split(Features(2, channels_first=True), Head(channels_first=True)), (BATCH, 3, 12, 10)
        layout = true_layout = "channels_first"
        options = {"input_layout": "channels_first"}
    elif kind in ("pooled_head", "max_pooled_head"):
        pool = "max" if kind == "max_pooled_head" else "mean"
        model, shape = Split(Features(2), PooledHead(pool)), (BATCH, 12, 10, 3)
    elif kind == "tokens":
        model, shape = Split(Tokens(), TokenHead()), (BATCH, 16, 16, 3)
        layout = true_layout = "tokens"
    else:
        raise ValueError(kind)
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    variables = numpy_init(model, inputs, rng)
    spatial = tuple(shape[2:]) if true_layout == "channels_first" else tuple(shape[1:-1])
    return model, variables, inputs, layout, true_layout, spatial, options


@functools.cache
def _reference_functions(kind: str):  # type: ignore[no-untyped-def]
    """Returns jitted ``features(x)`` and ``(head(a), vjp of head at a with cotangent c)``."""
    model, variables, *_ = _build(kind)

    @jax.jit
    def features(x: jax.Array) -> jax.Array:
        return model.apply(variables, x, method=lambda m, x: m.features(x))

    @jax.jit
    def head_vjp(activations: jax.Array, cotangent: jax.Array) -> tuple[jax.Array, jax.Array]:
        outputs, vjp_fn = jax.vjp(lambda a: model.apply(variables, a, method=lambda m, a: m.head(a)), activations)
        return outputs, vjp_fn(cotangent)[0]

    return features, head_vjp


@jax.custom_vjp
def guided_relu(z: jax.Array) -> jax.Array:
    """ReLU whose gradient passes only where the input and the incoming gradient are positive."""
    return jnp.where(z > 0, z, 0.0)


guided_relu.defvjp(
    lambda z: (guided_relu(z), z),
    lambda z, upstream: (upstream * (z > 0) * (upstream > 0),),
)


def _guided_features(kind: str, variables: dict, x: jax.Array) -> jax.Array:
    """``Features`` written out with ``guided_relu`` in place of ``nn.relu``."""
    spatial = x.ndim - 2
    params = variables["params"]["features"]
    channels_first = kind == "channels_last"
    if channels_first:
        x = jnp.moveaxis(x, 1, -1)
    x = guided_relu(nn.Conv(6, (3,) * spatial, padding="SAME").apply({"params": params["Conv_0"]}, x))
    conv = nn.Conv(8, (3,) * spatial, strides=2, padding="SAME")
    x = guided_relu(conv.apply({"params": params["Conv_1"]}, x))
    return jnp.moveaxis(x, -1, 1) if channels_first else x


@functools.cache
def _guided_vjp(kind: str):  # type: ignore[no-untyped-def]
    model, variables, *_ = _build(kind)

    def network(x: jax.Array) -> jax.Array:
        if kind == "tokens":  # no ReLU: guided backprop is the plain input gradient
            return model.apply(variables, x)
        return model.apply(variables, _guided_features(kind, variables, x), method=lambda m, a: m.head(a))

    @jax.jit
    def vjp(x: jax.Array, cotangent: jax.Array) -> jax.Array:
        return jax.vjp(network, x)[1](cotangent)[0]

    return vjp


def upsample(maps: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """``(N, C, *S)`` → ``(N, C, *size)`` by ``jax.image.resize`` (linear, half-pixel centres)."""
    shape = (*maps.shape[:2], *size)
    return np.asarray(jax.image.resize(jnp.asarray(maps, jnp.float32), shape, "linear", antialias=False))


@functools.cache
def _linear_target(weights: bytes):  # type: ignore[no-untyped-def]
    # One function object per weights, so that every method reuses the compiled capture.
    w = jnp.asarray(np.frombuffer(weights, dtype=np.float32))
    return lambda output: output @ w


class SignalFeatures(nn.Module):
    """(N, 17, 3) → x[:, :, None] → Conv (3, 1) twice → (N, 9, 1, 8)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(6, (3, 1), padding="SAME")(x[:, :, None, :]))
        return nn.Conv(8, (3, 1), strides=(2, 1), padding="SAME")(x)


class SignalFeaturesOfImage(nn.Module):
    """(N, 10, 10, 3) → Conv (10, 1) → (N, 10, 8): a 1-D layer under a 2-D input."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(8, (10, 1), padding="VALID")(x)[:, 0]


@functools.cache
def _odd(kind: str):  # type: ignore[no-untyped-def]
    features = SignalFeatures() if kind == "signal_as_image" else SignalFeaturesOfImage()
    model = Split(features, Head())
    shape = (BATCH, 17, 3) if kind == "signal_as_image" else (BATCH, 10, 10, 3)
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    variables = numpy_init(model, inputs, rng)

    @jax.jit
    def reference_features(x: jax.Array) -> jax.Array:
        return model.apply(variables, x, method=lambda m, x: m.features(x))

    @jax.jit
    def head_vjp(activations: jax.Array, cotangent: jax.Array) -> tuple[jax.Array, jax.Array]:
        outputs, vjp_fn = jax.vjp(lambda a: model.apply(variables, a, method=lambda m, a: m.head(a)), activations)
        return outputs, vjp_fn(cotangent)[0]

    return model, variables, inputs, reference_features, head_vjp


# -- residual positions (kit.POSITIONS): a two-block ResNet whose forward can edit one value ----


class Relu(nn.Module):
    """``nn.relu`` as a module, so a block's first ReLU output has a path to explain."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(x)


def _edited(edits: dict | None, name: str, value: jax.Array) -> jax.Array:
    """Returns ``edits[name](value)`` where the caller edits that value, else ``value``."""
    return edits[name](value) if edits and name in edits else value


class ResBlock(nn.Module):
    """``relu(bn2(conv2(act1(bn1(conv1 x)))) + x)``; ``edits`` (oracle only) rewrites a named value."""

    channels: int = 8

    def setup(self) -> None:
        self.conv1 = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False)
        self.bn1 = nn.BatchNorm(use_running_average=True)
        self.act1 = Relu()
        self.conv2 = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False)
        self.bn2 = nn.BatchNorm(use_running_average=True)

    def __call__(self, x: jax.Array, edits: dict | None = None) -> jax.Array:
        y = _edited(edits, "act1", self.act1(self.bn1(self.conv1(x))))
        y = _edited(edits, "bn2", self.bn2(self.conv2(y)))
        return _edited(edits, "out", nn.relu(y + x))


class ResNet(nn.Module):
    """Stem → block1 → block2 → global mean pooling → dense; ``edits`` as in ``ResBlock``."""

    def setup(self) -> None:
        self.stem = nn.Conv(8, (3, 3), padding="SAME")
        self.block1 = ResBlock()
        self.block2 = ResBlock()
        self.fc = nn.Dense(CLASSES)

    def __call__(self, x: jax.Array, edits: dict | None = None) -> jax.Array:
        edits = edits or {}
        h = nn.relu(self.stem(x))
        h = self.block1(h, edits.get("block1"))
        h = self.block2(h, edits.get("block2"))
        return self.fc(h.mean(axis=(1, 2)))


# position → (the layer's path for anycam, (block, value) edited by the oracle's forward)
_POSITION_LAYERS = {
    "skip_inplace": ("block1/bn2", ("block1", "bn2")),
    "inside_block": ("block1/act1", ("block1", "act1")),
    "after_add": ("block1", ("block1", "out")),
    "before_pool": ("block2", ("block2", "out")),
}


@functools.cache
def _resnet() -> tuple[ResNet, dict, jax.Array]:
    model = ResNet()
    rng = np.random.default_rng(2)
    inputs = jnp.asarray(rng.normal(size=(BATCH, 8, 8, 3)).astype(np.float32))
    return model, numpy_init(model, inputs, rng), inputs


@functools.cache
def _position_functions(kind: str):  # type: ignore[no-untyped-def]
    """Returns jitted ``edited(x, fn) -> (outputs, the layer's value)`` with ``fn`` applied to that value.

    ``fn`` is a static Python function of the value; the oracle's gradients are ``jax.vjp``
    with respect to an added delta, its ablations a multiplied mask, all in the model's own forward.
    """
    model, variables, _ = _resnet()
    block, value = _POSITION_LAYERS[kind][1]

    def edited(x: jax.Array, fn: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
        seen: list[jax.Array] = []

        def edit(a: jax.Array) -> jax.Array:
            seen.append(a)
            return fn(a)

        outputs = model.apply(variables, x, {block: {value: edit}})
        return outputs, seen[0]

    @jax.jit
    def activations_and_outputs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        outputs, activations = edited(x, lambda a: a)
        return activations, outputs

    @jax.jit
    def head_vjp(x: jax.Array, cotangent: jax.Array) -> tuple[jax.Array, jax.Array]:
        shape = jax.eval_shape(lambda x: edited(x, lambda a: a)[1], x)
        outputs, vjp_fn = jax.vjp(lambda d: edited(x, lambda a: a + d)[0], jnp.zeros(shape.shape, shape.dtype))
        return outputs, vjp_fn(cotangent)[0]

    @jax.jit
    def replaced(x: jax.Array, replacement: jax.Array) -> jax.Array:
        return edited(x, lambda a: replacement)[0]

    @jax.jit
    def zeroed(x: jax.Array, channel: jax.Array) -> jax.Array:
        return edited(x, lambda a: a * (jnp.arange(a.shape[-1]) != channel).astype(a.dtype))[0]

    return activations_and_outputs, head_vjp, replaced, zeroed


class JaxKit:
    name = "jax"

    def odd_case(self, kind: str) -> Case:
        """``"signal_as_image"`` (1-D input, 2-D layer) or ``"image_to_signal"`` (the reverse)."""
        model, variables, inputs, features, head_vjp = _odd(kind)

        def reference(cotangents: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
            activations = features(inputs)
            if cotangents is None:
                outputs, _ = head_vjp(activations, jnp.zeros((BATCH, CLASSES)))
                return np.asarray(activations), None, np.asarray(outputs)
            pairs = [head_vjp(activations, jnp.asarray(c)) for c in cotangents]
            return np.asarray(activations), np.stack([g for _, g in pairs], axis=1), np.asarray(pairs[0][0])

        return Case(
            model=(model, variables),
            layer="features",
            inputs=inputs,
            layout=None,
            true_layout="channels_last",
            input_spatial=tuple(inputs.shape[1:-1]),
            reference=reference,
            linear_target=lambda w: None,
        )

    def position_case(self, kind: str) -> Case:
        """A layer of ``ResNet`` at one of ``kit.POSITIONS``; the oracle edits the model's own forward."""
        model, variables, inputs = _resnet()
        forward, head_vjp, replaced, zeroed = _position_functions(kind)

        def reference(cotangents: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
            activations, outputs = forward(inputs)
            if cotangents is None:
                return np.asarray(activations), None, np.asarray(outputs)
            grads = [np.asarray(head_vjp(inputs, jnp.asarray(c))[1]) for c in cotangents]
            return np.asarray(activations), np.stack(grads, axis=1), np.asarray(outputs)

        def head_reference(replacement: np.ndarray) -> np.ndarray:
            return np.asarray(replaced(inputs, jnp.asarray(replacement, jnp.float32)))

        def ablated_outputs(channel: int) -> np.ndarray:
            # The whole model rerun with channel k of the layer's output zeroed (channels last).
            return np.asarray(zeroed(inputs, jnp.asarray(channel)))

        def linear_target(weights: np.ndarray):  # type: ignore[no-untyped-def]
            return _linear_target(np.asarray(weights, dtype=np.float32).tobytes())

        return Case(
            model=(model, variables),
            layer=_POSITION_LAYERS[kind][0],
            inputs=inputs,
            layout=None,
            true_layout="channels_last",
            input_spatial=tuple(inputs.shape[1:-1]),
            reference=reference,
            linear_target=linear_target,
            head_reference=head_reference,
            ablated_outputs=ablated_outputs,
            upsample=upsample,
        )

    def case(self, kind: str) -> Case:
        if kind in _POSITION_LAYERS:
            return self.position_case(kind)
        model, variables, inputs, layout, true_layout, spatial, options = _build(kind)

        features, head_vjp = _reference_functions(kind)

        def reference(cotangents: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
            activations = features(inputs)
            if cotangents is None:
                outputs, _ = head_vjp(activations, jnp.zeros((BATCH, CLASSES)))
                return np.asarray(activations), None, np.asarray(outputs)
            grads = []
            for c in cotangents:
                outputs, grad = head_vjp(activations, jnp.asarray(c))
                grads.append(grad)
            return np.asarray(activations), np.stack(grads, axis=1), np.asarray(outputs)

        def linear_target(weights: np.ndarray):  # type: ignore[no-untyped-def]
            return _linear_target(np.asarray(weights, dtype=np.float32).tobytes())

        channel_axis = 1 if kind == "channels_last" else -1  # of the input and of the layer

        def head_reference(replacement: np.ndarray) -> np.ndarray:
            # The model is head(features(x)): run again with features' output replaced.
            return np.asarray(model.apply(variables, jnp.asarray(replacement), method=lambda m, a: m.head(a)))

        def ablated_outputs(channel: int) -> np.ndarray:
            activations = np.array(features(inputs))
            np.moveaxis(activations, channel_axis, 0)[channel] = 0
            return head_reference(activations)

        def masked_outputs(masks: np.ndarray) -> np.ndarray:
            masked = inputs * jnp.asarray(np.expand_dims(masks, channel_axis), jnp.float32)
            return np.asarray(model.apply(variables, masked))

        def guided(cotangents: np.ndarray) -> np.ndarray:
            vjp = _guided_vjp(kind)
            grads = np.stack([np.asarray(vjp(inputs, jnp.asarray(c))) for c in cotangents], axis=1)
            return grads if kind == "channels_last" else np.moveaxis(grads, -1, 2)  # (N, K, C_in, *S)

        return Case(
            model=(model, variables),
            layer="features",
            inputs=inputs,
            layout=layout,
            true_layout=true_layout,
            input_spatial=spatial,
            reference=reference,
            linear_target=linear_target,
            options=dict(options),
            head_reference=head_reference,
            ablated_outputs=ablated_outputs,
            masked_outputs=masked_outputs,
            upsample=upsample,
            guided=guided,
            has_relu=kind != "tokens",
        )


KIT = JaxKit()


def vjp_reference(
    features: Callable[[jax.Array], jax.Array],
    head: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    indices: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns activations, gradients ``(N, K, ...)`` of the ``(N, K)`` classes, and outputs.

    Plain ``jax.vjp`` of ``head`` at ``features(x)``, one cotangent at a time: what the JAX
    tests compare the backend against, whatever the model form.
    """
    activations = features(x)
    outputs, vjp_fn = jax.vjp(head, activations)
    one_hot = np.eye(outputs.shape[1], dtype=np.float32)[np.asarray(indices)]  # (N, K, classes)
    grads = [vjp_fn(jnp.asarray(one_hot[:, k]))[0] for k in range(one_hot.shape[1])]
    return np.asarray(activations), np.stack(grads, axis=1), np.asarray(outputs)
