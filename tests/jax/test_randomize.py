"""The sanity check on JAX models: layers listed in order, copies randomised, the model untouched.

Models are built abstractly and filled with NumPy draws (``numpy_init`` / ``numpy_fill``): no
initial value equals what an initialiser gives, so a re-initialised leaf always changes.
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
from anycam.metrics.sanity import replace_explainer, sanity_check, spearman
from tests.contract.kit_jax import numpy_fill, numpy_init

pytestmark = pytest.mark.jax

X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32))


def snapshot(tree: object) -> dict[str, np.ndarray]:
    """Returns a NumPy copy of every array leaf, keyed by its path."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): np.array(leaf) for path, leaf in leaves}


def changed(before: dict[str, np.ndarray], after: object) -> set[str]:
    now = snapshot(after)
    assert now.keys() == before.keys()
    return {path for path, value in before.items() if not np.array_equal(value, now[path])}


# -- Flax linen ----------------------------------------------------------------------------------


class Body(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x)))


class LinenNet(nn.Module):
    """stem → body (compact: Conv_0, BatchNorm_0) → GAP → fc; names not in alphabetical order."""

    def setup(self) -> None:
        self.stem = nn.Conv(4, (3, 3))
        self.body = Body()
        self.fc = nn.Dense(3)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(self.body(nn.relu(self.stem(x))).mean((1, 2)))


@functools.cache
def linen_net() -> tuple[LinenNet, dict, dict]:
    """Returns the module, its variables as numpy_init leaves them (keys sorted by tree_map) and
    the same variables in Flax's creation order, as module.init returns them."""
    model = LinenNet()
    variables = numpy_init(model, X, np.random.default_rng(1))
    params = variables["params"]
    body = {"Conv_0": params["body"]["Conv_0"], "BatchNorm_0": params["body"]["BatchNorm_0"]}
    created = {
        "params": {"stem": params["stem"], "body": body, "fc": params["fc"]},
        "batch_stats": variables["batch_stats"],
    }
    return model, variables, created


def test_linen_parameter_layers_from_input_to_output() -> None:
    model, variables, created = linen_net()
    backend = anycam.Explainer((model, variables), "body").backend
    # setup's order for its submodules; compact ones in the variables' order, here sorted ...
    assert backend.parameter_layers() == ("stem", "body/BatchNorm_0", "body/Conv_0", "fc")
    # ... unless a batch shows the order they run in,
    assert backend.parameter_layers(X) == ("stem", "body/Conv_0", "body/BatchNorm_0", "fc")
    # ... or the variables are in the order module.init made them (setup's order still wins).
    scrambled = {"params": dict(reversed(created["params"].items())), "batch_stats": created["batch_stats"]}
    order = anycam.Explainer((model, scrambled), "body").backend.parameter_layers()
    assert order == ("stem", "body/Conv_0", "body/BatchNorm_0", "fc")


def test_linen_randomised_copy_changes_exactly_the_chosen_layers() -> None:
    model, variables, _ = linen_net()
    before = snapshot(variables)
    explainer = anycam.Explainer((model, variables), "body")
    backend = explainer.backend
    with pytest.raises(anycam.InputError, match="explain a batch first"):
        backend.randomized(["fc"])  # module.init needs an input shape
    original = explainer.explain(X, target=1)
    copy = backend.randomized(["fc", "body/BatchNorm_0"], seed=3)
    fresh = copy._model.source[1]
    assert changed(before, fresh) == {
        "params/fc/kernel", "params/fc/bias", "params/body/BatchNorm_0/scale", "params/body/BatchNorm_0/bias",
        "batch_stats/body/BatchNorm_0/mean", "batch_stats/body/BatchNorm_0/var",
    }  # fmt: skip
    assert not changed(before, variables)  # the user's variables, bit for bit
    # The modules' own initialisers: BatchNorm's constants, Dense's zero bias.
    norm, stats = fresh["params"]["body"]["BatchNorm_0"], fresh["batch_stats"]["body"]["BatchNorm_0"]
    constants = np.stack([norm["scale"], norm["bias"], stats["mean"], stats["var"]])
    np.testing.assert_array_equal(constants, [[1] * 4, [0] * 4, [0] * 4, [1] * 4])
    np.testing.assert_array_equal(fresh["params"]["fc"]["bias"], np.zeros(3))
    # Seeded: the same seed gives the same values, another seed others.
    kernel = fresh["params"]["fc"]["kernel"]
    np.testing.assert_array_equal(backend.randomized(["fc"], seed=3)._model.source[1]["params"]["fc"]["kernel"], kernel)
    assert not np.array_equal(backend.randomized(["fc"], seed=4)._model.source[1]["params"]["fc"]["kernel"], kernel)
    # The copy explains the same layer with the compiled capture of the original, new weights.
    compiled = anycam.backends.jax.capture._capture._cache_size()
    again = replace_explainer(explainer, backend=copy).explain(X, target=1)
    assert anycam.backends.jax.capture._capture._cache_size() == compiled
    assert copy.layer_names == backend.layer_names and not np.allclose(again.scores, original.scores)
    with pytest.raises(anycam.LayerError, match="not found"):
        backend.randomized(["nope"])
    with pytest.raises(anycam.LayerError, match="owns no parameters to randomise; randomise its layers: 'body/"):
        backend.randomized(["body"])


