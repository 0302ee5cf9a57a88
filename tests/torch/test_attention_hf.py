"""Issue 22: rollout and gradient-weighted attention on Hugging Face ViT, DeiT, DINOv2 (registers), CLIP.

Tiny random configs (no download), each with ``attn_implementation`` ``"eager"`` and ``"sdpa"``.
The oracle is written here with torch's plain ops from the eager model's own attention
(``output_attentions=True``) and ``torch.autograd.grad`` on those tensors: rollout
(Abnar & Zuidema) and Chefer et al.'s R ← R + mean_h ReLU(∇A ⊙ A)·R, the class token's row over
the patch tokens. The sdpa model (fused attention, never builds A) must give the same maps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch

import anycam

transformers = pytest.importorskip("transformers")

COMMON = {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 32}
# Leading non-patch tokens per family: class; class + distillation; class + 4 registers; class.
PREFIX = {"vit": 1, "deit": 2, "dinov2": 5, "clip": 1}
OUTPUT = {"vit": "logits", "deit": "logits", "dinov2": "logits", "clip": "image_embeds"}
KINDS = sorted(PREFIX)


def build(kind: str, implementation: str) -> torch.nn.Module:
    """A tiny random model of the family; the same weights for both attention implementations."""
    torch.manual_seed(0)
    options = {"image_size": 32, "patch_size": 8, "attn_implementation": implementation, **COMMON}
    if kind == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=5, **options))
    elif kind == "deit":
        config = transformers.DeiTConfig(num_labels=5, **options)
        model = transformers.DeiTForImageClassificationWithTeacher(config)
    elif kind == "dinov2":
        config = transformers.Dinov2WithRegistersConfig(num_labels=5, num_register_tokens=4, **options)
        model = transformers.Dinov2WithRegistersForImageClassification(config)
    else:
        config = transformers.CLIPVisionConfig(projection_dim=5, **options)
        model = transformers.CLIPVisionModelWithProjection(config)
    assert model.config._attn_implementation == implementation
    return model.eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def eager_reference(
    kind: str, pixels: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(A per block (N, H, T, T), ∂score_k/∂A per block (N, K, H, T, T)) from the eager model, no anycam."""
    model = build(kind, "eager")
    out = model(pixel_values=pixels, output_attentions=True)
    attentions = list(out.attentions)
    scores = score(getattr(out, OUTPUT[kind]))  # (N, K)
    columns = [torch.autograd.grad(scores[:, k].sum(), attentions, retain_graph=True) for k in range(scores.shape[1])]
    grads = [torch.stack([column[b] for column in columns], dim=1) for b in range(len(attentions))]
    return [a.detach() for a in attentions], grads


def rollout_map(attentions: list[torch.Tensor], prefix: int) -> torch.Tensor:
    rolled = torch.eye(attentions[0].shape[-1], dtype=torch.float64)
    for attention in attentions:
        mean = attention.double().mean(dim=1)
        step = mean + torch.eye(mean.shape[-1], dtype=torch.float64)
        rolled = (step / step.sum(dim=-1, keepdim=True)) @ rolled
    return rolled[:, 0, prefix:].reshape(rolled.shape[0], 4, 4)


def chefer_map(attentions: list[torch.Tensor], grads: list[torch.Tensor], prefix: int) -> torch.Tensor:
    n, k, t = grads[0].shape[0], grads[0].shape[1], attentions[0].shape[-1]
    relevance = torch.eye(t, dtype=torch.float64).expand(n, k, t, t)
    for attention, grad in zip(attentions, grads, strict=True):
        weighted = (grad.double() * attention.double()[:, None]).clamp(min=0).mean(dim=2)
        relevance = relevance + weighted @ relevance
    return relevance[:, :, 0, prefix:].reshape(n, k, 4, 4)


def close(actual: np.ndarray, expected: torch.Tensor) -> None:
    expected_np = expected.numpy()
    np.testing.assert_allclose(actual, expected_np, rtol=1e-5, atol=1e-5 * float(np.abs(expected_np).max()))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_rollout_equals_the_hand_written_rollout_of_the_eager_attention(
    kind: str, implementation: str, pixels: torch.Tensor
) -> None:
    attentions, _ = eager_reference(kind, pixels, lambda out: out[:, :1])
    explainer = anycam.Explainer(build(kind, implementation), method="rollout", output=OUTPUT[kind], normalize=None)
    result = explainer.explain({"pixel_values": pixels}, target=1)
    assert len(result.layer) == COMMON["num_hidden_layers"]
    close(result.cam, rollout_map(attentions, PREFIX[kind]))
    assert result.heatmap.shape == (2, 32, 32)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_attention_grad_equals_chefers_relevance_from_the_eager_attention_and_its_gradient(
    kind: str, implementation: str, pixels: torch.Tensor
) -> None:
    targets = torch.tensor([[1, 3], [4, 0]])
    attentions, grads = eager_reference(kind, pixels, lambda out: out.gather(1, targets))
    explainer = anycam.Explainer(build(kind, implementation), method="attention-grad", output=OUTPUT[kind])
    result = explainer.explain({"pixel_values": pixels}, target=targets.numpy())
    expected = chefer_map(attentions, grads, PREFIX[kind])
    close(result.cam, expected)
    assert result.heatmap.shape == (2, 2, 32, 32)
    np.testing.assert_array_equal(result.target, targets.numpy())


