"""``layer=None`` on a JAX vision transformer (issue 22): the tokens the last attention reads.

Before: an Equinox ViT raised UnexpectedTracerError (its blocks call ``jax.vmap(self.norm)``,
and the automatic choice tapped the norm inside that vmap), and NNX and linen ViTs took the last
attention's value projection, an ``(N, T, heads, head_dim)`` array read as a map over
(heads, head_dim): a map of nothing. Now the rule of the torch backend: the last module that
ends with the ``(N, T, C)`` tokens before the last attention module, not inside it. The oracle is
Grad-CAM written by hand with ``jax.grad`` on the NNX blocks, the tokens split at that module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import anycam  # noqa: E402
from tests.jax import attention_vits  # noqa: E402


def _model(family: str) -> tuple[Any, np.ndarray, str]:
    """The family's ViT, its input and the layer the rule must choose (the last attention's tokens)."""
    last = attention_vits.BLOCKS - 1
    pytest.importorskip("equinox" if family == "equinox" else "flax")
    if family == "nnx":
        return attention_vits.nnx_vit(), attention_vits.images(3), f"blocks.{last}.ln1"
    if family == "linen":
        return attention_vits.linen_vit(), attention_vits.images(3), f"block{last}/ln1"
    # Equinox's blocks call jax.vmap(self.ln1): the norm runs inside a vmap of its own and cannot be
    # read, so the tokens the last attention gets are the previous block's output.
    return attention_vits.equinox_vit(), attention_vits.images(3, channels_first=True), f"blocks.{last - 1}"


@pytest.mark.parametrize("family", ["nnx", "linen", "equinox"])
def test_layer_none_on_a_jax_vit_chooses_the_tokens_the_last_attention_reads(family: str) -> None:
    model, x, expected = _model(family)
    # The rule's choice holds tokens, and a Flax model's layouts follow it, though 17 tokens of 16
    # channels read as channels-last too. An Equinox model of Linear layers has no layout
    # convention the capture trusts (backends/jax/capture.py, layouts_decided): it needs it named.
    layout = "tokens" if family == "equinox" else None
    explanation = anycam.Explainer(model, None, method="gradcam", layout=layout).explain(x)
    assert explanation.layer == expected
    assert explanation.cam.shape == (3, 4, 4)  # the 4 × 4 patch grid, the class token dropped
    assert np.abs(explanation.cam).max() > 0


def test_layer_none_gradcam_on_an_nnx_vit_equals_gradcam_written_by_hand_on_its_last_norm() -> None:
    pytest.importorskip("flax")
    vit = attention_vits.nnx_vit(seed=2)
    x = attention_vits.images(3, seed=1)
    explanation = anycam.Explainer(vit, None, method="gradcam", relu=False).explain(x)

    tokens = attention_vits.patchify(jnp.asarray(x)) @ vit.embed.kernel[...] + vit.embed.bias[...]
    cls = jnp.broadcast_to(vit.cls[...], (3, 1, attention_vits.DIM))
    tokens = jnp.concatenate([cls, tokens], axis=1) + vit.pos[...]
    for block in vit.blocks[:-1]:
        tokens = block(tokens)
    last = vit.blocks[-1]
    normed = last.ln1(tokens)

    def logits(h: jax.Array) -> jax.Array:  # the rest of the model from the norm's output; the residual keeps tokens
        y = tokens + last.attn(h)
        y = y + last.fc2(jax.nn.gelu(last.fc1(last.ln2(y))))
        return vit.head(vit.ln(y[:, 0]))

    classes = np.asarray(logits(normed)).argmax(1)
    grads = jax.grad(lambda h: logits(h)[jnp.arange(3), classes].sum())(normed)
    patches, patch_grads = np.asarray(normed)[:, 1:], np.asarray(grads)[:, 1:]  # the class token dropped
    alpha = patch_grads.mean(axis=1)  # (N, C): the mean gradient over the 4 × 4 positions
    expected = np.einsum("nc,ntc->nt", alpha, patches).reshape(3, 4, 4)
    np.testing.assert_array_equal(explanation.target, classes)
    np.testing.assert_allclose(explanation.cam, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
