"""Keras 3 helpers shared by the adapters of Keras on TensorFlow, JAX and PyTorch.

Keras runs one model definition on three frameworks, and everything anycam needs from the
model's *structure* is framework-free Keras: layer paths through nested models, layouts from
``data_format``, the layer's ``call`` intercepted while the model runs, and the copies the
sanity check randomises. Each adapter (``tensorflow.py``, ``keras_jax.py``, ``keras_torch.py``)
adds only how its framework differentiates the intercepted output: a ``GradientTape`` watching
it, a zero ``delta`` added under ``jax.vjp`` of ``stateless_call``, or a leaf tensor for
``torch.autograd.grad``. This module imports Keras and no framework.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import random
import threading
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import keras

from anycam._errors import AnycamError, BackendError, ConfigTypeError, LayerError, closest

FORMATS = ("channels_first", "channels_last")
_MISSING = object()
# Held while a layer's call is replaced: two threads tracing at once must not save each
# other's wrappers as the "original".
_PATCH_LOCK = threading.RLock()


def backend() -> str:
    """Returns the framework Keras runs on: ``"tensorflow"``, ``"jax"``, ``"torch"``, ..."""
    return str(keras.config.backend())


_FRAMEWORKS = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}


def require_backend(model: Any, wanted: str) -> None:
    """Raises unless Keras runs on ``wanted`` (its backend name) and ``model`` is a Keras layer.

    The Keras backend is fixed when Keras is first imported, so the fix is the other anycam
    backend (or ``backend=None``, which detects it), or ``KERAS_BACKEND`` set before that import.
    """
    active = backend()
    if active != wanted:
        raise BackendError(
            f"backend={wanted!r} explains a Keras model only when Keras runs on {_FRAMEWORKS[wanted]}, but "
            f"it runs on {active!r}; pass backend={active!r} (or backend=None, which detects it), or set "
            f"KERAS_BACKEND={wanted} before the first `import keras`"
        )
    if not isinstance(model, keras.Layer):
        raise ConfigTypeError(f"a Keras model was expected, got {type(model).__name__}")


# -- model structure ----------------------------------------------------------------------


def sublayers(layer: Any) -> list[Any]:
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=False))
    return list(getattr(layer, "layers", []))


def layer_paths(model: Any) -> dict[str, Any]:
    """Returns ``{path: layer}`` for every layer inside ``model``, nested ones as ``"outer/inner"``.

    Attribute names of subclassed models are aliases (``"features"`` for ``self.features``)
    where they differ from the layer's name.
    """
    paths: dict[str, Any] = {}
    aliases: dict[str, Any] = {}
    seen: set[int] = set()

    def walk(layer: Any, prefix: str) -> None:
        children = sublayers(layer)
        for child in children:
            paths.setdefault(prefix + child.name, child)
        attributes = dict(vars(layer))
        # Keras on torch: a layer is a torch.nn.Module, which keeps submodules in _modules.
        modules = attributes.get("_modules")
        if isinstance(modules, dict):
            attributes.update(modules)
        for attribute, value in attributes.items():
            if isinstance(value, keras.Layer) and not attribute.startswith("_"):
                aliases.setdefault(prefix + attribute, value)
        for child in children:
            if id(child) not in seen:
                seen.add(id(child))
                walk(child, f"{prefix}{child.name}/")

    walk(model, "")
    for path, layer in aliases.items():
        paths.setdefault(path, layer)
    return paths


def data_format(layer: Any) -> str | None:
    """Returns the data_format of ``layer``, or of the nearest layer upstream that has one.

    Walks the Keras graph backwards from the layer's output (a ReLU, BatchNormalization or Add
    after a ``channels_first`` convolution is ``channels_first`` too); for layers outside any
    graph (subclassed models), the last sublayer that has a data_format decides.
    """
    queue: collections.deque[Any] = collections.deque([layer])
    seen: set[int] = set()
    while queue and len(seen) < 1000:
        operation = queue.popleft()
        if id(operation) in seen:
            continue
        seen.add(id(operation))
        fmt = getattr(operation, "data_format", None)
        if fmt in FORMATS:
            return str(fmt)
        tensors: list[Any] = []
        if isinstance(operation, keras.Model):
            try:
                tensors = list(operation.outputs or [])
            except (AttributeError, ValueError):
                tensors = []
        if not tensors:
            nodes = getattr(operation, "_inbound_nodes", None) or []
            tensors = list(nodes[0].input_tensors) if nodes else []
        for tensor in tensors:
            history = getattr(tensor, "_keras_history", None)
            if history is not None:
                queue.append(history.operation)
    return outermost_format(layer, last=True)


def outermost_format(layer: Any, *, last: bool) -> str | None:
    """Returns the data_format of the first (or last) sublayer that has one, outermost first.

    A sublayer that declares a data_format decides for everything inside it (a custom
    channels_first layer may wrap a channels_last convolution).
    """
    children = sublayers(layer)
    for child in reversed(children) if last else children:
        fmt = getattr(child, "data_format", None)
        if fmt in FORMATS:
            return str(fmt)
        found = outermost_format(child, last=last)
        if found is not None:
            return found
    return None


def resolve_layer(model: Any, layer: Any) -> tuple[str, Any]:
    """Returns ``(path, layer)`` for a layer name, a path through nested models or a layer object.

    Raises:
        anycam.LayerError: the layer is not in the model (the message lists the closest names).
    """
    paths = layer_paths(model)
    unbuilt = (
        "" if getattr(model, "built", True)
        else "; the model is not built yet: call it once on a batch so its layers exist"
    )
    if isinstance(layer, str):
        if layer in paths:
            return layer, paths[layer]
        if "/" not in layer:
            matches = [p for p in paths if p.rsplit("/", 1)[-1] == layer]
            distinct = {id(paths[p]) for p in matches}
            if len(distinct) == 1:
                return matches[0], paths[matches[0]]
            if matches:
                raise LayerError(
                    f"layer name {layer!r} is ambiguous in the model; use one of the paths "
                    f"{', '.join(map(repr, matches))}"
                )
        bare = {p.rsplit("/", 1)[-1] for p in paths}
        hint = closest(layer, [*paths, *sorted(bare - set(paths))])
        raise LayerError(f"layer {layer!r} not found in the model{hint}{unbuilt}")
    if isinstance(layer, keras.Layer):
        if layer is model:
            raise LayerError("the layer given is the model itself; explain one of its layers")
        for path, candidate in paths.items():
            if candidate is layer:
                return path, candidate
        raise LayerError(
            f"the {type(layer).__name__} {layer.name!r} given as layer is not part of the model"
        )
    if layer is None:
        raise LayerError(
            "name the layer to explain: its name (e.g. 'conv5_block3_out'), its path in "
            "nested models ('resnet50/conv5_block3_out') or the layer object"
        )
    raise LayerError(
        f"a Keras layer is a layer name, a path or a layer object, got {type(layer).__name__}"
    )



# -- the explained layers' call, intercepted ----------------------------------------------


Tap = Callable[[int, Any], Any]
"""``tap(index, value) -> value``: receives explained layer ``index``'s tensor, returns what flows on."""


