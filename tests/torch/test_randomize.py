"""The sanity check on PyTorch models: the user's model is never touched, steps are right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import anycam
from anycam.metrics.sanity import sanity_check


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()  # fmt: skip


def test_randomised_copy_changes_only_the_chosen_layers() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backend = anycam.Explainer(model, "3").backend
    assert backend.parameter_layers() == ("0", "2", "6")
    copy = backend.randomized(["6", "2"], seed=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert not torch.equal(copy.model[6].weight, model[6].weight)
    assert not torch.equal(copy.model[2].weight, model[2].weight)
    assert torch.equal(copy.model[0].weight, model[0].weight)
    again = backend.randomized(["6", "2"], seed=3)
    assert torch.equal(again.model[2].weight, copy.model[2].weight)  # seeded
    with pytest.raises(anycam.LayerError, match="unknown layer"):
        backend.randomized(["nope"])


def test_sanity_check_steps_and_oracle() -> None:
    model = _model()
    x = torch.randn(4, 3, 12, 12)
    explainer = anycam.Explainer(model, "3")
    cascading = sanity_check(explainer, x, target=1)
    independent = sanity_check(explainer, x, target=1, mode="independent")
    assert cascading.layers == independent.layers == ("6", "2", "0")
    # The first step randomises the same single layer with the same seed in both modes.
    np.testing.assert_allclose(cascading.spearman[0], independent.spearman[0])
    # Independent oracle for that step: the signed Grad-CAM of the randomised copy, by hand.
    copy = explainer.backend.randomized(["6"], seed=0).model
    leaf = copy[3](copy[2](copy[1](copy[0](x)))).detach().requires_grad_()
    (grads,) = torch.autograd.grad(copy[6](copy[5](copy[4](leaf)))[:, 1].sum(), leaf)
    signed = torch.einsum("nc,nchw->nhw", grads.mean((2, 3)), leaf.detach()).numpy()
    reference = anycam.Explainer(model, "3", relu=False, normalize=None).explain(x, target=1).cam
    from anycam.metrics.sanity import spearman

    np.testing.assert_allclose(cascading.spearman[0], spearman(reference, signed), atol=1e-6)
    assert cascading.ssim is not None and cascading.ssim.shape == (3, 4)
    full = sanity_check(explainer, x, target=1, mode="full")
    assert full.layers == ("all",)
    np.testing.assert_array_equal(full.spearman[0], cascading.spearman[-1])
    np.testing.assert_array_equal(full.ssim[0], cascading.ssim[-1])
    # SSIM oracle for the last step: the rectified heatmap of the randomised copy, computed anew.
    copy_explainer = anycam.Explainer(model, "3")
    copy_explainer.backend = explainer.backend.randomized(["6", "2", "0"], seed=2)
    from anycam.metrics.sanity import ssim

    expected = ssim(explainer(x, target=1), copy_explainer(x, target=1))
    np.testing.assert_allclose(cascading.ssim[-1], expected, atol=1e-6)
    assert "| 6 |" in cascading.table()


def test_sanity_check_rejects_k_maps() -> None:
    explainer = anycam.Explainer(_model(), "3")
    with pytest.raises(anycam.InputError, match="one map per sample"):
        sanity_check(explainer, torch.randn(2, 3, 8, 8), target=anycam.top_k(2))
