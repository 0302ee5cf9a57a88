"""Randomised copies of a JAX model for ``anycam.sanity_check``, and the layers that own parameters.

``parameter_layers()`` lists the modules that own parameters directly, in definition order, or in
the order they run when given a batch; ``randomized(layers, seed)`` returns a backend over a copy
whose chosen layers have fresh values: a linen model from one ``module.init`` (the modules' own
initialisers), NNX and Equinox layers rebuilt from the constructor arguments they keep, the
leaves of a ``(features, head, params)`` dict redrawn from a Gaussian of their own mean and
spread. Weights are arguments of the compiled capture, so the copy reuses it.
"""

from __future__ import annotations

import copy
import functools
import inspect
import operator
import re
import sys
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from anycam._errors import InputError, LayerError, UnsupportedError, closest

from .models import _equinox_modules, _follow, _linen_children, _linen_paths, _Program, _resolve

if TYPE_CHECKING:
    from .backend import JaxBackend


def _natural(name: str) -> tuple[Any, ...]:
    """Returns a sort key that puts ``"Conv_2"`` before ``"Conv_10"``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _creation_order(names: list[str]) -> list[str]:
    """Returns a dict's keys in the order its entries were created, as far as the dict shows it.

    Flax and NNX create keys in definition order, but a tree that went through ``jax.tree_util``
    (``tree_map``, optax updates, a checkpoint restore) or NNX's split/merge comes back with
    sorted keys; those are put in natural order, so that ``"Conv_10"`` follows ``"Conv_9"``.
    """
    return sorted(names, key=_natural) if names == sorted(names) else names


def _layer_key(seed: int, name: str) -> jax.Array:
    # One key per layer, from its name: a layer's new values do not depend on which other
    # layers are randomised with it (the TensorFlow backend seeds the same way).
    return jax.random.key(zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF)


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def _rebuild(module: Any, name: str, key_argument: str, key: Any, family: str) -> Any:
    """Returns a new ``type(module)`` built from the constructor arguments ``module`` keeps.

    Equinox and NNX layers keep their configuration as attributes named like their
    ``__init__`` arguments (``in_features``, ``kernel_size``, ...): each argument is read from
    there, or left to its default, and ``key_argument`` gets the fresh random key. NNX layers
    do not keep the initialisers they were given, so theirs are the constructor's defaults.

    Raises:
        anycam.UnsupportedError: an argument without default is not kept, or the rebuild fails.
    """
    cls = type(module)
    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError) as exc:
        raise UnsupportedError(
            f"cannot re-initialise layer {name!r}: {cls.__name__}.__init__ has no signature"
        ) from exc
    kept = vars(module)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.name == key_argument:
            value = key
        elif parameter.name in kept:
            value = kept[parameter.name]
        elif parameter.default is not parameter.empty:
            value = parameter.default
        else:
            raise UnsupportedError(
                f"cannot re-initialise layer {name!r}: {cls.__name__}.__init__ takes {parameter.name!r}, which "
                f"the module does not keep as an attribute; randomise {family} layers that keep their "
                "constructor arguments (the built-in ones do), or pass layers= without this one"
            )
        if parameter.kind is parameter.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[parameter.name] = value
    try:
        return cls(*args, **kwargs)
    except Exception as exc:
        raise UnsupportedError(
            f"cannot re-initialise layer {name!r}: rebuilding {cls.__name__} from its attributes failed ({exc})"
        ) from exc


def _fresh_value(name: str, old: Any, new: Any) -> jax.Array:
    """Returns ``new`` in ``old``'s dtype, checking it is a new array of ``old``'s shape."""
    if not _is_array(new) or new.shape != old.shape:
        shape = getattr(new, "shape", type(new).__name__)
        raise UnsupportedError(
            f"cannot re-initialise layer {name!r}: rebuilt from its attributes it has a leaf of shape {shape} "
            f"where the model has {old.shape}"
        )
    if new is old:
        raise UnsupportedError(
            f"cannot re-initialise layer {name!r}: its constructor takes the arrays themselves, so a rebuild "
            "gives the same values; randomise layers whose constructor draws them"
        )
    return jnp.asarray(new, dtype=old.dtype)


# Flax linen: owners from the variables, one module.init for the fresh values.

_LINEN_STATE = ("params", "batch_stats")


def _linen_owners(module: Any, variables: Mapping[str, Any]) -> list[str]:
    """Returns the paths of the modules that own ``params`` or ``batch_stats`` leaves directly.

    Definition order: the submodules a module registers through fields and ``setup``, in that
    order, then the others (compact ones) in the variables' order, which is the order Flax
    created them unless the keys were sorted (see ``_creation_order``).
    """
    try:
        bound = module.bind(variables)
    except Exception:  # variables that do not bind: the variables' order alone
        bound = None
    owners: list[str] = []

    def walk(nodes: list[Mapping[str, Any]], bound: Any, path: tuple[str, ...]) -> None:
        if path and any(not isinstance(value, Mapping) for node in nodes for value in node.values()):
            owners.append("/".join(path))
        names = list(dict.fromkeys(k for node in nodes for k, v in node.items() if isinstance(v, Mapping)))
        registered = _linen_children(bound)
        ordered = [n for n in registered if n in names] + _creation_order([n for n in names if n not in registered])
        for name in ordered:
            children = [node[name] for node in nodes if isinstance(node.get(name), Mapping)]
            walk(children, registered.get(name), (*path, name))

    walk([variables[c] for c in _LINEN_STATE if isinstance(variables.get(c), Mapping)], bound, ())
    return owners


def _linen_calls(program: _Program, variables: Any, x: jax.Array) -> list[str]:
    """Returns the paths of the linen modules in the order their methods are first entered."""
    import flax.linen as nn

    entered: dict[str, None] = {}

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        entered.setdefault("/".join(context.module.path), None)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda params, xs: program.run(params, xs, None)[1], variables, x)
    return list(entered)


@functools.partial(jax.jit, static_argnums=(0,))
def _linen_init(program: _Program, key: jax.Array, x: jax.Array) -> Any:
    """Returns the ``params`` and ``batch_stats`` of a fresh ``module.init``, compiled once."""
    variables = program.structure.init({"params": key}, x, **program.kwargs)
    return {collection: variables[collection] for collection in _LINEN_STATE if collection in variables}


def _replace_own(tree: Mapping[str, Any], fresh: Mapping[str, Any], path: Sequence[str], name: str) -> dict[str, Any]:
    """Returns ``tree`` with the leaves directly at ``path`` taken from ``fresh``."""
    if path:
        return {**tree, path[0]: _replace_own(tree[path[0]], fresh[path[0]], path[1:], name)}
    return {k: v if isinstance(v, Mapping) else _fresh_value(name, v, fresh[k]) for k, v in tree.items()}


def _linen_randomized(
    program: _Program, source: tuple[Any, Any], chosen: list[str], seed: int, example: Any
) -> tuple[Any, dict[str, Any]]:
    """Returns (module, variables) with the chosen modules' leaves from ``module.init`` with key ``seed``."""
    module, variables = source
    if example is None:
        raise InputError(
            "randomising a Flax linen model runs module.init, which needs an input to run on; explain a batch "
            "first (explainer(x)), or call parameter_layers(x)"
        )
    shape, dtype = example
    sample = shape[1:] if program.vmap else (1, *shape[1:])
    fresh = _linen_init(program, jax.random.key(seed), jnp.zeros(sample, dtype))
    new = dict(variables)
    for name in chosen:
        path = name.split("/")
        for collection in _LINEN_STATE:
            tree = new.get(collection)
            if not isinstance(tree, Mapping) or not isinstance(_get(tree, path), Mapping):
                continue
            try:
                new[collection] = _replace_own(tree, fresh.get(collection, {}), path, name)
            except KeyError as exc:
                raise LayerError(
                    f"module.init creates no {collection} leaf {exc} for layer {name!r}, which the variables "
                    "have; were they made by this module?"
                ) from exc
    return module, new


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for part in path:
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


