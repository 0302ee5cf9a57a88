"""Every method leaves a Flax model with BatchNorm as it was (issue 19, item 2).

A linen model's variables (``params`` and ``batch_stats``) and an NNX model in training mode
(its BatchNorm statistics, its mode flags) are compared bit for bit before and after each
method of ``anycam.core.METHODS``: whether the method explains the model (inference mode) or
refuses it (a linen model asked to run in training mode, where BatchNorm would update its
statistics and mix the samples of a batch).
"""

from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anycam
from anycam import core
from tests.contract.kit_jax import numpy_fill, numpy_init

pytestmark = pytest.mark.jax

X = jnp.asarray(np.random.default_rng(11).normal(size=(2, 8, 8, 3)).astype(np.float32))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(x))
        return nn.Dense(3, name="fc")(x.mean(axis=(1, 2)))


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)  # training mode: use_running_average=False
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))


def snapshot(tree) -> list[tuple[str, np.ndarray]]:  # type: ignore[no-untyped-def]
    """Every leaf of ``tree`` as (path, a NumPy copy), to compare bit for bit."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [(jax.tree_util.keystr(path), np.array(leaf, copy=True)) for path, leaf in leaves]


def assert_identical(before: list[tuple[str, np.ndarray]], after: list[tuple[str, np.ndarray]]) -> None:
    assert [path for path, _ in before] == [path for path, _ in after]
    for (path, old), (_, new) in zip(before, after, strict=True):
        assert old.dtype == new.dtype and old.shape == new.shape, path
        assert old.tobytes() == new.tobytes(), f"{path} changed"


def explain(model, method: str, **options) -> None:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anycam.AnycamWarning)
        anycam.Explainer(model, "conv", method=method, **options).explain(X, target=[0, 2])


@functools.cache
def linen() -> tuple[LinenNet, dict]:
    model = LinenNet()
    variables = numpy_init(model, X, np.random.default_rng(1))
    # Statistics far from what this batch gives, so an update would show.
    stats = jax.tree_util.tree_map(lambda v: v + 3.0, variables["batch_stats"])
    return model, {"params": variables["params"], "batch_stats": stats}


@pytest.mark.parametrize("method", sorted(set(core.METHODS) - set(core.methods.ATTENTION_METHODS)))
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_every_method_leaves_linen_variables_untouched(method: str, train: bool) -> None:
    model, variables = linen()
    before = snapshot(variables)
    if train:  # BatchNorm would update batch_stats: refused, and nothing changes
        with pytest.raises(anycam.BackendError, match="training mode"):
            explain((model, variables), method, model_kwargs={"train": True})
    else:
        explain((model, variables), method)
    assert_identical(before, snapshot(variables))
    assert model.scope is None  # the module is still unbound


def nnx_net() -> NnxNet:
    abstract = nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    model = nnx.merge(graphdef, numpy_fill(state, np.random.default_rng(2)))
    model.bn.mean[...] = model.bn.mean[...] + 3.0
    return model


@pytest.mark.parametrize("method", sorted(set(core.METHODS) - set(core.methods.ATTENTION_METHODS)))
def test_every_method_leaves_an_nnx_model_in_training_mode_untouched(method: str) -> None:
    model = nnx_net()
    modules = {path: module for path, module in nnx.iter_modules(model)}
    before = snapshot(nnx.state(model))
    flags = {path: dict(vars(module)) for path, module in modules.items()}
    explain(model, method)
    assert_identical(before, snapshot(nnx.state(model)))
    assert model.bn.use_running_average is False  # still in training mode
    after = {path: module for path, module in nnx.iter_modules(model)}
    assert after.keys() == modules.keys()
    for path, module in after.items():
        assert module is modules[path] and type(module) is type(modules[path])
        # Same attributes holding the same objects: flags, submodules, variables.
        assert vars(module).keys() == flags[path].keys(), path
        for name, value in vars(module).items():
            assert value is flags[path][name] or value == flags[path][name], (path, name)
    # And the model still trains: a training-mode call updates its statistics as before.
    mean = np.array(model.bn.mean[...])
    model(X)
    assert not np.array_equal(mean, np.array(model.bn.mean[...]))


@pytest.mark.parametrize("mutable", [["batch_stats"], True])
def test_linen_mutable_batch_stats_are_refused(mutable: object) -> None:
    # apply(..., mutable=...) would run BatchNorm on the batch's statistics, mixing the samples.
    model, variables = linen()
    before = snapshot(variables)
    with pytest.raises(anycam.ConfigTypeError, match="mutable.*inference mode"):
        explain((model, variables), "gradcam", output=0, model_kwargs={"train": True, "mutable": mutable})
    assert_identical(before, snapshot(variables))
