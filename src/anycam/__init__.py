"""anycam: Grad-CAM for PyTorch, TensorFlow/Keras and JAX from one pure-NumPy core.

``import anycam`` imports no framework; the adapter for a model's framework is loaded on first
use. See ``anycam.Explainer``; ``anycam.metrics`` and ``anycam.sanity_check`` evaluate explanations.
"""

from __future__ import annotations

from . import core, metrics
from ._errors import (
    AnycamError,
    AnycamWarning,
    BackendError,
    ConfigError,
    ConfigTypeError,
    InputError,
    LayerError,
    MissingExtraError,
    NonFiniteError,
    TargetError,
    TrainingModeWarning,
    UnsupportedError,
    ZeroMapWarning,
)
from .core.targets import top_k
from .dataset import (
    ExplanationStore,
    StoreCorruptError,
    StoreError,
    StoreFormatError,
    StoreKeyError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreWriteError,
    explain_dataset,
)
from .explain import Explainer, Explanation, TTAExplainer
from .metrics.sanity import SanityResult, sanity_check
from .metrics.streaming import StreamingMetrics
from .protocol.backend import AblationHead, Backend, Capture
from .viz import overlay, plot, save

__version__ = "0.1.0"

__all__ = [
    "AblationHead",
    "AnycamError",
    "AnycamWarning",
    "Backend",
    "BackendError",
    "Capture",
    "ConfigError",
    "ConfigTypeError",
    "Explainer",
    "Explanation",
    "ExplanationStore",
    "InputError",
    "LayerError",
    "MissingExtraError",
    "NonFiniteError",
    "SanityResult",
    "StoreCorruptError",
    "StoreError",
    "StoreFormatError",
    "StoreKeyError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreWriteError",
    "StreamingMetrics",
    "TTAExplainer",
    "TargetError",
    "TrainingModeWarning",
    "UnsupportedError",
    "ZeroMapWarning",
    "__version__",
    "core",
    "explain_dataset",
    "metrics",
    "overlay",
    "plot",
    "sanity_check",
    "save",
    "top_k",
]
