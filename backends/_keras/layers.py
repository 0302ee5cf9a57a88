"""Keras model structure: which framework Keras runs on, layer paths and lookup, layouts, the auto choice's records.

A layer is found by its name, its path through nested models (``"outer/inner"``), an attribute
name of a subclassed model, or the layer object; its layout is its ``data_format``, or that of
the nearest layer upstream that has one. ``layer_records`` runs the model once with every layer
intercepted, for ``layer="auto"``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import keras

from anycam._errors import BackendError, ConfigTypeError, LayerError
from anycam.protocol.layers import choose_layer, layer_not_found

from .intercept import Intercept

FORMATS = ("channels_first", "channels_last")


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
        ""
        if getattr(model, "built", True)
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
        missing = layer_not_found(layer, [*paths, *sorted(bare - set(paths))])
        raise LayerError(f"{missing}{unbuilt}")
    if isinstance(layer, keras.Layer):
        if layer is model:
            raise LayerError("the layer given is the model itself; explain one of its layers")
        for path, candidate in paths.items():
            if candidate is layer:
                return path, candidate
        raise LayerError(f"the {type(layer).__name__} {layer.name!r} given as layer is not part of the model")
    if layer is None:
        raise LayerError(
            "name the layer to explain: its name (e.g. 'conv5_block3_out'), its path in "
            "nested models ('resnet50/conv5_block3_out') or the layer object"
        )
    raise LayerError(f"a Keras layer is a layer name, a path or a layer object, got {type(layer).__name__}")


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


def before_last_attention(records: Sequence[Any], paths: dict[str, Any], batch: int) -> str | None:
    """The token rule (issue 22) on Keras: the layer holding the tokens the last attention reads.

    Among ``layer_records``' records (in the order the calls returned), the last layer that returned
    ``(N, T, C)`` tokens before the model's last ``keras.layers.MultiHeadAttention`` call started
    (its own sublayers excluded), that runs once and reaches the output. ``T`` is the attention's
    query length, which must equal its key length (self-attention over the whole sequence). None
    when the model has no such attention (a CNN; windowed attention, whose batch is N·windows):
    the general rule applies then.
    """
    calls = [i for i, r in enumerate(records) if isinstance(paths.get(r.name), keras.layers.MultiHeadAttention)]
    if not calls:
        return None
    last = records[calls[-1]]
    shape = last.shape
    if shape is None or len(shape) != 3 or shape[0] != batch:
        return None
    tokens = shape[1]
    inside = [i for i, r in enumerate(records) if r.name.startswith(last.name + "/")]
    keys = [r.shape for r in records if r.name == f"{last.name}/key"]  # (N, S, heads, head_dim)
    if keys and (keys[0] is None or len(keys[0]) < 2 or keys[0][1] != tokens):
        return None
    for record in reversed(records[: min([calls[-1], *inside])]):
        fits = record.shape is not None and len(record.shape) == 3 and record.shape[:2] == (batch, tokens)
        if fits and record.calls == 1 and record.reaches_output:
            return str(record.name)
    return None


def auto_choice(
    records: Sequence[Any], paths: dict[str, Any], batch: int, input_spatial: Sequence[int]
) -> tuple[str, str | None]:
    """The ``layer="auto"`` choice on every Keras backend: ``(layer path, token note)``.

    The token rule (``before_last_attention``) first; else ``choose_layer``'s general rule. The
    note is None for the general rule; when the token rule chose, the caller reads the layer as
    tokens and shows the note in the Explainer's repr.
    """
    token = before_last_attention(records, paths, batch)
    if token is None:
        return choose_layer(records, input_spatial), None
    note = (
        f"a token model: {token!r} holds the tokens the last attention reads (the last layer with them "
        "before it); the attention methods (rollout, attention-grad) need no layer"
    )
    return token, note


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
