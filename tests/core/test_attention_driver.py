"""The attention driver (``anycam.explain.attention``) on a NumPy fake adapter: shapes, targets, refusals."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

import anycam
from anycam import Backend, Capture, backends, core
from anycam.protocol.backend import AttentionCapture

# One block, one head, 1 class token + a 2 × 2 grid of patches; samples differ.
ATTENTION = np.zeros((2, 1, 5, 5), np.float32)
ATTENTION[0, 0] = np.eye(5)
ATTENTION[0, 0, 0] = [0.2, 0.4, 0.1, 0.2, 0.1]
ATTENTION[1, 0] = np.full((5, 5), 0.2)
SCORES = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]], np.float32)


class Attending(Backend):
    """Declares the attention capability; hands back :data:`ATTENTION` and gradients of ones."""

    name = "fake"
    capabilities = frozenset({"attention"})
    calls: ClassVar[list[tuple[str, bool]]] = []

    def __init__(self, model: Any, layers: Any, *, output: Any = None, input_layout: Any = None) -> None:
        self.layer_names = ()

    def capture(self, inputs: Any, target: core.TargetSpec, *, gradients: bool = True) -> Capture:
        raise AssertionError("the attention methods never call capture()")

    def predict(self, inputs: Any) -> np.ndarray:
        return SCORES

    def attention_capture(self, inputs: Any, target: core.TargetSpec, *, gradients: bool) -> AttentionCapture:
        Attending.calls.append(("attention_capture", bool(gradients)))
        indices = core.resolve_indices(target, SCORES)
        count = indices.shape[1]
        # ∂score_k/∂A = (k + 1) everywhere: target k's relevance differs from the others'.
        grads = np.stack([np.full((2, 1, 5, 5), k + 1.0, np.float32) for k in range(count)], axis=1)
        return AttentionCapture(
            attentions=(ATTENTION,),
            gradients=(grads,) if gradients else None,
            scores=np.take_along_axis(SCORES, indices, axis=1),
            target=indices,
            input_spatial=(8, 8),
            prefix_tokens=1,
            names=("block0.attn",),
        )


@pytest.fixture()
def attending(monkeypatch: pytest.MonkeyPatch) -> type[Attending]:
    monkeypatch.setattr(Attending, "calls", [])
    monkeypatch.setattr(backends, "load", lambda name, model=None: Attending)
    return Attending


def test_rollout_map_is_the_class_row_of_the_rolled_out_attention(attending: type[Attending]) -> None:
    result = anycam.Explainer(object(), method="rollout", backend="torch", normalize=None).explain(
        np.zeros((2, 3, 8, 8))
    )
    # One block: (A + I)/2, row 0 over the 4 patches; by hand for sample 0: A[0, 1:] / 2.
    np.testing.assert_allclose(result.cam[0], [[0.2, 0.05], [0.1, 0.05]], rtol=1e-6)
    np.testing.assert_allclose(result.cam[1], np.full((2, 2), 0.1), rtol=1e-6)
    assert result.heatmap.shape == (2, 8, 8) and result.weights is None
    assert result.layer == ("block0.attn",) and result.method == "rollout"
    np.testing.assert_array_equal(result.target, [2, 0])
    assert attending.calls == [("attention_capture", False)]


def test_attention_grad_gives_one_map_per_target_from_one_capture(attending: type[Attending]) -> None:
    explainer = anycam.Explainer(object(), method="attention-grad", backend="torch", normalize=None)
    result = explainer.explain(np.zeros((2, 3, 8, 8)), target=np.array([[0, 1], [2, 0]]))
    assert result.heatmap.shape == (2, 2, 8, 8) and result.cam.shape == (2, 2, 2, 2)
    # R = I + (k + 1)·A (ReLU of a positive product, one head): row 0 over the patches = (k + 1)·A[0, 1:].
    for k in range(2):
        np.testing.assert_allclose(result.cam[0, k], (k + 1) * np.array([[0.4, 0.1], [0.2, 0.1]]), rtol=1e-6)
    assert attending.calls == [("attention_capture", True)]
    heat = anycam.Explainer(object(), method="attention-grad", backend="torch").explain(np.zeros((2, 3, 8, 8)))
    assert heat.heatmap.min() == 0.0 and heat.heatmap.max() == 1.0


@pytest.mark.parametrize("method", ["rollout", "attention-grad"])
def test_attention_methods_refuse_a_layer(attending: type[Attending], method: str) -> None:
    with pytest.raises(anycam.ConfigError, match="takes no layer; pass layer=None"):
        anycam.Explainer(object(), "blocks.3", method=method, backend="torch")
