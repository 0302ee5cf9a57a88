"""``explain_fn`` is a pure function of (weights, inputs, target): it equals Grad-CAM written by hand
on an explicitly split model, and under ``jax.jit`` and ``jax.vmap`` it equals its eager call; new
weights under one compiled function give the new weights' map, without a new trace (issue 21.4).

The oracle (tests/jax/split_models.py) cuts each model at the layer with the framework's own
calls (linen ``method=``, ``nnx.merge``, ``eqx.combine``, plain functions), takes ``jax.vjp`` of
the head, and writes Grad-CAM, the bilinear upsampling (``jax.image.resize``) and the min-max
normalisation out; float32 throughout, so 1e-5 on maps in [0, 1].
"""

from __future__ import annotations

import equinox as eqx
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from anycam.backends.jax.compose import explain_fn

import anycam
from tests.jax.split_models import CLASSES, FORMS, by_hand, inputs

pytestmark = pytest.mark.jax

TOL = 1e-5
TARGET = jnp.array([0, 2, 1, 2])


@pytest.fixture(params=sorted(FORMS), scope="module")
def form(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return FORMS[request.param]()


def test_explain_fn_equals_gradcam_written_by_hand(form) -> None:  # type: ignore[no-untyped-def]
    f = explain_fn(form.model, form.layer, "gradcam")
    x = inputs(form)
    maps = f(form.weights, x, TARGET)
    assert maps.shape == (4, 8, 8) and maps.dtype == jnp.float32
    np.testing.assert_allclose(maps, by_hand(form, form.weights, x, TARGET), atol=TOL)
    # target=None explains each sample's top class.
    top = jnp.argmax(form.head(form.weights, form.features(form.weights, x)), axis=1)
    np.testing.assert_allclose(f(form.weights, x), by_hand(form, form.weights, x, top), atol=TOL)
    # The other weights give another map: the oracle can tell weights apart.
    assert float(jnp.abs(by_hand(form, form.other, x, TARGET) - maps).max()) > 0.1


@pytest.mark.filterwarnings("ignore::anycam.ZeroMapWarning")
def test_explain_fn_equals_the_explainer(form) -> None:  # type: ignore[no-untyped-def]
    x = inputs(form)
    layer = form.layer
    explainer = anycam.Explainer(form.model, layer=layer, method="gradcam", backend="jax")
    expected = explainer.explain(np.asarray(x), np.asarray(TARGET))
    np.testing.assert_allclose(explain_fn(form.model, layer)(form.weights, x, TARGET), expected.heatmap, atol=TOL)


def test_jit_and_vmap_equal_the_eager_call(form) -> None:  # type: ignore[no-untyped-def]
    f = explain_fn(form.model, form.layer, "gradcam")
    x = inputs(form)
    eager = f(form.weights, x, TARGET)
    np.testing.assert_allclose(jax.jit(f)(form.weights, x, TARGET), eager, atol=TOL)
    # vmap over samples: each a batch of one.
    per_sample = jax.vmap(f, in_axes=(None, 0, 0))(form.weights, x[:, None], TARGET[:, None])
    np.testing.assert_allclose(per_sample[:, 0], eager, atol=TOL)
    # vmap over weights: an ensemble of two models in one call.
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), form.weights, form.other)
    both = jax.jit(jax.vmap(f, in_axes=(0, None, None)))(stacked, x, TARGET)
    np.testing.assert_allclose(both[0], eager, atol=TOL)
    np.testing.assert_allclose(both[1], by_hand(form, form.other, x, TARGET), atol=TOL)


def test_new_weights_under_one_jit_give_their_own_map_without_a_new_trace(form) -> None:  # type: ignore[no-untyped-def]
    f = explain_fn(form.model, form.layer, "gradcam")
    traces = []

    @jax.jit
    def step(weights, x, target):  # type: ignore[no-untyped-def]
        traces.append(1)  # runs only while tracing
        return f(weights, x, target)

    x = inputs(form)
    first = step(form.weights, x, TARGET)
    second = step(form.other, x, TARGET)
    assert len(traces) == 1
    np.testing.assert_allclose(first, by_hand(form, form.weights, x, TARGET), atol=TOL)
    np.testing.assert_allclose(second, by_hand(form, form.other, x, TARGET), atol=TOL)


def test_several_targets_give_one_map_each(form) -> None:  # type: ignore[no-untyped-def]
    f = explain_fn(form.model, form.layer, "gradcam")
    x = inputs(form)
    targets = jnp.array([[0, 1], [2, 0], [1, 1], [2, 1]])
    maps = jax.jit(f)(form.weights, x, targets)
    assert maps.shape == (4, 2, 8, 8)
    for k in range(2):
        np.testing.assert_allclose(maps[:, k], by_hand(form, form.weights, x, targets[:, k]), atol=TOL)


def test_parts_hold_the_scores_and_classes(form) -> None:  # type: ignore[no-untyped-def]
    f = explain_fn(form.model, form.layer, "gradcam")
    x = inputs(form)
    parts = jax.jit(f.parts)(form.weights, x, TARGET)
    logits = form.head(form.weights, form.features(form.weights, x))
    np.testing.assert_allclose(parts.scores, logits[jnp.arange(4), TARGET], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(parts.target, TARGET)
    assert parts.cams[0].shape == (4, 4, 4) and parts.weights.shape == (4, 6)


def test_nnx_weights_may_be_split_states_or_the_module() -> None:
    form = FORMS["nnx"]()
    f = explain_fn(form.model, "block")
    x = inputs(form)
    expected = by_hand(form, form.weights, x, TARGET)
    _, params, rest = nnx.split(form.model, nnx.Param, ...)
    np.testing.assert_allclose(jax.jit(f)((params, rest), x, TARGET), expected, atol=TOL)
    np.testing.assert_allclose(f(form.model, x, TARGET), expected, atol=TOL)


def test_equinox_weights_may_be_the_model() -> None:
    form = FORMS["equinox"]()
    f = explain_fn(form.model, "block")
    x = inputs(form)
    expected = by_hand(form, form.weights, x, TARGET)
    np.testing.assert_allclose(eqx.filter_jit(f)(form.model, x, TARGET), expected, atol=TOL)


def test_weights_of_another_structure_are_refused() -> None:
    form = FORMS["functions"]()
    f = explain_fn(form.model)
    with pytest.raises(anycam.BackendError, match="structure"):
        f({"k1": form.weights["k1"]}, inputs(form), TARGET)


def test_methods_that_need_more_than_one_capture_are_refused() -> None:
    form = FORMS["functions"]()
    with pytest.raises(anycam.ConfigError, match="scorecam"):
        explain_fn(form.model, None, "scorecam")


def test_layer_auto_is_refused() -> None:
    form = FORMS["linen"]()
    with pytest.raises(anycam.LayerError, match="named"):
        explain_fn(form.model, "auto")


def test_out_of_range_classes_are_refused_when_concrete() -> None:
    form = FORMS["functions"]()
    f = explain_fn(form.model)
    with pytest.raises(anycam.TargetError, match=r"\[0, 3\)"):
        f(form.weights, inputs(form), jnp.array([0, 1, 2, CLASSES]))
