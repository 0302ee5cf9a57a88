"""The driver of the attention methods: attention rollout and gradient-weighted attention.

It asks the backend for every block's attention probabilities (``Backend.attention_capture``),
reduced on the model's device where the adapter can (the head mean for rollout, Chefer's
per-block ``Ē`` for attention-grad: ``core.attention.AttentionRequest``), leaves the math to
the core (``anycam.core.attention``, on the arrays' namespace) and builds the Explanation like
every other driver: the token map on the patch grid, upsampled and normalised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import core
from ..core import attention as math
from ..core._namespace import is_numpy
from .assembly import float32, host, native_explanation
from .explanation import Explanation

if TYPE_CHECKING:
    from .explainer import Explainer


def attention(explainer: Explainer, inputs: Any, spec: core.TargetSpec) -> Explanation:
    """Rollout / gradient-weighted attention: capture → class-token rows (N, K, T) → token map → heatmap.

    ``cam`` is the map on the patch grid ``(N[, K], *grid)``; ``weights`` is None and ``layer``
    the names of the attention calls read.
    """
    method = explainer.method
    native = explainer.arrays == "native"
    with math.requesting(math.AttentionRequest(reduced=True, native=native)):
        capture = explainer.backend.attention_capture(inputs, spec, gradients=math.GRADIENT_ATTENTION_METHODS[method])
    scores = capture.scores
    batch, count = scores.shape[0], scores.shape[1]
    names = tuple(capture.names)
    _, tokens = math.check_attentions(capture.attentions, batch, names)
    for index, attention_probs in enumerate(capture.attentions):
        core.check_finite(attention_probs, "attention", names[index] if index < len(names) else str(index))
    if capture.gradients is not None:
        for index, gradient in enumerate(capture.gradients):
            core.check_finite(gradient, "attention gradients", names[index] if index < len(names) else str(index))
    grid = explainer.token_grid if explainer.token_grid is not None else capture.grid
    prefix, grid = math.patch_tokens(tokens, capture.prefix_tokens, grid, tuple(capture.input_spatial))
    rows = math.token_rows(method, capture.attentions, capture.gradients, count, prefix)
    cam = math.row_map(rows, prefix=prefix, grid=grid)
    on_device = native and not is_numpy(cam)
    if not on_device:
        cam, scores = host(cam), np.asarray(host(scores), np.float32)
    heat = core.heatmaps(
        [cam],
        None if explainer.upsample is None else tuple(capture.input_spatial),
        normalization=explainer.normalize,
        resize_mode=explainer.upsample,
    )
    squeeze = spec.squeeze and count == 1

    def shaped(array: Any) -> Any:
        return array[:, 0] if squeeze and array is not None else array

    # On the device the core already computed in float32 (float64 where the model is).
    cam32 = cam if on_device else float32(cam)
    explained = Explanation(
        heatmap=shaped(heat if on_device else float32(heat)),
        cam=shaped(cam32),
        cams=(shaped(cam32),),
        weights=None,
        scores=shaped(scores),
        target=shaped(capture.target),
        layer=names,
        method=method,
    )
    if on_device:  # computed where the model runs: the arrays are already the framework's
        return explained
    # An adapter that handed NumPy (no native capture): arrays="native" still gets the framework's arrays.
    return native_explanation(explainer, explained) if native else explained
