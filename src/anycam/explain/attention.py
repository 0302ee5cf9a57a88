"""The driver of the attention methods: attention rollout and gradient-weighted attention.

It asks the backend for every block's attention probabilities (``Backend.attention_capture``),
leaves the math to the NumPy core (``anycam.core.attention``) and builds the Explanation like
every other driver: the token map on the patch grid, upsampled and normalised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import core
from ..core import attention as math
from .assembly import float32, native_explanation
from .explanation import Explanation

if TYPE_CHECKING:
    from .explainer import Explainer


def attention(explainer: Explainer, inputs: Any, spec: core.TargetSpec) -> Explanation:
    """Rollout / gradient-weighted attention: capture → relevance (N, K, T, T) → token map → heatmap.

    ``cam`` is the map on the patch grid ``(N[, K], *grid)``; ``weights`` is None and ``layer``
    the names of the attention calls read.
    """
    method = explainer.method
    needs_gradients = math.GRADIENT_ATTENTION_METHODS[method]
    capture = explainer.backend.attention_capture(inputs, spec, gradients=needs_gradients)
    scores = np.asarray(capture.scores, np.float32)
    batch, count = scores.shape
    names = tuple(capture.names)
    _, tokens = math.check_attentions(capture.attentions, batch, names)
    for index, attention_probs in enumerate(capture.attentions):
        core.check_finite(attention_probs, "attention", names[index] if index < len(names) else str(index))
    if capture.gradients is not None:
        for index, gradient in enumerate(capture.gradients):
            core.check_finite(gradient, "attention gradients", names[index] if index < len(names) else str(index))
    grid = explainer.token_grid if explainer.token_grid is not None else capture.grid
    prefix, grid = math.patch_tokens(tokens, capture.prefix_tokens, grid, tuple(capture.input_spatial))
    relevance = math.relevance(method, capture.attentions, capture.gradients, count)
    cam = math.token_map(relevance, prefix=prefix, grid=grid)
    heat = core.heatmaps(
        [cam],
        None if explainer.upsample is None else tuple(capture.input_spatial),
        normalization=explainer.normalize,
        resize_mode=explainer.upsample,
    )
    squeeze = spec.squeeze and count == 1

    def shaped(array: np.ndarray | None) -> np.ndarray | None:
        return array[:, 0] if squeeze and array is not None else array

    cam32 = float32(cam)
    explained = Explanation(
        heatmap=shaped(float32(heat)),  # type: ignore[arg-type]
        cam=shaped(cam32),  # type: ignore[arg-type]
        cams=(shaped(cam32),),  # type: ignore[arg-type]
        weights=None,
        scores=shaped(scores),  # type: ignore[arg-type]
        target=shaped(capture.target),
        layer=names,
        method=method,
    )
    # The attention math runs on the host (issue 21's namespaces cover the CAM methods so far):
    # arrays="native" still hands the user the framework's arrays.
    return native_explanation(explainer, explained) if explainer.arrays == "native" else explained
