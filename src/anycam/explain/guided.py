"""The driver of the guided methods: Guided Backpropagation and Guided Grad-CAM.

It drives the backend's ``guided_gradients`` / ``guided_capture`` and leaves every formula to
the NumPy core; no framework is imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import core
from ..protocol.backend import Capture
from .assembly import assemble, float32, layer_results
from .explanation import Explanation

if TYPE_CHECKING:
    from .explainer import Explainer


def guided(explainer: Explainer, inputs: Any, spec: core.TargetSpec) -> Explanation:
    """Guided Backpropagation and Guided Grad-CAM: input-resolution attributions.

    ``guided-backprop``: attribution = guided gradients; ``cam`` is Σ_c |attribution_c| at the
    input's resolution (there is no layer map). ``guided-gradcam``: the capture's Grad-CAM map
    (``cam``, ``weights``), upsampled with ``upsample`` (linear if None), times the guided
    gradients of the same targets.
    """
    backend = explainer.backend
    input_layout = backend.input_layout
    capture: Capture | None = None
    if explainer.method == "guided-gradcam":
        capture, grads = backend.guided_capture(inputs, spec)
        scores, target = capture.scores, capture.target
    else:
        grads, scores, target = backend.guided_gradients(inputs, spec)
    grads = np.asarray(grads, dtype=np.float64)
    core.check_finite(grads, "guided gradients", "input")
    # (N, K, *input) in the input's layout → (N, K, C_in, *S).
    attribution = grads if input_layout == "channels_first" else np.moveaxis(grads, -1, 2)
    size = tuple(attribution.shape[3:])
    if capture is not None:
        results = layer_results(explainer, capture, "gradcam")
        upsampled = core.resize(results[0].cam, size, explainer.upsample or "linear")
        attribution = core.guided_gradcam(attribution, upsampled, channel_axis=2)
    else:
        capture = Capture(
            activations=(),
            gradients=None,
            scores=np.asarray(scores, np.float32),
            target=target,
            input_spatial=size,
            layouts=(),
        )
        results = [core.LayerResult(float32(core.attribution_map(attribution, channel_axis=2)), None)]
    heat = core.normalize(core.attribution_map(attribution, channel_axis=2), explainer.normalize, len(size))
    return assemble(explainer, results, capture, spec, heatmap=float32(heat), attribution=float32(attribution))
