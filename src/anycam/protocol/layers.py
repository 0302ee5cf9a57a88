"""Layer specs shared by every backend: a layer's input or output, and the automatic choice.

``layer="avgpool:input"`` explains what flows *into* a module rather than out of it: when the
last stage ends in an activation module that the network also uses elsewhere (EfficientNet's
shared ``_swish``), its output cannot be captured once, but the input of the pooling or head
module after it is the same post-activation feature map. ``layer=None`` (or ``"auto"``) picks
the layer by one rule, :func:`choose_layer`, the same in every backend: each backend only
reports the layers it saw, in call order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._errors import LayerError, closest

AUTO = "auto"
PORTS = ("output", "input")
# Class-name fragments of the layers the automatic choice tells apart (any framework's spelling).
_NORMALIZATION = ("norm",)
_ACTIVATION = ("relu", "swish", "silu", "gelu", "sigmoid", "tanh", "mish", "hardswish", "elu", "activation")


def layer_kind(type_name: str) -> str | None:
    """Returns ``"normalization"``, ``"activation"`` or None for a layer's class name.

    Read from the name so that it holds in every framework (``BatchNorm2d``, ``BatchNormalization``,
    ``nn.LayerNorm``; ``ReLU``, ``SiLU``, ``MemoryEfficientSwish``, Keras ``Activation``).

    >>> layer_kind("BatchNorm2d"), layer_kind("MemoryEfficientSwish"), layer_kind("Conv2d")
    ('normalization', 'activation', None)
    """
    lowered = type_name.lower()
    if any(part in lowered for part in _NORMALIZATION):
        return "normalization"
    if any(part in lowered for part in _ACTIVATION):
        return "activation"
    return None


def layer_not_found(name: str, names: Sequence[str], *, model: str = "the model", listed: int = 12) -> LayerError:
    """Returns the LayerError for a layer name that is not in ``names`` (every backend's wording).

    The closest names when some are close; otherwise the top-level layers (names without a
    ``.`` or ``/``), so the message always offers something to pick, and the automatic choice.
    """
    names = [n for n in names if n]
    hint = closest(name, names)
    if not hint:
        top = [n for n in names if "." not in n and "/" not in n] or names
        more = f", … ({len(top) - listed} more)" if len(top) > listed else ""
        shown = ", ".join(repr(n) for n in top[:listed]) + more
        hint = f"; its top-level layers: {shown}" if top else "; it has no named layers"
    return LayerError(
        f"layer {name!r} not found in {model}{hint}; or pass layer=None to pick the last feature map "
        "on the path to the output"
    )


def is_auto(layer: Any) -> bool:
    """Returns whether ``layer`` asks for the automatic choice (None or ``"auto"``)."""
    return layer is None or (isinstance(layer, str) and layer == AUTO)


@dataclass(frozen=True)
class LayerSpec:
    """One explained layer: which layer, and whether its output or its input is explained.

    Attributes:
        layer: the layer as the user named it (a name or a layer object), suffix removed.
        port: ``"output"`` (the default) or ``"input"`` (the first positional input of the
            layer's call).
    """

    layer: Any
    port: str = "output"

    def label(self, name: str) -> str:
        """Returns the name the explainer reports: ``name`` or ``name + ":input"``."""
        return name if self.port == "output" else f"{name}:input"


def parse_layer(layer: Any) -> LayerSpec:
    """Returns the :class:`LayerSpec` of ``layer``: a trailing ``":input"`` or ``":output"`` is the port.

    Only strings carry a port; any other value (a layer object, a Flax path tuple) is explained
    at its output.

    >>> parse_layer("avgpool:input")
    LayerSpec(layer='avgpool', port='input')
    >>> parse_layer("layer4")
    LayerSpec(layer='layer4', port='output')

    Raises:
        anycam.LayerError: for a port with no layer name (``":input"``).
    """
    if not isinstance(layer, str):
        return LayerSpec(layer)
    name, sep, port = layer.rpartition(":")
    if not sep or port not in PORTS:
        return LayerSpec(layer)
    if not name:
        raise LayerError(f"layer {layer!r} names no layer before ':{port}'; write e.g. 'avgpool:{port}'")
    return LayerSpec(name, port)


@dataclass(frozen=True)
class LayerRecord:
    """What a backend saw of one layer during a forward pass, for :func:`choose_layer`.

    Attributes:
        name: the layer's name as the backend resolves it.
        shape: the output's shape ``(N, ...)``, or None when the output is not one array.
        layout: ``"channels_first"`` or ``"channels_last"``: where the spatial axes are.
        calls: how many times the layer ran in the forward pass.
        reaches_output: whether the explained output depends on the layer's output.
        kind: ``"normalization"``, ``"activation"`` or None (see :func:`layer_kind`), for
            :func:`choice_note`.
    """

    name: str
    shape: tuple[int, ...] | None
    layout: str = "channels_first"
    calls: int = 1
    reaches_output: bool = True
    kind: str | None = None

    @property
    def spatial(self) -> tuple[int, ...] | None:
        """The output's spatial shape in its layout, or None."""
        if self.shape is None or len(self.shape) < 3:
            return None
        return tuple(self.shape[2:]) if self.layout == "channels_first" else tuple(self.shape[1:-1])

    def rejection(self, rank: int) -> str | None:
        """Returns why this layer cannot be the automatic choice, or None if it can."""
        if self.calls != 1:
            return f"runs {self.calls} times"
        if not self.reaches_output:
            return "does not reach the output"
        spatial = self.spatial
        if spatial is None:
            return "not a feature map" if self.shape is None else f"output {self.shape} has no spatial axes"
        if len(spatial) != rank:
            return f"output {self.shape} has {len(spatial)} spatial axes, the input {rank}"
        if math.prod(spatial) <= 1:
            return f"output {self.shape} has spatial size 1"
        return None


def choose_layer(records: Sequence[LayerRecord], input_spatial: Sequence[int], *, listed: int = 12) -> str:
    """Returns the last layer, in call order, that reaches the output with a map of the input's rank.

    The rule (``layer=None`` or ``"auto"``, every backend): among the layers that run once and on
    the path to the explained output, the last whose output has as many spatial axes as the input
    and more than one spatial position. A container that ends a stage reports after its children,
    so a stage (``layer4``) wins over its last block.

    Args:
        records: the layers in the order their outputs were produced.
        input_spatial: the spatial shape of the input.
        listed: how many of the last layers the error message lists.

    Raises:
        anycam.LayerError: if no layer fits; the message says how many layers were considered and
            why the last ones were not taken.
    """
    rank = len(input_spatial)
    for record in reversed(records):
        if record.rejection(rank) is None:
            return record.name
    if not records:
        raise LayerError("layer='auto' found no layers in the forward pass; name the layer to explain")
    tail = [f"{r.name!r} ({r.rejection(rank)})" for r in list(records)[-listed:]]
    more = f" (the last {len(tail)} of {len(records)})" if len(records) > len(tail) else ""
    raise LayerError(
        f"layer='auto' found no layer whose output has the input's {rank} spatial axes "
        f"(input spatial shape {tuple(input_spatial)}) with spatial size > 1 on the path to the output; "
        f"considered{more}: {', '.join(tail)}; name the layer to explain"
    )


def choice_note(records: Sequence[LayerRecord], chosen: str) -> str | None:
    """Returns why the automatic choice is a normalisation's (pre-activation) output, or None.

    The rule prefers the last layer, so an activation after a normalisation wins whenever it can
    be captured. It cannot when the activation is one module the network calls more than once
    (EfficientNet's shared ``_swish``): then the choice is the normalisation before it, and the
    post-activation map is the input of the layer that follows. The note says so, for ``repr``.
    """
    names = [r.name for r in records]
    if chosen not in names:
        return None
    index = names.index(chosen)
    if records[index].kind != "normalization":
        return None
    # Records come in the order of first calls: a shared activation first ran before the chosen
    # normalisation (after the stem), so it may stand anywhere in the list.
    shared = next((r for r in records if r.kind == "activation" and r.calls != 1), None)
    if shared is None:
        return None
    after = next((r for r in records[index + 1 :] if r.kind != "activation"), None)
    fix = f"; for the post-activation map explain {after.name + ':input'!r}" if after is not None else ""
    return (
        f"{chosen!r} is a normalisation before the activation: the activation {shared.name!r} runs "
        f"{shared.calls} times (one shared module), so its output cannot be captured once{fix}"
    )
