"""``anycam.ray``: ``BatchExplainer`` for Ray Data's ``Dataset.map_batches`` (see ``anycam.dataset.ray``).

Importing it imports Ray (``pip install "anycam[ray]"``), as ``anycam.dataset.ray`` does.
"""

from __future__ import annotations

from .dataset.ray import BatchExplainer

__all__ = ["BatchExplainer"]