# Flax NNX: owners hold Param or BatchStat variables; layers rebuilt with nnx.Rngs.


def _nnx_names(model: Any) -> dict[int, tuple[str, tuple[Any, ...]]]:
    """Returns ``id(module) → (name, path)`` for the submodules, named as the backend names them."""
    from flax import nnx

    modules = sorted(
        ((path, module) for path, module in nnx.iter_modules(model) if path),
        key=lambda item: tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in item[0]),
    )
    return {id(module): (".".join(map(str, path)), tuple(path)) for path, module in reversed(modules)}


def _nnx_in_order(model: Any) -> list[Any]:
    """Returns every submodule once, depth first, attributes in assignment order."""
    from flax import nnx

    seen = {id(model)}
    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, nnx.Module):
            attributes = vars(node)
            children = [attributes[k] for k in _creation_order([k for k in attributes if not k.startswith("_")])]
        elif isinstance(node, (list, tuple)):
            children = list(node)
        elif isinstance(node, dict):
            children = list(node.values())
        else:
            return
        for child in children:
            if isinstance(child, nnx.Module):
                if id(child) in seen:
                    continue
                seen.add(id(child))
                found.append(child)
            visit(child)

    visit(model)
    return found


def _nnx_owns(module: Any) -> list[str]:
    from flax import nnx

    return [k for k, v in vars(module).items() if isinstance(v, (nnx.Param, nnx.BatchStat))]