def test_sanity_check_steps_and_oracle() -> None:
    model, _, variables = linen_net()
    before = snapshot(variables)
    explainer = anycam.Explainer((model, variables), "body")
    cascading = sanity_check(explainer, X, target=1)
    independent = sanity_check(explainer, X, target=1, mode="independent")
    assert cascading.layers == independent.layers == ("fc", "body/BatchNorm_0", "body/Conv_0", "stem")
    np.testing.assert_allclose(cascading.spearman[0], independent.spearman[0])
    # Independent oracle for the first step: the signed Grad-CAM of the randomised copy, by jax.vjp.
    randomised = explainer.backend.randomized(["fc"], seed=0)._model.source[1]
    activations = model.apply(randomised, X, method=lambda m, x: m.body(nn.relu(m.stem(x))))
    head = functools.partial(model.apply, randomised, method=lambda m, a: m.fc(a.mean((1, 2))))
    scores, vjp_fn = jax.vjp(head, activations)
    (gradients,) = vjp_fn(jnp.zeros_like(scores).at[:, 1].set(1.0))
    signed = np.einsum("nhwc,nc->nhw", activations, gradients.mean(axis=(1, 2)))
    reference = anycam.Explainer((model, variables), "body", relu=False, normalize=None).explain(X, target=1).cam
    np.testing.assert_allclose(cascading.spearman[0], spearman(reference, signed), atol=1e-6)
    assert cascading.ssim is not None and cascading.ssim.shape == (4, 4)
    full = sanity_check(explainer, X, target=1, mode="full")
    assert full.layers == ("all",) and full.ssim is not None
    np.testing.assert_array_equal(full.spearman[0], cascading.spearman[-1])
    np.testing.assert_array_equal(full.ssim[0], cascading.ssim[-1])
    assert not changed(before, variables)


# -- Flax NNX ------------------------------------------------------------------------------------


class NnxBlock(nnx.Module):
    def __init__(self, channels: int, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x)) + x)


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.blocks = nnx.List([NnxBlock(4, rngs) for _ in range(2)])
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean((1, 2)))


def test_nnx_layers_in_order_and_randomised_copy() -> None:
    model = NnxNet(nnx.Rngs(0))  # built directly: its attributes keep their assignment order
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.state(model))
    nnx.update(model, numpy_fill(shapes, np.random.default_rng(2)))
    in_order = ("stem", "blocks.0.conv", "blocks.0.bn", "blocks.1.conv", "blocks.1.bn", "fc")
    assert anycam.Explainer(model, "blocks.1").backend.parameter_layers() == in_order
    clone = nnx.clone(model)  # split/merge sorts the attributes; a batch restores the order
    backend = anycam.Explainer(clone, "blocks.1").backend
    assert backend.parameter_layers()[-1] == "stem" and backend.parameter_layers(X) == in_order
    before = snapshot(nnx.state(clone))
    copy = backend.randomized(["fc", "blocks.0.bn"], seed=1)
    leaves = ["fc/kernel", "fc/bias"] + [f"blocks/0/bn/{leaf}" for leaf in ("scale", "bias", "mean", "var")]
    assert changed(before, nnx.state(copy._model.source)) == {f"{leaf}/value" for leaf in leaves}
    assert not changed(before, nnx.state(clone)) and clone.blocks[0].bn.use_running_average is False
    kernel = copy._model.source.fc.kernel[...]
    np.testing.assert_array_equal(backend.randomized(["fc"], seed=1)._model.source.fc.kernel[...], kernel)
    assert not np.array_equal(backend.randomized(["fc"], seed=2)._model.source.fc.kernel[...], kernel)
    assert not np.allclose(copy.predict(X), backend.predict(X))
    with pytest.raises(anycam.LayerError, match="owns no parameters to randomise; randomise its layers: 'blocks.0"):
        backend.randomized(["blocks.0"])


