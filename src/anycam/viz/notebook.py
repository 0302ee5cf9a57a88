"""The figure class anycam returns: a matplotlib ``Figure`` that displays itself in a notebook.

anycam builds figures without ``pyplot`` (nothing is registered globally, so a loop that makes a
thousand figures holds none of them). Such a figure has no pyplot manager, and Jupyter shows it
only as ``<Figure size 890x260 with 5 Axes>`` unless ``%matplotlib inline`` already registered
matplotlib's PNG printer, and ``Figure.show()`` raises. ``NotebookFigure`` gives the figure its
own PNG representation (``_repr_png_``, what IPython's display asks an object for) and a
``show()`` that displays it in a notebook, or hands it to pyplot's window elsewhere.

Importing this module imports matplotlib; ``anycam.viz.figures`` imports it only to draw.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from matplotlib.figure import Figure

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


class NotebookFigure(Figure):
    """A matplotlib ``Figure`` that displays as a PNG in Jupyter as returned, pyplot or not."""

    def _repr_png_(self) -> bytes:
        """Returns the figure as PNG bytes: what Jupyter shows for a cell's value or ``display(fig)``."""
        buffer = io.BytesIO()
        # The notebook shows the drawn area, as matplotlib's inline backend does.
        self.savefig(buffer, format="png", bbox_inches="tight")
        return buffer.getvalue()

    def show(self, warn: bool = True) -> None:
        """Shows the figure: in a notebook as the cell's output, elsewhere in a pyplot window.

        Raises:
            FigureShowError: outside a notebook when this matplotlib's pyplot cannot adopt a
                figure made without it (before matplotlib 3.10); save it with ``fig.savefig``.
        """
        if _in_notebook() is not None:
            from IPython.display import display

            display(self)
            return
        if self.canvas.manager is None:
            import matplotlib.pyplot as plt

            try:
                plt.figure(self)  # matplotlib >= 3.10 gives an unmanaged figure a window
            except (TypeError, ValueError) as exc:
                raise FigureShowError(
                    "this figure was made without pyplot and this matplotlib cannot give it a window "
                    f"({exc}); save it with fig.savefig('figure.png'), or display it in a notebook"
                ) from exc
        super().show(warn=warn)


__all__ = ["FigureShowError", "NotebookFigure"]
