"""Whole datasets: ``explain_dataset`` streams batches through an Explainer into a resumable store.

``runner`` parses batches, explains them and writes parts in order (resuming where a killed run
stopped); ``store`` holds the Parquet parts, the manifest and the index, and
:class:`ExplanationStore`, which reads them; ``lock`` keeps a second writer out;
``fingerprint`` hashes the model's weights and the batches' inputs; ``errors`` holds the store's
errors; ``ray`` (imported only on request, it imports Ray) holds ``BatchExplainer`` for Ray
Data, also importable as ``anycam.ray.BatchExplainer``.
"""

from __future__ import annotations

from .errors import (
    StoreCorruptError,
    StoreError,
    StoreFormatError,
    StoreKeyError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreWriteError,
)
from .lock import LOCK
from .runner import describe_target, explain_dataset, explainer_config
from .store import FIELDS, FORMAT_VERSION, HEATMAP_DTYPES, INDEX, MANIFEST, ExplanationStore

__all__ = [
    "FIELDS",
    "FORMAT_VERSION",
    "HEATMAP_DTYPES",
    "INDEX",
    "LOCK",
    "MANIFEST",
    "ExplanationStore",
    "StoreCorruptError",
    "StoreError",
    "StoreFormatError",
    "StoreKeyError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreWriteError",
    "describe_target",
    "explain_dataset",
    "explainer_config",
]
