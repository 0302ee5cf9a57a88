"""Figures: heatmaps beside their images (``anycam.plot``) and the sanity-check curves.

matplotlib is imported only when a figure is made (``pip install "anycam[viz]"``). Figures are
built on ``matplotlib.figure.Figure`` directly, not through ``pyplot``: nothing is registered
globally, so a loop that makes a thousand figures holds none of them, and no display is needed.
They are ``anycam.viz.notebook.NotebookFigure`` objects, which display in Jupyter as returned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import InputError, MissingExtraError
from .overlay import as_rgb_float, install_hint, lookup_colormap, overlay

# A figure wider than this no longer fits a notebook cell or a README column.
_MAX_WIDTH_INCHES = 16.0
_MAX_HEIGHT_INCHES = 30.0


def _figure_class() -> Any:
    """Returns ``NotebookFigure``: a ``Figure`` that displays in a notebook without pyplot."""
    try:
        # Checked on every call: the module below may be imported already while matplotlib is gone.
        import matplotlib.figure  # noqa: F401

        from .notebook import figure_class
    except ImportError as exc:
        raise MissingExtraError(f"figures need matplotlib ({exc}); {install_hint('viz')}") from exc
    return figure_class()


def _column_maps(maps: Any) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """Returns ``(column title, (N, K, *S) heatmaps, (N, K) targets or None)`` per map source."""
    if isinstance(maps, Mapping):
        if not maps:
            raise InputError("plot needs at least one map; got an empty mapping")
        sources = list(maps.items())
    else:
        sources = [(None, maps)]
    columns = []
    for title, source in sources:
        targets = None
        if hasattr(source, "heatmap"):
            heat = np.asarray(source.heatmap)
            targets = None if source.target is None else np.asarray(source.target)
            name = str(title) if title is not None else str(getattr(source, "method", ""))
            squeezed = np.asarray(source.scores).ndim == 1
        else:
            heat = np.asarray(source)
            name = "" if title is None else str(title)
            squeezed = heat.ndim == 3
        if heat.ndim not in (3, 4) or 0 in heat.shape:
            raise InputError(
                f"plot draws 2-D maps: heatmaps (N, H, W) or (N, K, H, W), got shape {heat.shape}"
                + (f" for {name!r}" if name else "")
            )
        if heat.ndim == 4 and squeezed:
            raise InputError(f"heatmaps of shape {heat.shape} are not 2-D maps")
        if not np.all(np.isfinite(heat)):
            raise InputError(f"heatmaps{f' for {name!r}' if name else ''} contain NaN or inf")
        if heat.ndim == 3:
            heat = heat[:, None]
        if targets is not None:
            targets = targets.reshape(len(targets), -1)
        columns.append((name, heat, targets))
    sizes = {len(heat) for _, heat, _ in columns}
    if len(sizes) != 1:
        raise InputError(f"every map source must hold the same number of samples, got {sorted(sizes)}")
    return columns


def _display_images(images: Any, count: int) -> np.ndarray | None:
    """Returns ``images`` as ``(N, H, W, 3)`` float in [0, 1] (floats outside it min-max scaled)."""
    if images is None:
        return None
    array = np.asarray(images)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4) and count == 1 and len(array) != 1):
        array = array[None]
    if len(array) != count:
        raise InputError(f"got {len(array)} images for maps of {count} samples; pass one image per sample")
    shown = []
    for index, image in enumerate(array):
        if np.issubdtype(image.dtype, np.floating) and image.size and np.all(np.isfinite(image)):
            low, high = float(image.min()), float(image.max())
            if low < 0.0 or high > 1.0:
                # Model inputs are often standardised; show them min-max scaled rather than refuse.
                image = (image - low) / (high - low) if high > low else np.zeros_like(image)
        try:
            shown.append(as_rgb_float(image))
        except InputError as exc:
            raise InputError(f"image {index}: {exc}") from None
    return np.stack(shown)


def _class_name(index: int, class_names: Sequence[str] | Mapping[int, str] | None) -> str:
    if class_names is None:
        return f"class {index}"
    try:
        return str(class_names[index])
    except (IndexError, KeyError):
        return f"class {index}"


def plot(
    images: Any,
    maps: Any,
    *,
    labels: Sequence[str] | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    boxes: Any = None,
    title: str | None = None,
    colormap: str | Any = "jet",
    alpha: float = 0.5,
    max_columns: int = 12,
    colorbar: bool = True,
    cell_inches: float | None = None,
    fontsize: float | None = None,
) -> Any:
    """Returns a matplotlib ``Figure``: each image, then its heatmaps as overlays, in titled columns.

    One group of cells per sample — the image (titled with ``labels[i]``), then one overlay per
    map column; groups wrap into rows so that at most ``max_columns`` cells stand side by side,
    so 1 to 64 images give a figure that fits a page. Column titles name the method (or the key
    of ``maps``); the explained class is named under each overlay when the maps carry targets.

    Args:
        images: ``(N, H, W)``, ``(N, H, W, 1|3)`` or ``(N, 1|3, H, W)``; uint8 or float (floats
            outside [0, 1], e.g. standardised model inputs, are min-max scaled per image for
            display). None draws the heatmaps alone.
        maps: an ``Explanation``, heatmaps ``(N, H, W)`` / ``(N, K, H, W)`` in [0, 1], or a mapping
            from column title to either (e.g. ``{"gradcam": ex1, "scorecam": ex2}``).
        labels: one caption per image (e.g. the true class).
        class_names: names of the class indices (a list, or a dict), for the overlays' captions.
        boxes: ``(N, 4)`` ``(row0, col0, row1, col1)`` boxes, ends exclusive, drawn on every cell
            of the sample with a "true box" legend.
        title: the figure's title.
        colormap: matplotlib colormap of the heatmaps.
        alpha: weight of the colour in the overlays (heatmaps alone are drawn fully coloured).
        max_columns: most cells per figure row.
        colorbar: draw the colour scale of the heatmaps (0 to 1), beside the maps.
        cell_inches: the width of one cell (default: up to 2 inches, less where the figure would
            grow past 16 inches wide or 30 inches tall).
        fontsize: the text size in points (default: in proportion to the cell, 5 to 9). Titles
            wider than their cell break at a hyphen or space.

    Returns:
        a ``matplotlib.figure.Figure`` (save with ``fig.savefig(path)``; in a notebook it displays
        as the cell's value, and ``fig.show()`` displays it too).

    Raises:
        InputError: for maps that are not 2-D, mismatched counts, or bad boxes/labels.
        MissingExtraError: if matplotlib cannot be imported.
    """
    columns = _column_maps(maps)
    count = len(columns[0][1])
    shown = _display_images(images, count)
    if labels is not None and len(labels) != count:
        raise InputError(f"got {len(labels)} labels for {count} samples")
    box_array = None
    if boxes is not None:
        box_array = np.asarray(boxes)
        if box_array.shape != (count, 4) or not np.issubdtype(box_array.dtype, np.number):
            raise InputError(f"boxes must be (N, 4) = ({count}, 4) (row0, col0, row1, col1), got {box_array.shape}")
    if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 1:
        raise InputError(f"max_columns must be a positive integer, got {max_columns!r}")
    for option, value in (("cell_inches", cell_inches), ("fontsize", fontsize)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise InputError(f"{option} must be a positive number, got {value!r}")
    cmap = lookup_colormap(colormap)
    figure_class = _figure_class()

    cells = sum(heat.shape[1] for _, heat, _ in columns) + (shown is not None)
    if cells <= max_columns:  # whole samples side by side
        per_row = max(1, min(count, max_columns // cells))
        grid_cols, grid_rows = cells * per_row, math.ceil(count / per_row)
    else:  # one sample's cells wrap over several rows
        per_row, grid_cols = 1, max_columns
        grid_rows = count * math.ceil(cells / max_columns)

    def position(sample: int, index: int) -> tuple[int, int]:
        if cells <= max_columns:
            return sample // per_row, (sample % per_row) * cells + index
        return sample * math.ceil(cells / max_columns) + index // max_columns, index % max_columns

    if cell_inches is None:
        cell = min(2.0, _MAX_WIDTH_INCHES / grid_cols, _MAX_HEIGHT_INCHES / (1.25 * grid_rows))
    else:
        cell = float(cell_inches)
    width = cell * grid_cols + (0.9 if colorbar else 0.2)
    height = 1.25 * cell * grid_rows + (0.5 if title else 0.1) + (0.3 if box_array is not None else 0.0)
    # "compressed" packs fixed-aspect images without the gaps "constrained" leaves around them,
    # so the colorbar stands beside the maps rather than at the figure's far edge.
    figure = figure_class(figsize=(width, height), layout="compressed")
    axes = figure.subplots(grid_rows, grid_cols, squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    font = max(5.0, min(9.0, 5.0 * cell)) if fontsize is None else float(fontsize)

    for sample in range(count):
        entries: list[tuple[str, np.ndarray | None, str]] = []
        if shown is not None:
            entries.append(("image", None, "" if labels is None else str(labels[sample])))
        for name, heat, targets in columns:
            for k in range(heat.shape[1]):
                caption = "" if targets is None else _class_name(int(targets[sample, k]), class_names)
                # K maps per sample (top_k, (N, K) targets): number them in target order.
                header = name if heat.shape[1] == 1 else f"{name} #{k + 1}".strip()
                entries.append((header, heat[sample, k], caption))
        for index, (name, heat_map, caption) in enumerate(entries):
            row, col = position(sample, index)
            axis = axes[row, col]
            if heat_map is None:
                axis.imshow(shown[sample])  # type: ignore[index]
            elif shown is None:
                axis.imshow(heat_map, cmap=cmap, vmin=0.0, vmax=1.0)
            else:
                axis.imshow(overlay(shown[sample], heat_map, colormap=cmap, alpha=alpha))
            if box_array is not None:
                _draw_box(axis, box_array[sample])
            # Column titles head the first row; wrapped samples name every cell.
            header = name if (row == 0 or cells > max_columns) and name != "image" else ""
            text = "\n".join(_fit(part, cell, font) for part in (header, caption) if part)
            if text:
                axis.set_title(text, fontsize=font)

    if colorbar:
        import matplotlib.cm
        import matplotlib.colors

        mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0.0, 1.0), cmap=cmap)
        bar = figure.colorbar(mappable, ax=axes, shrink=min(1.0, 4.0 / grid_rows + 0.2), fraction=0.03)
        bar.set_label("heatmap", fontsize=font)
        bar.ax.tick_params(labelsize=font)
    if box_array is not None:
        import matplotlib.lines

        marker = matplotlib.lines.Line2D([], [], color="lime", linewidth=1.5, label="true box")
        figure.legend(handles=[marker], loc="outside lower center", fontsize=font, frameon=False)
    if title:
        figure.suptitle(title, fontsize=font + 2)
    return figure


def _fit(text: str, cell: float, font: float) -> str:
    """Returns ``text`` broken at hyphens or spaces into lines that fit a cell ``cell`` inches wide."""
    # An average glyph is about 0.6 em wide; a point is 1/72 inch.
    per_line = max(4, int(cell * 72.0 / (0.6 * font)))
    lines: list[str] = []
    for word in text.replace("-", "-\0").replace(" ", " \0").split("\0"):
        if lines and len(lines[-1]) + len(word.rstrip()) <= per_line:
            lines[-1] += word
        else:
            lines.append(word)
    return "\n".join(line.rstrip() for line in lines)


def _draw_box(axis: Any, box: np.ndarray) -> None:
    import matplotlib.patches

    row0, col0, row1, col1 = (float(v) for v in box)
    # Ends are exclusive and pixel centres sit on integers: the box's outline runs on pixel edges.
    axis.add_patch(
        matplotlib.patches.Rectangle(
            (col0 - 0.5, row0 - 0.5), col1 - col0, row1 - row0, fill=False, edgecolor="lime", linewidth=1.2
        )
    )


def to_png(figure: Any, dpi: int = 100) -> bytes:
    """Returns ``figure`` rendered as PNG bytes."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def plot_sanity(
    results: Any,
    path: str | None = None,
    *,
    metric: str | None = None,
    max_labels: int = 24,
) -> Any:
    """Returns the sanity-check figure (Adebayo et al. 2018, Fig. 2 style): one panel per method.

    Each panel starts at the original model (similarity 1 by definition, marked "original") and
    follows the randomisation steps from the logits down. With one result per method the panel
    shows every similarity measure; with several (e.g. one per framework) it shows one measure,
    ``metric``, per result. The shaded band is ± one standard deviation over the batch. A long
    network (more than ``max_labels`` steps) gets every k-th layer labelled, and the figure's
    width is capped.

    Args:
        results: a ``SanityResult`` or a sequence of them.
        path: save the figure there (PNG) if given.
        metric: ``"spearman"``, ``"spearman_abs"`` or ``"ssim"``; default: all measures for one
            result per method, ``"spearman"`` for several.
        max_labels: most layer names on a panel's x axis.

    Returns:
        ``matplotlib.figure.Figure``.

    Raises:
        InputError: for no results, an unknown metric, or a metric a result lacks (SSIM of 1-D maps).
    """
    items = [results] if hasattr(results, "spearman") else list(results)
    if not items:
        raise InputError("plot_sanity needs at least one SanityResult")
    measures = {"spearman": "Spearman", "spearman_abs": "Spearman (abs)", "ssim": "SSIM"}
    if metric is not None and metric not in measures:
        raise InputError(f"unknown metric {metric!r}; choose one of {', '.join(measures)}")
    by_method: dict[str, list[Any]] = {}
    for result in items:
        by_method.setdefault(result.method, []).append(result)
    figure_class = _figure_class()
    longest = max(len(r.layers) for r in items) + 1
    panel_width = min(7.5, max(3.6, 0.22 * min(longest, max_labels) + 2.0))
    panels = len(by_method)
    per_row = max(1, min(panels, int(_MAX_WIDTH_INCHES // panel_width)))
    rows = math.ceil(panels / per_row)
    figure = figure_class(figsize=(panel_width * per_row, 3.6 * rows + 0.5), layout="constrained")
    axes = figure.subplots(rows, per_row, squeeze=False, sharey=True)
    for axis in axes.flat[panels:]:
        axis.set_axis_off()
    for axis, (method, group) in zip(axes.flat, by_method.items(), strict=False):
        series = []
        for result in group:
            names = [metric] if metric else (list(measures) if len(group) == 1 else ["spearman"])
            for name in names:
                values = getattr(result, name)
                if values is None:
                    if metric:
                        raise InputError(f"{result.method}: no {name} values (SSIM needs 2-D maps)")
                    continue
                label = measures[name] if len(group) == 1 else (getattr(result, "backend", "") or result.mode)
                series.append((label, np.asarray(values, dtype=np.float64)))
        steps = np.arange(len(group[0].layers) + 1)
        for label, values in series:
            mean = np.r_[1.0, values.mean(axis=1)]
            spread = np.r_[0.0, values.std(axis=1)]
            axis.plot(steps, mean, marker="o", markersize=3, label=label)
            axis.fill_between(steps, mean - spread, mean + spread, alpha=0.2)
        names = ["original", *group[0].layers]
        every = max(1, math.ceil(len(names) / max_labels))
        shown = [n if i % every == 0 else "" for i, n in enumerate(names)]
        axis.set_xticks(steps, shown, rotation=60, ha="right", fontsize=7)
        axis.set_ylim(-1.05, 1.05)
        axis.axhline(0.0, color="grey", linewidth=0.5)
        axis.set_title(method, fontsize=10)
        steps_word = {"cascading": "randomised from the logits down to", "independent": "layer randomised alone"}
        axis.set_xlabel(steps_word.get(group[0].mode, "randomised layers"), fontsize=8)
        axis.legend(loc="upper right", fontsize=7)
    axes[0, 0].set_ylabel("similarity to the original map")
    batch = items[0].spearman.shape[1] if items[0].spearman.ndim == 2 else 1
    figure.supxlabel(f"band: ± 1 s.d. over {batch} images; 'original': the unrandomised model", fontsize=8)
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


__all__ = ["plot", "plot_sanity", "to_png"]
