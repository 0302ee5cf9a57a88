"""Issue 22 (speed, consistency, native): what the torch attention capture keeps and hands over.

* Reduced capture: rollout gets each block's head mean, attention-grad each block's
  ``Ē = mean_h ReLU(∂score/∂A ⊙ A)`` formed inside the backward — never all heads' A or ∂A.
  The oracle is the hand-written forward of ``test_attention_torch`` (every head's softmax spelt
  out, ``torch.autograd.grad`` on it), reduced here with plain torch ops.
* An attention call whose probabilities do not reach the explained score raises LayerError.
* ``arrays="native"``: the attention methods compute where the model is, no host copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import anycam
from anycam.core import parse_target

from .test_attention_torch import TinyViT, X, chefer_map, reference, rollout_map
from .test_native_arrays import no_host_copies

TARGETS = torch.tensor([[1, 4], [0, 2]])


def _reduced(backend: Any, x: Any, target: Any, gradients: bool) -> Any:
    """The capture as the attention driver asks for it: reduced on the device as the pass goes."""
    from anycam.core.attention import AttentionRequest, requesting

    with requesting(AttentionRequest(reduced=True)):
        return backend.attention_capture(x, target, gradients=gradients)


@pytest.fixture()
def vit() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT().eval()


def test_reduced_capture_hands_chefers_block_terms_not_every_heads_gradients(vit: TinyViT) -> None:
    attentions, grads = reference(vit, X, TARGETS)
    backend = anycam.Explainer(vit, method="attention-grad").backend
    capture = _reduced(backend, X, parse_target(TARGETS.numpy()), True)
    assert capture.gradients is not None and len(capture.gradients) == len(attentions)
    for attention, grad, kept, ones in zip(attentions, grads, capture.gradients, capture.attentions, strict=True):
        n, k, _, t, _ = grad.shape
        assert kept.shape == (n, k, 1, t, t) and ones.shape == (n, 1, t, t)  # one "head": nothing per head kept
        expected = (grad * attention[:, None]).clamp(min=0).mean(dim=2, keepdim=True).numpy()
        np.testing.assert_allclose(kept, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        np.testing.assert_array_equal(ones, 1.0)


def test_reduced_rollout_capture_hands_the_head_means(vit: TinyViT) -> None:
    attentions, _ = reference(vit, X, TARGETS[:, :1])
    backend = anycam.Explainer(vit, method="rollout").backend
    capture = _reduced(backend, X, parse_target(None), False)
    assert capture.gradients is None
    for attention, kept in zip(attentions, capture.attentions, strict=True):
        np.testing.assert_allclose(kept, attention.mean(dim=1, keepdim=True).numpy(), rtol=1e-5, atol=1e-7)


def test_a_whole_block_capture_is_still_given_to_callers_that_ask_with_a_bool(vit: TinyViT) -> None:
    _, grads = reference(vit, X, TARGETS)
    capture = anycam.Explainer(vit, method="attention-grad").backend.attention_capture(
        X, parse_target(TARGETS.numpy()), gradients=True
    )
    assert capture.gradients is not None
    for grad, kept in zip(grads, capture.gradients, strict=True):
        np.testing.assert_allclose(kept, grad.numpy(), rtol=1e-5, atol=1e-6 * float(grad.abs().max()))


class DiscardsAnAttention(TinyViT):
    """Runs one attention whose output is thrown away: its probabilities never reach the logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        self.blocks[0].attn(h, h, h, need_weights=False)  # result unused
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, 0])


def test_an_attention_that_does_not_reach_the_score_raises_layer_error() -> None:
    torch.manual_seed(0)
    model = DiscardsAnAttention().eval()
    with pytest.raises(anycam.LayerError, match=r"attention call\(s\) \[0\] do not reach the explained output"):
        anycam.Explainer(model, method="attention-grad").explain(X)
    # Rollout reads no gradient: the call is read like any other.
    assert anycam.Explainer(model, method="rollout").explain(X).layer[0] == "blocks.0.attn"


@pytest.mark.parametrize("method", ["rollout", "attention-grad"])
def test_native_attention_maps_are_device_tensors_equal_to_the_oracle(vit: TinyViT, method: str) -> None:
    attentions, grads = reference(vit, X, TARGETS)
    result = anycam.Explainer(vit, method=method, normalize=None, arrays="native").explain(X, target=TARGETS.numpy())
    assert isinstance(result.cam, torch.Tensor) and isinstance(result.heatmap, torch.Tensor)
    assert result.cam.dtype == torch.float32 and result.cam.device == X.device
    if method == "rollout":
        expected = np.stack([rollout_map(attentions).numpy()] * 2, axis=1)
    else:
        expected = chefer_map(attentions, grads).numpy()
    np.testing.assert_allclose(result.cam.numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("method", ["rollout", "attention-grad"])
def test_native_attention_methods_copy_nothing_to_the_host(vit: TinyViT, method: str) -> None:
    """Fails if an attention block, a gradient, a score row or a map goes to the host (``.numpy()``,
    ``np.asarray``, ``.tolist()``, ``.item()``, ``.cpu()``); allowed: the (N, K) = (2, 2) int64
    target indices and one boolean per finiteness check."""
    explainer = anycam.Explainer(vit, method=method, arrays="native")
    with no_host_copies(allowed=4):
        explanation = explainer.explain(X, anycam.top_k(2))
    assert isinstance(explanation.heatmap, torch.Tensor)


def test_the_host_copy_probe_sees_the_numpy_modes_attention_copies(vit: TinyViT) -> None:
    explainer = anycam.Explainer(vit, method="attention-grad")
    with pytest.raises(AssertionError, match="tensors copied to the host"), no_host_copies(allowed=4):
        explainer.explain(X)
