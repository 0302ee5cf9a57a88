"""What a backend's test kit provides to the shared contract suite.

Every kit builds small models split as ``head(features(x))`` and explains the ``features``
output. Its ``reference`` computes that layer's activations and the vector-Jacobian products
of the head *independently* of anycam, with the framework's plain autodiff; the suite then
checks that the Explainer's maps equal the core's math applied to those arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KINDS = ("conv2d", "conv1d", "conv3d", "channels_last", "tokens")


@dataclass
class Case:
    """One model to explain.

    Attributes:
        model, layer, inputs: what the user would pass (inputs in the framework's type).
        layout: the ``layout=`` argument to give the Explainer (None: the backend's guess).
        true_layout: the layer output's real layout, for the expected computation.
        input_spatial: the input's spatial shape.
        reference: cotangents ``(K, N, classes)`` → (activations ``(N, ...)``, gradients
            ``(N, K, ...)``, outputs ``(N, classes)``), computed without anycam; with None
            instead of cotangents it returns (activations, None, outputs).
        linear_target: weights ``(classes,)`` → a callable target in the framework's ops
            returning ``output @ weights`` of shape ``(N,)``.
        options: extra Explainer keyword arguments.
    """

    model: Any
    layer: Any
    inputs: Any
    layout: str | None
    true_layout: str
    input_spatial: tuple[int, ...]
    reference: Callable[[np.ndarray | None], tuple[np.ndarray, np.ndarray | None, np.ndarray]]
    linear_target: Callable[[np.ndarray], Any]
    options: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None
