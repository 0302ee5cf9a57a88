"""The errors of the dataset store: each an ``anycam.AnycamError`` and the builtin it refines."""

from __future__ import annotations

from .._errors import AnycamError


class StoreError(AnycamError):
    """Base class of the errors of an ``explain_dataset`` store."""


class StoreMismatchError(StoreError, ValueError):
    """An ``out=`` store was written by another configuration, model or data."""


class StoreWriteError(StoreError, OSError):
    """Writing a part failed (disk full, permissions); the store still holds every complete part."""


class StoreCorruptError(StoreError, ValueError):
    """A store's file is missing, truncated or changed since it was written (the message names it)."""


class StoreFormatError(StoreError, ValueError):
    """A store was written in a format version this anycam does not read."""


class StoreLockedError(StoreError, RuntimeError):
    """Another run holds the store's writer lock."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """There is no anycam store at the path."""


class StoreKeyError(StoreError, KeyError):
    """An id or a column that the store does not hold."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""
