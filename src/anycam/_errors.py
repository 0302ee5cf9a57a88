"""One family of exceptions: every error anycam raises is an ``AnycamError``.

Each also subclasses the builtin it refines, so ``except ValueError`` keeps working in code
that does not know anycam.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Iterable
from types import ModuleType


class AnycamError(Exception):
    """Base class of every error raised by anycam."""


class BackendError(AnycamError, RuntimeError):
    """No backend fits the model, or the chosen framework cannot be imported."""


class LayerError(AnycamError, LookupError):
    """A layer cannot be found, is never called, or does not reach the model output."""

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class TargetError(AnycamError, ValueError):
    """A target does not fit the model output or the batch."""


class InputError(AnycamError, ValueError):
    """The input has the wrong rank, dtype or layout."""


class NonFiniteError(AnycamError, FloatingPointError):
    """NaN or inf appeared in the input, the activations or the gradients."""


class ConfigError(AnycamError, ValueError):
    """A configuration value is unknown: a method, normalisation, upsampling, aggregation or layout."""


class ConfigTypeError(AnycamError, TypeError):
    """A configuration argument is unknown or of the wrong type.

    An option the backend does not know, ``model_kwargs`` that is not a dict, or a model the
    chosen backend cannot take.
    """


class AnycamWarning(UserWarning):
    """Base class of the warnings anycam gives (filter them with ``warnings.filterwarnings``)."""


# The folders of the anycam package (``anycam`` and ``anycam.backends`` may lie apart in a
# source checkout): a warning is attributed to the first frame outside them.
_PACKAGE_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (__file__, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "backends", "x"))
)


def user_stacklevel() -> int:
    """Returns the ``stacklevel`` for ``warnings.warn`` that points at the user's line.

    Counts the frames from the function that calls this one (level 1) out to the first frame
    whose file is not part of anycam, so the warning names the user's call however deep inside
    anycam (the Explainer, a method, an adapter) it was raised.
    """
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIRS):
        frame = frame.f_back
        level += 1
    return level


class ZeroMapWarning(AnycamWarning):
    """A map came out all zero (or flat): it carries no localisation."""


class TrainingModeWarning(AnycamWarning):
    """A module that behaves differently in training is in training mode."""


class UnsupportedError(AnycamError, NotImplementedError):
    """The backend cannot do what was asked of this model (a capability it lacks, a model it cannot copy)."""


class MissingExtraError(AnycamError, ImportError):
    """An optional dependency (matplotlib, Pillow, scipy) that a feature needs cannot be imported."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Returns the imported ``module``, or raises a MissingExtraError naming the pip extra.

    Optional dependencies are imported inside the functions that need them, so that
    ``import anycam`` needs NumPy only.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise MissingExtraError(
            f'{purpose} needs {package} ({exc}); pip install "anycam[{extra}]" '
            f'(from a source checkout: pip install ".[{extra}]")'
        ) from exc


def closest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Returns a "closest: 'a', 'b'" hint for an unknown ``name`` (empty if nothing is close)."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if not matches:
        matches = [c for c in candidates if name and (name in c or c in name)][:n]
    if not matches:
        return ""
    return "; closest: " + ", ".join(repr(m) for m in matches)