# -- Equinox and (features, head, params) ---------------------------------------------------------


@functools.cache
def equinox_sequential() -> eqx.nn.Sequential:
    def build(key: jax.Array) -> eqx.nn.Sequential:
        k1, k2 = jax.random.split(key)
        return eqx.nn.Sequential(
            [
                eqx.nn.Conv2d(3, 4, 3, padding=1, key=k1),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.Lambda(lambda a: a.mean((1, 2))),
                eqx.nn.Linear(4, 3, key=k2),
            ]
        )

    return numpy_fill(eqx.filter_eval_shape(build, jax.random.key(0)), np.random.default_rng(3))


class Scale(eqx.Module):
    """Its constructor takes the array itself: a rebuild cannot draw new values."""

    weight: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.weight * x


class Opaque(eqx.Module):
    """Its constructor's argument is not kept: it cannot be rebuilt."""

    weight: jax.Array

    def __init__(self, size: int, key: jax.Array) -> None:
        self.weight = jax.random.normal(key, (size,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.weight * x


def test_equinox_randomised_copy() -> None:
    model = equinox_sequential()
    backend = anycam.Explainer(model, 1).backend
    assert backend.parameter_layers() == ("layers.0", "layers.3")
    before = snapshot(model)
    copy = backend.randomized([3], seed=0)  # an index of the Sequential, as for explaining
    assert changed(before, copy._model.source) == {"layers/3/weight", "layers/3/bias"}
    assert not changed(before, model)
    again = backend.randomized(["layers.3"], seed=0)._model.source
    np.testing.assert_array_equal(again.layers[3].weight, copy._model.source.layers[3].weight)
    x = jnp.moveaxis(X, -1, 1)
    assert not np.allclose(copy.predict(x), backend.predict(x))
    for layer, message in ((Scale(jnp.ones(3)), "takes the arrays"), (Opaque(3, jax.random.key(0)), "does not keep")):
        wrapped = eqx.nn.Sequential([layer, eqx.nn.Lambda(jnp.tanh)])
        with pytest.raises(NotImplementedError, match=message):
            anycam.Explainer(wrapped, 0, vmap=False).backend.randomized(["layers.0"])


def test_function_params_dict_and_plain_pair() -> None:
    rng = np.random.default_rng(4)
    shapes = {"conv": (3, 4), "fc": (4, 3)}
    params = {name: jnp.asarray(rng.normal(size=shape), jnp.float32) for name, shape in shapes.items()}

    def features(p: dict, x: jax.Array) -> jax.Array:
        return jnp.einsum("nchw,cd->ndhw", x, p["conv"])

    def head(p: dict, a: jax.Array) -> jax.Array:
        return a.mean((2, 3)) @ p["fc"]

    backend = anycam.Explainer((features, head, params), None, backend="jax").backend
    assert backend.parameter_layers() == ("conv", "fc")
    copy = backend.randomized(["fc"], seed=0)
    fresh = copy._model.source[2]
    assert fresh["conv"] is params["conv"] and not np.array_equal(fresh["fc"], params["fc"])
    np.testing.assert_array_equal(backend.randomized(["fc"], seed=0)._model.source[2]["fc"], fresh["fc"])
    plain = anycam.Explainer((functools.partial(features, params), functools.partial(head, params)), backend="jax")
    with pytest.raises(NotImplementedError, match="pair"):
        plain.backend.parameter_layers()
    with pytest.raises(NotImplementedError, match="pair"):
        plain.backend.randomized(["features"])
