"""Bad models, layers, inputs and targets: errors that say what was given and what to do."""

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
from tests.contract.kit_jax import numpy_fill, numpy_init

pytestmark = pytest.mark.jax


class Net(nn.Module):
    """A backbone, an auxiliary branch whose output is dropped, a shared conv, a tuple layer."""

    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
        _ = nn.Conv(2, (1, 1), name="aux")(x)  # computed, never used
        x = nn.BatchNorm(use_running_average=not self.train, name="bn")(x)
        shared = nn.Conv(4, (1, 1), name="shared")
        x = shared(shared(x))
        x = Pair(name="pair")(x)[0]
        return nn.Dense(3, name="fc")(x.mean((1, 2)))


class Pair(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = nn.Conv(4, (1, 1))(x)
        return y, -y


def x(*shape: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).normal(size=shape or (2, 6, 6, 3)).astype(np.float32))


@functools.cache
def net() -> tuple[Net, dict]:
    model = Net()
    return model, numpy_init(model, x(), np.random.default_rng(1))


def test_unknown_linen_path_lists_the_paths() -> None:
    with pytest.raises(anycam.LayerError, match=r"'convv' not found in the Flax linen model; closest: 'conv'") as info:
        anycam.Explainer(net(), "convv")
    assert "module paths: 'aux', 'bn', 'conv', 'fc', 'pair', 'pair/Conv_0', 'shared'" in str(info.value)
    with pytest.raises(anycam.LayerError, match="'pair/Conv_1' not found.*closest: 'pair/Conv_0'"):
        anycam.Explainer(net(), ("pair", "Conv_1"))
    with pytest.raises(anycam.LayerError, match="a Flax linen layer is a module path"):
        anycam.Explainer(net(), 3.5)


def test_unknown_nnx_and_equinox_paths_list_the_paths() -> None:
    class Small(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.blocks = nnx.List([nnx.Conv(3, 3, (1, 1), rngs=rngs) for _ in range(2)])

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.blocks[1](self.blocks[0](x)).mean((1, 2))

    model = nnx.eval_shape(lambda: Small(nnx.Rngs(0)))
    with pytest.raises(
        anycam.LayerError, match=r"'blocks.5' not found in the Flax NNX model.*module paths: .*'blocks.1'"
    ):
        anycam.Explainer(model, "blocks.5")
    with pytest.raises(anycam.LayerError, match=r"'auto' \(or None\) chooses one layer; it cannot be part of a list"):
        anycam.Explainer(model, ["blocks.0", None])
    with pytest.raises(anycam.LayerError, match="not a module of the Flax NNX model"):
        anycam.Explainer(model, nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    sequential = eqx.nn.Sequential([eqx.nn.Lambda(jnp.tanh), eqx.nn.Lambda(jnp.sin)])
    with pytest.raises(anycam.LayerError, match=r"'layers.7' not found in the Equinox model; closest: 'layers.1'"):
        anycam.Explainer(sequential, "layers.7")


def test_layer_that_does_not_reach_the_output() -> None:
    explainer = anycam.Explainer(net(), "aux")
    with pytest.raises(anycam.LayerError, match="'aux' does not reach the explained output.*zero everywhere"):
        explainer(x())
    with pytest.raises(anycam.LayerError, match="'aux' does not reach"):  # the verdict is cached
        explainer(x(), target=1)


def test_layer_that_never_runs_or_runs_twice_or_returns_a_tuple() -> None:
    class Unused(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.used = nnx.Conv(3, 2, (1, 1), rngs=rngs)
            self.unused = nnx.Conv(3, 2, (1, 1), rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.used(x).mean((1, 2))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Unused(nnx.Rngs(0))))
    unused = nnx.merge(graphdef, numpy_fill(state, np.random.default_rng(0)))
    with pytest.raises(anycam.LayerError, match="'unused'.* did not run during the forward pass"):
        anycam.Explainer(unused, "unused")(x())
    with pytest.raises(anycam.LayerError, match="'shared' runs more than once"):
        anycam.Explainer(net(), "shared")(x())

    class Tied(nnx.Module):  # one submodule under two names: NNX keeps it shared
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.first = nnx.Conv(3, 3, (1, 1), rngs=rngs)
            self.second = self.first
            self.fc = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.fc(self.second(jnp.tanh(self.first(x))).mean((1, 2)))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Tied(nnx.Rngs(0))))
    tied = nnx.merge(graphdef, numpy_fill(state, np.random.default_rng(0)))
    with pytest.raises(anycam.LayerError, match="'first' runs more than once"):
        anycam.Explainer(tied, "first")(x())
    with pytest.raises(anycam.LayerError, match="'pair' returns tuple, not a floating-point array"):
        anycam.Explainer(net(), "pair")(x())


