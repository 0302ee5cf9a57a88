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

from .checks import (
    check_batch,
    check_scores_shape,
    forward_error,
    integer_input_error,
    is_input_failure,
    non_finite_input,
)
from .guided import attribution_map, guided_gradcam
from .layout import (
    LAYOUTS,
    LayerReading,
    align_spatial,
    canonical_layout,
    read_layer,
    read_layouts,
    spatial_shape,
    to_channels_first,
    token_grid,
)
from .methods import (
    ATTENTION_METHODS,
    CAPTURE_METHODS,
    DIFFERENTIABLE_METHODS,
    GRADIENT_METHODS,
    GUIDED_METHODS,
    METHODS,
    SCORE_METHODS,
    TARGET_FREE_METHODS,
    class_activation_map,
    compute_cam,
    eigencam,
    eigengradcam,
    gradcam_elementwise,
    gradcam_weights,
    gradcampp_weights,
    hirescam,
    kpcacam,
    layercam,
    random_weights,
    relu,
    weighted_cam,
    xgradcam_weights,
)
from .normalize import NORMALIZATIONS, normalize
from .perturbation import (
    SCORECAM_VARIANTS,
    ablated_copies,
    ablated_head_features,
    ablation_weights,
    head_features,
    scorecam_masks,
    scorecam_weights,
    sigmoid,
    top_variance_channels,
)
from .pipeline import AGGREGATIONS, LayerResult, check_finite, heatmaps, layer_cam
from .resize import RESIZE_MODES, interpolation_matrix, resize
from .targets import TargetSpec, TopK, one_hot, parse_target, resolve_indices, top_k

__all__ = [
    "AGGREGATIONS",
    "ATTENTION_METHODS",
    "CAPTURE_METHODS",
    "DIFFERENTIABLE_METHODS",
    "GRADIENT_METHODS",
    "GUIDED_METHODS",
    "LAYOUTS",
    "METHODS",
    "NORMALIZATIONS",
    "RESIZE_MODES",
    "SCORECAM_VARIANTS",
    "SCORE_METHODS",
    "TARGET_FREE_METHODS",
    "LayerReading",
    "LayerResult",
    "TargetSpec",
    "TopK",
    "ablated_copies",
    "ablated_head_features",
    "ablation_weights",
    "align_spatial",
    "attribution_map",
    "canonical_layout",
    "check_batch",
    "check_finite",
    "check_scores_shape",
    "class_activation_map",
    "compute_cam",
    "eigencam",
    "eigengradcam",
    "forward_error",
    "gradcam_elementwise",
    "gradcam_weights",
    "gradcampp_weights",
    "guided_gradcam",
    "head_features",
    "heatmaps",
    "hirescam",
    "integer_input_error",
    "interpolation_matrix",
    "is_input_failure",
    "kpcacam",
    "layer_cam",
    "layercam",
    "non_finite_input",
    "normalize",
    "one_hot",
    "parse_target",
    "random_weights",
    "read_layer",
    "read_layouts",
    "relu",
    "resize",
    "resolve_indices",
    "scorecam_masks",
    "scorecam_weights",
    "sigmoid",
    "spatial_shape",
    "to_channels_first",
    "token_grid",
    "top_k",
    "top_variance_channels",
    "weighted_cam",
    "xgradcam_weights",
]
