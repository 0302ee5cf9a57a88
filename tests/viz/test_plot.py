"""anycam.plot, the sanity figure and the notebook display of Explanation (needs matplotlib)."""

from __future__ import annotations

import sys

import matplotlib.image
import matplotlib.patches
import numpy as np
import pytest

import anycam
from anycam import InputError
from anycam.explain import Explanation
from anycam.metrics.sanity import SanityResult
from anycam.viz import plot_sanity, to_png

RNG = np.random.default_rng(0)


def _explanation(count: int = 3, k: int | None = None, method: str = "gradcam") -> Explanation:
    shape = (count, 16, 16) if k is None else (count, k, 16, 16)
    heat = RNG.random(shape).astype(np.float32)
    target = np.arange(count) if k is None else np.arange(count * k).reshape(count, k) % 10
    scores = RNG.random(target.shape).astype(np.float32)
    return Explanation(
        heatmap=heat,
        cam=heat[..., ::4, ::4],
        cams=(heat[..., ::4, ::4],),
        weights=None,
        scores=scores,
        target=target,
        layer="layer4",
        method=method,
    )


def _images_in(axis: object) -> list[np.ndarray]:
    children = axis.get_children()
    return [np.asarray(c.get_array()) for c in children if isinstance(c, matplotlib.image.AxesImage)]


def _drawn(figure: object) -> list[object]:
    return [axis for axis in figure.axes if _images_in(axis)]


def test_columns_are_image_then_one_overlay_per_method_with_titles() -> None:
    images = RNG.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    first, second = _explanation(2), _explanation(2, method="scorecam")
    figure = anycam.plot(images, {"gradcam": first, "scorecam": second}, labels=["cat", "dog"])
    axes = _drawn(figure)
    assert len(axes) == 6  # 2 samples × (image + 2 methods)
    titles = [axis.get_title() for axis in axes]
    assert titles[0] == "cat" and titles[3] == "dog"
    assert titles[1].startswith("gradcam") and titles[2].startswith("scorecam")
    # The overlay cell shows exactly anycam.overlay(image, heatmap): the independent oracle.
    np.testing.assert_array_equal(_images_in(axes[1])[0], anycam.overlay(images[0], first.heatmap[0]))
    np.testing.assert_array_equal(_images_in(axes[5])[0], anycam.overlay(images[1], second.heatmap[1]))
    np.testing.assert_array_equal(_images_in(axes[0])[0], images[0] / 255.0)


def test_class_names_caption_each_overlay_and_k_maps_are_numbered() -> None:
    explanation = _explanation(2, k=3)
    names = [f"name{i}" for i in range(10)]
    figure = anycam.plot(None, explanation, class_names=names, max_columns=3)  # one sample a row
    axes = _drawn(figure)
    assert len(axes) == 6
    titles = [axis.get_title() for axis in axes]
    assert titles[:3] == [f"gradcam #{k + 1}\nname{int(explanation.target[0, k])}" for k in range(3)]
    assert titles[3:] == [f"name{int(explanation.target[1, k])}" for k in range(3)]
    # Heatmaps alone are drawn as values on a fixed 0..1 scale.
    image = axes[4].get_images()[0]
    np.testing.assert_array_equal(np.asarray(image.get_array()), explanation.heatmap[1, 1])
    assert image.get_clim() == (0.0, 1.0)