def test_unrecognised_models_say_which_forms_are_accepted() -> None:
    with pytest.raises(anycam.BackendError, match=r"does not recognise a builtins.dict; it accepts a Flax linen"):
        anycam.Explainer({"w": 1}, None, backend="jax")
    with pytest.raises(anycam.BackendError, match=r"cannot tell which framework.*backend='jax'"):
        anycam.Explainer((jnp.tanh, jnp.sin), None)  # a pair of functions needs backend="jax"
    with pytest.raises(anycam.BackendError, match="unbound and has no variables; pass \\(module, variables\\)"):
        anycam.Explainer(Net(), "conv")
    model, variables = net()
    with pytest.raises(anycam.BackendError, match=r"pass \(module, \{'params': params\}\)"):
        anycam.Explainer((model, variables["params"]), "conv")


def test_function_pairs_take_no_layer_and_no_model_kwargs() -> None:
    pair = (lambda x: jnp.tanh(x), lambda a: a.mean((2, 3)))
    with pytest.raises(anycam.LayerError, match="already cut at its layer.*pass layer=None"):
        anycam.Explainer(pair, "conv", backend="jax")
    with pytest.raises(TypeError, match="model_kwargs does not apply"):
        anycam.Explainer(pair, backend="jax", model_kwargs={"train": False})
    accepted = "accepted: model_kwargs, spatial_input, vmap"
    with pytest.raises(TypeError, match=rf"unknown option\(s\) trian for the jax backend; {accepted}"):
        anycam.Explainer(pair, backend="jax", trian=False)


def test_inputs_must_be_float_arrays() -> None:
    explainer = anycam.Explainer(net(), "conv")
    with pytest.raises(anycam.InputError, match="input has dtype int32, but the heatmap needs a floating-point input"):
        explainer(jnp.ones((2, 6, 6, 3), jnp.int32))
    with pytest.raises(anycam.InputError, match="input has dtype uint8, but the heatmap needs a floating-point input"):
        explainer(np.zeros((2, 6, 6, 3), np.uint8))
    # A list is several inputs (extra positional arguments); none of these is an array.
    with pytest.raises(anycam.InputError, match="no input is a floating-point array with spatial axes"):
        explainer([[[[0.0]]]])
    with pytest.raises(anycam.InputError, match=r"input 1 must be a jax.Array or a NumPy array, got str"):
        explainer((np.zeros((1, 4, 4, 1), np.float32), "text"))
    with pytest.raises(anycam.InputError, match="no spatial axis"):
        explainer(jnp.ones((2, 3)))


