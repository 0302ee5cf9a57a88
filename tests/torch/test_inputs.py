"""torch: several inputs (tuple, list, dict, model_kwargs), a layer's input, the automatic layer,
DataParallel/DistributedDataParallel and torch.compile wrappers.

Every map is checked against Grad-CAM written here in plain torch autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anycam.backends.torch.demo import build_demo_model
from torch import nn

import anycam


def torch_gradcam(activations: torch.Tensor, head, target: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """ReLU(Σ_k mean_s(∂y_t/∂A_k) A_k), by autograd on a leaf copy of the activations."""
    leaf = activations.detach().clone().requires_grad_()
    scores = head(leaf)[torch.arange(leaf.shape[0]), torch.as_tensor(target)]
    (grads,) = torch.autograd.grad(scores.sum(), leaf)
    weights = grads.mean(dim=tuple(range(2, grads.ndim)), keepdim=True)
    return torch.relu((weights * leaf).sum(1)).detach().numpy()


class TwoInputs(nn.Module):
    """An image modulated by a metadata vector (FiLM), with a keyword-only scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.film = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 5)

    def head(self, activations: torch.Tensor, meta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        mixed = torch.tanh(activations * self.film(meta)[:, :, None, None]) * scale
        return self.fc(mixed.mean((2, 3)))

    def forward(self, image: torch.Tensor, meta: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.head(self.conv(image), meta, scale)


@pytest.fixture
def two() -> TwoInputs:
    torch.manual_seed(0)
    return TwoInputs().eval()


IMAGE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
META = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
TARGET = [1, 3]


@pytest.mark.parametrize("form", ["tuple", "list", "dict", "dict_meta_first", "numpy_tuple"])
def test_tuple_list_and_dict_inputs_match_autograd(two: TwoInputs, form: str) -> None:
    inputs: object = {
        "tuple": (IMAGE, META),
        "list": [IMAGE, META],
        "dict": {"image": IMAGE, "meta": META},
        "dict_meta_first": {"meta": META, "image": IMAGE},  # the image is found, wherever it is
        "numpy_tuple": (IMAGE.numpy(), META.numpy()),
    }[form]
    result = anycam.Explainer(two, "conv", normalize=None).explain(inputs, target=TARGET)
    with torch.no_grad():
        activations = two.conv(IMAGE)
    expected = torch_gradcam(activations, lambda a: two.head(a, META), TARGET)
    np.testing.assert_allclose(result.cam, expected, rtol=1e-5, atol=1e-7)
    assert result.heatmap.shape == (2, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(result.scores, two(IMAGE, META)[[0, 1], TARGET].numpy(), rtol=1e-6)


def test_model_kwargs_reach_every_call(two: TwoInputs) -> None:
    explainer = anycam.Explainer(two, "conv", normalize=None, model_kwargs={"scale": 3.0})
    result = explainer.explain((IMAGE, META), target=TARGET)
    with torch.no_grad():
        activations = two.conv(IMAGE)
        logits = two(IMAGE, META, scale=3.0)
    expected = torch_gradcam(activations, lambda a: two.head(a, META, 3.0), TARGET)
    np.testing.assert_allclose(result.cam, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(explainer.backend.predict((IMAGE, META)), logits.numpy(), rtol=1e-6)
    # Without the constant the scores differ: the kwarg really was passed.
    plain = anycam.Explainer(two, "conv").explain((IMAGE, META), target=TARGET)
    assert not np.allclose(plain.scores, result.scores)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_scorecam_masks_the_spatial_input_and_keeps_the_others(two: TwoInputs, form: str) -> None:
    inputs: object = (IMAGE, META) if form == "tuple" else {"meta": META, "image": IMAGE}
    # batch_size=5 with 2 × 6 masked copies: chunks mix samples, so rows of meta must follow.
    explainer = anycam.Explainer(two, "conv", method="scorecam", normalize=None, batch_size=5)
    result = explainer.explain(inputs, target=TARGET)
    with torch.no_grad():
        activations = two.conv(IMAGE).double()
        up = torch.nn.functional.interpolate(activations, size=(8, 8), mode="bilinear", align_corners=False)
        low, high = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        masks = ((up - low) / (high - low)).float()
        weights = torch.stack(
            [two(IMAGE * masks[:, k : k + 1], META).softmax(1)[[0, 1], TARGET] for k in range(6)], dim=1
        ).double()
    expected = torch.relu((weights[:, :, None, None] * activations).sum(1)).numpy()
    np.testing.assert_allclose(result.weights, weights.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.cam, expected, rtol=1e-5, atol=1e-6)


class TwoImages(nn.Module):
    """Two images of different sizes; the explained conv sees the second."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Conv2d(3, 4, 3, padding=1)
        self.large = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, small: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([self.small(small).mean((2, 3)), torch.tanh(self.large(large)).mean((2, 3))], 1)
        return self.fc(pooled)


def test_spatial_input_sets_the_heatmap_resolution() -> None:
    torch.manual_seed(0)
    model = TwoImages().eval()
    small, large = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 12, 12)
    default = anycam.Explainer(model, "large").explain((small, large), target=0)
    chosen = anycam.Explainer(model, "large", spatial_input=1).explain((small, large), target=0)
    keyed = anycam.Explainer(model, "large", spatial_input="large").explain({"small": small, "large": large}, 0)
    assert default.heatmap.shape == (2, 8, 8)  # the first floating map
    assert chosen.heatmap.shape == keyed.heatmap.shape == (2, 12, 12)
    np.testing.assert_allclose(chosen.cam, default.cam)
    np.testing.assert_allclose(keyed.heatmap, chosen.heatmap)
    with pytest.raises(anycam.InputError, match=r"spatial_input=2 names no input; the inputs are 0: \(2, 3, 8, 8\)"):
        anycam.Explainer(model, "large", spatial_input=2)((small, large))
    with pytest.raises(anycam.InputError, match="spatial_input='big' names no input.*'large': \\(2, 3, 12, 12\\)"):
        anycam.Explainer(model, "large", spatial_input="big")({"small": small, "large": large})
    # Score-CAM masks the input named by spatial_input, at its own resolution.
    scored = anycam.Explainer(model, "large", method="scorecam", spatial_input=1).explain((small, large), target=0)
    assert scored.heatmap.shape == (2, 12, 12)
    with torch.no_grad():
        acts = model.large(large).double()
        up = torch.nn.functional.interpolate(acts, size=(12, 12), mode="bilinear", align_corners=False)
        masks = ((up - up.amin((2, 3), keepdim=True)) / (up.amax((2, 3), keepdim=True) - up.amin((2, 3), keepdim=True)))
        probabilities = [model(small, large * masks[:, k : k + 1].float()).softmax(1)[:, 0] for k in range(4)]
    np.testing.assert_allclose(scored.weights, torch.stack(probabilities, 1).numpy(), rtol=1e-5, atol=1e-7)


class PixelValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.conv(pixel_values).mean((2, 3)))


def test_a_key_the_model_does_not_take_wraps_the_framework_message() -> None:
    model = PixelValues().eval()
    explainer = anycam.Explainer(model, "conv")
    heat = explainer({"pixel_values": IMAGE})
    assert heat.shape == (2, 8, 8)
    with pytest.raises(anycam.InputError, match="keys 'pixel_value'.*unexpected keyword argument 'pixel_value'"):
        explainer({"pixel_value": IMAGE})
    with pytest.raises(anycam.InputError, match="model_kwargs 'colour'"):
        anycam.Explainer(model, "conv", model_kwargs={"colour": 1})(IMAGE)
    with pytest.raises(anycam.InputError, match="3 positional"):
        explainer((IMAGE, None, IMAGE))
    # An error raised inside forward is not mistaken for a signature mismatch: it is the
    # input's (issue 10, item 8), with the framework's error as the cause.
    with pytest.raises(anycam.InputError, match=r"shape \(2, 5, 8, 8\)") as info:
        explainer({"pixel_values": torch.randn(2, 5, 8, 8)})
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "keys" not in str(info.value)


class SharedSwish(nn.Module):
    """EfficientNet-style: one activation module used after the stem and after the last block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self._swish = nn.SiLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._swish(self.block(self._swish(self.stem(x))))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(features).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_the_input_of_the_pool_is_the_shared_activations_output() -> None:
    torch.manual_seed(0)
    model = SharedSwish().eval()
    x = torch.randn(2, 3, 10, 10)
    with pytest.raises(anycam.LayerError, match=r"runs more than once.*'avgpool:input' \(the input of the module that"):
        anycam.Explainer(model, "_swish")(x)
    explainer = anycam.Explainer(model, "avgpool:input", normalize=None)
    assert explainer.layer_names == ("avgpool:input",)
    result = explainer.explain(x, target=TARGET)
    with torch.no_grad():
        features = model.features(x)
    np.testing.assert_allclose(result.cam, torch_gradcam(features, model.head, TARGET), rtol=1e-5, atol=1e-7)
    # The module object works as well, and a layer's input combines with other layers.
    both = anycam.Explainer(model, ["block", "avgpool:input"], normalize=None).explain(x, target=TARGET)
    assert both.layer == ("block", "avgpool:input")
    np.testing.assert_allclose(both.cams[1], result.cam, rtol=1e-6)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_the_input_of_a_module_with_no_positional_input_is_an_error() -> None:
    class KeywordCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(input=x).mean((1, 2, 3))[:, None]

    with pytest.raises(anycam.LayerError, match="no positional input"):
        anycam.Explainer(KeywordCall().eval(), "conv:input")(IMAGE, target=0)


def test_auto_picks_the_last_stage_of_the_demo_network() -> None:
    torch.manual_seed(0)
    model = build_demo_model()
    x = torch.randn(2, 1, 32, 32)
    for layer in (None, "auto"):
        explainer = anycam.Explainer(model, layer, normalize=None)
        assert repr(explainer).endswith("layer=auto (chosen at the first call))")
        result = explainer.explain(x, target=TARGET)
        assert explainer.layer_names == ("stage3",) and result.layer == "stage3"
        assert "layer=[stage3] (auto)" in repr(explainer)
        named = anycam.Explainer(model, "stage3", normalize=None).explain(x, target=TARGET)
        np.testing.assert_allclose(result.cam, named.cam)
        # The choice is made once and kept.
        explainer(torch.randn(2, 1, 32, 32))
        assert explainer.layer_names == ("stage3",)
    # Methods that need more than one capture choose the same way.
    for method in ("ablationcam", "guided-gradcam"):
        explainer = anycam.Explainer(model, "auto", method=method, normalize=None)
        result = explainer.explain(x, target=TARGET)
        assert explainer.layer_names == ("stage3",)
        named = anycam.Explainer(model, "stage3", method=method, normalize=None).explain(x, target=TARGET)
        np.testing.assert_allclose(result.cam, named.cam)
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_auto_skips_shared_modules_and_layers_off_the_path() -> None:
    class SideBranch(SharedSwish):
        def __init__(self) -> None:
            super().__init__()
            self.side = nn.Conv2d(8, 8, 1)  # runs last, but its output is discarded

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = self.features(x)
            self.side(features)
            return self.head(features)

    torch.manual_seed(0)
    explainer = anycam.Explainer(SideBranch().eval(), "auto")
    explainer(torch.randn(2, 3, 10, 10))
    assert explainer.layer_names == ("block",)


def test_auto_without_a_spatial_layer_lists_what_it_considered() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with pytest.raises(anycam.LayerError, match=r"considered: '0' \(output \(2, 48\) has no spatial axes\), '1'"):
        anycam.Explainer(model)(torch.randn(2, 3, 4, 4))
    with pytest.raises(anycam.LayerError, match="cannot be part of a list"):
        anycam.Explainer(model, ["auto", "1"])


def test_data_parallel_names_with_or_without_the_prefix() -> None:
    torch.manual_seed(0)
    model = SharedSwish().eval()
    x = torch.randn(2, 3, 10, 10)
    expected = anycam.Explainer(model, "block", normalize=None).explain(x, target=TARGET)
    wrapped = nn.DataParallel(model)
    for name in ("block", "module.block"):
        explainer = anycam.Explainer(wrapped, name, normalize=None)
        assert explainer.layer_names == ("block",)
        np.testing.assert_allclose(explainer.explain(x, target=TARGET).cam, expected.cam)
    assert anycam.Explainer(wrapped, model.block).layer_names == ("block",)
    auto = anycam.Explainer(wrapped)
    auto(x)
    assert auto.layer_names == ("block",)
    with pytest.raises(anycam.LayerError, match="not found"):
        anycam.Explainer(wrapped, "module.nothing")


def test_distributed_data_parallel_on_a_one_process_gloo_group(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    torch.manual_seed(0)
    model = SharedSwish().eval()
    x = torch.randn(2, 3, 10, 10)
    expected = anycam.Explainer(model, "avgpool:input", normalize=None).explain(x, target=TARGET)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(model)
        for name in ("avgpool:input", "module.avgpool:input"):
            explainer = anycam.Explainer(wrapped, name, normalize=None)
            assert explainer.layer_names == ("avgpool:input",)
            np.testing.assert_allclose(explainer.explain(x, target=TARGET).cam, expected.cam)
    finally:
        dist.destroy_process_group()


def test_a_compiled_model_is_explained_through_its_original_module() -> None:
    torch.manual_seed(0)
    model = SharedSwish().eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 10, 10)
    expected = anycam.Explainer(model, "block", normalize=None).explain(x, target=TARGET)
    for name in ("block", "_orig_mod.block"):
        explainer = anycam.Explainer(compiled, name, normalize=None)
        assert explainer.backend.model is model
        np.testing.assert_allclose(explainer.explain(x, target=TARGET).cam, expected.cam)
