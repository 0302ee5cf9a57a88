"""From a backend's capture to an ``Explanation``: checked layouts → per-layer maps → heatmaps.

The functions every driver shares (the one-capture methods here, Score-CAM, Ablation-CAM and the
guided methods in their own modules): they read the Explainer's public settings (``layout``,
``token_grid``, ``relu``, ``normalize`` …) and leave every formula to the core.

With ``arrays="native"`` the capture's arrays are the framework's, on the model's device, and
they stay there: the core computes on their own namespace (``anycam.core._namespace``), layouts
are read from shapes only, and the checks here sync one boolean per array (the host sees a
whole array only on the error path, to name the first bad element). Drivers that still compute
on the host (Score-CAM's weights, Ablation-CAM's, the guided methods) hand their NumPy results
to :func:`native_explanation`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import core
from .._errors import AnycamError, ZeroMapWarning, user_stacklevel
from ..core._namespace import is_numpy, namespace
from ..protocol.backend import Capture
from .explanation import Explanation

if TYPE_CHECKING:
    from .explainer import Explainer


def capture(explainer: Explainer, inputs: Any, spec: core.TargetSpec) -> Explanation:
    """The driver of the one-capture methods: one forward (and backward) pass, then the core's map."""
    gradients = core.METHODS[explainer.method].kind == "gradient"
    return explanation(explainer, capture_call(explainer, inputs, spec, gradients=gradients), spec)


def capture_call(explainer: Explainer, inputs: Any, spec: core.TargetSpec, *, gradients: bool) -> Capture:
    """Runs the backend's capture in the Explainer's array mode.

    The ``native`` / ``differentiable`` keywords are passed only when True, so adapters that do
    not declare those capabilities keep the protocol's original signature.
    """
    keywords: dict[str, bool] = {}
    if explainer.arrays == "native":
        keywords["native"] = True
    if explainer.differentiable:
        keywords["differentiable"] = True
    return explainer.backend.capture(inputs, spec, gradients=gradients, **keywords)


def check_finite(array: Any, what: str, name: str) -> None:
    """``core.check_finite`` on any namespace: one boolean read for a framework array, scalars when it fails."""
    core.check_finite(array, what, name)


def host(array: Any) -> np.ndarray:
    """Returns a framework array as NumPy (error paths and host-only drivers; never in native maps)."""
    if is_numpy(array):
        return np.asarray(array)
    xp = namespace(array)
    try:
        import array_api_compat

        array = array_api_compat.to_device(array, "cpu")
    except Exception:  # JAX and others convert from any device through __array__
        pass
    if hasattr(array, "detach"):  # a torch tensor that requires grad refuses __array__
        array = array.detach()
    if array.dtype not in (xp.float32, xp.float64, xp.bool, xp.int64, xp.int32):
        array = xp.astype(array, xp.float32)  # bfloat16 has no NumPy dtype
    return np.asarray(array)


def explanation(explainer: Explainer, capture: Capture, spec: core.TargetSpec) -> Explanation:
    """Returns the Explanation of one capture with the Explainer's method."""
    return assemble(explainer, layer_results(explainer, capture), capture, spec)


def read_layouts(explainer: Explainer, capture: Capture) -> tuple[tuple[int, ...], tuple[core.LayerReading, ...]]:
    """Returns the input's spatial shape and each layer's checked layout (core.read_layouts).

    Layouts are checked, not guessed: the backend's guess is kept when the shapes fit it,
    replaced by the one reading that fits when they do not, and a user's ``layout=`` is
    refused when it contradicts them; the input's layout is changed only when no layer fits
    the backend's reading of it and the user did not give ``input_layout=``.
    """
    inputs = [(capture.input_layout or "channels_first", tuple(capture.input_spatial))]
    if capture.input_shape is not None and capture.input_layout in ("channels_first", "channels_last"):
        other = "channels_last" if capture.input_layout == "channels_first" else "channels_first"
        if not explainer.input_layout_given:
            inputs.append((other, core.spatial_shape(capture.input_shape, other)))
    _, spatial, readings = core.read_layouts(
        [a.shape for a in capture.activations],
        capture.layouts,
        inputs,
        given=explainer.layout,
        grid=explainer.token_grid,
        names=explainer.layer_names,
        follow=capture.layouts_follow_input,
        input_shape=capture.input_shape,
    )
    return spatial, readings


