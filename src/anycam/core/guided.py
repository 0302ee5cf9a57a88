"""Guided Backpropagation and Guided Grad-CAM: input-resolution attributions and their heatmaps."""

from __future__ import annotations

import numpy as np

_F = np.float64


def guided_gradcam(guided: np.ndarray, cam: np.ndarray, channel_axis: int = 1) -> np.ndarray:
    """Returns R = G_guided ⊙ Up(L_Grad-CAM), Guided Grad-CAM (Selvaraju et al. 2017, §3).

    The guided-backpropagation gradients of every input channel are multiplied pixel by pixel
    with the Grad-CAM map upsampled to the input (raw and ReLU'd, not normalised; Captum's
    ``GuidedGradCam`` does the same, with nearest upsampling by default).

    Args:
        guided: ``(..., C_in, *S)`` guided gradients.
        cam: ``(..., *S)``, the Grad-CAM map at the input's resolution.
        channel_axis: position of C_in in ``guided``.

    Returns:
        ``(..., C_in, *S)`` float64.

    >>> guided_gradcam(np.array([[[1.0, -2.0], [3.0, 4.0]]]), np.array([[0.5, 0.0]]))
    array([[[ 0.5, -0. ],
            [ 1.5,  0. ]]])
    """
    grads = np.asarray(guided, _F)
    return grads * np.expand_dims(np.asarray(cam, _F), channel_axis % grads.ndim)


def attribution_map(attribution: np.ndarray, channel_axis: int = 1) -> np.ndarray:
    """Returns Σ_c |R_c|, the channel reduction that turns an attribution into one map.

    The sum of absolute values over the input channels is the heatmap of the guided methods
    (Captum's ``visualize_image_attr(sign="absolute_value")`` reduces the same way); the signed
    attribution itself stays in ``Explanation.attribution``.

    Args:
        attribution: ``(..., C_in, *S)``.

    Returns:
        ``(..., *S)`` float64, ≥ 0.

    >>> attribution_map(np.array([[[1.0, -2.0], [-3.0, 0.5]]]))
    array([[4. , 2.5]])
    """
    values = np.asarray(attribution, _F)
    return np.sum(np.abs(values), axis=channel_axis % values.ndim)