class Intercept:
    """Replaces each layer's ``call`` by a tapping wrapper; restores it on exit, always.

    The wrapper hands the layer's output (or, for port ``"input"``, its first positional input)
    to ``tap`` and lets the model continue with what ``tap`` returns, so each framework decides
    how the tensor is made differentiable. Only the thread that entered is tapped; errors
    raised by ``tap`` are collected in ``errors`` (Keras re-creates exceptions raised inside a
    layer's call with the call's arguments appended) and raised by :func:`run`.
    """

    def __init__(
        self,
        layers: Sequence[Any],
        names: Sequence[str],
        tap: Tap,
        ports: Sequence[str] | None = None,
        *,
        once: bool = True,
    ) -> None:
        self.layers = layers
        self.once = once
        self.names = names
        self.tap = tap
        self.ports = tuple(ports) if ports is not None else ("output",) * len(layers)
        self.tapped: set[int] = set()
        self.errors: list[Exception] = []
        self.saved: list[Any] = []

    def _take(self, index: int, value: Any) -> Any:
        if self.errors:
            return value
        if self.once and index in self.tapped:
            self.errors.append(
                LayerError(
                    f"layer {self.names[index]!r} runs more than once per forward pass (a "
                    "shared layer); explain a layer that runs once"
                )
            )
            return value
        try:
            tapped = self.tap(index, value)
        except AnycamError as exc:
            self.errors.append(exc)
            return value
        self.tapped.add(index)
        return tapped

    def _wrapper(self, index: int, original: Callable[..., Any], owner: int) -> Callable[..., Any]:
        port = self.ports[index]

        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != owner:
                return original(*args, **kwargs)
            if port == "input":
                if args:
                    args = (self._take(index, args[0]), *args[1:])
                else:
                    key = next(iter(kwargs), None)
                    if key is None:
                        self.errors.append(LayerError(f"layer {self.names[index]!r} was called without an input"))
                    else:
                        kwargs = {**kwargs, key: self._take(index, kwargs[key])}
                return original(*args, **kwargs)
            return self._take(index, original(*args, **kwargs))

        return call

    def __enter__(self) -> Intercept:
        owner = threading.get_ident()
        _PATCH_LOCK.acquire()
        try:
            for index, layer in enumerate(self.layers):
                self.saved.append(layer.__dict__.get("call", _MISSING))
                # object.__setattr__: Keras's __setattr__ would try to track the function.
                object.__setattr__(layer, "call", self._wrapper(index, layer.call, owner))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        # In reverse, so a layer listed twice gets its own call back, not the first wrapper.
        for layer, saved in reversed(list(zip(self.layers, self.saved, strict=False))):
            if saved is _MISSING:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", saved)
        self.saved = []
        _PATCH_LOCK.release()


