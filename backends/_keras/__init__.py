"""Keras 3 structure shared by the adapters of Keras on TensorFlow, JAX and PyTorch.

Keras runs one model definition on three frameworks, and everything anycam needs from the
model's *structure* is framework-free Keras: layer paths through nested models, layouts from
``data_format``, the layer's ``call`` intercepted while the model runs, and the copies the
sanity check randomises. Each adapter (``tensorflow/``, ``jax/keras.py``, ``torch/keras.py``)
adds only how its framework differentiates the intercepted output: a ``GradientTape`` watching
it, a zero ``delta`` added under ``jax.vjp`` of ``stateless_call``, or a leaf tensor for
``torch.autograd.grad``. This package imports Keras and no framework.

Modules: ``layers`` (the Keras backend, layer lookup and paths, layouts, the auto choice's
records), ``intercept`` (a layer's ``call`` intercepted; ``run``), ``pooled`` (Ablation-CAM's
pooled head), ``randomize`` (weight owners and randomised copies), ``demo`` (the demo network).
The adapters use the names re-exported here as ``_keras.<name>``.
"""

from __future__ import annotations

from .intercept import Intercept, Tap, run
from .layers import (
    FORMATS,
    all_layers,
    auto_choice,
    backend,
    before_last_attention,
    data_format,
    input_layout,
    input_spec,
    layer_paths,
    layer_records,
    layouts,
    outermost_format,
    require_backend,
    resolve_layer,
    resolve_spec,
    sublayers,
)
from .pooled import PooledHead, pooled_head
from .randomize import (
    INITIALIZER_ALIASES,
    built_model,
    clone_graph,
    copy_model,
    initializer_of,
    is_graph_model,
    own_weights,
    parameter_layers,
    randomized_copy,
    rebuild_from_config,
    reinitialise,
    reseeded,
    twins,
    weight_owners,
)

__all__ = [
    "FORMATS",
    "INITIALIZER_ALIASES",
    "Intercept",
    "PooledHead",
    "Tap",
    "all_layers",
    "auto_choice",
    "backend",
    "before_last_attention",
    "built_model",
    "clone_graph",
    "copy_model",
    "data_format",
    "initializer_of",
    "input_layout",
    "input_spec",
    "is_graph_model",
    "layer_paths",
    "layer_records",
    "layouts",
    "outermost_format",
    "own_weights",
    "parameter_layers",
    "pooled_head",
    "randomized_copy",
    "rebuild_from_config",
    "reinitialise",
    "require_backend",
    "reseeded",
    "resolve_layer",
    "resolve_spec",
    "run",
    "sublayers",
    "twins",
    "weight_owners",
]
