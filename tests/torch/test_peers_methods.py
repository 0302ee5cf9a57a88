"""The issue-9 methods against the peers' own code: pytorch-grad-cam and Captum.

pytorch-grad-cam imports torchvision at package import, for image helpers these tests do not
use, and torchvision does not import beside this project's CPU torch build; a stub module
stands in for it (the classes compared here never touch it). The tests-torch session installs
grad-cam with ``--no-deps`` for the same reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import GuidedBackprop, GuidedGradCam
from torch import nn

import anycam

from .peer_stubs import torchvision_stub

# pytorch-grad-cam imports torchvision names when it loads; the stand-in is gone afterwards.
with torchvision_stub():
    from pytorch_grad_cam import KPCA_CAM, AblationCAM, EigenGradCAM, GradCAMElementWise, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection


def _net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, stride=2),
        nn.ReLU(),  # "3": the explained layer, post-ReLU so pytorch-grad-cam's ablation zeroes
        nn.Conv2d(12, 12, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 6),
    )
    return model.eval()


@pytest.fixture
def setup() -> tuple[nn.Module, torch.Tensor, list[int]]:
    torch.manual_seed(1)
    return _net(), torch.rand(2, 3, 10, 14), [2, 4]


def _activations(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model[:4](x).numpy()


def test_scorecam_equals_pytorch_grad_cam(setup) -> None:  # type: ignore[no-untyped-def]
    model, x, classes = setup
    ours = anycam.Explainer(model, "3", method="scorecam", scorecam="pytorch-grad-cam", batch_size=7).explain(
        x, target=classes
    )
    peer = ScoreCAM(model, target_layers=[model[3]])
    targets = [ClassifierOutputTarget(c) for c in classes]
    activations = _activations(model, x)
    weights = peer.get_cam_weights(x, model[3], targets, activations, None)
    np.testing.assert_allclose(ours.weights, weights, rtol=1e-5, atol=1e-7)
    raw = np.maximum(peer.get_cam_image(x, model[3], targets, activations, None, False), 0)
    np.testing.assert_allclose(ours.cam, raw, rtol=1e-5, atol=1e-6)


def test_ablationcam_equals_pytorch_grad_cam(setup) -> None:  # type: ignore[no-untyped-def]
    model, x, classes = setup
    ours = anycam.Explainer(model, "3", method="ablationcam", batch_size=8).explain(x, target=classes)
    peer = AblationCAM(model, target_layers=[model[3]], batch_size=5)
    targets = [ClassifierOutputTarget(c) for c in classes]
    activations = _activations(model, x)
    assert activations.min() == 0  # where pytorch-grad-cam's ablation is the paper's zeroing
    weights = peer.get_cam_weights(x, model[3], targets, activations, None)
    np.testing.assert_allclose(ours.weights, weights, rtol=1e-5, atol=1e-6)
    assert isinstance(model[3], nn.ReLU)  # the peer put the layer back


def test_gradcam_elementwise_equals_pytorch_grad_cam(setup) -> None:  # type: ignore[no-untyped-def]
    model, x, classes = setup
    ours = anycam.Explainer(model, "3", method="gradcam-elementwise").explain(x, target=classes)
    peer = GradCAMElementWise(model, target_layers=[model[3]])
    heat = peer(x, targets=[ClassifierOutputTarget(c) for c in classes])
    # Its maps are min-max normalised after a cv2 resize (the same linear resize): compare heatmaps.
    np.testing.assert_allclose(ours.heatmap, heat, atol=1e-5)


def test_eigengradcam_equals_pytorch_grad_cam_up_to_its_arbitrary_sign(setup) -> None:  # type: ignore[no-untyped-def]
    model, x, classes = setup
    ours = anycam.Explainer(model, "3", method="eigengradcam", relu=False).explain(x, target=classes)
    activations = torch.as_tensor(_activations(model, x)).requires_grad_()
    outputs = model[4:](activations)
    (grads,) = torch.autograd.grad(outputs.gather(1, torch.as_tensor(classes)[:, None]).sum(), activations)
    product = (grads * activations).detach().numpy()
    raw = get_2d_projection(product.copy())
    assert EigenGradCAM is not None  # the class that calls get_2d_projection on grads * activations
    for n in range(len(classes)):
        # pytorch-grad-cam keeps the SVD's sign (it can flip from run to run); anycam fixes it.
        sign = np.sign(np.sum(ours.cam[n] * raw[n]))
        np.testing.assert_allclose(ours.cam[n], sign * raw[n], rtol=1e-4, atol=1e-5)


def test_kpcacam_equals_pytorch_grad_cam_up_to_the_sign_it_leaves_open(setup) -> None:  # type: ignore[no-untyped-def]
    model, x, classes = setup
    ours = anycam.Explainer(model, "3", method="kpcacam", relu=False).explain(x, target=classes)
    peer = KPCA_CAM(model, target_layers=[model[3]])
    raw = peer.get_cam_image(x, model[3], None, _activations(model, x), None, False)
    for n in range(len(classes)):
        sign = np.sign(np.sum(ours.cam[n] * raw[n]))
        np.testing.assert_allclose(ours.cam[n], sign * raw[n], rtol=1e-4, atol=1e-5)


def test_guided_backprop_equals_captum(setup) -> None:  # type: ignore[no-untyped-def]
    model, x, classes = setup
    ours = anycam.Explainer(model, "3", method="guided-backprop").explain(x, target=classes)
    peer = GuidedBackprop(model).attribute(x, target=classes).detach().numpy()
    np.testing.assert_allclose(ours.attribution, peer, rtol=1e-4, atol=1e-7)


def test_guided_gradcam_equals_captum(setup) -> None:  # type: ignore[no-untyped-def]
    model, x, classes = setup
    ours = anycam.Explainer(model, "3", method="guided-gradcam", upsample="nearest").explain(x, target=classes)
    peer = GuidedGradCam(model, model[3]).attribute(x, target=classes).detach().numpy()
    np.testing.assert_allclose(ours.attribution, peer, rtol=1e-4, atol=1e-7)
