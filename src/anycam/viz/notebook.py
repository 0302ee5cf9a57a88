"""The figure class anycam returns: a matplotlib ``Figure`` that displays itself in a notebook.

anycam builds figures without ``pyplot`` (nothing is registered globally, so a loop that makes a
thousand figures holds none of them). Such a figure has no pyplot manager, and Jupyter shows it
only as ``<Figure size 890x260 with 5 Axes>`` unless ``%matplotlib inline`` already registered
matplotlib's PNG printer, and ``Figure.show()`` raises. ``NotebookFigure`` gives the figure its
own PNG representation (``_repr_png_``, what IPython's display asks an object for) and a
``show()`` that displays it in a notebook, or hands it to pyplot's window elsewhere.

The class is made on first use (``figure_class()``, or ``anycam.viz.notebook.NotebookFigure``), so
importing this module imports no matplotlib.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from .._errors import AnycamError


class FigureShowError(AnycamError, AttributeError):
    """``show()`` has nowhere to show the figure (no notebook, and pyplot cannot adopt it)."""


def _in_notebook() -> Any:
    """Returns the running IPython kernel's shell, or None outside a kernel."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    shell = ipython.get_ipython()
    # A terminal IPython has no rich display: it prints the repr, so use a window there.
    return shell if shell is not None and hasattr(shell, "kernel") else None


def _repr_png_(self: Any) -> bytes:
    """Returns the figure as PNG bytes: what Jupyter shows for a cell's value or ``display(fig)``."""
    buffer = io.BytesIO()
    # The notebook shows the drawn area, as matplotlib's inline backend does.
    self.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _show(self: Any, warn: bool = True) -> None:
    """Shows the figure: in a notebook as the cell's output, elsewhere in a pyplot window.

    Raises:
        FigureShowError: outside a notebook when this matplotlib's pyplot cannot adopt a figure
            made without it (before matplotlib 3.10); save it with ``fig.savefig``.
    """
    if _in_notebook() is not None:
        from IPython.display import display

        display(self)
        return
    from matplotlib.figure import Figure

    if self.canvas.manager is None:
        import matplotlib.pyplot as plt

        try:
            plt.figure(self)  # matplotlib >= 3.10 gives an unmanaged figure a window
        except (TypeError, ValueError) as exc:
            raise FigureShowError(
                "this figure was made without pyplot and this matplotlib cannot give it a window "
                f"({exc}); save it with fig.savefig('figure.png'), or display it in a notebook"
            ) from exc
    Figure.show(self, warn=warn)


_CLASS: type | None = None


def figure_class() -> type:
    """Returns ``NotebookFigure``, a ``matplotlib.figure.Figure`` subclass that displays as PNG in Jupyter."""
    global _CLASS
    if _CLASS is None:
        from matplotlib.figure import Figure

        _CLASS = type(
            "NotebookFigure",
            (Figure,),
            {
                "__doc__": "A matplotlib ``Figure`` that displays as a PNG in Jupyter as returned, pyplot or not.",
                "__module__": __name__,
                "_repr_png_": _repr_png_,
                "show": _show,
            },
        )
    return _CLASS


def __getattr__(name: str) -> Any:
    # ``anycam.viz.notebook.NotebookFigure`` (also what pickle looks up) makes the class on demand.
    if name == "NotebookFigure":
        return figure_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FigureShowError", "figure_class"]
