"""Beyond one machine: ``BatchExplainer``, a callable class for Ray Data's ``Dataset.map_batches``.

Ray Data does the scheduling, placement, retries and I/O; this module only explains a batch.
Each actor builds its model once from a user *factory* (a module-level function, or a
``functools.partial`` of one), so no model, tensor or compiled function crosses the wire, and
the same code runs on a laptop (``ray.init()``) and on a cluster (``ray.init(address=...)``)::

    import ray
    from anycam.ray import BatchExplainer

    ds = ray.data.read_images("s3://bucket/voc/", include_paths=True)   # columns image, path
    ds = ds.map(preprocess)                                                # to float (C, H, W)
    maps = ds.map_batches(
        BatchExplainer,
        fn_constructor_kwargs=dict(model_factory=load_resnet, layer="layer4", id_key="path"),
        compute=ray.data.ActorPoolStrategy(size=4),   # N actors (older Ray: concurrency=4)
        num_gpus=1,                                   # per actor, on a GPU cluster
        batch_size=32,
        batch_format="numpy",
    )
    maps.write_parquet("s3://bucket/cams/")

``ray`` itself is imported only when this module is (``pip install "anycam[ray]"``);
``BatchExplainer`` needs no Ray to run, so it is tested in-process as well.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import AnycamError, ConfigTypeError, InputError, require
from ..explain.explainer import Explainer
from ..explain.tta import TTAExplainer
from .runner import Keys, Runner, check_fields, parse_batch

# Importing anycam.ray is the user's statement that Ray is wanted: fail here, clearly.
ray = require("ray", "ray", "anycam.ray")

__all__ = ["BatchExplainer"]


class BatchExplainer:
    """Explains ``{column: ndarray}`` batches; returns NumPy columns ``id`` plus ``fields``.

    Built once per Ray actor (``map_batches(BatchExplainer, fn_constructor_kwargs=...)``).

    Args:
        model_factory: a picklable callable with no arguments that returns the model (load
            weights, move it to the GPU, set the thread count there).
        layer, method, backend: as for ``anycam.Explainer``.
        target: the target for every row (int, ``top_k``, callable), unless rows carry a
            ``target_key`` column.
        fields: what is returned besides ``id``: ``"heatmap"``, ``"target"``, ``"scores"``,
            ``"cam"``, ``"attribution"`` (default heatmap, target, scores).
        heatmap_dtype: ``"float32"`` or ``"float16"``.
        input_key, id_key, target_key: the batch's column names; ``id_key`` must exist (a Ray
            batch has no global position), e.g. ``"path"`` from ``read_images(include_paths=True)``.
        scales, flip, combine: test-time augmentation (``anycam.TTAExplainer``); the default is
            none.
        **explainer_options: further ``anycam.Explainer`` keywords (``normalize=``, ``layout=``…).

    Raises:
        anycam.ConfigTypeError: ``model_factory`` is not a factory (a model itself, say).
        anycam.ConfigError: an unknown ``heatmap_dtype``.
        anycam.InputError: an unknown field; a batch without the input or id column.
    """

    def __init__(
        self,
        model_factory: Callable[[], Any],
        layer: Any = None,
        method: str = "gradcam",
        backend: str | None = None,
        *,
        target: Any = None,
        fields: Sequence[str] = ("heatmap", "target", "scores"),
        heatmap_dtype: str = "float32",
        input_key: str = "image",
        id_key: str = "id",
        target_key: str = "target",
        scales: Sequence[float] | None = None,
        flip: bool = False,
        combine: str = "mean",
        **explainer_options: Any,
    ) -> None:
        if not _takes_no_arguments(model_factory):
            raise ConfigTypeError(
                f"model_factory must be a callable returning the model, got {type(model_factory).__name__}; "
                "pass a function (building the model in each actor), not the model itself"
            )
        explainer = Explainer(model_factory(), layer, method, backend, **explainer_options)
        if scales is not None or flip:
            explainer = TTAExplainer(explainer, scales if scales is not None else (1.0,), flip=flip, combine=combine)
        self.explainer = explainer
        self._keys = Keys(input_key, id_key, target_key, "regions")
        self._runner = Runner(explainer, target, check_fields(fields), heatmap_dtype, None, self._keys)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Returns ``{"id": (B,), field: (B, ...)}`` for one batch of rows."""
        if not isinstance(batch, Mapping):
            raise InputError(
                f"BatchExplainer takes dict batches, got {type(batch).__name__}; call map_batches with "
                "batch_format='numpy'"
            )
        if self._keys.id not in batch:
            raise InputError(
                f"the batch has no id column {self._keys.id!r} (columns: {sorted(batch)}); give each row an id, "
                "e.g. id_key='path' with read_images(include_paths=True)"
            )
        parsed = parse_batch(batch, self._keys, 0)
        inputs = np.asarray(parsed.inputs)
        if inputs.dtype == object:
            raise InputError(
                "the image column holds arrays of different shapes; resize in a map() step first, or "
                "use batch_size=1 to explain images one by one"
            )
        parsed.inputs = inputs
        assert parsed.ids is not None
        if not parsed.size:
            return {"id": parsed.ids}
        return {"id": parsed.ids, **self._runner.explain(parsed, 0)}


def _takes_no_arguments(factory: Any) -> bool:
    """False for a non-callable or for a model itself (models are callable too)."""
    if not callable(factory):
        return False
    backends = importlib.import_module("anycam.backends")
    try:
        backends.detect(factory)
    except AnycamError:
        return True
    return False