def test_linen_training_mode_is_an_error_that_names_the_fix() -> None:
    _, variables = net()
    explainer = anycam.Explainer((Net(train=True), variables), "conv")
    with pytest.raises(anycam.BackendError, match=r"training mode.*model_kwargs=\{'train': False\}"):
        explainer(x())

    class Dropping(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
            x = nn.Conv(2, (1, 1), name="conv")(x)
            return nn.Dropout(0.5, deterministic=not train)(x).mean((1, 2))

    dropping = Dropping()
    drop_vars = numpy_init(dropping, x(), np.random.default_rng(0), train=False)
    with pytest.raises(anycam.BackendError, match="random key.*Dropout runs in training mode"):
        anycam.Explainer((dropping, drop_vars), "conv")(x())
    assert anycam.Explainer((dropping, drop_vars), "conv", model_kwargs={"train": False})(x()).shape == (2, 6, 6)


def test_target_errors() -> None:
    explainer = anycam.Explainer(net(), "conv")
    with pytest.raises(anycam.TargetError, match=r"top_k\(4\) asks for more classes than the model has \(3\)"):
        explainer(x(), target=anycam.top_k(4))
    with pytest.raises(anycam.TargetError, match="out of range: the model has 3 outputs"):
        explainer(x(), target=3)
    with pytest.raises(anycam.TargetError, match="got 3 targets for a batch of 2"):
        explainer(x(), target=[0, 1, 2])
    with pytest.raises(anycam.TargetError, match=r"callable target must return a JAX array of shape \(N,\)"):
        explainer(x(), target=lambda output: output.sum())
    with pytest.raises(anycam.TargetError, match=r"callable target must return a JAX array"):
        anycam.Explainer(net(), "conv", method="eigencam")(x(), target=lambda output: 1.0)


def test_tuple_outputs_need_a_selector() -> None:
    class TwoHeads(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            pooled = nn.relu(nn.Conv(3, (3, 3), name="conv")(x)).mean((1, 2))
            return nn.Dense(4, name="a")(pooled), nn.Dense(2, name="b")(pooled)

    model = TwoHeads()
    variables = numpy_init(model, x(), np.random.default_rng(0))
    with pytest.raises(anycam.TargetError, match="returned a tuple; say which part to explain, e.g. output=0"):
        anycam.Explainer((model, variables), "conv")(x())
    result = anycam.Explainer((model, variables), "conv", output=1).explain(x())
    assert result.scores.shape == (2,) and set(result.target) <= {0, 1}


def test_a_flax_pair_in_nhwc_is_read_channels_last_without_being_told() -> None:
    """Issue 10, item 3: (features, head) cut from an NHWC Flax model, no layout given.

    Read channels-first (the pair default) the input's spatial shape would be (24, 3) and the
    map (N, 24, 16); only the channels-last reading fits, so it is taken.
    """
    conv, dense = nn.Conv(16, (3, 3), strides=2, padding="SAME"), nn.Dense(5)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 24, 24, 3)).astype(np.float32))
    conv_vars = numpy_init(conv, x, rng)
    dense_vars = numpy_init(dense, jnp.zeros((2, 16)), rng)

    def features(images):  # type: ignore[no-untyped-def]
        return jax.nn.relu(conv.apply(conv_vars, images))

    def head(activations):  # type: ignore[no-untyped-def]
        return dense.apply(dense_vars, activations.mean(axis=(1, 2)))

    told = anycam.Explainer((features, head), None, backend="jax", input_layout="NHWC").explain(x)
    found = anycam.Explainer((features, head), None, backend="jax").explain(x)
    assert told.heatmap.shape == found.heatmap.shape == (2, 24, 24)
    np.testing.assert_array_equal(found.heatmap, told.heatmap)


class Small(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
        return nn.Dense(5, name="fc")(x.mean(axis=(-3, -2)))


@pytest.mark.parametrize("method", ["gradcam", "ablationcam", "guided-backprop"])
def test_an_extra_input_axis_with_an_indexing_callable_is_refused_not_clamped(method: str) -> None:
    """Issue 10, item 8: Flax folds an extra axis into the batch, the output becomes (N, 1, classes)
    and JAX clamps the callable's class index to 0 — the maps were of the wrong entries."""
    x = np.random.default_rng(0).random((2, 8, 8, 3), np.float32)
    module = Small()
    variables = module.init(jax.random.key(0), x)
    labels = jnp.array([3, 1])

    def pick(output: jax.Array) -> jax.Array:
        return output[jnp.arange(output.shape[0]), labels]

    explainer = anycam.Explainer((module, variables), "conv", method=method, progress=False)
    good = explainer.explain(x, target=pick)  # a right input: no false alarm
    logits = module.apply(variables, x)
    np.testing.assert_allclose(good.scores, logits[np.arange(2), labels], rtol=1e-5)
    with pytest.raises(anycam.TargetError, match=r"out of range.*\(2, 1, 5\).*\(2, 1, 8, 8, 3\)"):
        explainer.explain(x[:, None], target=pick)
    # A negative index is in range (it counts from the end): not refused.
    last = explainer.explain(x, target=lambda output: output[:, -1])
    np.testing.assert_allclose(last.scores, logits[:, -1], rtol=1e-5)