def _nnx_layers(model: Any) -> tuple[dict[str, tuple[Any, ...]], list[str]]:
    names = _nnx_names(model)
    owners = {names[id(m)][0]: names[id(m)][1] for m in _nnx_in_order(model) if id(m) in names and _nnx_owns(m)}
    return owners, [name for name, _ in names.values()]


def _record_nnx(module: Any, name: str, entered: dict[str, None]) -> None:
    """Gives one module of a private copy a ``__call__`` that notes when it first runs."""
    base = type(module)
    if not any("__call__" in vars(cls) for cls in base.__mro__[:-1]):
        return

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        entered.setdefault(name, None)
        return base.__call__(self, *args, **kwargs)

    module.__class__ = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__})


def _nnx_calls(model: Any, program: _Program, x: jax.Array) -> list[str]:
    """Returns the names of the NNX modules in the order they are first called on ``x``."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    entered: dict[str, None] = {}

    def run(state: Any, xs: jax.Array) -> None:
        def call(sample: jax.Array) -> None:
            private = nnx.merge(graphdef, state)
            private.eval()
            for name, path in _nnx_names(private).values():
                _record_nnx(_follow(private, path), name, entered)
            private(sample, **program.kwargs)

        jax.vmap(call)(xs) if program.vmap else call(xs)

    jax.eval_shape(run, state, x)
    return list(entered)


def _nnx_randomized(model: Any, chosen: list[tuple[str, tuple[Any, ...]]], seed: int) -> Any:
    """Returns a clone of ``model`` whose chosen modules have the variables of rebuilt twins."""
    from flax import nnx

    clone = nnx.clone(model)
    for name, path in chosen:
        module = _follow(clone, path)
        twin = _rebuild(module, name, "rngs", nnx.Rngs(_layer_key(seed, name)), "Flax NNX")
        for attribute in _nnx_owns(module):
            variable, fresh = getattr(module, attribute), vars(twin).get(attribute)
            if not isinstance(fresh, nnx.Variable):
                raise UnsupportedError(f"cannot re-initialise layer {name!r}: rebuilt, it has no {attribute!r}")
            variable.set_value(_fresh_value(name, variable.get_value(), fresh.get_value()))
    return clone


# Equinox: owners hold array leaves outside submodules; layers rebuilt with a key.


def _equinox_split(module: Any) -> tuple[list[Any], Any]:
    """Flattens ``module`` down to its own leaves: its submodules stay whole, as single leaves."""
    import equinox as eqx

    return jax.tree_util.tree_flatten(module, is_leaf=lambda n: n is not module and isinstance(n, eqx.Module))


def _equinox_layers(model: Any) -> tuple[dict[str, tuple[Any, ...]], list[str]]:
    modules = list(_equinox_modules(model))
    owners = {
        ".".join(map(str, path)): path for path, module in modules if any(map(_is_array, _equinox_split(module)[0]))
    }
    return owners, [".".join(map(str, path)) for path, _ in modules]


def _equinox_randomized(model: Any, chosen: list[tuple[str, tuple[Any, ...]]], seed: int) -> Any:
    """Returns ``model`` with the chosen modules' own arrays taken from rebuilt twins."""
    import equinox as eqx

    for name, path in chosen:
        module = _follow(model, path)
        twin = _rebuild(module, name, "key", _layer_key(seed, name), "Equinox")
        leaves, treedef = _equinox_split(module)
        fresh, fresh_treedef = _equinox_split(twin)
        if fresh_treedef != treedef:
            raise UnsupportedError(f"cannot re-initialise layer {name!r}: rebuilt, it has another structure")
        leaves = [
            _fresh_value(name, old, new) if _is_array(old) else old for old, new in zip(leaves, fresh, strict=True)
        ]
        where = functools.partial(_follow, path=path)
        model = eqx.tree_at(where, model, jax.tree_util.tree_unflatten(treedef, leaves))
    return model