def run(
    forward: Callable[[], Any],
    layers: Sequence[Any],
    names: Sequence[str],
    tap: Tap,
    ports: Sequence[str] | None = None,
) -> Any:
    """Returns ``forward()`` run with the layers tapped; every layer must be tapped exactly once.

    Raises:
        anycam.LayerError: a tap failed, a layer ran twice (a shared layer) or did not run.
    """
    with Intercept(layers, names, tap, ports) as intercept:
        output = forward()
    if intercept.errors:
        raise intercept.errors[0]
    missing = [name for index, name in enumerate(names) if index not in intercept.tapped]
    if missing:
        raise LayerError(
            f"layer(s) {', '.join(map(repr, missing))} did not run during the forward pass; "
            "explain a layer on the path from the input to the output"
        )
    return output


def _graph_ancestors(model: Any) -> set[int]:
    """Returns the ids of the layers the outputs of a Functional/Sequential ``model`` depend on.

    Walks the Keras graph backwards from ``model.outputs``, into nested Functional models through
    their own outputs. Empty for a model without a graph (subclassed).
    """
    try:
        outputs = list(model.outputs or [])
    except (AttributeError, ValueError):
        return set()
    seen: set[int] = set()
    pending = [getattr(t, "_keras_history", None) for t in outputs]
    operations = [h.operation for h in pending if h is not None]
    while operations:
        operation = operations.pop()
        if id(operation) in seen:
            continue
        seen.add(id(operation))
        if isinstance(operation, keras.Model) and operation is not model:
            seen |= _graph_ancestors(operation)
        for node in getattr(operation, "_inbound_nodes", None) or []:
            for tensor in node.input_tensors:
                history = getattr(tensor, "_keras_history", None)
                if history is not None:
                    operations.append(history.operation)
    return seen


def _has_graph(layer: Any) -> bool:
    try:
        return bool(getattr(layer, "outputs", None))
    except (AttributeError, ValueError):
        return False


