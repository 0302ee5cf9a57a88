"""The contract between the NumPy core and the framework adapters in ``anycam.backends``.

An adapter is built once per ``Explainer`` (it resolves layers and compiles what it can) and
then turns a batch into a :class:`Capture`: NumPy float32 activations and gradients of the
chosen layers, the scores of the targets, and the resolved class indices. Nothing in the core
knows which framework produced them.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .core.targets import TargetSpec


@dataclass(frozen=True)
class Capture:
    """What one forward (and backward) pass of a backend hands to the core.

    Attributes:
        activations: per layer, ``(N, ...)`` float32 in the layer's own layout.
        gradients: per layer, ``(N, K, ...)`` float32 (∂ score_k / ∂ activations), or None when
            the method needs no gradients.
        scores: ``(N, K)`` float32, the explained outputs (pre-softmax unless the model ends in
            a softmax).
        target: ``(N, K)`` int64 class indices, or None for callable targets.
        input_spatial: the spatial shape of the input, the heatmaps' resolution.
        layouts: per layer, the layout the backend believes the output has
            (``"channels_first"``, ``"channels_last"`` or ``"tokens"``); the user's ``layout=``
            overrides it.
    """

    activations: tuple[np.ndarray, ...]
    gradients: tuple[np.ndarray, ...] | None
    scores: np.ndarray
    target: np.ndarray | None
    input_spatial: tuple[int, ...]
    layouts: tuple[str, ...]


class Backend(abc.ABC):
    """One framework's adapter. Subclasses live in ``backends/<name>.py`` as ``BACKEND``.

    Args (of every subclass's constructor):
        model: the framework model.
        layers: a non-empty list of layer names or layer objects.
        output: selects the explained tensor from a model output that is a tuple, dict or
            dataclass (an index, key, attribute name or callable); None takes it as is.
        input_layout: the input's layout, or None for the framework's convention.
        **options: backend-specific options; unknown ones raise ``anycam.ConfigTypeError`` (a
            ``TypeError``). Backends that take several inputs accept ``spatial_input=`` and ``model_kwargs=`` (see
            ``anycam._inputs.structure_inputs``, which turns each call's inputs into one form).

    A layer is a name (``"name:input"`` for the layer's input, see ``anycam._layers``), a layer
    object, or None / ``"auto"`` for the automatic choice (``anycam._layers.choose_layer``).
    """

    name: ClassVar[str]

    layer_names: tuple[str, ...]
    """The resolved names; empty until the first call when the layer is chosen automatically
    during a forward pass."""

    auto_layer: bool = False
    """Whether the layer was chosen (or is to be chosen) by the automatic rule."""

    @abc.abstractmethod
    def __init__(
        self,
        model: Any,
        layers: Sequence[Any],
        *,
        output: Any = None,
        input_layout: str | None = None,
        **options: Any,
    ) -> None:
        """Resolves the layers and prepares (compiles, caches) what every call reuses."""

    @abc.abstractmethod
    def capture(self, inputs: Any, target: TargetSpec, *, gradients: bool = True) -> Capture:
        """Runs the model once on ``inputs`` and returns what the core needs."""

    @abc.abstractmethod
    def predict(self, inputs: Any) -> np.ndarray:
        """Returns the selected model output for ``inputs`` as float32 NumPy, no gradients."""

    def parameter_layers(self, inputs: Any = None) -> tuple[str, ...]:
        """Returns the names of the layers that own parameters, from the input to the output.

        Used by ``anycam.sanity_check`` to randomise the model layer by layer. Backends whose
        models do not record their call order (Flax) use ``inputs``, a batch, to trace it.
        """
        raise NotImplementedError(f"the {self.name} backend cannot list its parameter layers")

    def randomized(self, layers: Sequence[str], seed: int = 0) -> Backend:
        """Returns a backend over a *copy* of the model whose ``layers`` are re-initialised.

        Each layer gets fresh weights from the framework's own initialiser; the user's model
        is never touched. The copy explains the same layers with the same options.
        """
        raise NotImplementedError(f"the {self.name} backend cannot randomise a model copy")


def select_output(output: Any, selector: Any) -> Any:
    """Returns the part of a model output that ``selector`` names (shared by all backends).

    ``selector`` is None (the output itself, which must then not be a tuple/list/dict), an int
    (index), a str (dict key, or attribute of a dataclass-like output) or a callable.

    Raises:
        anycam.TargetError: if the output is a container and no selector was given, or the
            selector does not fit it.
    """
    from ._errors import TargetError

    if selector is None:
        if isinstance(output, (tuple, list, dict)):
            kind = type(output).__name__
            hint = "output=0" if not isinstance(output, dict) else f"output={next(iter(output), 'key')!r}"
            raise TargetError(
                f"the model returned a {kind}; say which part to explain, e.g. {hint} "
                "(an index, key, attribute name or callable)"
            )
        return output
    if callable(selector):
        return selector(output)
    try:
        if isinstance(selector, str) and not isinstance(output, dict):
            return getattr(output, selector)
        return output[selector]
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        raise TargetError(f"output={selector!r} does not fit a model output of type {type(output).__name__}") from exc


def as_list(layer: Any) -> list[Any]:
    """Returns ``layer`` as a list of layers: only a ``list`` means several layers.

    A tuple stays one layer, because a tuple is how Flax spells a module path.

    Raises:
        anycam.LayerError: for an empty list.
    """
    from ._errors import LayerError

    if isinstance(layer, list):
        if not layer:
            raise LayerError("layer list is empty; name at least one layer")
        return list(layer)
    return [layer]


def check_options(backend: str, options: dict[str, Any], known: Sequence[str]) -> None:
    """Raises ``anycam.ConfigTypeError`` (a TypeError) for unknown options, listing the known ones."""
    from ._errors import ConfigTypeError

    unknown = sorted(set(options) - set(known))
    if unknown:
        accepted = ", ".join(sorted(known)) or "none"
        raise ConfigTypeError(f"unknown option(s) {', '.join(unknown)} for the {backend} backend; accepted: {accepted}")