# (features, head, params): the keys of a dict of parameters.


def _function_params(source: tuple[Any, ...]) -> Mapping[Any, Any]:
    params = source[2] if len(source) == 3 else None
    if not isinstance(params, Mapping) or not params:
        raise UnsupportedError(
            "a (features, head) pair is plain functions: anycam can neither find nor re-initialise its "
            "parameters; pass (features, head, params) with params a dict of layers, e.g. {'conv': ..., 'fc': ...}"
        )
    return params


def _function_layers(source: tuple[Any, ...]) -> tuple[dict[str, tuple[Any, ...]], list[str]]:
    params = _function_params(source)
    owners = {str(k): (k,) for k, v in params.items() if any(map(_is_array, jax.tree_util.tree_leaves(v)))}
    return owners, list(owners)


def _function_randomized(source: tuple[Any, ...], chosen: list[tuple[str, tuple[Any, ...]]], seed: int) -> Any:
    """Returns the triple with the chosen entries' float leaves redrawn as N(mean, std) of each leaf.

    Plain functions name no initialiser; a Gaussian with the leaf's own mean and spread keeps
    its scale whatever its layout (a kernel's fan-in axis is not known here).
    """
    features, head, params = source
    new = dict(params)
    for name, (key,) in chosen:
        leaves, treedef = jax.tree_util.tree_flatten(params[key])
        keys = jax.random.split(_layer_key(seed, name), max(len(leaves), 1))
        drawn = [
            jnp.mean(leaf) + jnp.std(leaf) * jax.random.normal(k, jnp.shape(leaf), jnp.result_type(leaf))
            if _is_array(leaf) and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
            else leaf
            for leaf, k in zip(leaves, keys, strict=False)
        ]
        new[key] = jax.tree_util.tree_unflatten(treedef, drawn)
    return features, head, new


# -- the verbs: parameter_layers and randomized --------------------------------------------------


def parameter_owners(backend: JaxBackend) -> tuple[dict[str, tuple[Any, ...]], list[str]]:
    """Returns the layers that own parameters (name → path, definition order) and all module names."""
    family, source = backend._model.family, backend._model.source
    if family == "linen":
        owners = _linen_owners(*source)
        return {name: tuple(name.split("/")) for name in owners}, list(_linen_paths(source[1]))
    if family == "nnx":
        return _nnx_layers(source)
    if family == "equinox":
        return _equinox_layers(source)
    return _function_layers(source)


