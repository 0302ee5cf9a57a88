"""A pure explanation function: capture + core as one traceable function of (weights, inputs, target).

``explain_fn(model, layer, method=...)`` returns an :class:`ExplainFn`, ``f(weights, inputs,
target=None) -> heatmaps``. Everything in it is JAX: the capture (``jax.vjp`` of the model with
the layer's output tapped, see ``models``) and the core's formulas on JAX arrays (the core picks
the arrays' own namespace, see ``anycam.core._namespace``). So ``f`` runs under ``jax.jit``,
``jax.vmap`` and ``jax.grad``, and sits inside a user's jitted training or evaluation step; the
weights are an argument, never a constant, so new weights of the same shapes reuse the compiled
code and never give a stale map.

What ``weights`` is, per model family (``f.weights`` holds the model's own, in that form):

* Flax linen: the variables, ``{"params": ..., "batch_stats": ...}``.
* Flax NNX: the state, ``nnx.state(model)`` (what ``nnx.split(model)[1]`` is), or a tuple of
  states from ``nnx.split(model, nnx.Param, ...)``, or a module of the same structure.
* Equinox: the array leaves, ``eqx.partition(model, eqx.is_array)[0]``, or a model of the same
  structure (under ``eqx.filter_jit``).
* ``(features, head, params)``: the params (None for a closed-over pair).

Differences from the Explainer, because nothing inside a trace can stop on a value: no NaN/inf
check (a NaN in the activations or gradients gives NaN in the map, never a plausible map: ReLU
keeps NaN), no zero-map warning, no ``layer="auto"`` (name the layer), one input array.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import anycam.core as core
from anycam._errors import AnycamError, BackendError, ConfigError, InputError, LayerError, TargetError

from .capture import _callable_scores, _class_outputs, layouts_decided
from .models import _NnxProgram, _Program


class Parts(NamedTuple):
    """Everything one call computes (a pytree): heatmap, per-layer cams and weights, scores, classes.

    Shapes as the Explainer's: ``(N, *S)`` for one target per sample, ``(N, K, *S)`` for K.
    ``weights`` is None for methods without channel weights; ``target`` is None for a callable.
    """

    heatmap: jax.Array
    cams: tuple[jax.Array, ...]
    weights: jax.Array | None
    scores: jax.Array
    target: jax.Array | None


def _split_nnx(model: Any) -> tuple[Any, Any]:
    from flax import nnx

    return nnx.split(model)


class ExplainFn:
    """``f(weights, inputs, target=None)``: the heatmaps of a capture method, traceable end to end.

    Build it with :func:`explain_fn`. ``target`` is None (each sample's top class), an int
    array ``(N,)`` (one class per sample: heatmaps ``(N, *S)``) or ``(N, K)`` (``(N, K, *S)``),
    or a callable of the model output returning ``(N,)`` or ``(N, K)`` scores. ``f.parts(...)``
    returns every array of the explanation (:class:`Parts`); ``f.weights`` the model's weights in
    the form ``f`` takes them.
    """

    def __init__(self, backend: Any, method: str, settings: Mapping[str, Any]) -> None:
        self._backend = backend
        self.method = method
        self._settings = dict(settings)
        program, params = backend._model.snapshot()
        self._family = backend._model.family
        if self._family == "nnx":
            # The graphdef program takes an nnx.State: the form users hold (nnx.split, nnx.state).
            graphdef, params = _split_nnx(backend._model.source)
            program = _NnxProgram(
                graphdef,
                program.paths,
                program.names,
                output=program.output,
                vmap=program.vmap,
                kwargs=program.kwargs,
                ports=program.ports,
            )
            self._graphdef = graphdef
        self._program: _Program = program
        self.weights = params
        self._structure = jax.tree_util.tree_structure(params)
        self.layer_names: tuple[str, ...] = tuple(backend.layer_names)

    # -- weights ---------------------------------------------------------------------------------

    def _params(self, weights: Any) -> Any:
        """Returns ``weights`` in the program's form, refusing a structure that is not the model's."""
        if self._family == "nnx":
            from flax import nnx

            if isinstance(weights, nnx.Module):
                weights = nnx.state(weights)
            elif isinstance(weights, (tuple, list)):
                weights = nnx.state(nnx.merge(self._graphdef, *weights))
        elif self._family == "equinox":
            import equinox as eqx

            # A whole model and its array part both partition to the array part.
            weights = eqx.partition(weights, eqx.is_array)[0]
        structure: Any = jax.tree_util.tree_structure(weights)
        if structure != self._structure:
            raise BackendError(
                f"the weights given do not have the structure of the model's weights ({self._family}): "
                f"expected {_short(self._structure)}, got {_short(structure)}; pass weights of the model "
                "explain_fn was built on, in the form f.weights has"
            )
        return weights

    # -- the function ----------------------------------------------------------------------------

    def __call__(self, weights: Any, inputs: Any, target: Any = None) -> jax.Array:
        """Returns the heatmaps ``(N, *S)`` (``(N, K, *S)`` for ``(N, K)`` targets), float32 in [0, 1]."""
        return self.parts(weights, inputs, target).heatmap

    def parts(self, weights: Any, inputs: Any, target: Any = None) -> Parts:
        """Returns heatmaps, per-layer cams and channel weights, scores and classes (see :class:`Parts`)."""
        params = self._params(weights)
        x = jnp.asarray(inputs)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise InputError(f"explain_fn takes floating-point inputs, got {x.dtype}; cast them first")
        gradients = core.METHODS[self.method].kind == "gradient"
        activations, grads, scores, classes = _capture(self._program, params, x, target, gradients=gradients)
        squeeze = classes is None and callable(target) and scores.shape[1] == 1
        squeeze = squeeze or target is None or (not callable(target) and jnp.ndim(target) == 1)
        return self._maps(x, activations, grads, scores, classes, squeeze)

    def _maps(
        self,
        x: jax.Array,
        activations: Sequence[Any],
        grads: Sequence[Any] | None,
        scores: jax.Array,
        classes: jax.Array | None,
        squeeze: bool,
    ) -> Parts:
        """Returns the core's maps of one capture; the layouts are read from the (static) shapes."""
        s = self._settings
        backend = self._backend
        count = scores.shape[1]
        input_spatial = core.spatial_shape(tuple(x.shape), backend.input_layout)
        inputs = [(backend.input_layout, input_spatial)]
        if not backend.input_layout_given and backend.input_layout in ("channels_first", "channels_last"):
            other = "channels_last" if backend.input_layout == "channels_first" else "channels_first"
            inputs.append((other, core.spatial_shape(tuple(x.shape), other)))
        guess = backend.layer_layout if layouts_decided(backend) else None
        _, spatial, readings = core.read_layouts(
            [tuple(a.shape) for a in activations],
            [guess] * len(activations),
            inputs,
            given=s["layout"],
            grid=s["token_grid"],
            names=self.layer_names,
            follow=True,
            input_shape=tuple(x.shape),
        )
        results = []
        for index, name in enumerate(self.layer_names):
            try:
                results.append(
                    core.layer_cam(
                        self.method,
                        activations[index],
                        None if grads is None else grads[index],
                        readings[index].layout,
                        count=count,
                        grid=readings[index].grid,
                        rectify=s["relu"],
                        seed=s["seed"],
                    )
                )
            except AnycamError as exc:
                raise type(exc)(f"layer {name!r}: {exc}") from exc
        heatmap = core.heatmaps(
            [r.cam for r in results],
            None if s["upsample"] is None else spatial,
            normalization=s["normalize"],
            resize_mode=s["upsample"],
            aggregate=s["aggregate"],
            aligned=[r.aligned for r in readings],
        )

        def shaped(array: Any) -> Any:
            return array[:, 0, ...] if squeeze and array is not None else array

        return Parts(
            heatmap=shaped(heatmap),
            cams=tuple(shaped(r.cam) for r in results),
            weights=shaped(results[0].weights),
            scores=shaped(scores),
            target=shaped(classes),
        )


def _short(structure: Any) -> str:
    text = str(structure)
    return text if len(text) <= 160 else text[:157] + "..."


def _capture(program: _Program, params: Any, x: jax.Array, target: Any, *, gradients: bool) -> Any:
    """Returns (activations, gradients ``(N, K, ...)`` or None, scores ``(N, K)``, classes ``(N, K)`` or None).

    The compiled capture's steps (``capture._capture``) as a plain traceable function: the
    layers' zero deltas make ``jax.vjp`` give the gradients with respect to their outputs, one
    one-hot cotangent per target. Under an outer ``jax.grad`` this is differentiated again
    (second order through the layer's gradient), which is what makes the maps differentiable.
    """
    batch = x.shape[0]
    is_callable = callable(target)
    shapes = jax.eval_shape(lambda p, xs: program.run(p, xs, None)[1], params, x)
    deltas = tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)

    def outputs_of(deltas: tuple[jax.Array, ...]) -> Any:
        output, activations = program.run(params, x, deltas)
        if is_callable:
            return _callable_scores(target, output, batch), activations
        return _class_outputs(output, batch), activations

    if not gradients:
        outputs, activations = outputs_of(deltas)
        if is_callable:
            return activations, None, outputs, None
        chosen = _classes(outputs, target, batch)
        return activations, None, jnp.take_along_axis(outputs, chosen, axis=1), chosen
    outputs, vjp_fn, activations = jax.vjp(outputs_of, deltas, has_aux=True)
    classes: jax.Array | None = None
    if is_callable:
        picks = jnp.broadcast_to(jnp.arange(outputs.shape[1]), outputs.shape)
    else:
        classes = picks = _classes(outputs, target, batch)
    cotangents = jax.nn.one_hot(picks.T, outputs.shape[1], dtype=outputs.dtype)  # (K, N, M)
    if cotangents.shape[0] == 1:
        grads = tuple(g[:, None, ...] for g in vjp_fn(cotangents[0])[0])
    else:
        grads = tuple(jnp.moveaxis(g, 0, 1) for g in jax.vmap(vjp_fn)(cotangents)[0])
    scores = jnp.take_along_axis(outputs, picks, axis=1)
    return activations, grads, scores, classes


