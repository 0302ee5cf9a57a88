"""Randomised copies of a torch model for ``anycam.sanity_check`` (Adebayo et al. 2018).

:func:`parameter_layers` lists the modules that own parameters, in registration order;
:func:`randomized` deep-copies the model, re-initialises the named modules with their own
``reset_parameters()`` under a fixed seed (the global RNG state is restored after), and returns an
adapter over the copy. :func:`over_copy` is that last step, shared with the Keras-on-torch adapter.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from anycam._errors import LayerError

if TYPE_CHECKING:
    from .backend import TorchBackend

B = TypeVar("B", bound="TorchBackend")


def parameter_layers(model: torch.nn.Module) -> tuple[str, ...]:
    """Returns the names of the modules that own parameters themselves, in registration order."""
    order: list[str] = []
    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            order.append(name)
    return tuple(order)


def over_copy(backend: B, model: Any, twins: dict[int, Any]) -> B:
    """Returns a shallow copy of ``backend`` over ``model``: its layers swapped for their ``twins``
    (keyed by ``id`` of the original), and no graph split cached from the original."""
    clone = copy.copy(backend)
    clone.model = model
    clone.modules = [twins[id(module)] for module in backend.modules]
    clone._splits = {}
    clone._splits_lock = threading.Lock()
    return clone


def randomized(backend: B, layers: Sequence[str], seed: int) -> B:
    """Returns an adapter over a copy of the model whose ``layers`` are re-initialised from ``seed``."""
    named = dict(backend.model.named_modules())
    unknown = [name for name in layers if name not in named]
    if unknown:
        raise LayerError(f"cannot randomise unknown layer(s) {', '.join(map(repr, unknown))}")
    model = copy.deepcopy(backend.model)
    copies = dict(model.named_modules())
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for name in layers:
            module = copies[name]
            reset = getattr(module, "reset_parameters", None)
            if reset is None:
                raise LayerError(
                    f"layer {name!r} ({type(module).__name__}) has no reset_parameters(); "
                    "randomise the layers that have one"
                )
            reset()
    finally:
        torch.random.set_rng_state(generator_state)
    twins = {id(o): c for o, c in zip(backend.model.modules(), model.modules(), strict=True)}
    return over_copy(backend, model, twins)
