"""The drivers of the perturbation methods: Score-CAM (masked inputs) and Ablation-CAM (zeroed channels).

Each drives a backend capability (``input_scores``; ``head_scorer`` / ``ablation_scorer`` /
``ablation_head``) in chunks, with the one progress rule of ``anycam._progress``, and leaves
every formula to the NumPy core; no framework is imported here.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import core
from .._errors import AnycamWarning, TargetError, user_stacklevel
from .._progress import progress_bar
from ..core._namespace import device_of, is_numpy, namespace
from ..protocol.backend import AblationHead, Backend
from ..protocol.inputs import looks_spatial, structure_inputs
from .assembly import assemble, check_finite, float32, host, read_layouts
from .explanation import Explanation

if TYPE_CHECKING:
    from .explainer import Explainer

# Default chunk sizes (float32 values per chunk): about 16 MB of masked inputs for Score-CAM
# (the network's activations for those rows come on top), 256 MB of ablated layer outputs for
# Ablation-CAM (the network after a late layer is small, and fewer chunks mean fewer prefixes
# for backends that cannot keep the prefix between chunks).
SCORECAM_VALUES = 2**22
ABLATION_VALUES = 2**26
# A backend that keeps the prefix between chunks (it overrides head_scorer) loses nothing by
# small chunks, and cache-sized ones (16 MB) make filling and reading the copies much cheaper.
ABLATION_VALUES_KEPT = 2**22
MAX_ROWS = 4096


def _rows(explainer: Explainer, values_per_row: int, budget: int) -> int:
    if explainer.batch_size is not None:
        return explainer.batch_size
    return int(max(1, min(MAX_ROWS, budget // max(1, values_per_row))))


def _numpy(value: Any) -> np.ndarray:
    """Returns ``value`` as NumPy; a device tensor as its CPU copy, a bfloat16 one as float32."""
    try:
        return np.asarray(value)
    except (TypeError, RuntimeError):
        pass
    # A CUDA torch tensor refuses __array__; its CPU copy is what the masks multiply.
    copy = value.detach().cpu()
    try:
        return np.asarray(copy)
    except TypeError:
        # NumPy has no dtype for torch's bfloat16 ("unsupported ScalarType BFloat16"); float32
        # holds every bfloat16 value exactly, and the masks multiply in float32 anyway.
        return np.asarray(copy.float())


def numpy_input(inputs: Any) -> np.ndarray:
    """Returns one input batch as float32 NumPy (a CPU copy of a device tensor)."""
    return np.asarray(_numpy(inputs), dtype=np.float32)


class _MaskedInputs:
    """Score-CAM's view of the inputs: the spatial one is masked, the others follow its rows.

    A model with several inputs (a tuple, list or dict, see ``anycam.protocol.inputs``) gets masked
    copies of its spatial input together with the matching rows of every other batched input;
    unbatched values (flags, None) pass unchanged.
    """

    def __init__(self, inputs: Any, spatial_input: Any, *, host_copy: bool = True) -> None:
        self.structure = structure_inputs(inputs, is_spatial=looks_spatial, spatial_input=spatial_input)
        value = self.structure.spatial_value
        # With device masks a framework array stays where it is (_DeviceMasks casts it there):
        # copying it to the host only to move it back is the per-call copy issue 21 removes.
        self.x = numpy_input(value) if host_copy or not _framework_array(value) else value
        batch = int(self.x.shape[0])

        def batched(key: Any, value: Any) -> Any:
            if key == self.structure.spatial or getattr(value, "shape", None) is None:
                return value
            array = _numpy(value)
            return array if array.ndim >= 1 and array.shape[0] == batch else value

        self.others = self.structure.map(batched)

    def rows(self, samples: np.ndarray, masked: np.ndarray) -> Any:
        """Returns the inputs for ``samples`` with the spatial input replaced by ``masked``."""

        def pick(key: Any, value: Any) -> Any:
            if key == self.structure.spatial:
                return masked
            return value[samples] if isinstance(value, np.ndarray) else value

        return self.others.map(pick).container()


def _framework_array(value: Any) -> bool:
    """Whether ``value`` is an array of a namespace the core computes on, other than NumPy."""
    if is_numpy(value) or not hasattr(value, "shape"):
        return False
    try:
        return namespace(value) is not np
    except Exception:  # not an array-API array: the host copy, as before
        return False


def _mask_input(x: np.ndarray, masks: np.ndarray, input_layout: str) -> np.ndarray:
    """Multiplies x ``(B, ...)`` float32 *in place* by masks ``(B, *S)`` broadcast over its channels; returns x.

    In float32, as the model computes: masks lie in [0, 1], so rounding them to float32 changes
    the product by at most one float32 ulp, and a float64 product would double the traffic.
    """
    axis = 1 if input_layout == "channels_first" else masks.ndim
    x *= np.expand_dims(np.asarray(masks, dtype=np.float32), axis)
    return x


class _DeviceMasks:
    """Score-CAM's masked inputs built where the model runs (backends with ``native_arrays``).

    The input goes to the model's device once per explanation (``Backend.to_native``), each
    chunk's masks are upsampled and scaled there from the device activations, and the masked
    copies are multiplied there: nothing per chunk is made on the host and copied over. The mask
    math is the core's (``core.scorecam_masks``) on the arrays' namespace, in float32; the
    aligned-corners variant's resize is written here on the namespace (for c21-core-tf: a
    namespace ``core.scorecam_masks(align_corners=True)`` would replace ``_corners``).
    """

    def __init__(self, backend: Backend, x: Any, input_layout: str) -> None:
        self.backend = backend
        if is_numpy(x):
            self.x = backend.to_native(np.asarray(x, dtype=np.float32))
        else:  # the caller's framework array, float32 on its device (as numpy_input makes the host one)
            self.xp = namespace(x)
            self.x = x if x.dtype == self.xp.float32 else self.xp.astype(x, self.xp.float32)
        self.xp = namespace(self.x)
        self.axis = 1 if input_layout == "channels_first" else x.ndim - 1

    def masked(self, acts: Any, samples: np.ndarray, channels: np.ndarray, size: Any, corners: bool) -> Any:
        """Returns x[samples] · mask(acts[samples, channels]) on the device."""
        xp, to = self.xp, self.backend.to_native
        # xp.take on flattened (sample, channel) pairs: the array API has no paired integer
        # indexing (acts[rows, channels]), and TensorFlow has none at all.
        batch, count = int(acts.shape[0]), int(acts.shape[1])
        rows = to(np.ascontiguousarray(samples, dtype=np.int64))
        pairs = to(np.ascontiguousarray(np.asarray(samples) * count + np.asarray(channels), dtype=np.int64))
        maps = xp.take(xp.reshape(acts, (batch * count, *tuple(acts.shape[2:]))), pairs, axis=0)
        if corners:
            masks = core.normalize(self._corners(maps, size), "minmax", spatial_ndim=len(size))
        else:
            masks = core.scorecam_masks(maps, size)
        masks = xp.astype(masks, self.x.dtype)
        return xp.take(self.x, rows, axis=0) * xp.expand_dims(masks, axis=self.axis)

    def _corners(self, maps: Any, size: Any) -> Any:
        """``core.perturbation._resize_corners`` on the maps' namespace (the matrices copied over)."""
        from ..core.perturbation import _corner_matrix

        xp, out = self.xp, maps
        first = out.ndim - len(size)
        for axis, target in enumerate(size, start=first):
            if out.shape[axis] != target:
                matrix = _corner_matrix(out.shape[axis], int(target)).T
                matrix = xp.asarray(np.asarray(matrix, np.float32), device=device_of(out))
                out = xp.moveaxis(xp.moveaxis(out, axis, -1) @ matrix, -1, axis)
        return out


