"""The four JAX model families, each resolved to one *program*: Flax linen, Flax NNX, Equinox, functions.

A program says, statically, how to run one family with the explained layers' outputs exposed:
Flax linen through ``nn.intercept_methods``, Flax NNX through a private copy (unflattened inside
the trace) whose target modules get a tapped ``__call__``, Equinox through ``eqx.tree_at`` (or by
slicing an ``eqx.nn.Sequential``), a ``(features, head)`` pair as given. Programs are the static
argument of every compiled function, so they compare equal by model structure, layers and
options; the weights are arguments, never constants. The user's model is never changed.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from anycam._errors import BackendError, ConfigTypeError, LayerError
from anycam.protocol.backend import select_output
from anycam.protocol.layers import is_auto, parse_layer

from .inputs import _call_model, _one_input
from .layers import _first_input, _labels, _pick, _Taps

ACCEPTED = (
    "a Flax linen (module, variables) pair or bound module, a Flax NNX module, an Equinox "
    "module, or a (features, head) or (features, head, params) tuple of functions"
)


# -- cache keys: a program compares by structure, an unhashable part by identity ---------------


class _Identity:
    """Compares by identity: the cache key of a value that cannot be hashed."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value


def _is_hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return ("mapping", tuple((key, _hashable(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_hashable(item) for item in value))
    return value if _is_hashable(value) else _Identity(value)


# -- programs: the static half of a capture ------------------------------------------------------


class _Program:
    """How to run one model family with its explained layers tapped; a jit static argument.

    Equal programs share compiled code, so equality is by model *structure* (module
    definition, NNX graphdef, Equinox static part, function identity), layers and options.
    """

    def __init__(
        self,
        structure: Any,
        paths: tuple[Any, ...],
        names: tuple[str, ...],
        *,
        output: Any,
        vmap: bool,
        kwargs: Mapping[str, Any],
        key: Any = None,
        ports: tuple[str, ...] = (),
    ) -> None:
        self.structure = structure
        self.paths = paths
        self.names = names
        # "output" or "input" per layer: "name:input" taps what flows into the module.
        self.ports = tuple(ports) or ("output",) * len(names)
        self.output = output
        self.vmap = vmap
        self.kwargs = dict(kwargs)
        structure_key = _hashable(structure) if key is None else key
        self._key = (type(self), structure_key, paths, self.ports, _hashable(output), vmap, _hashable(self.kwargs))
        self._hash = hash(self._key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Program) and self._key == other._key

    def call(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        """Runs the model once on ``x`` (a batch, or one sample under vmap)."""
        raise NotImplementedError

    def run(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        """Returns (selected output, activations) for a batch; deltas None adds nothing."""
        if self.vmap:
            output, activations = jax.vmap(functools.partial(self.call, params))(x, deltas)
        else:
            output, activations = self.call(params, x, deltas)
        return select_output(output, self.output), activations


def _follow(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        if isinstance(part, int) or isinstance(node, Mapping):
            node = node[part]
        else:
            node = getattr(node, part)
    return node


class _FunctionsProgram(_Program):
    """A ``(features, head)`` or ``(features, head, params)`` split given by the user."""

    def call(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        features, head, with_params = self.structure
        taps = _Taps(self.names, deltas)
        args = (params,) if with_params else ()
        _one_input(x, "a (features, head) pair")
        activations = taps(0, features(*args, x))
        return head(*args, activations), taps.activations()


class _LinenProgram(_Program):
    """A Flax linen module; the layers' ``__call__`` outputs are intercepted by module path."""

    def call(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        import flax.errors
        import flax.linen as nn

        taps = _Taps(self.names, deltas)
        index = {path: i for i, path in enumerate(self.paths)}

        def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
            found = index.get(context.module.path) if context.method_name == "__call__" else None
            if found is not None and self.ports[found] == "input":
                args = (taps(found, _first_input(self.names[found], args)), *args[1:])
                return next_fun(*args, **kwargs)
            out = next_fun(*args, **kwargs)
            if found is not None:
                out = taps(found, out)
            return out

        try:
            with nn.intercept_methods(interceptor):
                output = _call_model(functools.partial(self.structure.apply, params), x, self.kwargs)
        except flax.errors.ModifyScopeVariableError as exc:
            raise BackendError(
                f"the Flax model tried to update a variable ({exc}); it runs in training mode, "
                "where BatchNorm mixes the samples of a batch. Run it in inference mode: pass the "
                "argument your model takes, e.g. model_kwargs={'train': False}, or build BatchNorm "
                "with use_running_average=True"
            ) from exc
        except flax.errors.InvalidRngError as exc:
            raise BackendError(
                f"the Flax model asked for a random key ({exc}); Dropout runs in training mode. "
                "Run it in inference mode, e.g. model_kwargs={'train': False} (deterministic=True)"
            ) from exc
        return output, taps.activations()


class _NnxProgram(_Program):
    """A Flax NNX module, rebuilt privately inside the trace; targets get a tapped ``__call__``.

    ``structure`` is a pytree treedef (NNX modules are pytrees; flattening is ~10× cheaper
    than ``nnx.split``) or, for modules that share submodules or are not pytrees, a graphdef.
    """

    def call(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        from flax import nnx

        if isinstance(self.structure, nnx.GraphDef):
            model = nnx.merge(self.structure, params)
        else:
            model = jax.tree_util.tree_unflatten(self.structure, params)
        model.eval()
        taps = _Taps(self.names, deltas)
        for index, path in enumerate(self.paths):
            _tap_nnx(_follow(model, path), index, taps, self.ports[index])
        return _call_model(model, x, self.kwargs), taps.activations()


def _tap_nnx(module: Any, index: int, taps: _Taps, port: str = "output") -> None:
    """Gives one module of a private copy a ``__call__`` that reports its output (or input) to ``taps``."""
    base = type(module)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if port == "input":
            args = (taps(index, _first_input(taps.names[index], args)), *args[1:])
            return base.__call__(self, *args, **kwargs)
        return taps(index, base.__call__(self, *args, **kwargs))

    module.__class__ = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__})


@functools.cache
def _equinox_tap() -> type:
    import equinox as eqx

    class Tap(eqx.Module):
        """Stands in for an explained Equinox module: reports its ``__call__`` output (or input).

        Every other attribute reads through to the module: its fields and arrays as they are,
        its methods and properties bound to the tap, so a model that calls
        ``self.block.logits(x)`` runs the block's own method, and a method that calls
        ``self(x)`` is seen by the tap. The fields have anycam's prefix so that they shadow
        none of the module's own names.
        """

        _anycam_inner: Any
        _anycam_index: int = eqx.field(static=True)
        _anycam_taps: Any = eqx.field(static=True)
        _anycam_port: str = eqx.field(static=True, default="output")

        def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
            if self._anycam_port == "input":
                return self._anycam_inner(self._anycam_taps(self._anycam_index, x), *args, **kwargs)
            return self._anycam_taps(self._anycam_index, self._anycam_inner(x, *args, **kwargs))

        def __getattr__(self, name: str) -> Any:
            # Only called for what the tap itself lacks. Dunders stay the tap's own: copying,
            # pickling and dataclass machinery must not see through it.
            if (name.startswith("__") and name.endswith("__")) or name.startswith("_anycam_"):
                raise AttributeError(name)
            inner = object.__getattribute__(self, "_anycam_inner")
            if name in getattr(inner, "__dict__", {}):
                return getattr(inner, name)
            found = inspect.getattr_static(type(inner), name, _MISSING)
            if found is _MISSING:
                return getattr(inner, name)  # the module's own __getattr__, or its AttributeError
            if hasattr(found, "__get__"):
                return found.__get__(self, type(inner))
            return found

    return Tap


_MISSING = object()


class _EquinoxProgram(_Program):
    """An Equinox module; the layers are wrapped with ``eqx.tree_at`` in a private copy."""

    def call(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        import equinox as eqx

        model = eqx.nn.inference_mode(eqx.combine(params, self.structure))
        taps = _Taps(self.names, deltas)
        tap = _equinox_tap()
        # Deepest first: wrapping a module leaves the paths of the modules around it unchanged,
        # so a block and a layer inside it can both be tapped.
        for index in sorted(range(len(self.paths)), key=lambda i: -len(self.paths[i])):
            path = self.paths[index]
            wrapped = tap(_follow(model, path), index, taps, self.ports[index])
            model = eqx.tree_at(functools.partial(_follow, path=path), model, wrapped)
        return _call_model(model, x, self.kwargs), taps.activations()


class _SequentialProgram(_Program):
    """An ``eqx.nn.Sequential`` sliced after the explained layer: ``head(features(x))``."""

    def call(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        import equinox as eqx

        model = eqx.nn.inference_mode(eqx.combine(params, self.structure))
        _one_input(x, "an eqx.nn.Sequential")
        cut = self.paths[0][-1] + (0 if self.ports[0] == "input" else 1)
        taps = _Taps(self.names, deltas)
        activations = taps(0, model[:cut](x, **self.kwargs))
        return model[cut:](activations, **self.kwargs), taps.activations()


# -- model forms ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Model:
    """A resolved model: layer names, default layout, and its (program, params) for a call.

    ``family`` (``"linen"``, ``"nnx"``, ``"equinox"``, ``"functions"``) and ``source`` (the model
    in a form ``_resolve`` takes) are what a randomised copy starts from.
    """

    names: tuple[str, ...]
    layout: str
    snapshot: Callable[[], tuple[_Program, Any]]
    family: str = ""
    source: Any = None
    # Whether the family's convention decides ``layout``: Flax works on the last axis; an Equinox
    # convolution or pooling takes ``(C, *spatial)``. A model of neither (an Equinox sequence model
    # of Linear layers, a pair of functions) only has a default, which must not pick silently
    # between two readings the shapes both allow.
    decided: bool = True


def _linen_paths(variables: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()

    def walk(tree: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                found.add((*path, key))
                walk(value, (*path, key))

    for collection in variables.values():
        if isinstance(collection, Mapping):
            walk(collection, ())
    return {"/".join(p): p for p in sorted(found)}


def _linen_children(bound: Any) -> dict[str, Any]:
    """Returns the submodules a bound linen module registers (fields, then ``setup``), in order.

    Compact submodules exist only while a method runs, so they are not among them.
    """
    import flax.linen as nn

    if bound is None:
        return {}
    try:
        bound._try_setup()
        children = bound._state.children
    except Exception:  # a setup that cannot run outside apply: the variables' order stands
        return {}
    return {name: child for name, child in children.items() if isinstance(child, nn.Module)}


def _linen_setup_paths(module: Any, variables: Any) -> list[tuple[str, ...]]:
    """Returns the paths of the submodules registered in ``setup`` or as fields, recursively.

    These include modules without variables (an activation or pooling module), which the
    variables do not show; compact submodules exist only while the model runs, so only those
    with variables can be named.
    """
    try:
        bound = module.bind(variables)
    except Exception:  # variables that do not bind: the variables' paths alone
        return []
    found: list[tuple[str, ...]] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        for name, child in _linen_children(node).items():
            found.append((*path, name))
            walk(child, (*path, name))

    walk(bound, ())
    return found


def _linen(module: Any, variables: Any, layers: Sequence[Any], common: dict[str, Any]) -> _Model:
    if not isinstance(variables, Mapping):
        raise BackendError(
            "a Flax linen model is (module, variables), variables being what module.init returns; "
            f"got {type(variables).__name__} as variables"
        )
    if variables and "params" not in variables:
        raise BackendError(
            "the variables of a Flax linen model are a dict of collections, {'params': ..., "
            f"'batch_stats': ...}}; got one with keys {list(variables)[:5]}. If these are the "
            "parameters, pass (module, {'params': params})"
        )
    if common["kwargs"].get("mutable"):
        # apply(..., mutable=...) would return (output, updated variables): BatchNorm in training
        # mode, whose batch statistics mix the samples (and the masked or ablated copies) of a batch.
        raise ConfigTypeError(
            f"model_kwargs={{'mutable': {common['kwargs']['mutable']!r}}} asks Flax to update the model's "
            "variables; anycam runs the model in inference mode and never changes its variables. Drop "
            "'mutable' and pass the model's inference argument, e.g. model_kwargs={'train': False}"
        )
    paths = _linen_paths(variables)
    for path in _linen_setup_paths(module, variables):
        paths.setdefault("/".join(path), path)
    names = tuple(_pick(layer, paths, {}, "Flax linen", "/") for layer in layers)
    labels = _labels(names, common)
    program = _LinenProgram(module, tuple(paths[n] for n in names), labels, **common)
    return _Model(labels, "channels_last", lambda: (program, variables), "linen", (module, variables))


def _nnx(model: Any, layers: Sequence[Any], common: dict[str, Any]) -> _Model:
    from flax import nnx

    modules = sorted(
        ((path, module) for path, module in nnx.iter_modules(model) if path),
        key=lambda item: tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in item[0]),
    )
    paths = {".".join(map(str, path)): tuple(path) for path, _ in modules}
    objects = {id(module): ".".join(map(str, path)) for path, module in reversed(modules)}
    chosen = tuple(paths[_pick(layer, paths, objects, "Flax NNX", ".")] for layer in layers)
    names = _labels(tuple(".".join(map(str, path)) for path in chosen), common)

    leaves, treedef = jax.tree_util.tree_flatten(model)
    # Tree mode copies a shared submodule, so its tap would see one of its calls only.
    tree_mode = len(leaves) == len(jax.tree_util.tree_leaves(nnx.state(model))) and _is_hashable(treedef)

    def snapshot() -> tuple[_Program, Any]:
        # Flattened per call: NNX modules are updated in place (optimiser steps), and an
        # unchanged structure flattens to an equal treedef, so the compiled capture is reused.
        if tree_mode:
            leaves, treedef = jax.tree_util.tree_flatten(model)
            return _NnxProgram(treedef, chosen, names, **common), leaves
        graphdef, state = nnx.split(model)
        return _NnxProgram(graphdef, chosen, names, **common), state

    return _Model(names, "channels_last", snapshot, "nnx", model)


def _equinox_modules(node: Any, path: tuple[Any, ...] = ()) -> Any:
    import equinox as eqx

    if isinstance(node, eqx.Module):
        if path:
            yield path, node
        for field in dataclasses.fields(node):
            yield from _equinox_modules(getattr(node, field.name, None), (*path, field.name))
    elif isinstance(node, (list, tuple)):
        for index, item in enumerate(node):
            yield from _equinox_modules(item, (*path, index))
    elif isinstance(node, dict):
        for key, item in node.items():
            yield from _equinox_modules(item, (*path, key))


def _equinox(model: Any, layers: Sequence[Any], common: dict[str, Any]) -> _Model:
    import equinox as eqx

    modules = list(_equinox_modules(model))
    paths = {".".join(map(str, path)): tuple(path) for path, _ in modules}
    objects = {id(module): ".".join(map(str, path)) for path, module in reversed(modules)}
    sequential = isinstance(model, eqx.nn.Sequential)
    if sequential:  # layer=3 or "3" means model.layers[3]
        paths.update({str(i): ("layers", i) for i in range(len(model.layers))})
    names = tuple(_pick(layer, paths, objects, "Equinox", ".") for layer in layers)
    chosen = tuple(paths[n] for n in names)
    names = _labels(tuple(".".join(map(str, path)) for path in chosen), common)
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten(static)
    key = _hashable((treedef, tuple(leaves)))
    sliced = sequential and len(chosen) == 1 and len(chosen[0]) == 2
    program = (_SequentialProgram if sliced else _EquinoxProgram)(static, chosen, names, key=key, **common)
    channels_first = (eqx.nn.Conv, eqx.nn.ConvTranspose, eqx.nn.Pool, eqx.nn.AdaptivePool)
    decided = isinstance(model, channels_first) or any(isinstance(m, channels_first) for _, m in modules)
    return _Model(names, "channels_first", lambda: (program, params), "equinox", model, decided)


def _functions(model: Sequence[Any], layers: Sequence[Any], common: dict[str, Any]) -> _Model:
    features, head, *rest = model
    if len(layers) != 1 or layers[0] not in (None, "features"):
        raise LayerError("a (features, head) pair is already cut at its layer, the output of features; pass layer=None")
    if common["kwargs"]:
        raise ConfigTypeError(
            "model_kwargs does not apply to a (features, head) pair; bind arguments with functools.partial"
        )
    program = _FunctionsProgram((features, head, bool(rest)), ((),), ("features",), **common)
    params = rest[0] if rest else None
    return _Model(("features",), "channels_first", lambda: (program, params), "functions", tuple(model), False)


def _all_layers(model: Any) -> list[str] | None:
    """Returns every module name of a Flax or Equinox model (``layer="auto"`` chooses among them).

    None for a ``(features, head)`` pair, which is already cut at its layer.
    """
    linen = sys.modules.get("flax.linen")
    nnx = sys.modules.get("flax.nnx")
    equinox = sys.modules.get("equinox")
    if linen is not None:
        pair = isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], linen.Module)
        if pair or (isinstance(model, linen.Module) and model.scope is not None):
            module, variables = model if pair else model.unbind()
            if not isinstance(variables, Mapping):
                return None
            paths = {"/".join(path) for path in _linen_setup_paths(module, variables)}
            return sorted(set(_linen_paths(variables)) | paths)
    if nnx is not None and isinstance(model, nnx.Module):
        return [".".join(map(str, path)) for path, _ in nnx.iter_modules(model) if path]
    if equinox is not None and isinstance(model, equinox.Module):
        return [".".join(map(str, path)) for path, _ in _equinox_modules(model)]
    return None


def _resolve(model: Any, layers: Sequence[Any], options: dict[str, Any], output: Any) -> _Model:
    linen = sys.modules.get("flax.linen")
    nnx = sys.modules.get("flax.nnx")
    equinox = sys.modules.get("equinox")
    kwargs = options.get("model_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigTypeError(f"model_kwargs must be a dict of keyword arguments, got {type(kwargs).__name__}")
    is_equinox = equinox is not None and isinstance(model, equinox.Module)
    vmap = bool(options.get("vmap", is_equinox))
    common: dict[str, Any] = {"output": output, "vmap": vmap, "kwargs": kwargs}
    if isinstance(model, (tuple, list)) and len(model) in (2, 3) and all(map(callable, model[:2])):
        if not (linen is not None and isinstance(model[0], linen.Module)):
            return _functions(model, [None if is_auto(layer) else layer for layer in layers], common)
    if any(is_auto(layer) for layer in layers) and len(layers) > 1:
        raise LayerError("layer='auto' (or None) chooses one layer; it cannot be part of a list")
    specs = [parse_layer(layer) for layer in layers]
    common["ports"] = tuple(spec.port for spec in specs)
    layers = [spec.layer for spec in specs]
    if linen is not None:
        if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], linen.Module):
            return _linen(model[0], model[1], layers, common)
        if isinstance(model, linen.Module):
            if model.scope is None:
                raise BackendError(
                    f"the Flax linen {type(model).__name__} is unbound and has no variables; "
                    "pass (module, variables) or module.bind(variables)"
                )
            module, variables = model.unbind()
            return _linen(module, variables, layers, common)
    if nnx is not None and isinstance(model, nnx.Module):
        return _nnx(model, layers, common)
    if is_equinox:
        return _equinox(model, layers, common)
    if isinstance(model, (tuple, list)) and len(model) in (2, 3) and all(map(callable, model[:2])):
        return _functions(model, layers, common)
    raise BackendError(
        f"the jax backend does not recognise a {type(model).__module__}.{type(model).__qualname__}; "
        f"it accepts {ACCEPTED}"
    )
