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
# Layer positions in a residual network (two blocks, each ``relu(bn2(conv2(relu(bn1(conv1 x)))) + x)``,
# then global mean pooling and a dense layer), each a ``kit.case(kind)`` whose ``ablated_outputs``
# zeroes the channel and reruns the whole model:
#   skip_inplace: a block's ``bn2``, whose output the identity is added to (in place where the
#                 framework can, torch ``out += identity``) before the ReLU — ResNet's ``layerN.1.bn2``;
#   inside_block: a block's first ReLU output, read only by ``conv2`` inside the block;
#   after_add:    the first block's output (after the add and its ReLU), which the second block's
#                 branch and skip both read;
#   before_pool:  the last block's output, read only by the global pooling.
POSITIONS = ("skip_inplace", "inside_block", "after_add", "before_pool")


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
        ablated_outputs: channel k → ``(N, classes)`` outputs of the *whole* model with channel k
            of the explained layer set to zero (a hooked or rebuilt forward, without anycam).
        masked_outputs: masks ``(N, *input_spatial)`` → ``(N, classes)`` outputs of the model on
            the input multiplied by the masks (broadcast over the input channels).
        upsample: maps ``(N, C, *S)`` and a size → ``(N, C, *size)`` by the framework's own linear
            resize with half-pixel centres.
        guided: cotangents ``(K, N, classes)`` → ``(N, K, C_in, *input_spatial)`` guided
            backpropagation gradients, channels first, from a network whose ReLUs were replaced
            by hand (no anycam).
        has_relu: whether the model calls a ReLU (guided methods warn when it does not).
        head_reference: replacement ``(N, *layer_shape)`` → outputs ``(N, classes)``: the model
            run again with the layer's output replaced (Ablation-CAM's ablated copies).
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
    ablated_outputs: Callable[[int], np.ndarray] | None = None
    masked_outputs: Callable[[np.ndarray], np.ndarray] | None = None
    upsample: Callable[[np.ndarray, tuple[int, ...]], np.ndarray] | None = None
    guided: Callable[[np.ndarray], np.ndarray] | None = None
    head_reference: Callable[[np.ndarray], np.ndarray] | None = None
    has_relu: bool = True


def offered_head(explainer: Any, inputs: Any, target: Any = None) -> tuple[Any, Any]:
    """Returns (the ``AblationHead`` the explainer's backend offers for ``inputs``, or None; the capture)."""
    from anycam import core
    from anycam.explain.assembly import read_layouts

    spec = core.parse_target(target)
    capture = explainer.backend.capture(inputs, spec, gradients=False)
    layout = read_layouts(explainer, capture)[1][0].layout
    axis = 1 if layout == "channels_first" else -1
    return explainer.backend.ablation_head(inputs, spec, capture.target, capture.activations[0], axis), capture


def explain_through_head(explainer: Any, inputs: Any, target: Any, monkeypatch: Any) -> tuple[Any, Any]:
    """Explains with Ablation-CAM's suffix-on-every-copy path forbidden; returns (result, the head offered).

    Fails unless the backend offered exactly one ``AblationHead`` and the Explainer used it
    without a warning; the backend is restored afterwards.
    """
    import warnings

    import anycam

    backend = explainer.backend
    offered = backend.ablation_head
    heads: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        heads.append(offered(*args, **kwargs))
        return heads[-1]

    def suffix(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the network after the layer ran on ablated copies")

    monkeypatch.setattr(backend, "ablation_head", spy)
    monkeypatch.setattr(backend, "ablation_scorer", suffix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", anycam.AnycamWarning)
            warnings.simplefilter("ignore", anycam.ZeroMapWarning)
            result = explainer.explain(inputs, target=target)
    finally:
        monkeypatch.undo()
    assert len(heads) == 1 and isinstance(heads[0], anycam.AblationHead)
    return result, heads[0]
