"""One small CNN in the four JAX model forms, each with an explicit (features, head) split, and
the CAM methods written by hand on that split with ``jax.vjp`` (the oracles of issue 21, items 3-4).

Each form is ``Form(model, layer, weights, other, features, head, layout)``: ``weights`` are the
model's weights in the form ``explain_fn`` takes them, ``other`` a second set of the same
structure (different values), and ``features(weights, x)`` / ``head(weights, a)`` the model cut
at the explained layer, written with the framework's own calls (``method=`` for linen,
``nnx.merge`` for NNX, ``eqx.combine`` for Equinox) — not with anycam.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

CLASSES = 3
SIZE = (8, 8)  # the explained layer (stride 2) is 4 × 4: the maps are upsampled


class Form(NamedTuple):
    model: Any
    layer: Any
    weights: Any
    other: Any
    features: Callable[[Any, jax.Array], jax.Array]
    head: Callable[[Any, jax.Array], jax.Array]
    channels_last: bool


# -- Flax linen ----------------------------------------------------------------------------------


class LinenBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(nn.Conv(self.features, (3, 3), strides=2)(x))


class LinenNet(nn.Module):
    def setup(self) -> None:
        self.conv1 = nn.Conv(4, (3, 3))
        self.block = LinenBlock(6)
        self.fc = nn.Dense(CLASSES)

    def features(self, x: jax.Array) -> jax.Array:
        return self.block(nn.tanh(self.conv1(x)))

    def head(self, a: jax.Array) -> jax.Array:
        return self.fc(a.mean(axis=(1, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def linen_form() -> Form:
    module = LinenNet()
    x = jnp.zeros((1, *SIZE, 3))
    weights = module.init(jax.random.key(0), x)
    other = module.init(jax.random.key(1), x)
    return Form(
        (module, weights),
        "block",
        weights,
        other,
        lambda w, x: module.apply(w, x, method=LinenNet.features),
        lambda w, a: module.apply(w, a, method=LinenNet.head),
        True,
    )


# -- Flax NNX ------------------------------------------------------------------------------------


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(4, 6, (3, 3), strides=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.conv(x))


class NnxNet(nnx.Module):
    def __init__(self, seed: int) -> None:
        rngs = nnx.Rngs(seed)
        self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.block = NnxBlock(rngs)
        self.fc = nnx.Linear(6, CLASSES, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        return self.block(jnp.tanh(self.conv1(x)))

    def head(self, a: jax.Array) -> jax.Array:
        return self.fc(a.mean(axis=(1, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def nnx_form() -> Form:
    model = NnxNet(0)
    graphdef, weights = nnx.split(model)
    other = nnx.split(NnxNet(1))[1]
    return Form(
        model,
        "block",
        weights,
        other,
        lambda w, x: nnx.merge(graphdef, w).features(x),
        lambda w, a: nnx.merge(graphdef, w).head(a),
        True,
    )


# -- Equinox (unbatched modules, run under vmap) --------------------------------------------------


class EqxBlock(eqx.Module):
    conv: eqx.nn.Conv2d

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.conv(x))


class EqxNet(eqx.Module):
    conv1: eqx.nn.Conv2d
    block: EqxBlock
    fc: eqx.nn.Linear

    def __init__(self, seed: int) -> None:
        k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
        self.conv1 = eqx.nn.Conv2d(3, 4, 3, padding=1, key=k1)
        self.block = EqxBlock(eqx.nn.Conv2d(4, 6, 3, stride=2, padding=1, key=k2))
        self.fc = eqx.nn.Linear(6, CLASSES, key=k3)

    def features(self, x: jax.Array) -> jax.Array:
        return self.block(jnp.tanh(self.conv1(x)))

    def head(self, a: jax.Array) -> jax.Array:
        return self.fc(a.mean(axis=(1, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def equinox_form() -> Form:
    model = EqxNet(0)
    weights, static = eqx.partition(model, eqx.is_array)
    other = eqx.partition(EqxNet(1), eqx.is_array)[0]
    return Form(
        model,
        "block",
        weights,
        other,
        lambda w, x: jax.vmap(eqx.combine(w, static).features)(x),
        lambda w, a: jax.vmap(eqx.combine(w, static).head)(a),
        False,
    )


# -- (features, head, params) functions -----------------------------------------------------------


def _conv(kernel: jax.Array, x: jax.Array, stride: int = 1) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME")


def fn_features(params: Any, x: jax.Array) -> jax.Array:
    return jax.nn.relu(_conv(params["k2"], jnp.tanh(_conv(params["k1"], x)), 2))


def fn_head(params: Any, a: jax.Array) -> jax.Array:
    return a.mean(axis=(2, 3)) @ params["w"] + params["b"]


def _fn_params(seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {
        "k1": jnp.asarray(rng.normal(0, 0.4, (4, 3, 3, 3)), jnp.float32),
        "k2": jnp.asarray(rng.normal(0, 0.4, (6, 4, 3, 3)), jnp.float32),
        "w": jnp.asarray(rng.normal(0, 1, (6, CLASSES)), jnp.float32),
        "b": jnp.asarray(rng.normal(0, 0.1, (CLASSES,)), jnp.float32),
    }


def functions_form() -> Form:
    weights = _fn_params(0)
    return Form((fn_features, fn_head, weights), None, weights, _fn_params(1), fn_features, fn_head, False)


FORMS = {"linen": linen_form, "nnx": nnx_form, "equinox": equinox_form, "functions": functions_form}


def inputs(form: Form, batch: int = 4, seed: int = 0) -> jax.Array:
    x = np.random.default_rng(seed).normal(size=(batch, 3, *SIZE)).astype(np.float32)
    return jnp.asarray(x.transpose(0, 2, 3, 1) if form.channels_last else x)


# -- the methods by hand ------------------------------------------------------------------------


def _channels_first(a: jax.Array, channels_last: bool) -> jax.Array:
    return jnp.moveaxis(a, -1, 1) if channels_last else a


def raw_cam(method: str, a: jax.Array, g: jax.Array) -> jax.Array:
    """Returns one target's raw map ``(N, H, W)`` from channels-first ``(N, C, H, W)`` A and G."""
    relu = jax.nn.relu
    if method == "gradcam":
        return relu(jnp.einsum("nc,nchw->nhw", g.mean(axis=(2, 3)), a))
    if method == "hirescam":
        return relu((g * a).sum(axis=1))
    if method == "layercam":
        return relu((relu(g) * a).sum(axis=1))
    if method == "gradcam-elementwise":
        return relu(g * a).sum(axis=1)
    if method == "xgradcam":
        w = (g * a).sum(axis=(2, 3)) / (a.sum(axis=(2, 3)) + 1e-7)
        return relu(jnp.einsum("nc,nchw->nhw", w, a))
    if method == "gradcam++":
        # α = g² / (2g² + Σ_s A g³) where g ≠ 0 (Chattopadhay et al. eq. 19), w = Σ_s α ReLU(g).
        sums = a.sum(axis=(2, 3), keepdims=True)
        denominator = 2 * g**2 + sums * g**3
        valid = (g != 0) & (denominator != 0)
        alpha = jnp.where(valid, g**2 / jnp.where(valid, denominator, 1.0), 0.0)
        return relu(jnp.einsum("nc,nchw->nhw", (alpha * relu(g)).sum(axis=(2, 3)), a))
    raise ValueError(method)


def by_hand(
    form: Form, weights: Any, x: jax.Array, classes: jax.Array, method: str = "gradcam", *, upsample: bool = True
) -> jax.Array:
    """Returns the min-max-normalised heatmaps ``(N, H, W)`` of ``method`` for one class per sample."""
    a = form.features(weights, x)
    out, vjp = jax.vjp(lambda act: form.head(weights, act), a)
    (g,) = vjp(jax.nn.one_hot(classes, out.shape[1], dtype=out.dtype))
    cam = raw_cam(method, _channels_first(a, form.channels_last), _channels_first(g, form.channels_last))
    if upsample:
        # jax.image.resize's "linear" is half-pixel bilinear with clamped edges when upsampling.
        cam = jax.image.resize(cam, (cam.shape[0], *SIZE), "linear", antialias=False)
    low = cam.min(axis=(1, 2), keepdims=True)
    span = cam.max(axis=(1, 2), keepdims=True) - low
    return jnp.where(span > 0, (cam - low) / jnp.where(span > 0, span, 1.0), 0.0)
