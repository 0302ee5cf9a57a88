"""TTAExplainer: exact on the identity view, flip-equivariant, equal to a hand-written torch oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anycam
from tests.dataset.models import images, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "eigencam"])
def test_the_identity_view_is_exactly_the_wrapped_explainer(model, method):
    x = images(3)
    for layer in ("features", ["relu1", "features"]):
        explainer = anycam.Explainer(model, layer, method=method)
        tta = anycam.TTAExplainer(explainer)
        np.testing.assert_array_equal(tta(x), explainer(x))
        np.testing.assert_array_equal(tta(x, target=anycam.top_k(2)), explainer(x, target=anycam.top_k(2)))


@pytest.mark.parametrize("combine", ["mean", "max"])
def test_a_flipped_input_gives_the_flipped_map(model, combine):
    tta = anycam.TTAExplainer(anycam.Explainer(model, "features"), scales=(1.0, 0.75, 1.5), flip=True, combine=combine)
    x = images(4)
    mirrored = np.ascontiguousarray(x[..., ::-1])
    # the view set {x, flip x} × scales maps onto itself under a flip, so the maps mirror exactly
    np.testing.assert_allclose(tta(mirrored, target=2), tta(x, target=2)[..., ::-1], atol=1e-6)


class _ChannelsLast(torch.nn.Module):
    """The tiny net taking (N, H, W, C) images: exercises TTA's channels-last path in torch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


def test_channels_last_inputs_are_scaled_and_flipped_on_their_spatial_axes(model):
    x = images(2, size=12)
    first = anycam.TTAExplainer(anycam.Explainer(model, "features"), scales=(1.0, 1.5), flip=True)
    wrapped = _ChannelsLast().eval()
    last = anycam.TTAExplainer(
        anycam.Explainer(wrapped, "net.features", input_layout="channels_last"), scales=(1.0, 1.5), flip=True
    )
    np.testing.assert_allclose(last(np.ascontiguousarray(x.transpose(0, 2, 3, 1))), first(x), atol=1e-6)


def _torch_gradcam_on_grid(model, view, target, size):
    """Grad-CAM of one view in plain torch autograd, upsampled to ``size``: no anycam code."""
    captured = {}

    def hook(module, args, output):
        captured["a"] = output

    handle = model.features.register_forward_hook(hook)
    try:
        scores = model(view)[torch.arange(len(view)), target]
        grads = torch.autograd.grad(scores.sum(), captured["a"])[0]
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * captured["a"]).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0].detach().double()


@pytest.mark.parametrize("arrays", ["numpy", "native"])
@pytest.mark.parametrize("combine", ["mean", "max"])
def test_multi_scale_flip_equals_an_independent_torch_computation(model, combine, arrays):
    """In both array modes; in native mode the views, flips and average are taken on the device."""
    scales, x = (1.0, 0.5, 1.25), torch.from_numpy(images(3))
    explainer = anycam.Explainer(model, "features", arrays=arrays)
    tta = anycam.TTAExplainer(explainer, scales=scales, flip=True, combine=combine)
    explanation = tta.explain(x.numpy() if arrays == "numpy" else x)
    heatmap = explanation.heatmap if arrays == "numpy" else explanation.heatmap.numpy()
    with torch.no_grad():
        target = model(x).argmax(1)  # resolved on the original view
    maps = []
    for scale in scales:
        view = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        maps.append(_torch_gradcam_on_grid(model, view, target, (16, 16)))
        maps.append(_torch_gradcam_on_grid(model, view.flip(-1), target, (16, 16)).flip(-1))
    stacked = torch.stack(maps)
    combined = stacked.mean(0) if combine == "mean" else stacked.max(0).values
    low = combined.amin(dim=(1, 2), keepdim=True)
    high = combined.amax(dim=(1, 2), keepdim=True)
    expected = ((combined - low) / (high - low)).numpy()
    np.testing.assert_allclose(heatmap, expected, atol=2e-5)
    np.testing.assert_array_equal(explanation.target, target.numpy())
    assert explanation.weights is None and explanation.cam.shape == (3, 16, 16)


def test_views_explain_the_classes_the_original_view_resolved(model):
    tta = anycam.TTAExplainer(anycam.Explainer(model, "features"), scales=(0.5, 1.0), flip=True)
    assert tta.views()[0] == (1.0, False)
    x = images(5)
    seen = []
    original = tta.explainer.explain

    def spy(inputs, target=None):
        seen.append(target)
        return original(inputs, target)

    tta.explainer.explain = spy  # type: ignore[method-assign]
    explanation = tta.explain(x, target=anycam.top_k(2))
    assert isinstance(seen[0], anycam.core.TopK)
    for later in seen[1:]:
        np.testing.assert_array_equal(later, explanation.target)
    assert explanation.heatmap.shape == (5, 2, 16, 16)


def test_a_tta_explainer_works_with_the_metrics_and_the_dataset_runner(model, tmp_path):
    explainer = anycam.Explainer(model, "features")
    tta = anycam.TTAExplainer(explainer, scales=(1.0, 0.5), flip=True)
    x = images(4)
    auc = anycam.metrics.deletion(tta, x, tta(x), steps=4).auc
    assert auc.shape == (4,)
    store = anycam.explain_dataset(tta, [x], out=tmp_path / "s", progress=False)
    np.testing.assert_array_equal(store.read("heatmap"), tta(x))
    with pytest.raises(anycam.StoreMismatchError, match=r"tta: store has \{'combine': 'mean', 'flip': True"):
        anycam.explain_dataset(anycam.TTAExplainer(explainer, scales=(1.0,)), [x], out=tmp_path / "s")


def test_bad_tta_settings_raise_clear_errors(model):
    explainer = anycam.Explainer(model, "features")
    # anycam errors that are also the builtin they refine.
    with pytest.raises(anycam.ConfigError, match="positive numbers"):
        anycam.TTAExplainer(explainer, scales=(1.0, 0))
    with pytest.raises(anycam.ConfigError, match="combine"):
        anycam.TTAExplainer(explainer, combine="median")
    with pytest.raises(anycam.ConfigError, match="upsample=None"):
        anycam.TTAExplainer(anycam.Explainer(model, "features", upsample=None))
    with pytest.raises(anycam.ConfigError, match="input attribution"):
        anycam.TTAExplainer(anycam.Explainer(model, "features", method="guided-gradcam"))
    with pytest.raises(anycam.ConfigTypeError, match="wraps an anycam.Explainer"):
        anycam.TTAExplainer(model)
    with pytest.raises(anycam.InputError, match="one image batch"):
        anycam.TTAExplainer(explainer).explain({"x": images(1)})


def test_flipped_views_refuse_a_callable_target(model):
    """Item 19.8: a callable may score a place (here the left half of a logit map), which a flip mirrors."""
    x = images(2)

    def left_half(output):
        return output[:, :2].sum(dim=1)  # stands in for a region/box score

    flipping = anycam.TTAExplainer(anycam.Explainer(model, "features"), scales=(1.0, 0.75), flip=True)
    with pytest.raises(anycam.TargetError, match="flip=False"):
        flipping.explain(x, target=left_half)
    # Without flips the callable is explained on every scale, as the wrapped Explainer would.
    scaled = anycam.TTAExplainer(anycam.Explainer(model, "features"), scales=(1.0,), flip=False)
    np.testing.assert_array_equal(scaled(x, target=left_half), anycam.Explainer(model, "features")(x, target=left_half))
    # Class targets do not move under a flip, so flips keep them.
    assert flipping(x, target=1).shape == (2, *x.shape[2:])
