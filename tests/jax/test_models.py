"""Every JAX model form gives the maps of a plain ``jax.vjp`` of the model cut at the layer.

Forms: a ``(features, head)`` pair (parameters closed over or passed as a pytree), Flax linen
``(module, variables)`` and bound modules, Flax NNX modules, Equinox ``Sequential`` and
general modules. Each expected map is the core's math on activations and gradients that
``vjp_reference`` computes from a hand-written split of the same model.
"""

from __future__ import annotations

import functools

import equinox as eqx
import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anycam
from anycam import core
from tests.contract.kit_jax import numpy_fill, numpy_init, vjp_reference

pytestmark = pytest.mark.jax

BATCH, CLASSES = 3, 5
TARGET = np.array([[1, 3], [0, 4], [2, 2]])  # K = 2 maps per sample


def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def inputs(*shape: int) -> jax.Array:
    return jnp.asarray(rng().normal(size=shape).astype(np.float32))


def assert_explains(result: anycam.Explanation, features, head, x, layout: str, method: str = "gradcam") -> None:  # type: ignore[no-untyped-def]
    """Checks ``result`` (explained for TARGET) against the plain-vjp reference."""
    activations, gradients, outputs = vjp_reference(features, head, x, TARGET)
    expected = core.layer_cam(method, activations, gradients, layout, count=TARGET.shape[1])
    scale = max(float(np.abs(expected.cam).max()), 1e-12)
    np.testing.assert_allclose(result.cam / scale, expected.cam / scale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.scores, np.take_along_axis(outputs, TARGET, axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.target, TARGET)


# -- (features, head) ----------------------------------------------------------------------------


def conv_nchw(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


@functools.cache
def function_params() -> dict:
    r = rng()
    return {
        "conv": jnp.asarray(r.normal(size=(4, 3, 3, 3)).astype(np.float32) / 5),
        "fc": jnp.asarray(r.normal(size=(4, CLASSES)).astype(np.float32)),
    }


def features_p(params: dict, x: jax.Array) -> jax.Array:
    return jax.nn.relu(conv_nchw(x, params["conv"]))


def head_p(params: dict, activations: jax.Array) -> jax.Array:
    return jnp.tanh(activations).mean((2, 3)) @ params["fc"]


def test_functions_with_closed_over_parameters() -> None:
    params = function_params()
    features = functools.partial(features_p, params)
    head = functools.partial(head_p, params)
    x = inputs(BATCH, 3, 8, 6)
    explainer = anycam.Explainer((features, head), backend="jax")
    assert explainer.layer_names == ("features",)
    result = explainer.explain(x, target=TARGET)
    assert result.heatmap.shape == (BATCH, 2, 8, 6)
    assert_explains(result, features, head, x, "channels_first")


def test_functions_with_parameters_as_a_pytree() -> None:
    params = function_params()
    x = inputs(BATCH, 3, 8, 6)
    result = anycam.Explainer((features_p, head_p, params), None, backend="jax").explain(x, target=TARGET)
    assert_explains(
        result, functools.partial(features_p, params), functools.partial(head_p, params), x, "channels_first"
    )
    # Other parameter values of the same shapes: same compiled capture, other answer.
    doubled = jax.tree_util.tree_map(lambda p: 2 * p, params)
    again = anycam.Explainer((features_p, head_p, doubled), backend="jax").explain(x, target=TARGET)
    assert not np.allclose(again.scores, result.scores)
    assert_explains(
        again, functools.partial(features_p, doubled), functools.partial(head_p, doubled), x, "channels_first"
    )


def test_per_sample_functions_run_under_vmap() -> None:
    params = function_params()

    def features(x: jax.Array) -> jax.Array:  # one (C, H, W) sample, Equinox style
        return features_p(params, x[None])[0]

    def head(a: jax.Array) -> jax.Array:
        return head_p(params, a[None])[0]

    x = inputs(BATCH, 3, 8, 6)
    result = anycam.Explainer((features, head), backend="jax", vmap=True).explain(x, target=TARGET)
    assert_explains(
        result, functools.partial(features_p, params), functools.partial(head_p, params), x, "channels_first"
    )


def test_channels_last_functions_via_layout_options() -> None:
    params = function_params()

    def features(x: jax.Array) -> jax.Array:  # NHWC in, NHWC out
        return jnp.moveaxis(features_p(params, jnp.moveaxis(x, -1, 1)), 1, -1)

    def head(a: jax.Array) -> jax.Array:
        return head_p(params, jnp.moveaxis(a, -1, 1))

    x = inputs(BATCH, 3, 8, 6)
    first = anycam.Explainer((functools.partial(features_p, params), functools.partial(head_p, params)), backend="jax")
    last = anycam.Explainer((features, head), backend="jax", input_layout="NHWC")
    told = anycam.Explainer((features, head), backend="jax", input_layout="channels_last", layout="channels_last")
    expected = first(x, target=TARGET)
    x_last = jnp.moveaxis(x, 1, -1)
    np.testing.assert_allclose(last(x_last, target=TARGET), expected, atol=1e-5)
    np.testing.assert_allclose(told(x_last, target=TARGET), expected, atol=1e-5)


# -- Flax linen ----------------------------------------------------------------------------------


class Block(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.BatchNorm(use_running_average=not train)(nn.Conv(self.channels, (3, 3))(x))
        return nn.relu(y + x)


class Backbone(nn.Module):
    def setup(self) -> None:
        self.stem = nn.Conv(4, (3, 3))
        self.layer1 = Block(4)
        self.layer2 = Block(4)

    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        return self.layer2(self.layer1(nn.relu(self.stem(x)), train), train)


class LinenNet(nn.Module):
    """backbone (stem, layer1, layer2; BatchNorm) → tanh → GAP → fc."""

    def setup(self) -> None:
        self.backbone = Backbone()
        self.fc = nn.Dense(CLASSES)

    def head(self, activations: jax.Array) -> jax.Array:
        return self.fc(jnp.tanh(activations).mean((1, 2)))

    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        return self.head(self.backbone(x, train))


@functools.cache
def linen_net() -> tuple[LinenNet, dict, jax.Array]:
    model = LinenNet()
    x = inputs(BATCH, 8, 6, 3)
    return model, numpy_init(model, x, rng(), train=False), x


def linen_split(model: LinenNet, variables: dict, layer: str):  # type: ignore[no-untyped-def]
    if layer == "layer2":

        def features(x: jax.Array) -> jax.Array:
            return model.apply(variables, x, method=lambda m, x: m.backbone(x, False))

        def head(a: jax.Array) -> jax.Array:
            return model.apply(variables, a, method=lambda m, a: m.head(a))

    else:

        def features(x: jax.Array) -> jax.Array:
            return model.apply(variables, x, method=lambda m, x: m.backbone.layer1(nn.relu(m.backbone.stem(x)), False))

        def head(a: jax.Array) -> jax.Array:
            return model.apply(variables, a, method=lambda m, a: m.head(m.backbone.layer2(a, False)))

    return features, head


@pytest.mark.parametrize("layer", ["backbone/layer2", ("backbone", "layer2"), "backbone.layer2", "backbone"], ids=str)
def test_linen_module_path_forms(layer: object) -> None:
    model, variables, x = linen_net()
    explainer = anycam.Explainer((model, variables), layer, model_kwargs={"train": False})
    assert explainer.layer_names[0] in ("backbone/layer2", "backbone")
    assert_explains(explainer.explain(x, target=TARGET), *linen_split(model, variables, "layer2"), x, "channels_last")


def test_linen_bound_module_and_several_layers() -> None:
    model, variables, x = linen_net()
    bound = model.bind(variables)
    explainer = anycam.Explainer(bound, ["backbone/layer1", "backbone/layer2"], model_kwargs={"train": False})
    assert explainer.layer_names == ("backbone/layer1", "backbone/layer2")
    result = explainer.explain(x, target=TARGET)
    for cam, layer in zip(result.cams, ("layer1", "layer2"), strict=True):
        single = dataclass_with_cam(result, cam)
        assert_explains(single, *linen_split(model, variables, layer), x, "channels_last")


def dataclass_with_cam(result: anycam.Explanation, cam: np.ndarray) -> anycam.Explanation:
    import dataclasses

    return dataclasses.replace(result, cam=cam)


# -- Flax NNX ------------------------------------------------------------------------------------


class NnxBlock(nnx.Module):
    def __init__(self, channels: int, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(channels, rngs=rngs)  # training mode until .eval()

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x)) + x)


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.blocks = nnx.List([NnxBlock(4, rngs) for _ in range(4)])
        self.layer4 = NnxBlock(4, rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.fc = nnx.Linear(4, CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.fc(self.drop(jnp.tanh(self.layer4(x)).mean((1, 2))))


def nnx_net() -> NnxNet:
    abstract = nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, numpy_fill(state, rng()))


def nnx_split(model: NnxNet, layer: str):  # type: ignore[no-untyped-def]
    reference = nnx.clone(model)
    reference.eval()
    cut = 4 if layer == "layer4" else 4 - 0  # "blocks.3" is the last block

    def features(x: jax.Array) -> jax.Array:
        x = nnx.relu(reference.stem(x))
        for block in list(reference.blocks)[:cut]:
            x = block(x)
        return reference.layer4(x) if layer == "layer4" else x

    def head(a: jax.Array) -> jax.Array:
        if layer != "layer4":
            a = reference.layer4(a)
        return reference.fc(jnp.tanh(a).mean((1, 2)))

    return features, head


@pytest.mark.parametrize("layer", ["layer4", "blocks.3", ("blocks", 3), "blocks/3"], ids=str)
def test_nnx_attribute_paths_in_inference_mode(layer: object) -> None:
    model = nnx_net()
    x = inputs(BATCH, 8, 6, 3)
    explainer = anycam.Explainer(model, layer)
    name = "layer4" if layer == "layer4" else "blocks.3"
    assert explainer.layer_names == (name,)
    assert_explains(explainer.explain(x, target=TARGET), *nnx_split(model, name), x, "channels_last")
    # The user's module is untouched: still in training mode, no class swapped in.
    assert model.blocks[3].bn.use_running_average is False and model.drop.deterministic is False
    assert type(model.blocks[3]) is NnxBlock and type(model.layer4) is NnxBlock


def test_nnx_module_object_and_in_place_updates() -> None:
    model = nnx_net()
    x = inputs(BATCH, 8, 6, 3)
    explainer = anycam.Explainer(model, model.blocks[3])
    assert explainer.layer_names == ("blocks.3",)
    before = explainer.explain(x, target=TARGET)
    model.fc.kernel[...] = 2 * model.fc.kernel[...]  # an optimiser step updates in place
    after = explainer.explain(x, target=TARGET)
    assert_explains(after, *nnx_split(model, "blocks.3"), x, "channels_last")
    assert not np.allclose(after.scores, before.scores)


# -- Equinox -------------------------------------------------------------------------------------


@functools.cache
def equinox_sequential() -> eqx.nn.Sequential:
    def build(key: jax.Array) -> eqx.nn.Sequential:
        k1, k2, k3 = jax.random.split(key, 3)
        return eqx.nn.Sequential(
            [
                eqx.nn.Conv2d(3, 4, 3, padding=1, key=k1),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.Conv2d(4, 6, 3, padding=1, key=k2),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.Lambda(lambda a: jnp.tanh(a).mean((1, 2))),
                eqx.nn.Linear(6, CLASSES, key=k3),
            ]
        )

    return numpy_fill(eqx.filter_eval_shape(build, jax.random.key(0)), rng())


@pytest.mark.parametrize("layer", [3, "3", "layers.3"], ids=repr)
def test_equinox_sequential_is_sliced(layer: object) -> None:
    model = equinox_sequential()
    x = inputs(BATCH, 3, 8, 6)
    explainer = anycam.Explainer(model, layer)
    assert explainer.layer_names == ("layers.3",)
    assert type(explainer.backend._model.snapshot()[0]).__name__ == "_SequentialProgram"
    assert_explains(explainer.explain(x, target=TARGET), jax.vmap(model[:4]), jax.vmap(model[4:]), x, "channels_first")


def test_equinox_sequential_several_layers_by_tree_at() -> None:
    model = equinox_sequential()
    x = inputs(BATCH, 3, 8, 6)
    explainer = anycam.Explainer(model, [1, "layers.3"])
    assert type(explainer.backend._model.snapshot()[0]).__name__ == "_EquinoxProgram"
    result = explainer.explain(x, target=TARGET)
    assert_explains(
        dataclass_with_cam(result, result.cams[0]), jax.vmap(model[:2]), jax.vmap(model[2:]), x, "channels_first"
    )
    assert_explains(
        dataclass_with_cam(result, result.cams[1]), jax.vmap(model[:4]), jax.vmap(model[4:]), x, "channels_first"
    )


class EqxNet(eqx.Module):
    stem: eqx.nn.Conv2d
    blocks: list
    drop: eqx.nn.Dropout
    fc: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        keys = jax.random.split(key, 5)
        self.stem = eqx.nn.Conv2d(3, 4, 3, padding=1, key=keys[0])
        self.blocks = [eqx.nn.Conv2d(4, 4, 3, padding=1, key=k) for k in keys[1:4]]
        self.drop = eqx.nn.Dropout(0.5)  # training mode: needs a key unless in inference mode
        self.fc = eqx.nn.Linear(4, CLASSES, key=keys[4])

    def features(self, x: jax.Array, upto: int) -> jax.Array:
        x = jax.nn.relu(self.stem(x))
        for block in self.blocks[: upto - 1]:
            x = jax.nn.relu(block(x))
        return self.blocks[upto - 1](x)

    def head(self, a: jax.Array, start: int) -> jax.Array:
        a = jax.nn.relu(a)
        for block in self.blocks[start:]:
            a = jax.nn.relu(block(a))
        return self.fc(self.drop(jnp.tanh(a).mean((1, 2)), inference=True))

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        x = jax.nn.relu(self.stem(x))
        for block in self.blocks:
            x = jax.nn.relu(block(x))
        return self.fc(self.drop(jnp.tanh(x).mean((1, 2)), key=key))


def test_equinox_module_by_pytree_path_and_object() -> None:
    model = numpy_fill(eqx.filter_eval_shape(EqxNet, jax.random.key(0)), rng())
    x = inputs(BATCH, 3, 8, 6)
    by_path = anycam.Explainer(model, "blocks.1")
    by_object = anycam.Explainer(model, model.blocks[1])
    assert by_path.layer_names == by_object.layer_names == ("blocks.1",)
    features = jax.vmap(lambda s: model.features(s, 2))
    head = jax.vmap(lambda a: model.head(a, 2))
    assert_explains(by_path.explain(x, target=TARGET), features, head, x, "channels_first")
    assert_explains(by_object.explain(x, target=TARGET), features, head, x, "channels_first")
    assert model.drop.inference is False  # inference mode was set on a private copy only