@pytest.mark.parametrize("kind", KINDS)
def test_sdpa_and_eager_models_give_the_same_maps(kind: str, pixels: torch.Tensor) -> None:
    maps = {}
    for implementation in ("eager", "sdpa"):
        model = build(kind, implementation)
        for method in ("rollout", "attention-grad"):
            result = anycam.Explainer(model, method=method, output=OUTPUT[kind]).explain({"pixel_values": pixels})
            maps[implementation, method] = result
    for method in ("rollout", "attention-grad"):
        np.testing.assert_allclose(maps["sdpa", method].heatmap, maps["eager", method].heatmap, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(maps["sdpa", method].target, maps["eager", method].target)


TARGETS: dict[str, tuple[object, Callable[[torch.Tensor], torch.Tensor]]] = {
    "int": (2, lambda out: out[:, 2:3]),
    "per-sample": ([1, 3], lambda out: out.gather(1, torch.tensor([[1], [3]]))),
    "NK": (np.array([[0, 4, 2], [3, 3, 1]]), lambda out: out.gather(1, torch.tensor([[0, 4, 2], [3, 3, 1]]))),
    "top_k": (anycam.top_k(2), lambda out: out.gather(1, out.topk(2, dim=1).indices)),
    "argmax": (None, lambda out: out.gather(1, out.argmax(dim=1, keepdim=True))),
}


@pytest.mark.parametrize("form", [*TARGETS, "callable"])
def test_every_target_form_gives_the_oracles_map(form: str, pixels: torch.Tensor) -> None:
    if form == "callable":

        def target(logits: torch.Tensor) -> torch.Tensor:
            return logits[:, 2] - logits[:, 0]

        def score(out: torch.Tensor) -> torch.Tensor:
            return target(out)[:, None]
    else:
        target, score = TARGETS[form]  # type: ignore[assignment]
    attentions, grads = eager_reference("vit", pixels, score)
    result = anycam.Explainer(build("vit", "sdpa"), method="attention-grad", output="logits", normalize=None).explain(
        {"pixel_values": pixels}, target=target
    )
    expected = chefer_map(attentions, grads, 1)
    cam = result.cam if result.cam.ndim == 4 else result.cam[:, None]
    close(cam, expected)
    if form == "callable":
        assert result.target is None
    with torch.no_grad():
        logits = build("vit", "eager")(pixel_values=pixels).logits
    np.testing.assert_allclose(np.asarray(result.scores).reshape(2, -1), score(logits).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_the_explicit_attention_gives_the_fused_models_output(kind: str, pixels: torch.Tensor) -> None:
    """The capture runs attention explicitly (softmax(q kᵀ/√d) @ v): the outputs equal sdpa's in float32."""
    from anycam.backends.torch.attention import AttentionMode

    model = build(kind, "sdpa")
    with torch.no_grad():
        fused = getattr(model(pixel_values=pixels), OUTPUT[kind])
        with AttentionMode() as mode:
            explicit = getattr(model(pixel_values=pixels), OUTPUT[kind])
    assert len(mode.attentions) == COMMON["num_hidden_layers"]
    # float32 softmax and matmuls in another order: differences of a few ulp of the logits.
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-6)


def test_swin_is_refused_with_a_clear_error(pixels: torch.Tensor) -> None:
    torch.manual_seed(0)
    config = transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=5
    )
    model = transformers.SwinForImageClassification(config).eval()
    for method in ("rollout", "attention-grad"):
        with pytest.raises(anycam.UnsupportedError, match="windowed or pooled attention"):
            anycam.Explainer(model, method=method, output="logits").explain({"pixel_values": pixels})


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_explaining_leaves_the_model_as_it_was(implementation: str, pixels: torch.Tensor) -> None:
    model = build("vit", implementation)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = {name: dict(vars(module)) for name, module in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        anycam.Explainer(model, method="attention-grad", output="logits").explain({"pixel_values": pixels})
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert {name: dict(vars(module)) for name, module in model.named_modules()} == attributes
    assert model.config._attn_implementation == implementation
    assert all(p.grad is None for p in model.parameters())
