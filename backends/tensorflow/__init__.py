"""The TensorFlow adapter: Keras 3 models on TensorFlow (Functional, Sequential, subclassed) and ``tf.Module``."""

from __future__ import annotations

from typing import Any

from anycam.protocol.backend import Backend

__all__ = ["backend_for"]


def backend_for(model: Any) -> type[Backend]:
    """Returns the adapter class for ``model``: one class serves Keras on TensorFlow and ``tf.Module``."""
    del model
    from .backend import TensorFlowBackend

    return TensorFlowBackend