def test_boxes_are_drawn_on_every_cell_on_pixel_edges() -> None:
    boxes = np.array([[2, 3, 10, 12], [0, 0, 16, 16]])
    figure = anycam.plot(np.zeros((2, 16, 16)), _explanation(2), boxes=boxes)
    axes = _drawn(figure)
    for index, axis in enumerate(axes):
        rectangles = [p for p in axis.patches if isinstance(p, matplotlib.patches.Rectangle)]
        assert len(rectangles) == 1
        row0, col0, row1, col1 = boxes[index // 2]
        assert rectangles[0].get_xy() == (col0 - 0.5, row0 - 0.5)
        assert (rectangles[0].get_width(), rectangles[0].get_height()) == (col1 - col0, row1 - row0)
    assert [t.get_text() for legend in figure.legends for t in legend.get_texts()] == ["true box"]


@pytest.mark.parametrize("count", [1, 7, 64])
def test_figure_size_stays_readable_for_1_to_64_images(count: int) -> None:
    figure = anycam.plot(np.zeros((count, 16, 16)), RNG.random((count, 16, 16)))
    width, height = figure.get_size_inches()
    assert len(_drawn(figure)) == 2 * count
    assert width <= 17.0 and height <= 31.0
    assert width >= 2.0


def test_many_columns_wrap_one_sample_over_several_rows() -> None:
    maps = {f"m{i}": RNG.random((2, 8, 8)) for i in range(14)}
    figure = anycam.plot(np.zeros((2, 8, 8)), maps, max_columns=5)
    axes = _drawn(figure)
    assert len(axes) == 2 * 15
    assert all(axis.get_title() for axis in axes if axis.get_title() != "")  # wrapped cells are named
    assert {axis.get_title() for axis in axes} >= {f"m{i}" for i in range(14)}


def test_standardised_float_images_are_scaled_for_display() -> None:
    image = np.linspace(-2.0, 3.0, 3 * 8 * 8).reshape(1, 3, 8, 8)
    figure = anycam.plot(image, RNG.random((1, 8, 8)))
    shown = _images_in(_drawn(figure)[0])[0]
    expected = np.moveaxis((image[0] + 2.0) / 5.0, 0, -1)
    np.testing.assert_allclose(shown, expected, atol=1e-12)


@pytest.mark.parametrize(
    ("images", "maps", "kwargs", "match"),
    [
        (None, np.zeros((2, 8)), {}, "2-D maps"),
        (None, {}, {}, "at least one map"),
        (np.zeros((3, 8, 8)), np.zeros((2, 8, 8)), {}, "3 images for maps of 2 samples"),
        (None, {"a": np.zeros((2, 8, 8)), "b": np.zeros((3, 8, 8))}, {}, "same number of samples"),
        (None, np.full((1, 8, 8), np.nan), {}, "NaN"),
        (None, np.zeros((2, 8, 8)), {"labels": ["x"]}, "1 labels for 2 samples"),
        (None, np.zeros((2, 8, 8)), {"boxes": np.zeros((2, 3))}, "boxes must be"),
        (None, np.zeros((2, 8, 8)), {"max_columns": 0}, "max_columns"),
    ],
)
def test_bad_input_is_refused_with_the_reason(images: object, maps: object, kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        anycam.plot(images, maps, **kwargs)


def test_explanation_repr_is_short_and_names_what_matters() -> None:
    text = repr(_explanation(12))
    assert text.startswith("Explanation(method='gradcam', layer='layer4', heatmap=(12, 16, 16)")
    assert "target=[0, 1, 2, 3, 4, 5, 6, 7, …]" in text
    assert "array" not in text and len(text) < 200


def test_notebook_display_is_a_png_and_none_without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    png = _explanation(3)._repr_png_()
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert _explanation(3)._repr_png_() is None


def _sanity(layers: int, method: str = "gradcam", backend: str = "torch") -> SanityResult:
    values = RNG.uniform(-1, 1, (layers, 4))
    return SanityResult(
        layers=tuple(f"block{i}.conv" for i in range(layers)),
        mode="cascading",
        spearman=values,
        spearman_abs=np.abs(values),
        ssim=values / 2,
        method=method,
        backend=backend,
    )


def test_sanity_figure_starts_at_the_original_and_plots_mean_of_each_measure() -> None:
    result = _sanity(5)
    figure = plot_sanity(result)
    axis = figure.axes[0]
    lines = axis.get_lines()[:3]
    assert [line.get_label() for line in lines] == ["Spearman", "Spearman (abs)", "SSIM"]
    np.testing.assert_allclose(lines[0].get_ydata(), np.r_[1.0, result.spearman.mean(axis=1)])
    np.testing.assert_allclose(lines[2].get_ydata(), np.r_[1.0, result.ssim.mean(axis=1)])
    labels = [tick.get_text() for tick in axis.get_xticklabels()]
    assert labels[0] == "original" and labels[1:] == list(result.layers)
    assert axis.get_xlabel() and axis.get_ylabel()
    assert "s.d." in figure.get_supxlabel()


def test_sanity_figure_for_a_50_layer_network_thins_labels_and_caps_the_width() -> None:
    figure = plot_sanity(_sanity(50), max_labels=20)
    labels = [tick.get_text() for tick in figure.axes[0].get_xticklabels() if tick.get_text()]
    assert 10 <= len(labels) <= 20
    assert figure.get_size_inches()[0] <= 16.0


def test_sanity_figure_has_one_panel_per_method_and_one_curve_per_framework() -> None:
    results = [_sanity(4, method, backend) for method in ("gradcam", "guided-gradcam") for backend in ("torch", "jax")]
    figure = plot_sanity(results)
    panels = [axis for axis in figure.axes if axis.get_lines()]
    assert [axis.get_title() for axis in panels] == ["gradcam", "guided-gradcam"]
    assert [line.get_label() for line in panels[1].get_lines()[:2]] == ["torch", "jax"]
    with pytest.raises(InputError, match="unknown metric"):
        plot_sanity(results, metric="pearson")


def test_to_png_writes_png_bytes() -> None:
    assert to_png(plot_sanity(_sanity(2)))[:4] == b"\x89PNG"


def test_the_demo_picture_is_readable_at_a_readme_width() -> None:
    from anycam.cli.demo import PICTURE_DPI, demo_figure

    rng = np.random.default_rng(3)
    count = 4
    demo = {
        "images": rng.random((count, 1, 64, 64)).astype(np.float32),
        "labels": np.arange(count),
        "boxes": np.tile([10, 10, 30, 24], (count, 1)),
    }
    maps = {method: rng.random((count, 64, 64)).astype(np.float32) for method in anycam.core.METHODS}
    figure = demo_figure(demo, maps, count, "torch backend, layer stage3")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure.set_dpi(PICTURE_DPI)  # laid out as savefig lays it out
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    width = figure.get_size_inches()[0] * PICTURE_DPI
    # The README shows the picture 800 pixels wide: every text at least 10 pixels tall there.
    shrink = 800.0 / width
    images = [axis for axis in figure.axes if axis.images]
    bar = next(axis for axis in figure.axes if not axis.images and axis.get_ylabel() == "heatmap")
    titles = [axis.title for axis in images if axis.get_title()]
    texts = [*figure.texts, *titles, bar.yaxis.label, *bar.get_yticklabels(), *figure.legends[0].get_texts()]
    assert len(titles) == 4 * (len(maps) + 1) and figure.texts  # every cell titled; the figure's title
    for text in texts:
        assert text.get_fontsize() * PICTURE_DPI / 72.0 * shrink >= 10.0, text
    # No two titles overlap (long method names break at their hyphen).
    boxes = [title.get_window_extent(renderer) for title in titles]
    for index, first in enumerate(boxes):
        for second in boxes[index + 1 :]:
            assert not first.overlaps(second)
    # The colorbar stands beside the maps: at most 40 README pixels between them.
    maps_right = max(axis.get_window_extent(renderer).x1 for axis in images)
    assert 0.0 <= (bar.get_window_extent(renderer).x0 - maps_right) * shrink <= 40.0
