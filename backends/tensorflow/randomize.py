"""Randomised model copies for ``anycam.sanity_check``: the layers that own weights, fresh weights for some.

The Keras work (paths, copies, re-seeded initializers) is ``anycam.backends._keras``'s; this
module gives the copy a backend of its own, with its own compiled captures.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import _keras
from .capture import keras_program

if TYPE_CHECKING:
    from .backend import TensorFlowBackend


def parameter_layers(backend: TensorFlowBackend) -> tuple[str, ...]:
    """Returns the paths of the layers that own weights (trainable or not), input to output.

    Paths as layers are addressed (``"inner/conv"`` inside a nested model); a layer counts
    when it creates weights itself, so a nested model is listed through its layers.

    Raises:
        NotImplementedError: for a ``(features, head)`` pair.
        anycam.LayerError: the model is not built yet.
    """
    return _keras.parameter_layers(backend.model)


def randomized(backend: TensorFlowBackend, layers: Sequence[str], seed: int = 0) -> TensorFlowBackend:
    """Returns a backend over a copy of the model whose ``layers`` have fresh weights.

    Each chosen layer's weights are drawn anew from the layer's own initializers
    (``kernel_initializer``, ``gamma_initializer``, ...), re-seeded from ``seed`` and the
    layer's path (a plain function given as initializer is called as it is); every other
    weight keeps the model's value. The model itself is only read, and the global random
    states are left as they were. The copy explains the same layers, under the same names,
    with the same output selector, and has its own compiled captures.

    Raises:
        anycam.LayerError: a layer is unknown, owns no weights, or keeps no initializer for
            one of them.
        NotImplementedError: for a ``(features, head)`` pair, or a model Keras cannot
            rebuild from its config.
    """
    duplicate, twins = _keras.randomized_copy(backend.model, layers, operator.index(seed))
    clone = copy.copy(backend)
    clone.model = duplicate
    clone.layers = [twins[id(layer)] for layer in backend.layers]
    clone._built = True
    clone._program = keras_program(clone)
    return clone
