"""StreamingMetrics accumulates ROAD, Average Drop/Gain and ADCC batch by batch: equal to one pass."""

from __future__ import annotations

import numpy as np
import pytest

import anycam
from anycam.metrics import adcc, average_drop_increase, average_gain, road

pytest.importorskip("scipy.sparse")


def quadrant_model(images):
    """Class 0's logit reads the top-left quadrant of channel 0; class 1's is its negative."""
    z = 3.0 * (images[:, 0, :4, :4].mean(axis=(1, 2)) - images[:, 0].mean(axis=(1, 2)))
    return np.stack([z, -z], axis=1)


def explain(images, target):
    """A fixed 'method': the channel-0 magnitude, min-max normalised per image."""
    maps = np.abs(images[:, 0])
    low = maps.min(axis=(1, 2), keepdims=True)
    return (maps - low) / (maps.max(axis=(1, 2), keepdims=True) - low)


def test_streaming_new_metrics_equal_one_pass_over_all_maps():
    rng = np.random.default_rng(11)
    images = rng.normal(size=(5, 2, 8, 8))
    maps = explain(images, None)
    names = ("road", "average_drop", "average_gain", "adcc")
    stream = anycam.StreamingMetrics(quadrant_model, names, explain=explain, road_percentages=(0.2, 0.5), seed=3)
    for start in (0, 2, 4):
        rows = slice(start, start + 2)
        stream.update(images[rows], maps[rows], target=np.zeros(len(images[rows]), dtype=int))
    summary = stream.summary()
    # ROAD's noise restarts from the seed at every call, so the stream equals road() on the same
    # batches; the other metrics have no randomness and equal one call over all samples.
    parts = [
        road(quadrant_model, images[s : s + 2], maps[s : s + 2], 0, percentages=(0.2, 0.5), seed=3) for s in (0, 2, 4)
    ]
    morf = np.concatenate([p.morf_mean for p in parts])
    lerf = np.concatenate([p.lerf_mean for p in parts])
    drop = average_drop_increase(quadrant_model, images, maps, 0).drop
    gain = average_gain(quadrant_model, images, maps, 0).gain
    ad = adcc(quadrant_model, images, maps, 0, explain=explain).per_sample
    for key, values in (
        ("road_morf", morf),
        ("road_lerf", lerf),
        ("road_combined", (lerf - morf) / 2),
        ("average_drop", drop),
        ("average_gain", gain),
        ("adcc", ad),
    ):
        assert summary[key]["count"] == 5
        np.testing.assert_allclose(summary[key]["mean"], values.mean(), rtol=1e-12, err_msg=key)
        np.testing.assert_allclose(summary[key]["std"], values.std(ddof=1), rtol=1e-9, err_msg=key)
    assert stream.config()["road"] == {"percentages": [0.2, 0.5], "noise": 0.01, "seed": 3}


def test_streaming_adcc_needs_something_to_explain_with():
    with pytest.raises(anycam.ConfigError, match="explain"):
        anycam.StreamingMetrics(quadrant_model, ("adcc",))
    # A store written before ROAD keeps its config: no road key unless ROAD is asked for.
    assert "road" not in anycam.StreamingMetrics(quadrant_model, ("deletion",)).config()