def layer_results(explainer: Explainer, capture: Capture, method: str | None = None) -> list[core.LayerResult]:
    """Returns each layer's raw map from one capture (``method`` defaults to the Explainer's)."""
    count = capture.scores.shape[1]
    _, readings = read_layouts(explainer, capture)
    results = []
    for index, name in enumerate(explainer.layer_names):
        activations = capture.activations[index]
        check_finite(activations, "activations", name)
        gradients = None
        if capture.gradients is not None:
            gradients = capture.gradients[index]
            check_finite(gradients, "gradients", name)
        try:
            results.append(
                core.layer_cam(
                    method or explainer.method,
                    activations,
                    gradients,
                    readings[index].layout,
                    count=count,
                    grid=readings[index].grid,
                    rectify=explainer.relu,
                    seed=explainer.seed,
                )
            )
        except AnycamError as exc:
            raise type(exc)(f"layer {name!r}: {exc}") from exc
        warn_zero(explainer, results[-1].cam, gradients, name)
    return results


def warn_zero(explainer: Explainer, cam: Any, gradients: Any, name: str) -> None:
    """Warns once per Explainer when a map ``(N, K, *S)`` is flat (its heatmap all zeros).

    A framework array costs one boolean sync; the (N, K) flags come to the host only when a map
    is flat.
    """
    if explainer.warned_zero:
        return
    xp = namespace(cam)
    flat = xp.reshape(cam, (*cam.shape[:2], -1))
    dead_native = xp.max(flat, axis=-1) <= xp.min(flat, axis=-1)
    if not bool(xp.any(dead_native)):
        return
    dead = host(dead_native)
    explainer.warned_zero = True
    sample, target = (int(i) for i in np.argwhere(dead)[0])
    if gradients is not None and not bool(xp.any(gradients[sample, target, ...] != 0)):
        cause = (
            "its gradient is zero: the explained output does not depend on it there (e.g. the last "
            "ViT block after the class token was read, or a head that ignores the patch tokens); explain "
            "an earlier layer"
        )
    else:
        cause = (
            "the weighted sum of its channels is ≤ 0 everywhere and the final ReLU removes it (e.g. a "
            "pre-activation layer: explain the layer after the activation, or pass relu=False)"
        )
    warnings.warn(
        f"layer {name!r} gives an all-zero map for {int(dead.sum())} of {dead.size} (sample, target) pairs "
        f"(first: sample {sample}, target {target}); {cause}. The heatmaps are returned as zeros. "
        "(This warning is shown once per Explainer.)",
        ZeroMapWarning,
        stacklevel=user_stacklevel(),
    )


def assemble(
    explainer: Explainer,
    results: list[core.LayerResult],
    capture: Capture,
    spec: core.TargetSpec,
    *,
    heatmap: Any = None,
    attribution: Any = None,
) -> Explanation:
    """Returns the Explanation of per-layer maps ``(N, K, *S)``; ``heatmap`` overrides the usual one."""
    count = capture.scores.shape[1]
    if heatmap is None:
        input_spatial, readings = read_layouts(explainer, capture)
        heatmap = core.heatmaps(
            [r.cam for r in results],
            None if explainer.upsample is None else input_spatial,
            normalization=explainer.normalize,
            resize_mode=explainer.upsample,
            aggregate=explainer.aggregate,
            aligned=[r.aligned for r in readings],
        )
    squeeze = spec.squeeze and count == 1

    def shaped(array: Any) -> Any:
        return array[:, 0, ...] if squeeze and array is not None else array

    cams = tuple(shaped(r.cam) for r in results)
    target = capture.target
    names = explainer.layer_names
    # guided-backprop with layer=None/"auto" runs no capture, so no layer is ever chosen: it
    # reads none, and says so with an empty tuple.
    layer: str | tuple[str, ...] = names[0] if explainer.single_layer and names else names
    explained = Explanation(
        heatmap=shaped(heatmap),
        cam=cams[0],
        cams=cams,
        weights=shaped(results[0].weights),
        scores=shaped(capture.scores),
        target=shaped(target),
        layer=layer,
        method=explainer.method,
        attribution=shaped(attribution),
    )
    if explainer.arrays == "native" and is_numpy(explained.heatmap):
        return native_explanation(explainer, explained)
    return explained


def native_explanation(explainer: Explainer, explained: Explanation) -> Explanation:
    """Returns an Explanation computed on the host with its arrays moved to the model's device.

    For the drivers that still compute on the host (the guided methods; Score-CAM and
    Ablation-CAM where the backend does not build their copies on the device): the
    ``arrays="native"`` contract is about what the user gets, so it holds for every method.
    """
    to = explainer.backend.to_native

    def moved(array: Any) -> Any:
        return None if array is None else to(np.asarray(array))

    return dataclasses.replace(
        explained,
        heatmap=moved(explained.heatmap),
        cam=moved(explained.cam),
        cams=tuple(moved(c) for c in explained.cams),
        weights=moved(explained.weights),
        scores=moved(explained.scores),
        attribution=moved(explained.attribution),
    )


def float32(array: np.ndarray) -> np.ndarray:
    """Returns ``array`` as contiguous float32, values beyond float32's range clipped to it."""
    limit = np.finfo(np.float32).max
    return np.ascontiguousarray(np.clip(array, -limit, limit), dtype=np.float32)