def parameter_layers(backend: JaxBackend, inputs: Any = None) -> tuple[str, ...]:
    """Returns the layers that own parameters directly, from the input to the output.

    Owning means holding linen ``params`` / ``batch_stats`` leaves, NNX ``Param`` /
    ``BatchStat`` variables or Equinox array fields itself, not through submodules; names
    are as layers are addressed. Without ``inputs`` the order is definition order (linen
    fields and ``setup``, NNX attribute assignments, Equinox field declarations; compact
    linen submodules as Flax created them, which variables that went through
    ``jax.tree_util`` no longer show, their keys being sorted). With ``inputs``, a batch,
    Flax modules come in the order they run on it, from one abstract trace (no compute);
    modules that run through other methods than ``__call__`` (NNX) or not at all follow in
    definition order. A ``(features, head, params)`` triple lists the keys of a dict
    ``params`` in its order.

    Raises:
        anycam.UnsupportedError: for a (features, head) pair without a dict of parameters.
    """
    owners = list(parameter_owners(backend)[0])
    family = backend._model.family
    if inputs is None or family not in ("linen", "nnx"):
        return tuple(owners)
    x = backend._as_input(inputs)
    backend._example = (tuple(x.shape), x.dtype)
    program, params = backend._model.snapshot()
    calls = _linen_calls(program, params, x) if family == "linen" else _nnx_calls(backend._model.source, program, x)
    ran = [name for name in calls if name in owners]
    return (*ran, *(name for name in owners if name not in ran))


def owner(backend: JaxBackend, layer: Any, owners: Mapping[str, Any], modules: Sequence[str]) -> str:
    """Returns the owner name ``layer`` means, or raises LayerError naming what fits."""
    family = backend._model.family
    sep = "/" if family == "linen" else "."
    if isinstance(layer, tuple):
        layer = sep.join(map(str, layer))
    name = str(layer)
    if (
        family == "equinox"
        and name.isdigit()
        and isinstance(backend._model.source, sys.modules["equinox"].nn.Sequential)
    ):
        name = f"layers.{name}"
    for candidate in (name, name.replace("/", sep).replace(".", sep)):
        if candidate in owners:
            return candidate
        if candidate in modules:
            inside = [owner for owner in owners if owner.startswith(candidate + sep)]
            hint = f"; randomise its layers: {', '.join(map(repr, inside))}" if inside else ""
            raise LayerError(f"layer {candidate!r} owns no parameters to randomise{hint}")
    raise LayerError(f"layer {name!r} not found among the layers with parameters{closest(name, list(owners))}")


def randomized(backend: JaxBackend, layers: Sequence[str], seed: int = 0) -> JaxBackend:
    """Returns a backend over a copy of the model whose ``layers`` have fresh parameters.

    * Flax linen: the chosen modules' ``params`` and ``batch_stats`` leaves come from one
      ``module.init`` with ``jax.random.key(seed)``: every module's own initialisers, the
      variables of the other modules untouched. The init runs on the shape of the last
      explained batch (compiled once, then one call per copy).
    * Flax NNX and Equinox: each chosen layer is rebuilt from the constructor arguments it
      keeps as attributes (NNX with ``nnx.Rngs``, Equinox with ``key=``), seeded by ``seed``
      and its name, and its own variables / arrays are taken from the rebuilt twin; NNX
      modules keep no initialisers, so theirs are the constructor defaults.
    * ``(features, head, params)`` with a dict ``params``: the float leaves of the chosen
      entries are drawn from a Gaussian with each leaf's own mean and standard deviation.

    The model is only read: the copy is a new variables dict, an ``nnx.clone`` or a new
    Equinox pytree. It explains the same layers with the same options, and as weights are
    arguments of the compiled capture, it reuses it.

    Raises:
        anycam.LayerError: a layer is unknown or owns no parameters itself.
        anycam.InputError: a linen model has explained no batch yet (init needs an input).
        anycam.UnsupportedError: a (features, head) pair without a dict of parameters, or a
            layer that cannot be rebuilt from its attributes.
    """
    seed = operator.index(seed)
    owners, modules = parameter_owners(backend)
    chosen = [
        (name, owners[name]) for name in dict.fromkeys(owner(backend, layer, owners, modules) for layer in layers)
    ]
    family, source = backend._model.family, backend._model.source
    if family == "linen":
        program, _ = backend._model.snapshot()
        model = _linen_randomized(program, source, [name for name, _ in chosen], seed, backend._example)
    elif family == "nnx":
        model = _nnx_randomized(source, chosen, seed)
    elif family == "equinox":
        model = _equinox_randomized(source, chosen, seed)
    else:
        model = _function_randomized(source, chosen, seed)
    clone = copy.copy(backend)
    clone._model = _resolve(model, list(backend.layer_names), backend._options, backend.output)
    return clone