def layer_records(
    model: Any, forward: Callable[[], Any], is_feature: Callable[[Any], bool]
) -> tuple[list[Any], dict[str, Any]]:
    """Returns what ``layer="auto"`` chooses from: every layer inside ``model``, in call order.

    ``forward()`` runs the model once (eagerly, or abstractly: only shapes are read) with every
    layer's ``call`` tapped; a layer is recorded when its call returns, so a nested model comes
    after its layers. Whether a layer reaches the output is read from the Keras graph: inside a
    Functional or Sequential model a layer must be an ancestor of its outputs; layers of a
    subclassed model inherit their parent's answer.

    Returns:
        ``(records, layers)``: ``anycam.protocol.layers.LayerRecord`` per layer that ran, and the layer
        object of every path.
    """
    from anycam.protocol.layers import LayerRecord

    paths = layer_paths(model)
    names: dict[int, str] = {}
    for path, layer in paths.items():  # canonical paths come before attribute aliases
        names.setdefault(id(layer), path)
    unique = list({id(layer): layer for layer in paths.values()}.values())
    index_names = [names[id(layer)] for layer in unique]
    order: list[int] = []
    calls: dict[int, int] = {}
    shapes: dict[int, tuple[int, ...] | None] = {}

    def tap(index: int, value: Any) -> Any:
        calls[index] = calls.get(index, 0) + 1
        if calls[index] == 1:
            order.append(index)
            shapes[index] = tuple(int(s) for s in value.shape) if is_feature(value) else None
        return value

    with Intercept(unique, index_names, tap, once=False) as intercept:
        forward()
    if intercept.errors:
        raise intercept.errors[0]

    graphs: dict[str, set[int] | None] = {"": _graph_ancestors(model) if _has_graph(model) else None}

    def reaches(path: str) -> bool:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent not in graphs:
            container = paths[parent]
            graphs[parent] = _graph_ancestors(container) if _has_graph(container) else None
        ancestors = graphs[parent]
        if ancestors is None:  # no graph to read: the parent's answer
            return True if parent == "" else reaches(parent)
        return id(paths[path]) in ancestors and (parent == "" or reaches(parent))

    default = keras.config.image_data_format()
    records = [
        LayerRecord(
            index_names[i],
            shapes[i],
            layout=data_format(unique[i]) or default,
            calls=calls[i],
            reaches_output=reaches(index_names[i]),
        )
        for i in order
    ]
    return records, paths


def layouts(layers: Sequence[Any]) -> tuple[str, ...]:
    """Returns each layer's output layout: its data_format, else the Keras default."""
    return tuple(data_format(layer) or keras.config.image_data_format() for layer in layers)


def input_layout(model: Any) -> str:
    """Returns the data_format of the model's first layer that has one, else the Keras default."""
    return outermost_format(model, last=False) or keras.config.image_data_format()


def input_spec(model: Any) -> tuple[tuple[Any, ...] | None, str]:
    """Returns the shape (``None`` for any size) and dtype of a one-input model's input.

    ``(None, floatx)`` where the model declares no inputs (subclassed) or several (their
    shapes are checked by Keras when it is called).
    """
    dtype = keras.config.floatx()
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError):
        return None, dtype
    if len(inputs) != 1:
        return None, dtype
    return tuple(inputs[0].shape), keras.backend.standardize_dtype(inputs[0].dtype)


# -- randomised copies (the sanity check) -------------------------------------------------

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
            raise ValueError(
                f"the weights of {where} differ in the copy: {signature(twin)} for "
                f"{signature(original)}"
            )
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
    return isinstance(model, keras.Sequential) or any(
        cls.__name__ == "Functional" for cls in type(model).__mro__
    )


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
        NotImplementedError: Keras cannot rebuild the model from its config.
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
    raise NotImplementedError(
        f"cannot copy the {type(model).__name__} model to randomise it ({'; '.join(failures)}). "
        "anycam copies Functional and Sequential models, and subclassed models that Keras can "
        "rebuild from get_config() (automatic when __init__ takes only numbers, strings, lists "
        "and dicts); give the model's class a get_config() (and from_config()) that rebuilds it"
    )


