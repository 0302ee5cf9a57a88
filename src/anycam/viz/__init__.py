"""Pictures and figures of heatmaps: ``overlay`` (colour overlays, PNG files, grids, boxes as uint8
RGB arrays; NumPy, Pillow and matplotlib's colormaps) and ``figures`` (``plot``, ``plot_sanity``,
``to_png``: matplotlib figures). Neither imports matplotlib or Pillow until it draws.
"""

from __future__ import annotations

from .._errors import MissingExtraError
from .figures import plot, plot_sanity, to_png
from .notebook import FigureShowError
from .overlay import draw_box, grid, overlay, save

__all__ = [
    "FigureShowError",
    "MissingExtraError",
    "draw_box",
    "grid",
    "overlay",
    "plot",
    "plot_sanity",
    "save",
    "to_png",
]