def _classes(outputs: jax.Array, target: Any, batch: int) -> jax.Array:
    """Returns the ``(N, K)`` int32 classes: each sample's top class for None, else the given ones."""
    if target is None:
        return jnp.argmax(outputs, axis=1)[:, None]
    given = jnp.asarray(target)
    if not jnp.issubdtype(given.dtype, jnp.integer):
        raise TargetError(f"explain_fn takes integer class indices, got {given.dtype}")
    if given.ndim == 1:
        given = given[:, None]
    if given.ndim != 2 or given.shape[0] != batch:
        raise TargetError(f"class indices must be (N,) or (N, K) with N={batch}, got shape {tuple(jnp.shape(target))}")
    # Out-of-range classes cannot be reported from inside a trace, and JAX would clamp them into
    # a plausible wrong map; the host check runs whenever the indices are concrete.
    if not isinstance(given, jax.core.Tracer):
        classes = outputs.shape[1]
        if bool(jnp.any((given < 0) | (given >= classes))):
            raise TargetError(f"class indices must lie in [0, {classes}); got {given.tolist()}")
    return given.astype(jnp.int32)


def explain_fn(
    model: Any,
    layer: Any = None,
    method: str = "gradcam",
    *,
    upsample: str | None = "linear",
    normalize: str | None = "minmax",
    aggregate: str = "mean",
    relu: bool = True,
    layout: str | None = None,
    token_grid: tuple[int, ...] | None = None,
    input_layout: str | None = None,
    output: Any = None,
    seed: int = 0,
    differentiable: bool = False,
    **options: Any,
) -> ExplainFn:
    """Returns ``f(weights, inputs, target=None) -> heatmaps``, a pure function for ``jax.jit``/``vmap``/``grad``.

    Args:
        model, layer, output, input_layout, options (``model_kwargs``, ``vmap``): as for
            ``anycam.Explainer`` with a JAX model; ``layer`` must be named (a list for several),
            or None for a ``(features, head)`` pair.
        method: a capture method (``anycam.core.CAPTURE_METHODS``): the Grad-CAM family, HiResCAM,
            LayerCAM, XGrad-CAM, Grad-CAM++, element-wise Grad-CAM, Eigen-CAM, Eigen-Grad-CAM,
            KPCA-CAM, RandomCAM.
        upsample, normalize, aggregate, relu, layout, token_grid, seed: as for the Explainer.
        differentiable: promise to take ``jax.grad`` of the maps (a training loss): refuses the
            methods outside ``anycam.core.DIFFERENTIABLE_METHODS`` at once. The
            function is the same either way; JAX differentiates it by composition.

    Raises:
        anycam.ConfigError: a method that needs more than one capture (Score-CAM, Ablation-CAM,
            guided methods), ``differentiable=True`` with a method that cannot be differentiable
            (Eigen-CAM, Eigen-Grad-CAM, KPCA-CAM, RandomCAM), or an unknown setting.
        anycam.LayerError: ``layer="auto"``.
    """
    from .backend import JaxBackend

    if method not in core.CAPTURE_METHODS:
        raise ConfigError(
            f"explain_fn computes the capture methods {sorted(core.CAPTURE_METHODS)}; {method!r} is not one "
            "(Score-CAM and Ablation-CAM run the model many times, the guided methods need a modified "
            "backward pass): use anycam.Explainer for it"
        )
    if differentiable and method not in core.DIFFERENTIABLE_METHODS:
        raise ConfigError(
            f"{method} cannot give differentiable maps (an SVD or eigendecomposition with a sign rule, or "
            f"random weights); the differentiable methods are {', '.join(core.DIFFERENTIABLE_METHODS)}"
        )
    if upsample not in (None, *core.RESIZE_MODES):
        raise ConfigError(f"unknown upsample {upsample!r}; choose one of {core.RESIZE_MODES} or None")
    if normalize not in (None, *core.NORMALIZATIONS):
        raise ConfigError(f"unknown normalize {normalize!r}; choose one of {core.NORMALIZATIONS} or None")
    if aggregate not in core.AGGREGATIONS:
        raise ConfigError(f"unknown aggregate {aggregate!r}; choose one of {core.AGGREGATIONS}")
    layers = list(layer) if isinstance(layer, list) else [layer]
    backend = JaxBackend(model, layers, output=output, input_layout=input_layout, **options)
    if backend.auto_layer:
        raise LayerError(
            "explain_fn needs the layer named (layer='auto' chooses from a first batch, which a traced "
            "function does not have); pass the layer, e.g. the one an Explainer with layer='auto' chose"
        )
    settings = {
        "upsample": upsample,
        "normalize": normalize,
        "aggregate": aggregate,
        "relu": relu,
        "layout": layout,
        "token_grid": token_grid,
        "seed": seed,
    }
    return ExplainFn(backend, method, settings)


__all__ = ["ExplainFn", "Parts", "explain_fn"]
