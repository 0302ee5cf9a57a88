"""The scoring runner of the faithfulness metrics: validated inputs, maps and targets, and model runs.

A metric hands the model batches of modified images; :class:`Run` checks what the user passed
(inputs, heatmaps, target, score), resolves class targets on the original images and scores
each batch's target, from an ``anycam.Explainer`` (its backend's ``predict``), an
``anycam.Backend`` or any NumPy callable. Nothing here imports a framework.

The metrics compute in NumPy (and scipy) on the host. Framework arrays — torch tensors,
TensorFlow tensors, JAX arrays, on any device, attached to a graph or not, such as the
heatmaps of ``Explainer(arrays="native")`` or ``differentiable=True`` — are accepted wherever
an array is (inputs, heatmaps, targets, baselines, regions, a ``predict``'s outputs) and are
copied to the host once, when they enter, by :func:`to_numpy`: the numbers are those of the
same values given as NumPy.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._errors import ConfigError, ConfigTypeError, InputError, NonFiniteError, TargetError
from .._progress import Bar, progress_bar
from ..core._namespace import is_numpy
from ..core.layout import canonical_layout, spatial_shape
from ..core.targets import TargetSpec, parse_target

Predict = Callable[[np.ndarray], Any]
"""What a metric runs: a NumPy batch ``(B, ...)`` to ``(B, classes)`` outputs (or anything a callable target reads)."""


class Run:
    """Validated inputs, heatmaps and target of one metric, and the scoring of image batches."""

    def __init__(
        self,
        predict: Any,
        inputs: Any,
        heatmaps: Any,
        target: Any,
        score: Any,
        batch_size: Any,
        input_layout: str | None,
    ) -> None:
        self.predict, self.layout = predictor(predict, input_layout)
        target = target if callable(target) else to_numpy(target, "target")
        self.inputs = as_inputs(inputs)
        self.spatial = spatial_shape(self.inputs.shape, self.layout)
        self.count = self.inputs.shape[0]
        if self.count == 0:
            raise InputError("inputs hold no samples")
        self.heatmaps = as_maps(heatmaps)
        expected = (self.count, *self.spatial)
        if self.heatmaps.shape != expected:
            if self.heatmaps.shape[:1] + self.heatmaps.shape[2:] == expected:
                raise InputError(
                    f"heatmaps of shape {self.heatmaps.shape} hold several maps per sample; "
                    "metrics take one: pass heatmaps[:, k] with the k-th column of the target"
                )
            raise InputError(
                f"heatmaps of shape {self.heatmaps.shape} do not fit inputs of shape "
                f"{self.inputs.shape} ({self.layout}): expected {expected}; resize maps with "
                f"anycam.core.resize(maps, {self.spatial}), or set input_layout"
            )
        self.spec = metric_target(target, self.count)
        self.transform = score_transform(score)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.target: np.ndarray | None = None

    def channel_mask(self, spatial: np.ndarray) -> np.ndarray:
        """Returns ``(B, *S)`` values shaped to broadcast against the ``(B, ...)`` images."""
        return spatial[:, None] if self.layout == "channels_first" else spatial[..., None]

    def score_originals(self, bar: Bar) -> np.ndarray:
        """Scores the unmodified inputs, resolving None/int targets on the way; returns ``(N,)``."""
        scores = np.empty(self.count, dtype=np.float64)
        if self.spec.kind != "callable":
            self.target = np.zeros(self.count, dtype=np.int64)
        for rows in chunks(self.count, self.batch_size):
            outputs = self._forward(self.inputs[rows])
            if self.spec.kind != "callable":
                assert self.target is not None
                classes = outputs.shape[1]
                if self.spec.kind == "argmax":
                    self.target[rows] = np.argmax(outputs, axis=1)
                else:
                    assert self.spec.indices is not None
                    indices = self.spec.indices[:, 0]
                    self.target[rows] = indices if self.spec.kind == "index" else indices[rows]
                    largest = int(self.target[rows].max())
                    if largest >= classes:
                        raise TargetError(f"target class {largest} is out of range: the model has {classes} outputs")
            scores[rows] = self._scores(outputs, rows)
            bar.update(len(rows))
        return scores

    def score(self, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Returns ``(B,)`` scores of ``images``, row b for the target of sample ``rows[b]``."""
        return self._scores(self._forward(images), rows)

    def _forward(self, images: np.ndarray) -> Any:
        outputs = self.predict(images)
        if self.spec.kind == "callable":
            return outputs
        outputs = to_numpy(outputs, "predict's outputs")
        try:
            outputs = np.asarray(outputs, dtype=np.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"predict must return an array of numbers (NumPy or a framework's), got "
                f"{type(outputs).__name__}; or pass the anycam.Explainer"
            ) from exc
        if outputs.ndim != 2 or outputs.shape[0] != len(images):
            raise TargetError(
                "class-index targets need predict to return (B, classes) outputs, got "
                f"{outputs.shape} for a batch of {len(images)}; pass a callable target that "
                "maps the output to (B,) scores"
            )
        return outputs

    def _scores(self, outputs: Any, rows: np.ndarray) -> np.ndarray:
        if self.spec.kind == "callable":
            assert self.spec.fn is not None
            values = np.asarray(to_numpy(self.spec.fn(outputs), "the callable target's scores"), dtype=np.float64)
            if values.shape not in ((len(rows),), (len(rows), 1)):
                raise TargetError(
                    f"a callable target must map a batch of {len(rows)} outputs to ({len(rows)},) "
                    f"scores, got shape {values.shape}"
                )
            values = values.reshape(len(rows))
        else:
            if not np.all(np.isfinite(outputs)):
                raise NonFiniteError("the model's outputs hold NaN or inf; check the inputs and baseline")
            table = self.transform(outputs)
            if table.shape != outputs.shape:
                raise TargetError(f"a score function must return the outputs' shape {outputs.shape}, got {table.shape}")
            assert self.target is not None
            values = table[np.arange(len(rows)), self.target[rows]]
        if not np.all(np.isfinite(values)):
            raise NonFiniteError("the target's scores hold NaN or inf; check the model, inputs and baseline")
        return values


