"""The one progress-bar rule of anycam, shared by the Explainer, the metrics and the dataset runner.

``progress=True`` always shows a tqdm bar; ``progress=False`` never does; ``progress=None``
(every default) shows one only once the work has taken over 2 s (tqdm's ``delay``), so short
runs stay quiet and long ones (Score-CAM on a large network, the metrics, TTA, the sanity
check, a dataset) are never silent. tqdm is one of anycam's own dependencies, installed with
it; an environment that lacks it anyway gets no bar for ``None`` and an
``anycam.MissingExtraError`` naming the install for ``True``.

The long-running entry points and their bars: the Explainer's ``scorecam`` and ``ablationcam``
(rows of masked inputs or ablated copies), ``TTAExplainer`` (views), ``anycam.metrics``'
``deletion``/``insertion``/``average_drop_increase`` (scored images) and ``StreamingMetrics``,
``anycam.sanity_check`` (randomised models), and ``explain_dataset`` and the CLI.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any, Protocol

from ._errors import MissingExtraError

#: Seconds a ``progress=None`` run goes before its bar appears (short runs stay quiet).
DELAY = 2.0


class Bar(Protocol):
    """What the callers use of a bar: ``update(n)`` after each chunk of ``n`` units."""

    def update(self, n: int = 1) -> Any:
        """Advances the bar by ``n`` units."""


class _NoBar:
    def update(self, n: int = 1) -> None:
        """Does nothing."""


@contextlib.contextmanager
def progress_bar(progress: bool | None, total: int | None, desc: str, unit: str, **options: Any) -> Iterator[Bar]:
    """Yields a tqdm bar of ``total`` units (or a no-op bar) by the module's rule; closes it on exit.

    Args:
        progress: True (always a bar), False (never) or None (a bar once the work has taken
            over :data:`DELAY` seconds; none without tqdm).
        total: the units of work, or None when unknown.
        desc, unit: the bar's label and unit.
        **options: further tqdm options of that caller (``leave``, ``dynamic_ncols`` …).

    Raises:
        anycam.MissingExtraError: ``progress=True`` and tqdm is not installed.
    """
    bar: Any = None
    if progress is not False:
        try:
            # The package first: its absence must show even where tqdm.auto was imported before.
            importlib.import_module("tqdm")
            from tqdm.auto import tqdm
        except ImportError:
            if progress:
                raise MissingExtraError(
                    'progress=True needs tqdm, a dependency of anycam missing from this environment: '
                    'pip install tqdm (or reinstall anycam: pip install anycam, or pip install . from a checkout)'
                    "; progress=None shows a bar only where tqdm is installed"
                ) from None
        else:
            bar = tqdm(total=total, desc=desc, unit=unit, delay=0 if progress else DELAY, **options)
    try:
        yield bar if bar is not None else _NoBar()
    finally:
        if bar is not None:
            bar.close()
