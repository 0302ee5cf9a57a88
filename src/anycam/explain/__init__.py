"""Explaining a batch: the ``Explainer``, the ``Explanation`` it returns, and the drivers behind it.

``explainer`` holds the options, the backend choice and the :data:`~anycam.explain.explainer.DRIVERS`
table; ``assembly`` turns a capture into checked layouts, maps and an ``Explanation``;
``perturbation`` (Score-CAM, Ablation-CAM) and ``guided`` drive the methods beyond one capture;
``tta`` wraps an Explainer in test-time augmentation.
"""

from __future__ import annotations

from .explainer import DRIVERS, Explainer
from .explanation import Explanation
from .tta import TTAExplainer

__all__ = ["DRIVERS", "Explainer", "Explanation", "TTAExplainer"]
