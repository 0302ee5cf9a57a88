"""One ViT's weights in torch, Keras (on TensorFlow) and Flax NNX give the same attention maps (issue 22).

The Keras ViT of ``attention_keras_run`` (a conv patch embedding) and the NNX ViT of
``tests/jax/attention_vits`` (the same patches through a dense layer) compute the same function
when the conv kernel ``(4, 4, 3, D)`` is read as the dense kernel ``(48, D)``; every other weight
has the same layout in both. The torch ViT of ``attention_torch_vit`` takes the same weights
transposed to torch's layouts, attending through ``F.scaled_dot_product_attention`` or
``nn.MultiheadAttention``. Three frameworks' autodiff through three adapters, one answer.

Tolerance: every map is a float32 computation through the patch embedding, 2 blocks (LayerNorm,
softmax, matmuls of width 16–32) and the head, and for attention-grad its backward pass; the
frameworks sum in different orders, so each op differs by a few float32 ulps (~1e-7 relative)
and the differences grow at most by the network's modest condition (the logits agree to ~1e-6;
measured on these weights, the maps differ by at most 1.2e-6 of their largest entry).
rtol 1e-4 leaves two orders of magnitude; a map entry near 0 (a sum of terms of both signs) is
compared with an absolute floor of 1e-6 of the map's largest entry, the cancellation's scale.
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


#: Every target form that gives one forward: the default (the top class), one class for every
#: sample, one class per sample, top_k and an explicit (N, K) array.
TARGETS: dict[str, Any] = {
    "None": None,
    "int": 3,
    "per-sample": np.array([4, 0, 2]),
    "top_k": anycam.top_k(2),
    "(N,K)": np.array([[0, 3], [1, 2], [4, 4]]),
}


@pytest.fixture(scope="module")
def three_vits() -> dict[str, Any]:
    """One set of weights in Keras, Flax NNX and torch (both attention paths), and one batch."""
    torch = pytest.importorskip("torch")
    from tests.parity.attention_torch_vit import torch_from_keras

    model = keras_vit(seed=7)
    x = np.random.default_rng(8).normal(size=(3, SIDE, SIDE, 3)).astype(np.float32)
    vits = {"keras": model, "nnx": _nnx_from_keras(model)}
    vits |= {f"torch-{kind}": torch_from_keras(model, kind) for kind in ("sdpa", "mha")}
    logits = model(x, training=False).numpy()
    assert np.ptp(logits, axis=1).min() > 1e-3  # distinct classes: the top-class targets are well defined
    np.testing.assert_allclose(np.asarray(vits["nnx"](x)), logits, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for kind in ("sdpa", "mha"):
            given = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            np.testing.assert_allclose(vits[f"torch-{kind}"](given).numpy(), logits, rtol=1e-4, atol=1e-5)
    return {"vits": vits, "x": x, "x_torch": x.transpose(0, 3, 1, 2).copy()}


@pytest.mark.parametrize("method", ["rollout", "attention-grad"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_torch_keras_and_flax_nnx_vits_with_one_set_of_weights_give_the_same_maps(
    three_vits: dict[str, Any], method: str, target: str
) -> None:
    vits, x = three_vits["vits"], three_vits["x"]
    given = TARGETS[target]
    keras_ex = anycam.Explainer(vits["keras"], None, method=method).explain(x, target=given)
    others = {"nnx": anycam.Explainer(vits["nnx"], None, method=method).explain(x, target=given)}
    for kind in ("sdpa", "mha"):
        explainer = anycam.Explainer(vits[f"torch-{kind}"], None, method=method)
        assert explainer.backend.name == "torch"
        others[f"torch-{kind}"] = explainer.explain(three_vits["x_torch"], target=given)
    # A map that is all zeros in every framework would agree trivially.
    assert np.abs(keras_ex.cam).max() > 1e-3
    # The class token's row over the 4 × 4 patch grid; (N, K, 4, 4) for K targets.
    assert keras_ex.cam.shape[-2:] == (SIDE // 4, SIDE // 4)
    floor = 1e-6 * np.abs(keras_ex.cam).max()
    for name, other in others.items():
        assert len(other.layer) == len(keras_ex.layer) == 2, name
        assert other.cam.shape == keras_ex.cam.shape, name
        np.testing.assert_array_equal(other.target, keras_ex.target, err_msg=name)
        np.testing.assert_allclose(other.cam, keras_ex.cam, rtol=1e-4, atol=floor, err_msg=name)
        np.testing.assert_allclose(other.heatmap, keras_ex.heatmap, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(other.scores, keras_ex.scores, rtol=1e-4, atol=1e-5, err_msg=name)