def scorecam(explainer: Explainer, inputs: Any, spec: core.TargetSpec) -> Explanation:
    """Score-CAM (Wang et al. 2020): weights from the scores of the input masked by each channel.

    A callable target gets the contract it has in every method: the model's output for the N
    samples, row i from sample i. So with a callable each model call takes one masked copy of
    every sample, in order (``batch_size`` does not split it); class-index targets are applied
    per row, so their copies are chunked freely.

    A backend with ``native_arrays`` gets its masked inputs built on the device in every mode
    (:class:`_DeviceMasks`); the weights are computed on the host from the (M, K) scores, as
    always, and the map from them with the activations where they are (device in native mode).
    """
    backend = explainer.backend
    on_device = backend.can("native_arrays")
    native_out = explainer.arrays == "native"
    keywords = {"native": True} if on_device else {}
    try:
        capture = backend.capture(inputs, spec, gradients=False, **keywords)
    except TargetError as exc:
        if spec.kind == "callable":
            raise
        raise TargetError(
            f"scorecam weights each channel by the target's class score, and {exc}; for a model whose "
            "output is not class scores pass a callable target that returns the score to weight by"
        ) from exc
    given = _MaskedInputs(inputs, explainer.spatial_input, host_copy=not on_device)
    x = given.x
    input_layout = backend.input_layout
    device = _DeviceMasks(backend, x, input_layout) if on_device else None
    if on_device and not native_out:
        # The NumPy mode's map and weights come from host copies of the (float32) activations,
        # exactly as from a NumPy capture; only the masks are made on the device.
        capture = dataclasses.replace(capture, scores=host(capture.scores))
    size = capture.input_spatial
    probabilities = explainer.scorecam == "probability" and spec.kind != "callable"
    # One output (a binary classifier's logit): its softmax is 1 whatever the input, so every
    # weight would be 1; the probability such a model means is the sigmoid of the logit.
    sigmoid = probabilities and _one_output(backend, inputs, capture)
    probabilities = probabilities and not sigmoid
    corners = explainer.scorecam == "pytorch-grad-cam"
    per_sample = spec.kind == "callable"
    rows = _rows(explainer, math.prod(int(d) for d in x.shape[1:]), SCORECAM_VALUES)
    count = capture.scores.shape[1]
    results = []
    _, readings = read_layouts(explainer, capture)
    for index, name in enumerate(explainer.layer_names):
        activations = capture.activations[index]
        check_finite(activations, "activations", name)
        reading = readings[index]
        device_acts = None
        if device is not None:
            device_acts = core.to_channels_first(activations, reading.layout, lead=1, grid=reading.grid)
        if not is_numpy(activations) and not native_out:
            activations = host(activations)
        acts = core.to_channels_first(activations, reading.layout, lead=1, grid=reading.grid)
        batch, channels = acts.shape[:2]
        if explainer.scorecam_top_k is None:
            chosen = np.broadcast_to(np.arange(channels), (batch, channels))
        else:
            chosen = _top_variance(acts, explainer.scorecam_top_k)
        if per_sample:
            # Copy j of every sample in one call: rows (0, j), (1, j), … (N − 1, j).
            samples = np.tile(np.arange(batch), chosen.shape[1])
            picked = chosen.T.reshape(-1)
            step = batch
        else:
            samples = np.repeat(np.arange(batch), chosen.shape[1])
            picked = chosen.reshape(-1)
            step = rows
        scores = np.zeros((batch, count, channels), dtype=np.float64)
        scored = np.zeros((batch, 1, channels), dtype=bool)
        scored[samples, 0, picked] = True
        with progress_bar(explainer.progress, samples.size, f"anycam scorecam {name}", "row") as bar:
            for start in range(0, samples.size, step):
                n, k = samples[start : start + step], picked[start : start + step]
                if device is not None:
                    masked = device.masked(device_acts, n, k, size, corners)
                else:
                    masks = core.scorecam_masks(acts[n, k], size, align_corners=corners)
                    masked = _mask_input(x[n], masks, input_layout)  # x[n] is a fresh copy
                targets = None if capture.target is None else capture.target[n]
                batch_inputs = given.rows(n, masked)
                out = np.asarray(backend.input_scores(batch_inputs, spec, targets, probabilities=probabilities))
                scores[n, :, k] = out.reshape(len(n), count)
                bar.update(len(n))
        core.check_finite(scores, "masked-input scores", name)
        if sigmoid:
            scores = core.sigmoid(scores)
        weights = core.scorecam_weights(scores, explainer.scorecam, mask=scored)
        cam = core.weighted_cam(acts[:, None, ...], weights, channel_axis=2, rectify=explainer.relu)
        if is_numpy(cam):
            results.append(core.LayerResult(float32(cam), float32(weights)))
        else:  # native mode: the map on the device, the host-computed weights moved beside it
            results.append(core.LayerResult(cam, backend.to_native(float32(weights))))
    return assemble(explainer, results, capture, spec)