def all_layers(model: Any) -> list[Any]:
    found: list[Any] = []
    seen: set[int] = set()
    pending = sublayers(model)
    while pending:
        layer = pending.pop()
        if id(layer) not in seen:
            seen.add(id(layer))
            found.append(layer)
            pending.extend(sublayers(layer))
    return found


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
        raise NotImplementedError(
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
        NotImplementedError: ``model`` is not a Keras model.
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
        NotImplementedError: not a Keras model, or one Keras cannot rebuild from its config.
    """
    model = built_model(model, "randomise a copy of")
    chosen = [resolve_layer(model, layer) for layer in layers]
    for path, layer in chosen:
        if not own_weights(layer):
            inside = [p for p, _ in weight_owners(layer)]
            hint = f"; randomise its layers: {', '.join(repr(f'{path}/{p}') for p in inside)}"
            raise LayerError(
                f"layer {path!r} ({type(layer).__name__}) owns no weights to randomise"
                + (hint if inside else "")
            )
    duplicate, pairs = copy_model(model)
    for path, layer in chosen:
        reinitialise(pairs[id(layer)], path, seed)
    return duplicate, pairs


def resolve_spec(model: Any, layer: Any) -> tuple[str, Any, str]:
    """Returns ``(reported name, layer, port)`` for a layer spec (``"name:input"`` for its input).

    Raises:
        anycam.LayerError: the layer is not in the model, or ``"auto"`` is part of a list.
    """
    from anycam.protocol.layers import is_auto, parse_layer

    if is_auto(layer):
        raise LayerError("layer='auto' (or None) chooses one layer; it cannot be part of a list")
    spec = parse_layer(layer)
    path, found = resolve_layer(model, spec.layer)
    return spec.label(path), found, spec.port


# -- Ablation-CAM's pooled head ---------------------------------------------------------------

_L = keras.layers
_POOLINGS = {
    _L.GlobalAveragePooling1D: 1,
    _L.GlobalAveragePooling2D: 2,
    _L.GlobalAveragePooling3D: 3,
    _L.GlobalMaxPooling1D: 1,
    _L.GlobalMaxPooling2D: 2,
    _L.GlobalMaxPooling3D: 3,
}
# Identities at inference (training=False), the only mode anycam runs a model in.
_INFERENCE_IDENTITIES = (
    _L.Dropout,
    _L.SpatialDropout1D,
    _L.SpatialDropout2D,
    _L.SpatialDropout3D,
    _L.GaussianDropout,
    _L.GaussianNoise,
    _L.AlphaDropout,
    _L.Identity,
)
# Layers that compute each row of a batch from that row alone (exact types: a subclass may
# override call), so the tail can run B·N feature rows as one batch.
_PER_ROW = (
    *_INFERENCE_IDENTITIES,
    _L.Dense,
    _L.Activation,
    _L.Softmax,
    _L.ReLU,
    _L.LeakyReLU,
    _L.ELU,
    _L.PReLU,
    _L.Flatten,
    _L.Reshape,
    _L.BatchNormalization,
    _L.LayerNormalization,
)


@dataclasses.dataclass(frozen=True)
class PooledHead:
    """The network after an explained layer that only a global per-channel pooling reads.

    Attributes:
        pooling: the ``GlobalAveragePooling{1,2,3}D`` / ``GlobalMaxPooling{1,2,3}D`` layer.
        steps: the layers after the pooling, in order, up to the model output; each reads only
            the previous one's output and computes every row of a batch on its own.
        dense: the index in ``steps`` of a ``Dense`` layer that reads the pooled vector as
            ``(N, C)`` through shape-only steps (``Flatten``, ``Reshape``, dropout), or None.
    """

    pooling: Any
    steps: tuple[Any, ...]
    dense: int | None


def _own_call(layer: Any, base: type) -> bool:
    """Whether ``layer`` is a ``base`` whose ``call`` is ``base``'s own (not overridden)."""
    return isinstance(layer, base) and type(layer).call is base.call


def _functional_class(layer: Any) -> type | None:
    return next((cls for cls in type(layer).__mro__ if cls.__name__ == "Functional"), None)


def _graph_nodes(model: Any) -> list[Any]:
    return [node for nodes in model._nodes_by_depth.values() for node in nodes if not node.is_input]


def _single_call(node: Any, tensor: Any) -> bool:
    """Whether ``node`` calls its layer on ``tensor`` alone and has one output.

    Keyword arguments may only be None (a nested model's call records ``mask=None``), the
    defaults: ``Dropout()(x, training=True)`` would stay random at inference.
    """
    args, kwargs = node.arguments.args, node.arguments.kwargs
    defaults = all(value is None for value in kwargs.values())
    return len(args) == 1 and args[0] is tensor and defaults and len(node.outputs) == 1


def _contains(layer: Any, target: Any) -> bool:
    return any(inner is target for inner in all_layers(layer))


def _chain(layer: Any) -> list[Any] | None:
    """Returns what ``layer`` computes as a chain of per-row layers, input to output, or None."""
    if _own_call(layer, keras.Sequential):
        return _chains(layer.layers)
    functional = _functional_class(layer)
    if functional is not None:
        if type(layer).call is not functional.call or len(layer.inputs) != 1 or len(layer.outputs) != 1:
            return None
        return _walk(layer, layer.inputs[0])
    return [layer] if type(layer) in _PER_ROW or type(layer) in _POOLINGS else None


def _chains(layers: Sequence[Any]) -> list[Any] | None:
    steps: list[Any] = []
    for layer in layers:
        chain = _chain(layer)
        if chain is None:
            return None
        steps += chain
    return steps


def _walk(model: Any, tensor: Any) -> list[Any] | None:
    """Returns the chain from ``tensor`` to the single output of a Functional ``model``, or None
    where ``tensor`` (or a tensor after it) is read by several layers, or a layer reads more."""
    nodes = _graph_nodes(model)
    steps: list[Any] = []
    while True:
        # Functional graphs hold only the nodes that lead to an output (map_graph walks back
        # from the outputs), so a consumer here is one the output depends on.
        readers = [node for node in nodes if any(t is tensor for t in node.input_tensors)]
        if not readers:
            return steps if len(model.outputs) == 1 and tensor is model.outputs[0] else None
        if len(readers) != 1 or not _single_call(readers[0], tensor):
            return None
        chain = _chain(readers[0].operation)
        if chain is None:
            return None
        steps += chain
        tensor = readers[0].outputs[0]


def _after(model: Any, layer: Any) -> list[Any] | None:
    """Returns the chain from ``layer``'s output to ``model``'s output, where ``layer`` runs
    exactly once inside ``model`` (nested models included), or None."""
    if _own_call(model, keras.Sequential):
        inner = list(model.layers)
        holders = [i for i, step in enumerate(inner) if step is layer or _contains(step, layer)]
        if len(holders) != 1:
            return None
        index = holders[0]
        before = [] if inner[index] is layer else _after(inner[index], layer)
        rest = _chains(inner[index + 1 :])
        return None if before is None or rest is None else before + rest
    functional = _functional_class(model)
    if functional is None or type(model).call is not functional.call or len(model.outputs) != 1:
        return None
    holders = [n for n in _graph_nodes(model) if n.operation is layer or _contains(n.operation, layer)]
    if len(holders) != 1 or len(holders[0].outputs) != 1:
        return None
    node = holders[0]
    before = [] if node.operation is layer else _after(node.operation, layer)
    rest = _walk(model, node.outputs[0])
    return None if before is None or rest is None else before + rest


def pooled_head(model: Any, layer: Any, rank: int, channel_axis: int, *, head: bool = False) -> PooledHead | None:
    """Returns the network after ``layer`` as a :class:`PooledHead`, or None where it is not one.

    Only certain structures qualify: ``layer`` runs once in ``model`` (a Sequential or
    Functional model, nested ones included, none with its own ``call``), its output is read by
    exactly one layer, a global pooling over all the spatial axes of a rank-``rank`` output in
    the layout ``channel_axis`` gives, and every layer after it reads only the previous layer's
    output (no skip connection over the layer, no second input) and is a known per-row layer
    (``Dense``, activations, normalisations, dropout, ``Flatten``, ``Reshape``) computing in
    float32. ``head=True``: ``model`` is the head of a ``(features, head)`` pair and ``layer``
    is ignored: the chain starts at the head's input.
    """
    steps = _chain(model) if head else (None if layer is model else _after(model, layer))
    if not steps or _POOLINGS.get(type(steps[0])) != rank - 2:
        return None
    pooling, rest = steps[0], tuple(steps[1:])
    first = pooling.data_format == "channels_first"
    if (channel_axis % rank == 1) != first or rank < 3:
        return None
    floats = [pooling, *rest] if head else [layer, pooling, *rest]
    if any(getattr(step, "compute_dtype", None) != "float32" for step in floats):
        return None
    # Until the dense layer the pooled tensor keeps one axis of length C (size-1 axes besides),
    # so Flatten and Reshape keep the channel order whatever their data_format.
    width = rank if pooling.keepdims else 2
    dense = None
    for index, step in enumerate(rest):
        if isinstance(step, _INFERENCE_IDENTITIES):
            continue
        if type(step) is _L.Flatten:
            width = 2
        elif type(step) is _L.Reshape and sum(size != 1 for size in step.target_shape) <= 1:
            width = 1 + len(step.target_shape)
        elif type(step) is _L.Dense and width == 2 and _float_kernel(step):
            dense = index
            break
        else:
            break
    return PooledHead(pooling, rest, dense)


def _float_kernel(dense: Any) -> bool:
    return getattr(dense, "quantization_mode", None) is None and str(dense.kernel.dtype) == "float32"
