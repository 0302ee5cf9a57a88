"""The metrics' one entry rule for native outputs, and the battery the framework tests share (issue 21.2).

``all_metrics`` runs every metric on one set of maps and returns every per-sample number; the
framework tests (tests/torch/test_native_consumers.py, tests/jax/test_native_consumers_jax.py,
tests/tensorflow/test_native_consumers_tf.py) call it once with NumPy maps (the oracle) and once
with the same values as framework arrays, and require equal numbers. No framework is imported here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

import anycam
from anycam import metrics


def boxes(count: int, size: int) -> np.ndarray:
    """``count`` (row0, col0, row1, col1) boxes inside a ``size`` × ``size`` map, different per sample."""
    quarter = size // 4
    starts = [(0, 0), (quarter, quarter), (2 * quarter, 0), (quarter, 2 * quarter)]
    return np.array([[r, c, r + 2 * quarter, c + 2 * quarter] for r, c in (starts * count)[:count]])


def all_metrics(
    predict: Any, x: Any, heatmaps: Any, target: Any, regions: Any, *, explain: Any = None, layout: str | None = None
) -> dict[str, np.ndarray]:
    """Every metric's per-sample numbers for one set of maps (deletion/insertion curves, Average
    Drop, Average Gain, ADCC, ROAD, both pointing games and the streaming accumulator)."""
    common: dict[str, Any] = {"progress": False, "input_layout": layout}
    out: dict[str, np.ndarray] = {}
    out["deletion"] = metrics.deletion(predict, x, heatmaps, target, steps=4, **common).curves
    out["insertion"] = metrics.insertion(predict, x, heatmaps, target, steps=4, **common).curves
    drop = metrics.average_drop_increase(predict, x, heatmaps, target, **common)
    out["drop"] = np.stack([drop.drop, drop.masked])
    out["gain"] = metrics.average_gain(predict, x, heatmaps, target, **common).gain
    out["adcc"] = metrics.adcc(predict, x, heatmaps, target, explain=explain, **common).per_sample
    road = metrics.road(predict, x, heatmaps, target, percentages=(0.25, 0.5), **common)
    out["road"] = np.stack([road.morf, road.lerf])
    out["pointing"] = metrics.pointing_game(heatmaps, regions, tolerance=1)
    out["energy"] = metrics.energy_pointing_game(heatmaps, regions)
    streaming = anycam.StreamingMetrics(predict, ("deletion", "energy_pointing_game"), steps=4, input_layout=layout)
    for name, values in streaming.update(x, heatmaps, target, regions=regions).items():
        out[f"streaming.{name}"] = values
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """The same metrics with bit-equal numbers."""
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _predict(images: np.ndarray) -> np.ndarray:
    """Three classes that read the image's mean over thirds of its rows (a NumPy model)."""
    thirds = np.array_split(images.mean(axis=1), 3, axis=1)
    return np.stack([part.mean(axis=(1, 2)) * 4 for part in thirds], axis=1)


def test_an_explanation_passed_as_the_heatmaps_scores_as_its_heatmap() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 2, 12, 12)).astype(np.float32)
    maps = rng.random((4, 12, 12)).astype(np.float32)
    explanation = anycam.Explanation(
        heatmap=maps, cam=maps, cams=(maps,), weights=None, scores=np.zeros(4), target=None, layer="l", method="gradcam"
    )
    explain = lambda images, target: maps[: len(images)]  # noqa: E731
    want = all_metrics(_predict, x, maps, 1, boxes(4, 12), explain=explain)
    assert_same(all_metrics(_predict, x, explanation, 1, boxes(4, 12), explain=explain), want)
    with pytest.raises(anycam.InputError, match="heatmaps"):
        metrics.pointing_game(dataclasses.replace(explanation, heatmap=maps[:, 0]), boxes(4, 12))