def _top_variance(acts: Any, k: int) -> np.ndarray:
    """``core.top_variance_channels`` of host or device activations: (N, k) int64 on the host.

    On the device the variances are taken there (float32) and only the (N, k) indices come over.
    """
    if is_numpy(acts):
        return core.top_variance_channels(acts, k)
    xp = namespace(acts)
    flat = xp.reshape(acts, (*acts.shape[:2], -1))
    variance = xp.var(xp.astype(flat, xp.float32), axis=-1)
    order = xp.argsort(-variance, axis=-1, stable=True)[:, : min(k, acts.shape[1])]
    return host(order).astype(np.int64)


def _one_output(backend: Backend, inputs: Any, capture: Any) -> bool:
    """Whether the explained output has a single class (every class-index target is then 0).

    A target above 0 proves there are several; otherwise class 1 is asked for in one forward
    pass (1/C of Score-CAM's cost), which only a one-output model refuses as out of range.
    """
    if capture.target is not None and np.any(capture.target > 0):
        return False
    batch = capture.scores.shape[0]
    try:
        backend.capture(inputs, core.parse_target([1] * batch), gradients=False)
    except TargetError:
        return True
    return False


def ablationcam(explainer: Explainer, inputs: Any, spec: core.TargetSpec) -> Explanation:
    """Ablation-CAM (Desai & Ramaswamy 2020): weights from the score drop when a channel is zeroed."""
    backend = explainer.backend
    # A backend with native_arrays keeps the layer output on the device in every mode: its
    # ablation_head / ablation_scorer take it there (no copy to the host and back per call);
    # only the NumPy mode's map is made from a host copy, as from a NumPy capture.
    on_device = backend.can("native_arrays")
    capture = backend.capture(inputs, spec, gradients=False, **({"native": True} if on_device else {}))
    scores = host(capture.scores)  # (N, K): the weights are computed on the host from them
    if explainer.arrays != "native":
        capture = dataclasses.replace(capture, scores=scores)
    name = explainer.layer_names[0]
    activations = capture.activations[0]
    check_finite(activations, "activations", name)
    reading = read_layouts(explainer, capture)[1][0]
    layout = reading.layout
    channel_axis = 1 if layout == "channels_first" else -1
    batch, channels = int(activations.shape[0]), int(activations.shape[channel_axis])
    count = capture.scores.shape[1]
    # A backend that keeps the part before the layer between chunks (it overrides head_scorer or
    # ablation_scorer) loses nothing by small chunks, and cache-sized ones are faster.
    keeps_prefix = (
        type(backend).head_scorer is not Backend.head_scorer
        or type(backend).ablation_scorer is not Backend.ablation_scorer
    )
    budget = ABLATION_VALUES_KEPT if keeps_prefix else ABLATION_VALUES
    per_copy = max(1, _rows(explainer, math.prod(int(d) for d in activations.shape[1:]), budget) // batch)
    scorer: Any = None
    head = backend.ablation_head(inputs, spec, capture.target, activations, channel_axis)
    if head is not None and _head_agrees(head, scores, name):
        scorer = _head_scorer(head)
        features = head.pooled.shape[1] if head.weight is None else head.weight.shape[1]
        per_copy = max(1, _rows(explainer, features, ABLATION_VALUES_KEPT) // batch)
    if scorer is None:
        if type(backend).ablation_scorer is Backend.ablation_scorer and not is_numpy(activations):
            activations_for = host(activations)  # the protocol's default builds its copies in NumPy
        else:
            activations_for = activations
        scorer = backend.ablation_scorer(inputs, spec, capture.target, activations_for, channel_axis)
    ablated = np.zeros((batch, count, channels), dtype=np.float64)
    with progress_bar(explainer.progress, channels * batch, f"anycam ablationcam {name}", "row") as bar:
        for start in range(0, channels, per_copy):
            chunk = np.arange(start, min(channels, start + per_copy))
            out = np.asarray(scorer(chunk)).reshape(len(chunk), batch, count)
            ablated[:, :, chunk] = out.transpose(1, 2, 0)
            bar.update(len(chunk) * batch)
    core.check_finite(ablated, "ablated scores", name)
    weights = core.ablation_weights(scores, ablated)
    if explainer.arrays != "native" and not is_numpy(activations):
        activations = host(activations)
    acts = core.to_channels_first(activations, layout, lead=1, grid=reading.grid)
    cam = core.weighted_cam(acts[:, None], weights, channel_axis=2, rectify=explainer.relu)
    if is_numpy(cam):
        result = core.LayerResult(float32(cam), float32(weights))
    else:  # native mode: the map on the device, the host-computed weights moved beside it
        result = core.LayerResult(cam, backend.to_native(float32(weights)))
    return assemble(explainer, [result], capture, spec)


def _head_scorer(head: AblationHead) -> Callable[[np.ndarray], np.ndarray]:
    """Returns f(channels (B,)) -> (B, N, K): the tail's scores of the closed-form ablated features."""

    def scores(channels: np.ndarray) -> np.ndarray:
        features = core.ablated_head_features(head.pooled, channels, head.weight, head.bias)
        return np.asarray(head.tail(features.astype(np.float32)))

    return scores


def _head_agrees(head: AblationHead, scores: np.ndarray, name: str) -> bool:
    """Whether the backend's pooling → [dense] → tail reproduces the capture's unablated scores.

    The backend recognised the head from the model's structure; this checks the recognition on
    the numbers (one tail call on N vectors) before every channel's score is taken from it.
    """
    features = core.head_features(head.pooled, head.weight, head.bias)[None].astype(np.float32)
    try:
        got = np.asarray(head.tail(features), dtype=np.float64).reshape(np.shape(scores))
    except Exception as exc:  # any failure means: run the suffix instead
        reason = f"its tail failed ({type(exc).__name__}: {exc})"
    else:
        want = np.asarray(scores, dtype=np.float64)
        scale = max(float(np.abs(want).max()) if want.size else 0.0, 1e-12)
        if np.allclose(got, want, rtol=1e-4, atol=1e-5 * scale):
            return True
        reason = f"its scores differ from the model's by up to {float(np.abs(got - want).max()):.3g}"
    warnings.warn(
        f"ablationcam: the network after layer {name!r} looked like pooling → dense → head, but "
        f"{reason}; running the network after the layer on every ablated copy instead (slower). "
        "Please report this model's structure.",
        AnycamWarning,
        stacklevel=user_stacklevel(),
    )
    return False
