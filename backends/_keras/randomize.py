"""Randomised copies of a Keras model for the sanity check: weight owners, copies, re-seeded initializers.

``parameter_layers`` lists the layers that own weights; ``randomized_copy`` copies the model
(``clone_model`` for Sequential and Functional models, ``from_config(get_config())`` for
subclassed ones), copies the weights over and draws the chosen layers' weights anew from their
own initializers, leaving the model and every global random state as they were.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from typing import Any

import keras

from anycam._errors import LayerError, UnsupportedError

from .layers import all_layers, resolve_layer, sublayers

INITIALIZER_ALIASES = {
    "kernel": ("depthwise_initializer",),  # DepthwiseConv1D/2D
    "recurrent_kernel": ("recurrent_initializer",),  # LSTM/GRU/SimpleRNN cells
    "depthwise_kernel": ("depthwise_initializer",),  # SeparableConv1D/2D
    "pointwise_kernel": ("pointwise_initializer",),
}


def own_weights(layer: Any) -> list[Any]:
    """Returns the weights ``layer`` created itself (trainable or not), not its sublayers'."""
    inherited = {id(weight) for child in sublayers(layer) for weight in child.weights}
    return [weight for weight in layer.weights if id(weight) not in inherited]


def weight_owners(model: Any) -> list[tuple[str, Any]]:
    """Returns ``(path, layer)`` for the layers inside ``model`` that own weights, depth first.

    Depth first in the order Keras keeps sublayers (topological for Functional models, list
    order for Sequential, assignment order for subclassed ones), so a nested model's layers come
    where the nested model runs. A layer shared by several parents is listed once.
    """
    owners: list[tuple[str, Any]] = []
    seen = {id(model)}

    def walk(layer: Any, prefix: str) -> None:
        for child in sublayers(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = prefix + child.name
            if own_weights(child):
                owners.append((path, child))
            walk(child, path + "/")

    walk(model, "")
    return owners


def twins(model: Any, duplicate: Any) -> list[tuple[Any, Any]]:
    """Pairs every layer of ``model`` with its counterpart in ``duplicate``, by position.

    By position, not by name: a subclassed model rebuilt from its config gives auto-named
    sublayers new names (``dense_1`` for ``dense``).

    Raises:
        ValueError: the two differ in their sublayers or in the shapes and dtypes of weights.
    """
    pairs: list[tuple[Any, Any]] = []
    seen: set[int] = set()

    def signature(layer: Any) -> list[tuple[tuple[Any, ...], str]]:
        return [(tuple(weight.shape), str(weight.dtype)) for weight in own_weights(layer)]

    def pair(original: Any, twin: Any, path: str) -> None:
        seen.add(id(original))
        pairs.append((original, twin))
        where = repr(path) if path else "the model itself"
        if signature(original) != signature(twin):
            raise ValueError(f"the weights of {where} differ in the copy: {signature(twin)} for {signature(original)}")
        children, twin_children = sublayers(original), sublayers(twin)
        if len(children) != len(twin_children):
            raise ValueError(f"{where} has {len(children)} sublayers, its copy {len(twin_children)}")
        for child, twin_child in zip(children, twin_children, strict=True):
            if id(child) not in seen:
                pair(child, twin_child, f"{path}/{child.name}" if path else child.name)

    pair(model, duplicate, "")
    return pairs


def is_graph_model(model: Any) -> bool:
    """True for Sequential and Functional models (and their subclasses), which Keras can clone."""
    return isinstance(model, keras.Sequential) or any(cls.__name__ == "Functional" for cls in type(model).__mro__)


def clone_graph(model: Any) -> Any:
    return keras.models.clone_model(model, recursive=True)


def rebuild_from_config(model: Any) -> Any:
    # Not serialize_keras_object: the copy only runs inference, and its compile config could
    # name the user's unregistered loss.
    return type(model).from_config(model.get_config())


def copy_model(model: Any) -> tuple[Any, dict[int, Any]]:
    """Returns an independent copy of a built Keras ``model`` with equal weights, and its twins.

    Functional and Sequential models are cloned layer by layer (``keras.models.clone_model``);
    others are rebuilt from their config, as ``get_config``/``from_config`` allow. Either way
    the new variables then receive the model's values; the model is only read. ``copy.deepcopy``
    is no alternative: for a Keras model it is the same config round trip (``__reduce__`` saves
    and reloads the model, compile config included).

    Returns:
        ``(duplicate, twins)``, twins mapping ``id(layer)`` to the layer's copy.

    Raises:
        anycam.UnsupportedError: Keras cannot rebuild the model from its config.
    """
    classes = {type(layer).__name__: type(layer) for layer in [model, *all_layers(model)]}
    failures = []
    # Building the copy draws initializer seeds from Python's ``random``; leave it as found.
    python_state = random.getstate()
    try:
        ways = [("get_config/from_config", rebuild_from_config)]
        if is_graph_model(model):
            ways.insert(0, ("clone_model", clone_graph))
        for how, make in ways:
            try:
                with keras.saving.custom_object_scope(classes):
                    duplicate = make(model)
                if getattr(model, "built", True) and not getattr(duplicate, "built", True):
                    duplicate.build_from_config(model.get_build_config())
                pairs = twins(model, duplicate)
            except Exception as exc:  # Keras raises all kinds; each sends us to the next way
                failures.append(f"{how}: {type(exc).__name__}: {' '.join(str(exc).split())[:240]}")
                continue
            for original, twin in pairs:
                weights = zip(own_weights(original), own_weights(twin), strict=True)
                for weight, twin_weight in weights:
                    twin_weight.assign(weight.value)
            return duplicate, {id(original): twin for original, twin in pairs}
    finally:
        random.setstate(python_state)
    raise UnsupportedError(
        f"cannot copy the {type(model).__name__} model to randomise it ({'; '.join(failures)}). "
        "anycam copies Functional and Sequential models, and subclassed models that Keras can "
        "rebuild from get_config() (automatic when __init__ takes only numbers, strings, lists "
        "and dicts); give the model's class a get_config() (and from_config()) that rebuilds it"
    )


def initializer_of(layer: Any, weight: Any, path: str) -> Any:
    """Returns the initializer ``layer`` keeps for ``weight`` (``kernel_initializer``, ...)."""
    attributes = (f"{weight.name}_initializer", *INITIALIZER_ALIASES.get(weight.name, ()))
    for attribute in attributes:
        found = getattr(layer, attribute, None)
        if found is not None:
            return keras.initializers.get(found)
    raise LayerError(
        f"layer {path!r} ({type(layer).__name__}) does not say how its weight {weight.name!r} is "
        f"initialised (no attribute {' or '.join(map(repr, attributes))}); keep the initializer "
        "on the layer under that name, or randomise other layers"
    )


def reseeded(initializer: Any, seed: int) -> Any:
    """Returns ``initializer`` with its seed replaced by ``seed``; non-random ones as they are.

    Keras initializers draw with stateless ops from their seed, so this is deterministic and
    leaves every global random state alone.
    """
    if isinstance(initializer, keras.initializers.Initializer):
        config = initializer.get_config()
        if "seed" in config:
            return type(initializer).from_config({**config, "seed": seed})
    return initializer


def reinitialise(layer: Any, path: str, seed: int) -> None:
    """Gives the weights ``layer`` owns fresh values from its own initializers."""
    weights = own_weights(layer)
    initializers = [initializer_of(layer, weight, path) for weight in weights]  # all, or no change
    for index, (weight, initializer) in enumerate(zip(weights, initializers, strict=True)):
        # One seed per weight, from the path: a layer's new values do not depend on which
        # other layers are randomised with it.
        weight_seed = zlib.crc32(f"{seed}:{path}:{index}".encode())
        weight.assign(reseeded(initializer, weight_seed)(tuple(weight.shape), dtype=weight.dtype))


def built_model(model: Any, purpose: str) -> Any:
    """Returns ``model`` if it is a built Keras model; raises for a function pair or an unbuilt model."""
    if not isinstance(model, keras.Layer):
        raise UnsupportedError(
            f"cannot {purpose} a (features, head) pair: anycam sees two functions, not the "
            "layers and weights inside them; run the sanity check on the Keras model "
            "(Sequential, Functional or subclassed)"
        )
    if not getattr(model, "built", True):
        raise LayerError(
            f"cannot {purpose} an unbuilt model: its layers have no weights yet; call the "
            "model (or the explainer) once on a batch first"
        )
    return model


def parameter_layers(model: Any) -> tuple[str, ...]:
    """Returns the paths of the layers that own weights (trainable or not), input to output.

    Raises:
        anycam.UnsupportedError: ``model`` is not a Keras model.
        anycam.LayerError: the model is not built yet.
    """
    return tuple(path for path, _ in weight_owners(built_model(model, "list the layers of")))


def randomized_copy(model: Any, layers: Sequence[Any], seed: int) -> tuple[Any, dict[int, Any]]:
    """Returns a copy of ``model`` whose ``layers`` have fresh weights, and ``id(layer) → twin``.

    Each chosen layer's weights are drawn anew from the layer's own initializers, re-seeded from
    ``seed`` and the layer's path; every other weight keeps the model's value, and the model is
    only read.

    Raises:
        anycam.LayerError: a layer is unknown, owns no weights, or keeps no initializer for one.
        anycam.UnsupportedError: not a Keras model, or one Keras cannot rebuild from its config.
    """
    model = built_model(model, "randomise a copy of")
    chosen = [resolve_layer(model, layer) for layer in layers]
    for path, layer in chosen:
        if not own_weights(layer):
            inside = [p for p, _ in weight_owners(layer)]
            hint = f"; randomise its layers: {', '.join(repr(f'{path}/{p}') for p in inside)}"
            raise LayerError(
                f"layer {path!r} ({type(layer).__name__}) owns no weights to randomise" + (hint if inside else "")
            )
    duplicate, pairs = copy_model(model)
    for path, layer in chosen:
        reinitialise(pairs[id(layer)], path, seed)
    return duplicate, pairs
