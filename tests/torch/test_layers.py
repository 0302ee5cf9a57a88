"""Torch layers: a module's input port ("name:input"), the automatic choice, and the names of wrapped
(DataParallel, DistributedDataParallel, torch.compile) models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anycam.backends.torch.demo import build_demo_model
from torch import nn

import anycam

from .nets import IMAGE, TARGET, torch_gradcam


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


class BatchNormSharedSwish(SharedSwish):
    """EfficientNet-Lite0's head: conv → BatchNorm → the shared activation → pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._swish(self.bn(self.block(self._swish(self.stem(x)))))


def test_auto_says_when_its_choice_is_the_normalisation_before_a_shared_activation() -> None:
    # Issue 20.6: the rule picks the BatchNorm (the shared activation runs twice and cannot be
    # captured once); the repr says so and names the post-activation map to explain instead.
    torch.manual_seed(0)
    model = BatchNormSharedSwish().eval()
    x = torch.randn(2, 3, 10, 10)
    explainer = anycam.Explainer(model, None)
    explainer.explain(x)
    assert explainer.layer_names == ("bn",)
    text = repr(explainer)
    assert "'bn' is a normalisation before the activation" in text and "'avgpool:input'" in text
    # The note's advice is right: that port is the activation's output, as plain autograd computes it.
    advised = anycam.Explainer(model, "avgpool:input", normalize=None).explain(x, target=TARGET)
    with torch.no_grad():
        features = model.features(x)
    np.testing.assert_allclose(advised.cam, torch_gradcam(features, model.head, TARGET), rtol=1e-4, atol=1e-6)
