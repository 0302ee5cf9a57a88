"""One ViT's weights in Keras (on TensorFlow) and in Flax NNX give the same attention maps (issue 22).

The Keras ViT of ``attention_keras_run`` (a conv patch embedding) and the NNX ViT of
``tests/jax/attention_vits`` (the same patches through a dense layer) compute the same function
when the conv kernel ``(4, 4, 3, D)`` is read as the dense kernel ``(48, D)``; every other weight
has the same layout in both. Two frameworks' autodiff through two adapters, one answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("flax")

import anycam  # noqa: E402
from tests.jax import attention_vits  # noqa: E402
from tests.parity.attention_keras_run import BLOCKS, SIDE, keras_vit  # noqa: E402


def _nnx_from_keras(model: Any) -> Any:
    vit = attention_vits.nnx_vit()

    def weights(name: str) -> list[Any]:
        return [jnp.asarray(w) for w in model.get_layer(name).get_weights()]

    kernel, bias = weights("embed")
    vit.embed.kernel[...], vit.embed.bias[...] = kernel.reshape(-1, kernel.shape[-1]), bias
    vit.cls[...], vit.pos[...] = weights("tokens")
    for index, block in enumerate(vit.blocks):
        block.ln1.scale[...], block.ln1.bias[...] = weights(f"block{index}_ln1")
        block.ln2.scale[...], block.ln2.bias[...] = weights(f"block{index}_ln2")
        attention = block.attn
        (
            attention.query.kernel[...], attention.query.bias[...],
            attention.key.kernel[...], attention.key.bias[...],
            attention.value.kernel[...], attention.value.bias[...],
            attention.out.kernel[...], attention.out.bias[...],
        ) = weights(f"block{index}_attn")  # fmt: skip
        block.fc1.kernel[...], block.fc1.bias[...] = weights(f"block{index}_fc1")
        block.fc2.kernel[...], block.fc2.bias[...] = weights(f"block{index}_fc2")
    vit.ln.scale[...], vit.ln.bias[...] = weights("ln")
    vit.head.kernel[...], vit.head.bias[...] = weights("head")
    return vit


@pytest.mark.parametrize("method", ["rollout", "attention-grad"])
@pytest.mark.parametrize("target", [None, "top_k", "(N,K)"])
def test_keras_and_flax_nnx_vits_with_one_set_of_weights_give_the_same_maps(method: str, target: Any) -> None:
    model = keras_vit(seed=5)
    vit = _nnx_from_keras(model)
    x = np.random.default_rng(4).normal(size=(3, SIDE, SIDE, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(vit(x)), model(x, training=False).numpy(), rtol=1e-4, atol=1e-5)
    given = {None: None, "top_k": anycam.top_k(2), "(N,K)": np.array([[0, 3], [1, 2], [4, 4]])}[target]
    keras_ex = anycam.Explainer(model, None, method=method).explain(x, target=given)
    flax_ex = anycam.Explainer(vit, None, method=method).explain(x, target=given)
    assert len(keras_ex.layer) == len(flax_ex.layer) == BLOCKS
    np.testing.assert_allclose(flax_ex.cam, keras_ex.cam, rtol=1e-4, atol=1e-6 * np.abs(keras_ex.cam).max())
    np.testing.assert_allclose(flax_ex.heatmap, keras_ex.heatmap, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flax_ex.scores, keras_ex.scores, rtol=1e-4, atol=1e-5)
