"""Hugging Face ``transformers`` vision models: ResNet, ConvNeXt, ViT and Swin image classification.

Each is built from a tiny random config (no download), called with ``pixel_values=``, returns a
``ModelOutput`` (explained through ``output="logits"``), and is explained at its last stage with
every method. The expected maps come from activations and gradients captured here with a plain
forward hook and ``torch.autograd.grad`` (Grad-CAM itself is also written out in torch), from
whole-model forwards with one channel zeroed (Ablation-CAM) or the input masked (Score-CAM), and
from a copy of the model whose ReLU modules apply the guided rule (guided backpropagation).
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

import anycam
from anycam import core

TARGET = [1, 3]


def _last(model: torch.nn.Module, suffix: str) -> str:
    """The last module whose name ends in ``suffix`` (names move between transformers versions)."""
    return [name for name, _ in model.named_modules() if name.endswith(suffix)][-1]


def _build(kind: str) -> tuple[torch.nn.Module, str, str, int]:
    """Returns (model, explained module name, layout, prefix tokens)."""
    torch.manual_seed(0)
    if kind == "resnet":
        config = transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5
        )
        model = transformers.ResNetForImageClassification(config)
        layer, layout, prefix = _last(model, "encoder.stages.1"), "channels_first", 0
    elif kind == "convnext":
        config = transformers.ConvNextConfig(
            num_stages=2, patch_size=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5
        )
        model = transformers.ConvNextForImageClassification(config)
        layer, layout, prefix = _last(model, "encoder.stages.1"), "channels_first", 0
    elif kind == "vit":
        config = transformers.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=5,
        )
        model = transformers.ViTForImageClassification(config)
        # The class token reads the last block's *input* norm: the usual ViT Grad-CAM layer.
        layer, layout, prefix = _last(model, "layernorm_before"), "tokens", 1
    else:
        config = transformers.SwinConfig(
            image_size=32, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=5
        )
        model = transformers.SwinForImageClassification(config)
        layer, layout, prefix = "swin.layernorm", "tokens", 0  # the last stage's normalised tokens
    return model.eval(), layer, layout, prefix


def _reference(model: torch.nn.Module, layer: str, x: torch.Tensor, target: list[int]):  # type: ignore[no-untyped-def]
    """(activations, gradients (N, 1, ...), logits) by a forward hook and autograd, no anycam."""
    stored: list[torch.Tensor] = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, out: stored.append(out))
    try:
        logits = model(pixel_values=x).logits
    finally:
        handle.remove()
    scores = logits[torch.arange(x.shape[0]), torch.as_tensor(target)]
    (grads,) = torch.autograd.grad(scores.sum(), stored[0])
    return stored[0].detach(), grads[:, None].detach(), logits.detach()


def _channels_first(array: torch.Tensor, layout: str, prefix: int) -> torch.Tensor:
    """(N, C, H, W) from a feature map or from (N, prefix + H·W, C) tokens on a square grid."""
    if layout == "channels_first":
        return array
    patches = array[:, prefix:]
    side = math.isqrt(patches.shape[1])
    return patches.reshape(array.shape[0], side, side, -1).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", ["resnet", "convnext", "vit", "swin"])
def test_hugging_face_models_match_autograd_for_every_capture_method(kind: str, pixels: torch.Tensor) -> None:
    model, layer, layout, prefix = _build(kind)
    activations, gradients, logits = _reference(model, layer, pixels, TARGET)
    grid_acts = _channels_first(activations, layout, prefix)
    grid_grads = _channels_first(gradients[:, 0], layout, prefix)
    # Grad-CAM in torch: ReLU(Σ_k mean_s(∂y/∂A_k) A_k), class token dropped for ViT.
    gradcam = torch.relu((grid_grads.mean((2, 3), keepdim=True) * grid_acts).sum(1)).numpy()
    options = {"layout": "tokens"} if layout == "tokens" else {}
    assert set(core.METHODS) == {
        *core.CAPTURE_METHODS,
        *core.SCORE_METHODS,
        *core.GUIDED_METHODS,
        *core.methods.ATTENTION_METHODS,
    }
    for method in core.CAPTURE_METHODS:
        explainer = anycam.Explainer(model, layer, method=method, output="logits", normalize=None, **options)
        inputs = {"pixel_values": pixels} if kind in ("resnet", "vit") else pixels
        result = explainer.explain(inputs, target=TARGET)
        expected = core.layer_cam(method, activations.numpy(), gradients.numpy(), layout, count=1).cam[:, 0]
        if method == "gradcam":
            np.testing.assert_allclose(expected, gradcam, rtol=1e-5, atol=1e-6 * float(gradcam.max()))
        assert result.cam.shape == gradcam.shape
        scale = max(float(np.abs(expected).max()), 1e-12)
        np.testing.assert_allclose(result.cam / scale, expected / scale, rtol=1e-5, atol=1e-5, err_msg=method)
        assert result.heatmap.shape == (2, 32, 32)
        np.testing.assert_allclose(result.scores, logits[[0, 1], TARGET].numpy(), rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())


class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward ReLU(grad)·[x > 0] (Springenberg et al. 2015)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0).to(grad.dtype)


class _GuidedReLUModule(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedReLU.apply(x)  # type: ignore[no-any-return]


def _guided_gradients(model: torch.nn.Module, x: torch.Tensor, target: list[int]) -> tuple[np.ndarray, int]:
    """∂y/∂x through a copy whose ReLU modules are guided; also how many ReLUs were replaced."""
    twin = copy.deepcopy(model)
    replaced = 0
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.ReLU):
                setattr(parent, name, _GuidedReLUModule())
                replaced += 1
    leaf = x.clone().requires_grad_()
    logits = twin(pixel_values=leaf).logits
    (grads,) = torch.autograd.grad(logits[torch.arange(x.shape[0]), torch.as_tensor(target)].sum(), leaf)
    return grads.numpy(), replaced


def _outputs_with(model: torch.nn.Module, layer: str, x: torch.Tensor, change) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Logits of the whole model with the layer's output replaced by ``change(output)``."""
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, out: change(out.clone()))
    try:
        with torch.no_grad():
            return model(pixel_values=x).logits.numpy()
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["resnet", "convnext", "vit", "swin"])
def test_hugging_face_models_match_whole_model_perturbations_and_guided_gradients(
    kind: str, pixels: torch.Tensor
) -> None:
    model, layer, layout, prefix = _build(kind)
    activations, gradients, logits = _reference(model, layer, pixels, TARGET)
    acts = _channels_first(activations, layout, prefix).double()
    rows = torch.arange(2)
    options = {"layout": "tokens"} if layout == "tokens" else {}

    def explain(method: str) -> anycam.Explanation:
        explainer = anycam.Explainer(model, layer, method=method, output="logits", normalize=None, **options)
        return explainer.explain({"pixel_values": pixels} if kind in ("resnet", "vit") else pixels, target=TARGET)

    def close(got: np.ndarray, expected: np.ndarray, what: str, scale: float | None = None) -> None:
        scale = max(float(np.abs(expected).max()) if scale is None else scale, 1e-12)
        np.testing.assert_allclose(got / scale, expected / scale, rtol=1e-5, atol=1e-5, err_msg=what)

    def weighted(weights: torch.Tensor) -> tuple[np.ndarray, float]:
        """ReLU(Σ_k w_k A_k), and Σ_k |w_k A_k|: float32 rounding is relative to the latter, which
        matters where LayerNorm's zero-mean channels make the sum cancel (ViT, Swin)."""
        terms = weights[:, :, None, None] * acts
        return torch.relu(terms.sum(1)).numpy(), float(terms.abs().sum(1).max())

    # Ablation-CAM (eq. 3): w_k = (y − y_k) / y, y_k with channel k of the layer's output zeroed.
    channel_axis = -1 if layout == "tokens" else 1
    y = logits[rows, TARGET].double()

    def zeroed(k: int):  # type: ignore[no-untyped-def]
        def change(out: torch.Tensor) -> torch.Tensor:
            out.select(channel_axis, k).zero_()
            return out

        return change

    drops = torch.stack(
        [torch.as_tensor(_outputs_with(model, layer, pixels, zeroed(k)))[rows, TARGET] for k in range(acts.shape[1])],
        dim=1,
    ).double()
    weights = (y[:, None] - drops) / y[:, None]
    expected, scale = weighted(weights)
    close(explain("ablationcam").cam, expected, "ablationcam", scale)

    # Score-CAM: masks = min-max of each channel upsampled to the input; weights = softmax score.
    up = F.interpolate(acts, size=(32, 32), mode="bilinear", align_corners=False)
    low, high = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    masks = torch.where(high > low, (up - low) / (high - low).clamp(min=1e-30), torch.zeros_like(up))
    probabilities = []
    for k in range(acts.shape[1]):
        with torch.no_grad():
            masked = model(pixel_values=pixels * masks[:, k : k + 1].float()).logits.double()
        probabilities.append(masked.softmax(1)[rows, TARGET])
    weights = torch.stack(probabilities, dim=1)
    expected, scale = weighted(weights)
    close(explain("scorecam").cam, expected, "scorecam", scale)

    # Guided backpropagation, and guided Grad-CAM = guided gradients ⊙ upsampled Grad-CAM.
    guided, replaced = _guided_gradients(model, pixels, TARGET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no ReLU": ConvNeXt, ViT and Swin use GELU
        backprop, guided_cam = explain("guided-backprop"), explain("guided-gradcam")
    assert (replaced > 0) == (kind == "resnet")
    close(backprop.attribution, guided, "guided-backprop")
    gradcam = torch.relu(
        (_channels_first(gradients[:, 0], layout, prefix).double().mean((2, 3), keepdim=True) * acts).sum(1)
    )
    up_cam = F.interpolate(gradcam[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    close(guided_cam.attribution, guided * up_cam.numpy(), "guided-gradcam")


@pytest.mark.parametrize("kind", ["resnet", "convnext"])
def test_auto_picks_the_last_stage_of_a_hugging_face_cnn(kind: str, pixels: torch.Tensor) -> None:
    model, layer, _, _ = _build(kind)
    explainer = anycam.Explainer(model, "auto", output="logits")
    heat = explainer({"pixel_values": pixels})
    assert explainer.layer_names == (layer,)
    np.testing.assert_allclose(heat, anycam.Explainer(model, layer, output="logits")({"pixel_values": pixels}))


def test_a_model_output_without_output_selector_is_a_clear_error(pixels: torch.Tensor) -> None:
    model, layer, _, _ = _build("resnet")
    with pytest.raises(anycam.AnycamError, match="logits"):
        anycam.Explainer(model, layer)(pixels)
    with pytest.raises(anycam.InputError, match="keys 'pixel_value'.*pixel_value"):
        anycam.Explainer(model, layer, output="logits")({"pixel_value": pixels})
