"""Torch specifics of the issue-9 methods end to end: Score-CAM (and Faster Score-CAM), the
configuration errors and the progress bar."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import anycam

from .nets import Residual


def test_faster_scorecam_scores_only_the_top_variance_channels() -> None:
    torch.manual_seed(3)
    model = Residual().eval()
    x = torch.randn(2, 3, 6, 6)
    full = anycam.Explainer(model, "conv2", method="scorecam").explain(x, target=0)
    fast = anycam.Explainer(model, "conv2", method="scorecam", scorecam_top_k=2).explain(x, target=0)
    assert ((fast.weights != 0).sum(axis=1) == 2).all()
    kept = fast.weights != 0
    np.testing.assert_allclose(fast.weights[kept], full.weights[kept], rtol=1e-5)


def test_scorecam_on_a_model_without_class_scores_needs_a_callable() -> None:
    torch.manual_seed(4)
    segmenter = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    explainer = anycam.Explainer(segmenter, "1", method="scorecam")
    with pytest.raises(anycam.TargetError, match="callable target"):
        explainer.explain(x, target=1)
    result = explainer.explain(x, target=lambda out: out[:, 1].mean(dim=(1, 2)))
    assert result.heatmap.shape == (2, 6, 6) and np.isfinite(result.weights).all()


def test_configuration_errors() -> None:
    model = Residual().eval()
    with pytest.raises(anycam.ConfigError, match="batch_size must be a positive integer"):
        anycam.Explainer(model, "conv1", method="scorecam", batch_size=0)
    with pytest.raises(anycam.ConfigError, match="scorecam_top_k"):
        anycam.Explainer(model, "conv1", method="scorecam", scorecam_top_k=0)
    with pytest.raises(anycam.ConfigError, match="guided-backprop.*ablationcam|ablationcam.*guided-backprop"):
        anycam.Explainer(model, "conv1", method="ablation-cam")
    with pytest.raises(anycam.ConfigError, match="one layer"):
        anycam.Explainer(model, ["conv1", "conv2"], method="ablationcam")
    with pytest.raises(anycam.ConfigError, match="unknown scorecam"):
        anycam.Explainer(model, "conv1", method="scorecam", scorecam="paper")


def test_progress_bar_only_when_asked(capsys) -> None:  # type: ignore[no-untyped-def]
    model = Residual().eval()
    x = torch.randn(1, 3, 6, 6)
    anycam.Explainer(model, "conv1", method="ablationcam", progress=True, batch_size=2).explain(x)
    assert "anycam ablationcam" in capsys.readouterr().err
    anycam.Explainer(model, "conv1", method="scorecam", progress=False, batch_size=2).explain(x)
    assert "anycam" not in capsys.readouterr().err


def test_progress_true_without_tqdm_names_the_package(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    model = Residual().eval()
    with pytest.raises(anycam.MissingExtraError, match="pip install tqdm"):
        anycam.Explainer(model, "conv1", method="ablationcam", progress=True).explain(torch.randn(1, 3, 6, 6))
    # progress=None quietly goes without a bar.
    anycam.Explainer(model, "conv1", method="ablationcam").explain(torch.randn(1, 3, 6, 6))
