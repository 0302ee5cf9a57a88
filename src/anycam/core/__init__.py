"""The pure-NumPy core of anycam: usable on arrays from any framework, or none.

>>> import numpy as np
>>> from anycam import core
>>> activations = np.random.default_rng(0).random((1, 4, 7, 7))
>>> gradients = np.ones_like(activations)
>>> cam, weights = core.compute_cam("gradcam", activations, gradients)
>>> heat = core.normalize(core.resize(cam, (224, 224)))
>>> heat.shape, float(heat.min()), float(heat.max())
((1, 224, 224), 0.0, 1.0)
"""

from .layout import LAYOUTS, canonical_layout, spatial_shape, to_channels_first, token_grid
from .methods import (
    GRADIENT_METHODS,
    METHODS,
    class_activation_map,
    compute_cam,
    eigencam,
    gradcam_weights,
    gradcampp_weights,
    hirescam,
    layercam,
    relu,
    weighted_cam,
    xgradcam_weights,
)
from .normalize import NORMALIZATIONS, normalize
from .pipeline import AGGREGATIONS, LayerResult, check_finite, heatmaps, layer_cam
from .resize import RESIZE_MODES, interpolation_matrix, resize
from .targets import TargetSpec, TopK, one_hot, parse_target, resolve_indices, top_k

__all__ = [
    "AGGREGATIONS",
    "GRADIENT_METHODS",
    "LAYOUTS",
    "METHODS",
    "NORMALIZATIONS",
    "RESIZE_MODES",
    "LayerResult",
    "TargetSpec",
    "TopK",
    "canonical_layout",
    "check_finite",
    "class_activation_map",
    "compute_cam",
    "eigencam",
    "gradcam_weights",
    "gradcampp_weights",
    "heatmaps",
    "hirescam",
    "interpolation_matrix",
    "layer_cam",
    "layercam",
    "normalize",
    "one_hot",
    "parse_target",
    "relu",
    "resize",
    "resolve_indices",
    "spatial_shape",
    "to_channels_first",
    "token_grid",
    "top_k",
    "weighted_cam",
    "xgradcam_weights",
]
