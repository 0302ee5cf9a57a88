"""An anycam Explainer as Quantus's ``explain_func``, so Quantus's metrics run on anycam maps.

Quantus (Hedström et al., JMLR 2023) evaluates explanations with ~35 metrics; each calls
``explain_func(model=..., inputs=..., targets=..., **explain_func_kwargs)`` with NumPy batches
whenever it needs a fresh map (of a perturbed input, or of a randomised copy of the model).
:func:`quantus_explain_func` turns an Explainer into that function. Nothing here imports Quantus
or a framework.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._errors import ConfigTypeError


def quantus_explain_func(explainer: Any, *, factory: Callable[[Any], Any] | None = None) -> Callable[..., np.ndarray]:
    """Returns ``explain_func(model, inputs, targets, **kwargs)`` for Quantus, backed by ``explainer``.

    The function explains ``inputs`` (a NumPy batch in the explainer's input layout) for the
    classes ``targets`` (``(N,)`` ints) and returns the heatmaps ``(N, 1, *S)`` — ``(N, *S, 1)``
    for a channels-last explainer — as float32, one channel Quantus broadcasts over the input's.

    Quantus passes the model with every call. The explainer's own model is explained by the
    explainer; any other model (Quantus's randomisation metrics pass a randomised copy) by
    ``factory(model)`` when given, else by a new ``anycam.Explainer`` on that model with the
    same backend, method, layer names, normalisation, upsampling, aggregation, ReLU and input
    layout. Options the Explainer does not keep (``output=``, ``model_kwargs=``, backend
    options) are not carried over: pass ``factory`` for such models.

    Example::

        import quantus
        metric = quantus.FaithfulnessCorrelation(nr_runs=10)
        scores = metric(model=model, x_batch=x, y_batch=y, a_batch=None,
                        explain_func=anycam.metrics.quantus_explain_func(explainer))

    Args:
        explainer: an ``anycam.Explainer``.
        factory: builds the Explainer for a model that is not the explainer's own.

    Raises:
        anycam.ConfigTypeError: ``explainer`` is not an ``anycam.Explainer`` or ``factory`` is
            not callable.
    """
    from ..explain.explainer import Explainer

    if not isinstance(explainer, Explainer):
        raise ConfigTypeError(f"quantus_explain_func takes an anycam.Explainer, got {type(explainer).__name__}")
    if factory is not None and not callable(factory):
        raise ConfigTypeError(f"factory must be a callable from a model to an Explainer, got {type(factory).__name__}")
    own = getattr(explainer.backend, "model", None)
    built: dict[int, tuple[Any, Any]] = {}

    def rebuild(model: Any) -> Any:
        if factory is not None:
            return factory(model)
        names = list(explainer.layer_names)
        return Explainer(
            model,
            names[0] if explainer.single_layer and len(names) == 1 else names,
            explainer.method,
            explainer.backend.name,
            normalize=explainer.normalize,
            upsample=explainer.upsample,
            aggregate=explainer.aggregate,
            relu=explainer.relu,
            input_layout=explainer.backend.input_layout,
            layout=explainer.layout,
            token_grid=explainer.token_grid,
        )

    def explain_func(model: Any = None, inputs: Any = None, targets: Any = None, **kwargs: Any) -> np.ndarray:
        """Quantus's explain_func: heatmaps of ``inputs`` for ``targets`` with an anycam Explainer."""
        if model is None or model is own:
            use = explainer
        else:
            # Keyed by identity, holding the model so its id cannot be reused by another object.
            cached = built.get(id(model))
            if cached is None or cached[0] is not model:
                cached = (model, rebuild(model))
                built.clear()  # Quantus walks one randomised copy after another: keep the latest
                built[id(model)] = cached
            use = cached[1]
        target = None if targets is None else np.asarray(targets).reshape(-1).astype(np.int64)
        maps = np.asarray(use(np.asarray(inputs), target), dtype=np.float32)
        axis = 1 if use.backend.input_layout != "channels_last" else maps.ndim
        return np.expand_dims(maps, axis)

    return explain_func
