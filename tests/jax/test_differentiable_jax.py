"""Maps from ``explain_fn`` are differentiable by composition: ``jax.grad`` of a loss on the map with
respect to the weights and the input equals the gradient of the same method written by hand in
plain JAX — second order through the layer's gradient (issue 21.3).

The oracle (tests/jax/split_models.py) is each method's formula on ``jax.vjp`` of the model cut
at the layer with the framework's own calls, upsampled with ``jax.image.resize`` and min-max
normalised by hand; ``jax.grad`` of that is the reference. Both are float32, so the gradients
agree to 1e-5 relative to each gradient's largest entry (a few float32 roundings through two
backward passes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from anycam.backends.jax.compose import explain_fn

import anycam
from tests.jax.split_models import FORMS, SIZE, by_hand, inputs

pytestmark = pytest.mark.jax

TARGET = jnp.array([0, 2, 1, 2])
DIFFERENTIABLE = ("gradcam", "hirescam", "layercam", "xgradcam", "gradcam++", "gradcam-elementwise")
# The energy outside a box: the penalty of "right for the right reasons" training.
OUTSIDE = jnp.ones(SIZE).at[2:6, 3:7].set(0.0)


def _penalty(maps: jax.Array) -> jax.Array:
    return jnp.sum(maps * OUTSIDE) / (jnp.sum(maps) + 1e-6)


def _assert_close(found, expected) -> None:  # type: ignore[no-untyped-def]
    leaves = jax.tree_util.tree_leaves(expected)
    assert any(float(jnp.abs(leaf).max()) > 0 for leaf in leaves), "the reference gradient is zero: no test"
    for got, ref in zip(jax.tree_util.tree_leaves(found), leaves, strict=True):
        scale = max(float(jnp.abs(ref).max()), 1e-12)
        np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(ref) / scale, atol=1e-5)


@pytest.mark.parametrize("method", DIFFERENTIABLE)
@pytest.mark.parametrize("kind", sorted(FORMS))
def test_gradients_of_a_loss_on_the_map_equal_the_hand_written_method(kind: str, method: str) -> None:
    form = FORMS[kind]()
    f = explain_fn(form.model, form.layer, method, differentiable=True)
    x = inputs(form)

    def ours(weights, x):  # type: ignore[no-untyped-def]
        return _penalty(f(weights, x, TARGET))

    def reference(weights, x):  # type: ignore[no-untyped-def]
        return _penalty(by_hand(form, weights, x, TARGET, method))

    found = jax.jit(jax.grad(ours, argnums=(0, 1)))(form.weights, x)
    expected = jax.grad(reference, argnums=(0, 1))(form.weights, x)
    np.testing.assert_allclose(ours(form.weights, x), reference(form.weights, x), rtol=1e-5)
    _assert_close(found, expected)


def test_the_gradient_goes_through_the_layers_gradient() -> None:
    """Second order: the reference with the layer's gradient held constant gives another gradient."""
    form = FORMS["functions"]()
    f = explain_fn(form.model, None, "gradcam", differentiable=True)
    x = inputs(form)
    found = jax.grad(lambda w: _penalty(f(w, x, TARGET)))(form.weights)

    def first_order(weights):  # type: ignore[no-untyped-def]
        a = form.features(weights, x)
        out, vjp = jax.vjp(lambda act: form.head(weights, act), a)
        (g,) = vjp(jax.nn.one_hot(TARGET, out.shape[1]))
        g = jax.lax.stop_gradient(g)
        cam = jax.nn.relu(jnp.einsum("nc,nchw->nhw", g.mean(axis=(2, 3)), a))
        cam = jax.image.resize(cam, (4, *SIZE), "linear", antialias=False)
        low, high = cam.min(axis=(1, 2), keepdims=True), cam.max(axis=(1, 2), keepdims=True)
        return _penalty((cam - low) / (high - low))

    shallow = jax.grad(first_order)(form.weights)
    # The head's weights reach the map only through the gradient: zero without second order.
    assert float(jnp.abs(shallow["w"]).max()) == 0.0
    assert float(jnp.abs(found["w"]).max()) > 1e-3


@pytest.mark.parametrize("method", ["eigencam", "eigengradcam", "kpcacam", "randomcam"])
def test_methods_that_cannot_be_differentiable_are_refused(method: str) -> None:
    form = FORMS["functions"]()
    with pytest.raises(anycam.ConfigError, match="gradcam"):
        explain_fn(form.model, None, method, differentiable=True)