def predictor(predict: Any, input_layout: str | None) -> tuple[Predict, str]:
    """Returns the NumPy predict function and the input layout for what the user passed."""
    from ..explain.explainer import Explainer
    from ..protocol.backend import Backend

    # An Explainer is itself callable (it returns heatmaps), so it must be recognised first.
    backend = predict.backend if isinstance(predict, Explainer) else predict
    if isinstance(backend, Backend):
        function: Predict = backend.predict
        layout = input_layout or backend.input_layout or "channels_first"
    elif callable(predict):
        function = predict
        layout = input_layout or "channels_first"
    else:
        raise ConfigTypeError(
            f"predict must be an anycam.Explainer or a callable from a NumPy batch to (N, classes) "
            f"outputs, got {type(predict).__name__}"
        )
    return function, check_input_layout(layout)


def check_input_layout(layout: str) -> str:
    layout = canonical_layout(layout)
    if layout == "tokens":
        raise InputError("inputs cannot be in a token layout; use 'channels_first' or 'channels_last'")
    return layout


def metric_target(target: Any, count: int) -> TargetSpec:
    """Parses ``target`` into one class (or a callable) per sample."""
    spec = parse_target(target)
    if spec.kind == "topk":
        raise TargetError(
            "metrics score one class per sample; for top_k maps, run the metric once per column of Explanation.target"
        )
    if spec.kind == "indices":
        assert spec.indices is not None
        if spec.indices.shape[1] != 1:
            raise TargetError(
                f"metrics score one class per sample, got targets of shape {spec.indices.shape}; "
                "run the metric once per column"
            )
        if spec.indices.shape[0] != count:
            raise TargetError(
                f"got {spec.indices.shape[0]} targets for a batch of {count}; pass one per sample, "
                "or a single int for the whole batch"
            )
    return spec


def score_transform(score: Any) -> Callable[[np.ndarray], np.ndarray]:
    if callable(score):
        return lambda outputs: np.asarray(score(outputs), dtype=np.float64)
    if score == "logit":
        return lambda outputs: outputs
    if score == "probability":
        return _softmax
    raise ConfigError(f"unknown score {score!r}; choose 'probability', 'logit' or a callable")


