"""The public entry point: ``Explainer``, its options, the choice of backend and of driver.

A method's kind (``anycam.core.METHODS``) picks its driver from :data:`DRIVERS`: one capture
(``assembly.capture``), Score-CAM's masked inputs and Ablation-CAM's zeroed channels
(``perturbation``), guided backpropagation (``guided``), or every block's attention
(``attention``). Before any work, the Explainer refuses a method whose backend capability the adapter does not declare.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .. import core
from .._errors import AnycamError, BackendError, ConfigError, ConfigTypeError
from ..core._namespace import namespace
from ..protocol.backend import Backend, as_list
from ..protocol.layers import is_auto
from . import assembly, attention, guided, perturbation
from .explanation import Explanation

Driver = Callable[["Explainer", Any, core.TargetSpec], Explanation]

DRIVERS: Mapping[str, Driver] = {
    "gradient": assembly.capture,
    "activation": assembly.capture,
    "masking": perturbation.scorecam,
    "ablation": perturbation.ablationcam,
    "guided": guided.guided,
    "attention": attention.attention,
}
"""The driver of each method kind (``anycam.core.Method.kind``): ``f(explainer, inputs, spec)``."""


class Explainer:
    """Grad-CAM-family explanations of one model at one (or several) layers, any framework.

    Args:
        model: a ``torch.nn.Module``, a Keras model or ``tf.Module``, or a JAX model (Flax
            linen ``(module, variables)`` or bound module, Flax NNX or Equinox module, or a
            ``(features, head)`` pair of functions with ``backend="jax"``).
        layer: a layer name (``"layer4"``, ``"layer4.1.conv2"``, ``"resnet50/conv5_block3_out"``),
            the layer object, or a list of them (maps combined by ``aggregate``). A name ending in
            ``":input"`` (``"avgpool:input"``) explains the layer's input instead of its output.
            None or ``"auto"`` picks the last layer on the path to the output whose output has
            the input's spatial rank and spatial size > 1 (backends that need a forward pass
            for that choose at the first call; the choice shows in ``layer_names`` and
            ``repr``; on a torch token model, the last block's first normalisation); for a JAX
            ``(features, head)`` pair, None means the pair's own cut. The attention methods
            (``rollout``, ``attention-grad``) read every block's attention and take no layer.
        method: one of ``anycam.core.METHODS``.
        backend: ``"torch"``, ``"tensorflow"`` or ``"jax"``; None detects it from the model's
            type among frameworks already imported.
        output: selects the explained output when the model returns a tuple, dict or
            dataclass: an index, key, attribute name or callable.
        layout: the layer output's layout when the backend's guess is wrong:
            ``"channels_first"``, ``"channels_last"`` or ``"tokens"`` (``(N, T, C)``).
        token_grid: the patch grid of a token layout, e.g. ``(14, 14)``; inferred when square
            (leading class/register tokens are dropped).
        input_layout: the input's layout (default: the framework's convention), which is the
            layout of the spatial input when the model takes several.
        spatial_input: which input carries the spatial grid (the heatmap's resolution) when
            the model takes several: an index into a tuple/list input or a key of a dict input;
            default: the first floating-point input with spatial axes.
        model_kwargs: keyword arguments passed unchanged to every model call (e.g.
            ``{"output_hidden_states": False}``).
        normalize: ``"minmax"`` (default), ``"max"`` (the Keras example) or None.
        upsample: ``"linear"`` (default), ``"nearest"`` or None (heatmap at layer resolution).
        aggregate: ``"mean"`` or ``"max"`` over several layers.
        relu: keep only positive evidence (the papers' final ReLU). ``relu=False`` gives signed
            raw maps (Captum's default); heatmaps are then min-max scaled signed maps.
        batch_size: how many perturbed copies one model call takes: masked inputs for
            ``scorecam``, ablated layer outputs for ``ablationcam`` (N samples × channels are
            split into chunks of this many rows, so peak memory is bounded by one chunk, not by
            C). Default: about 16 MB of masked inputs for Score-CAM (27 rows at 3 × 224²; the
            network's own activations for those rows come on top), 256 MB of ablated copies for
            Ablation-CAM (16 MB where the backend keeps the part before the layer between chunks,
            as PyTorch's does: cache-sized chunks are faster there). With a callable target,
            Score-CAM's calls take one masked copy of each of the N samples (a callable scores
            the N samples' outputs, row i from sample i, in every method).
        progress: a tqdm progress bar over the chunks of ``scorecam``/``ablationcam``: True
            always, False never, None (default) only once a run has taken over 2 s. Needs
            ``tqdm`` (optional); None without it shows nothing.
        scorecam: how Score-CAM turns the masked inputs' scores into weights (see
            ``anycam.core.scorecam_weights``): ``"probability"`` (default, the authors' code:
            the class's softmax probability), ``"softmax"`` (softmax over channels of the raw
            scores: the paper's Algorithm 1, torchcam) or ``"pytorch-grad-cam"`` (``"softmax"``
            with masks upsampled with aligned corners, reproducing its ``ScoreCAM``). A model
            with one output gets the sigmoid of its logit as ``"probability"`` (a softmax over
            one value is always 1).
        scorecam_top_k: Faster Score-CAM: score only the k channels of largest activation
            variance per sample (the others get weight 0). None scores every channel.
        seed: the seed of ``randomcam``'s weights.
        arrays: what the Explanation's arrays are: ``"numpy"`` (the default unless
            ``differentiable=True``: float32 NumPy, computed in float64 on the host) or
            ``"native"``: heatmap, cam, cams, weights and scores are the model framework's
            arrays on the model's device, computed there in float32 (float64 only for a float64
            input); ``target`` stays an int64 NumPy array. See docs/devices.md.
        differentiable: keep the autodiff graph: the heatmap and cam of the gradient methods
            (:data:`DIFFERENTIABLE_METHODS`) carry gradients to the model's parameters and
            input, for use in a training loss. Implies ``arrays="native"``.
        **options: backend-specific options (see each backend's docs).

    Raises:
        anycam.BackendError: no backend fits, its framework is not installed, or its adapter
            does not declare the capability the method needs (``anycam.core.METHODS``).
        anycam.LayerError: a layer cannot be found (the message lists the closest names).
        anycam.ConfigError: an unknown method (the message lists them), a layer for an
            attention method, normalisation,
            upsampling, aggregation, layout or Score-CAM variant; a ``batch_size`` or
            ``scorecam_top_k`` below 1; ``ablationcam`` or ``guided-gradcam`` with more than one
            layer (also a ``ValueError``); an unknown ``arrays``; ``differentiable=True`` with
            ``arrays="numpy"`` or with a method outside :data:`DIFFERENTIABLE_METHODS`.
        anycam.ConfigTypeError: an unknown backend option (also a ``TypeError``).
    """

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        method: str = "gradcam",
        backend: str | None = None,
        *,
        output: Any = None,
        layout: str | None = None,
        token_grid: tuple[int, ...] | None = None,
        input_layout: str | None = None,
        normalize: str | None = "minmax",
        upsample: str | None = "linear",
        aggregate: str = "mean",
        relu: bool = True,
        spatial_input: int | str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
        scorecam: str = "probability",
        scorecam_top_k: int | None = None,
        seed: int = 0,
        arrays: str | None = None,
        differentiable: bool = False,
        **options: Any,
    ) -> None:
        # Imported here, not at module level: anycam.backends is a sibling folder mapped into
        # the package at install time, and importing it must stay optional for the core.
        backends = importlib.import_module("anycam.backends")

        if method not in core.METHODS:
            raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(core.METHODS)}")
        if normalize not in core.NORMALIZATIONS:
            raise ConfigError(f"unknown normalize={normalize!r}; choose 'minmax', 'max' or None")
        if upsample is not None and upsample not in core.RESIZE_MODES:
            raise ConfigError(f"unknown upsample={upsample!r}; choose 'linear', 'nearest' or None")
        if aggregate not in core.AGGREGATIONS:
            raise ConfigError(f"unknown aggregate={aggregate!r}; choose 'mean' or 'max'")
        self.layout = None if layout is None else core.canonical_layout(layout)
        if input_layout is not None:
            input_layout = core.canonical_layout(input_layout)
        self.input_layout_given = input_layout is not None
        self.method = method
        self.token_grid = None if token_grid is None else tuple(int(g) for g in token_grid)
        self.normalize = normalize
        self.upsample = upsample
        self.aggregate = aggregate
        self.relu = bool(relu)
        self.batch_size = _positive("batch_size", batch_size)
        self.scorecam_top_k = _positive("scorecam_top_k", scorecam_top_k)
        if scorecam not in core.SCORECAM_VARIANTS:
            raise ConfigError(f"unknown scorecam={scorecam!r}; choose one of {', '.join(core.SCORECAM_VARIANTS)}")
        self.scorecam = scorecam
        self.progress = progress
        self.seed = int(seed)
        self.arrays, self.differentiable = _array_mode(arrays, differentiable, method)
        if method in ("ablationcam", "guided-gradcam") and isinstance(layer, list) and len(layer) != 1:
            raise ConfigError(
                f"{method} explains one layer, got {len(layer)}; pass a single layer (or one Explainer per layer)"
            )
        name = backend if backend is not None else backends.detect(model)
        adapter: type[Backend] = backends.load(name, model)
        needs = core.METHODS[method].needs
        if needs is not None and needs not in adapter.capabilities:
            raise BackendError(
                f"the {adapter.name} backend cannot run {method}: it does not declare the {needs} capability"
            )
        for wanted, capability in (
            (self.arrays == "native", "native_arrays"),
            (self.differentiable, "differentiable"),
        ):
            if wanted and capability not in adapter.capabilities:
                option = "differentiable=True" if capability == "differentiable" else 'arrays="native"'
                # An adapter may say what to use instead (JAX: explain_fn composed with jax.grad).
                instead = getattr(adapter, "instead", {}).get(capability)
                raise BackendError(
                    f"the {adapter.name} backend cannot give {option}: it does not declare the {capability} capability"
                    + (f"; {instead}" if instead else "")
                )
        if core.METHODS[method].kind == "attention" and not is_auto(layer):
            # The attention methods read every attention call; a layer would be silently ignored.
            raise ConfigError(f"{method} reads the attention of every block and takes no layer; pass layer=None")
        self.spatial_input = spatial_input
        # Passed only when given, so a backend that does not take them yet says so by name.
        if spatial_input is not None:
            if isinstance(spatial_input, bool) or not isinstance(spatial_input, (int, str)):
                raise ConfigTypeError(
                    f"spatial_input must be an index (int) or a key (str), got {type(spatial_input).__name__}"
                )
            options["spatial_input"] = spatial_input
        if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
            raise ConfigTypeError(
                f"model_kwargs must be a dict of keyword arguments, got {type(model_kwargs).__name__}; "
                "e.g. model_kwargs={'output_hidden_states': False}"
            )
        if model_kwargs:
            options["model_kwargs"] = dict(model_kwargs)
        self.backend: Backend = adapter(model, as_list(layer), output=output, input_layout=input_layout, **options)
        self.single_layer = not isinstance(layer, list)
        """Whether one layer was given (not a list): ``Explanation.layer`` is then its name, not a tuple."""
        self.warned_zero = False
        """Whether this Explainer already warned of an all-zero map (``anycam.ZeroMapWarning``, once)."""

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The resolved names of the explained layers (``"name:input"`` for a layer's input).

        With ``layer="auto"`` this is the chosen layer; empty until the first call for backends
        that choose during a forward pass.
        """
        return tuple(self.backend.layer_names)

    def __repr__(self) -> str:
        names = self.layer_names
        auto = self.backend.auto_layer
        if auto and not names:
            layer = "auto (chosen at the first call)"
        else:
            layer = "[" + ", ".join(names) + "]" + (" (auto)" if auto else "")
        note = getattr(self.backend, "auto_note", None) if auto else None
        if note:
            layer += f"; note: {note}"
        return f"Explainer(method={self.method!r}, backend={self.backend.name!r}, layer={layer})"

    def __call__(self, inputs: Any, target: Any = None) -> np.ndarray:
        """Returns the heatmaps for ``inputs``; see :meth:`explain` for the target forms."""
        return self.explain(inputs, target).heatmap

    def explain(self, inputs: Any, target: Any = None) -> Explanation:
        """Explains a batch.

        Args:
            inputs: a batch ``(N, ...)`` of the framework's tensors (or a NumPy array); for a
                model with several inputs, a tuple/list (passed positionally) or a dict
                (passed as keyword arguments, e.g. ``{"pixel_values": x}``).
            target: None (argmax per sample), an int (the same class for every sample), N ints,
                an ``(N, K)`` int array (K maps per sample from one forward pass),
                ``anycam.top_k(k)``, or a callable from the model output to ``(N,)`` or
                ``(N, K)`` scores (segmentation, detection, embeddings, regression).

        Returns:
            An :class:`Explanation`; ``heatmap`` is ``(N, *input_spatial)`` for one map per
            sample, ``(N, K, *input_spatial)`` for K.

        Raises:
            anycam.TargetError: a target that does not fit the batch or the model output.
            anycam.InputError: an input of the wrong rank, dtype or layout.
            anycam.LayerError: a layer that is never called or does not reach the output.
            anycam.NonFiniteError: NaN or inf in the input, activations or gradients.
        """
        spec = core.parse_target(target)
        kind = core.METHODS[self.method].kind
        if kind in ("gradient", "activation") and self.arrays == "native" and not self.differentiable:
            if callable(getattr(self.backend, "compiled", None)):
                return compiled_capture(self, inputs, spec)
        return DRIVERS[kind](self, inputs, spec)


def compiled_capture(explainer: Explainer, inputs: Any, spec: core.TargetSpec) -> Explanation:
    """The one-capture driver in native mode, its core compiled by the backend (``backend.compiled``).

    Same result as ``assembly.capture``: the core's maps of the capture's arrays, on the device.
    Run op by op, the core costs one framework dispatch per array operation (JAX: about 50 ms a
    call, more than the map's arithmetic); a backend that can compile a function of its arrays
    (JAX's ``jax.jit``) offers ``compiled(key, fn)``, and the maps, the finiteness check and the
    flat-map check run as one program. Only two booleans come to the host. When either says
    something is wrong (a NaN or inf, a flat map not yet warned about), or when the core refuses
    the shapes while tracing, the uncompiled driver runs on the same capture: it raises or warns
    exactly as it always does, naming the layer and the first bad element.
    """
    gradients = core.METHODS[explainer.method].kind == "gradient"
    captured = assembly.capture_call(explainer, inputs, spec, gradients=gradients)
    input_spatial, readings = assembly.read_layouts(explainer, captured)
    # Everything the compiled function depends on besides its arguments' shapes and dtypes
    # (which jax.jit keys on itself).
    key = (
        "maps",
        explainer.method,
        captured.scores.shape[1],
        tuple(readings),
        explainer.relu,
        explainer.seed,
        None if explainer.upsample is None else tuple(input_spatial),
        explainer.normalize,
        explainer.upsample,
        explainer.aggregate,
        explainer.layer_names,
    )
    fn = _maps_function(*key[1:])
    try:
        heatmap, cams, weights, finite, flat = explainer.backend.compiled(key, fn)(  # type: ignore[attr-defined]
            tuple(captured.activations), None if captured.gradients is None else tuple(captured.gradients)
        )
    except AnycamError:
        return assembly.explanation(explainer, captured, spec)  # the same error, in the same order
    if not bool(finite):
        return assembly.explanation(explainer, captured, spec)  # raises NonFiniteError naming the element
    if not explainer.warned_zero and bool(flat):
        for index, name in enumerate(explainer.layer_names):
            grads = None if captured.gradients is None else captured.gradients[index]
            assembly.warn_zero(explainer, cams[index], grads, name)
    results = [core.LayerResult(cam, weight) for cam, weight in zip(cams, weights, strict=True)]
    return assembly.assemble(explainer, results, captured, spec, heatmap=heatmap)


def _maps_function(
    method: str,
    count: int,
    readings: tuple[core.LayerReading, ...],
    relu: bool,
    seed: int,
    spatial: tuple[int, ...] | None,
    normalize: str | None,
    upsample: str | None,
    aggregate: str,
    names: tuple[str, ...],
) -> Callable[[tuple[Any, ...], tuple[Any, ...] | None], tuple[Any, ...]]:
    """Returns ``f(activations, gradients) -> (heatmap, cams, weights, all finite, some map flat)``.

    A pure function of the arrays (the settings are closed over), so a backend can compile it:
    the core's formulas as ``assembly.layer_results`` and ``assembly.assemble`` call them, plus
    the two checks as device booleans instead of host reads.
    """

    def maps(activations: tuple[Any, ...], gradients: tuple[Any, ...] | None) -> tuple[Any, ...]:
        xp = namespace(*activations)
        checked = [*activations, *(gradients or ())]
        finite = xp.all(xp.stack([xp.all(xp.isfinite(a)) for a in checked]))
        results = []
        for index, name in enumerate(names):
            try:
                results.append(
                    core.layer_cam(
                        method,
                        activations[index],
                        None if gradients is None else gradients[index],
                        readings[index].layout,
                        count=count,
                        grid=readings[index].grid,
                        rectify=relu,
                        seed=seed,
                    )
                )
            except AnycamError as exc:
                raise type(exc)(f"layer {name!r}: {exc}") from exc
        heatmap = core.heatmaps(
            [r.cam for r in results],
            spatial,
            normalization=normalize,
            resize_mode=upsample,
            aggregate=aggregate,
            aligned=[r.aligned for r in readings],
        )
        flat = []
        for r in results:
            values = xp.reshape(r.cam, (*r.cam.shape[:2], -1))
            flat.append(xp.any(xp.max(values, axis=-1) <= xp.min(values, axis=-1)))
        return heatmap, tuple(r.cam for r in results), tuple(r.weights for r in results), finite, xp.any(xp.stack(flat))

    return maps


ARRAYS = ("numpy", "native")
"""The values of ``Explainer(arrays=...)``."""

DIFFERENTIABLE_METHODS = core.DIFFERENTIABLE_METHODS
"""The methods whose maps can carry gradients (``differentiable=True``).

Their maps are compositions of the layer's activations and gradients with products, sums,
means, ReLU, resizing and min-max scaling, all differentiable almost everywhere. Refused:
``eigencam``, ``eigengradcam`` and ``kpcacam`` (an SVD or eigendecomposition whose sign rule is
a discontinuous choice, and whose derivative is unbounded near repeated singular values),
``randomcam`` (a baseline with random weights: nothing to train towards), ``scorecam`` and
``ablationcam`` (weights from forward passes of perturbed copies, taken without a graph) and the
guided methods (guided backpropagation replaces the ReLU's derivative, so it is not the gradient
of anything)."""


def _array_mode(arrays: str | None, differentiable: Any, method: str) -> tuple[str, bool]:
    """Returns the checked (arrays, differentiable) of an Explainer."""
    if not isinstance(differentiable, (bool, np.bool_)):
        raise ConfigTypeError(f"differentiable must be True or False, got {differentiable!r}")
    differentiable = bool(differentiable)
    if arrays is None:
        arrays = "native" if differentiable else "numpy"
    if arrays not in ARRAYS:
        raise ConfigError(f"unknown arrays={arrays!r}; choose 'numpy' (the default) or 'native'")
    if differentiable and arrays == "numpy":
        raise ConfigError(
            'differentiable=True keeps the graph in the framework\'s arrays, and arrays="numpy" asks for host '
            'copies without it; leave arrays out (or pass arrays="native")'
        )
    if differentiable and method not in DIFFERENTIABLE_METHODS:
        raise ConfigError(
            f"{method} cannot give differentiable maps (see docs/devices.md); the differentiable methods are "
            f"{', '.join(DIFFERENTIABLE_METHODS)}"
        )
    return arrays, differentiable


def _positive(name: str, value: int | None) -> int | None:
    """Returns ``value`` as an int ≥ 1 (or None), else raises ValueError naming the option."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)
