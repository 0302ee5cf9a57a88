"""The JAX adapter: Flax linen and NNX, Equinox, (features, head) function pairs, and Keras 3 on JAX."""

from __future__ import annotations

from typing import Any

from anycam.protocol.backend import Backend

__all__ = ["backend_for", "explain_fn"]


def backend_for(model: Any) -> type[Backend]:
    """Returns the adapter class for ``model``: the Keras-on-JAX one for a Keras layer, else the JAX one."""
    from .. import is_keras

    if is_keras(model):
        from .keras import KerasJaxBackend

        return KerasJaxBackend
    from .backend import JaxBackend

    return JaxBackend


def __getattr__(name: str) -> Any:
    """Imports ``explain_fn`` (and JAX) on first use: importing this package imports no framework."""
    if name == "explain_fn":
        from .compose import explain_fn

        return explain_fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