def _softmax(outputs: np.ndarray) -> np.ndarray:
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def to_numpy(value: Any, what: str) -> Any:
    """Returns a framework array as a NumPy array on the host; anything else unchanged.

    The metrics' one rule for native outputs: a torch tensor is detached from its graph and
    copied from its device (bfloat16 as float32, which NumPy lacks), a TensorFlow tensor is read
    with ``.numpy()``, and a JAX array (any device) through ``numpy.asarray``. NumPy arrays,
    Python numbers and sequences pass as they are, and callables (targets, score functions)
    are left to the caller.

    Raises:
        anycam.InputError: an array with no values to read (a ``jax.jit`` tracer, a symbolic
            ``tf.function`` or Keras tensor): metrics run on concrete arrays, outside a trace.
    """
    if value is None or is_numpy(value) or callable(value):
        return value
    module = type(value).__module__
    try:
        if hasattr(value, "detach") and hasattr(value, "device"):  # torch, on any device, with a graph or not
            value = value.detach()
            if str(value.dtype) == "torch.bfloat16":
                value = value.float()
            return value.cpu().numpy()
        if module.startswith(("tensorflow", "tf_keras", "keras")):
            # An eager tensor or variable (any device); a symbolic one has no values and no numpy().
            return value.numpy()
        if module.startswith(("jax", "jaxlib")):
            return np.asarray(value)  # a JAX array, copied from its device; a tracer refuses
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise InputError(
            f"{what} is a {module}.{type(value).__name__} without values to read (made inside jax.jit, "
            f"tf.function or a symbolic graph?): the metrics run on concrete arrays, outside a trace ({exc})"
        ) from exc
    return value


def as_inputs(inputs: Any) -> np.ndarray:
    inputs = to_numpy(inputs, "inputs")  # its own InputError for a tracer, not re-worded below
    try:
        images = np.asarray(inputs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"inputs must be an array (NumPy, or a torch, TensorFlow or JAX array), got {type(inputs).__name__}"
        ) from exc
    if not np.issubdtype(images.dtype, np.floating):
        raise InputError(f"inputs must be floating point, got dtype {images.dtype}; scale them to floats first")
    if not np.all(np.isfinite(images)):
        raise InputError("inputs hold NaN or inf")
    return images


def host_maps(heatmaps: Any) -> Any:
    """Returns heatmaps on the host: an array of any framework (:func:`to_numpy`), or an
    ``anycam.Explanation``'s ``heatmap`` (in either array mode)."""
    from ..explain.explanation import Explanation

    if isinstance(heatmaps, Explanation):
        heatmaps = heatmaps.heatmap
    return to_numpy(heatmaps, "heatmaps")


def as_maps(heatmaps: Any) -> np.ndarray:
    """Returns the heatmaps as checked float64 NumPy (see :func:`host_maps`)."""
    heatmaps = host_maps(heatmaps)
    try:
        maps = np.asarray(heatmaps, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"heatmaps must be a numeric array, got {type(heatmaps).__name__}") from exc
    if maps.ndim < 2:
        raise InputError(f"heatmaps must be (N, *spatial), got shape {maps.shape}")
    if not np.all(np.isfinite(maps)):
        raise InputError("heatmaps hold NaN or inf")
    return maps


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def chunks(total: int, size: int) -> Iterator[np.ndarray]:
    for start in range(0, total, size):
        yield np.arange(start, min(start + size, total))


def masked_scores(
    run: Run, progress: bool | None, label: str, *, name: str | None = None, keep: bool = False, positive: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scores the images and the images ⊙ heatmap: ``(Y, O, masked images or None)``.

    The one loop of Average Drop/Increase, Average Gain and ADCC. ``label`` names the progress
    bar, ``name`` the metric in errors (default: ``label``); ``keep`` returns the masked images;
    ``positive`` refuses original scores ≤ 0 before any masked image is scored (Average Drop
    divides by them).
    """
    name = label if name is None else name
    low, high = float(run.heatmaps.min()), float(run.heatmaps.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise InputError(
            f"heatmaps must lie in [0, 1] for {name}, got values in [{low:.4g}, {high:.4g}]; "
            "normalise them first, e.g. anycam.core.normalize(maps)"
        )
    weights = run.channel_mask(np.clip(run.heatmaps, 0.0, 1.0))
    kept = np.empty_like(run.inputs) if keep else None
    with progress_bar(progress, 2 * run.count, label, "image", leave=False) as bar:
        original = run.score_originals(bar)
        if positive and np.any(original <= 0):
            bad = np.flatnonzero(original <= 0)
            raise InputError(
                f"{name} divides by the original score, which is <= 0 for sample(s) "
                f"{bad[:5].tolist()}; use score='probability' (softmax), which is always positive"
            )
        masked = np.empty(run.count, dtype=np.float64)
        for rows in chunks(run.count, run.batch_size):
            images = (run.inputs[rows] * weights[rows]).astype(run.inputs.dtype, copy=False)
            if kept is not None:
                kept[rows] = images
            masked[rows] = run.score(images, rows)
            bar.update(len(rows))
    return original, masked, kept
