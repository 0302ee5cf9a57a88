"""The PyTorch adapter: ``torch.nn.Module`` models, and Keras 3 models on Keras's torch backend."""

from __future__ import annotations

from typing import Any

from anycam.protocol.backend import Backend

__all__ = ["backend_for"]


def backend_for(model: Any) -> type[Backend]:
    """Returns the adapter class for ``model``: the Keras-on-torch one for a Keras layer, else the torch one."""
    from .. import is_keras

    if is_keras(model):
        from .keras import KerasTorchBackend

        return KerasTorchBackend
    from .backend import TorchBackend

    return TorchBackend
