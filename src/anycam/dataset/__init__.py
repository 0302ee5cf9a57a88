"""Whole datasets: ``explain_dataset`` streams batches through an Explainer into a resumable store.

``runner`` parses batches, explains them and writes parts in order (resuming where a killed run
stopped); ``store`` holds the Parquet parts, the manifest and the index, and
:class:`ExplanationStore`, which reads them; ``ray`` (imported only on request, it imports Ray)
holds ``BatchExplainer`` for Ray Data, also importable as ``anycam.ray.BatchExplainer``.
"""

from __future__ import annotations

from .runner import describe_target, explain_dataset, explainer_config
from .store import (
    FIELDS,
    FORMAT_VERSION,
    HEATMAP_DTYPES,
    INDEX,
    MANIFEST,
    ExplanationStore,
    StoreMismatchError,
    StoreWriteError,
)

__all__ = [
    "FIELDS",
    "FORMAT_VERSION",
    "HEATMAP_DTYPES",
    "INDEX",
    "MANIFEST",
    "ExplanationStore",
    "StoreMismatchError",
    "StoreWriteError",
    "describe_target",
    "explain_dataset",
    "explainer_config",
]
