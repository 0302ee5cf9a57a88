"""Metrics against closed forms on NumPy toy models (no framework is imported here)."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import ClassVar

import numpy as np
import pytest

import anycam
from anycam import backends
from anycam.metrics import (
    average_drop_increase,
    blur,
    deletion,
    energy_pointing_game,
    insertion,
    pointing_game,
)
from anycam.protocol.backend import Backend


@pytest.fixture
def rng():
    """A fresh generator per test: each test sees the same data however the suite is run."""
    return np.random.default_rng(20240606)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def region_model(rows: slice, cols: slice, gain: float = 20.0):
    """Two classes; class 0's logit is gain · (mean of the region − 0.5), class 1's its negative.

    On an all-ones image p0 = sigmoid(2 · gain · (m − 0.5)) with m the share of the region left.
    """

    def predict(images):
        m = images[:, :, rows, cols].mean(axis=(1, 2, 3))
        z = gain * (m - 0.5)
        return np.stack([z, -z], axis=1)

    return predict


def sum_model(images):
    """Class 0's logit is the sum of all values; class 1's is 0."""
    total = images.reshape(len(images), -1).sum(axis=1)
    return np.stack([total, np.zeros_like(total)], axis=1)


def trapezoid(x, y):
    return float(sum((y[i] + y[i + 1]) / 2 * (x[i + 1] - x[i]) for i in range(len(x) - 1)))


# --------------------------------------------------------------------------------------------
# Deletion and insertion: oracles


def test_deletion_of_the_true_region_collapses_at_once():
    ones = np.ones((1, 1, 8, 8))
    truth = np.zeros((1, 8, 8))
    truth[0, :2, :2] = 1.0  # the 4 pixels the model looks at
    result = deletion(region_model(slice(0, 2), slice(0, 2)), ones, truth, target=0, steps=64)
    left = np.maximum(4 - np.arange(65), 0) / 4  # share of the region left after j pixels
    expected = sigmoid(40.0 * (left - 0.5))
    np.testing.assert_allclose(result.curves[0], expected, rtol=1e-12)
    np.testing.assert_allclose(result.fractions, np.arange(65) / 64)
    # Closed form: the curve is ≈1, ≈1, 0.5, ≈0, ... → area ≈ ((1 + 1) + (1 + 0.5) + 0.5) / 2 / 64.
    assert result.auc[0] == pytest.approx(trapezoid(result.fractions, expected), abs=1e-12)
    assert result.auc[0] == pytest.approx(2.0 / 64, abs=1e-6)
    assert result.kind == "deletion"
    np.testing.assert_array_equal(result.target, [0])


def test_insertion_of_the_true_region_recovers_at_once():
    ones = np.ones((1, 1, 8, 8))
    truth = np.zeros((1, 8, 8))
    truth[0, :2, :2] = 1.0
    model = region_model(slice(0, 2), slice(0, 2))
    # A blur of a constant image is the image itself, so insertion needs zeros here.
    result = insertion(model, ones, truth, target=0, steps=64, baseline="zeros")
    shown = np.minimum(np.arange(65), 4) / 4
    np.testing.assert_allclose(result.curves[0], sigmoid(40.0 * (shown - 0.5)), rtol=1e-12)
    assert result.auc[0] == pytest.approx(1 - 2.0 / 64, abs=1e-6)


def test_random_maps_score_worse_than_the_true_map(rng):
    count = 16
    ones = np.ones((count, 1, 8, 8))
    truth = np.zeros((count, 8, 8))
    truth[:, :2, :2] = 1.0
    noise = rng.random((count, 8, 8))
    model = region_model(slice(0, 2), slice(0, 2))
    options = {"target": 0, "steps": 16, "baseline": "zeros"}
    true_del = deletion(model, ones, truth, **options).auc
    rand_del = deletion(model, ones, noise, **options).auc
    true_ins = insertion(model, ones, truth, **options).auc
    rand_ins = insertion(model, ones, noise, **options).auc
    assert np.all(rand_del > true_del.max()) and rand_del.mean() > 0.3
    assert np.all(rand_ins < true_ins.min()) and rand_ins.mean() < 0.7


def test_hand_computed_trapezoid_auc():
    image = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    heat = np.array([[[0.0, 1.0], [2.0, 3.0]]])  # removes 4, then 3, 2, 1
    result = deletion(sum_model, image, heat, target=0, steps=4, score="logit")
    np.testing.assert_array_equal(result.curves, [[10, 6, 3, 1, 0]])
    assert result.auc[0] == pytest.approx((8 + 4.5 + 2 + 0.5) / 4)  # 3.75
    # Steps that do not divide the pixels: floor(i · 4 / 3) = 0, 1, 2, 4 pixels removed.
    uneven = deletion(sum_model, image, heat, target=0, steps=3, score="logit")
    np.testing.assert_array_equal(uneven.fractions, [0, 0.25, 0.5, 1])
    np.testing.assert_array_equal(uneven.curves, [[10, 6, 3, 0]])
    assert uneven.auc[0] == pytest.approx(8 * 0.25 + 4.5 * 0.25 + 1.5 * 0.5)  # 3.875
    revealed = insertion(sum_model, image, heat, target=0, steps=4, score="logit", baseline=0.0)
    np.testing.assert_array_equal(revealed.curves, [[0, 4, 7, 9, 10]])
    assert revealed.auc[0] == pytest.approx((2 + 5.5 + 8 + 9.5) / 4)  # 6.25


def test_deletion_and_insertion_are_complements_on_a_linear_model(rng):
    inputs = rng.normal(size=(3, 2, 5, 4))
    maps = rng.random((3, 5, 4))
    background = rng.normal(size=(3, 2, 5, 4))
    options = {"target": 0, "steps": 7, "score": "logit", "baseline": background}
    removed = deletion(sum_model, inputs, maps, **options)
    revealed = insertion(sum_model, inputs, maps, **options)
    both = (inputs.sum(axis=(1, 2, 3)) + background.sum(axis=(1, 2, 3)))[:, None]
    np.testing.assert_allclose(removed.curves + revealed.curves, np.broadcast_to(both, (3, 8)))
    np.testing.assert_allclose(removed.auc + revealed.auc, both[:, 0])


def nonlinear_model(images):
    # Elementwise product and a per-row sum, not a matmul: BLAS may round differently for
    # different batch sizes, and the batching test compares curves bit for bit.
    weights = np.linspace(-1.0, 1.0, 4 * images[0].size).reshape(4, -1)
    flat = images.reshape(len(images), 1, -1)
    return np.tanh((flat * weights[None]).sum(axis=-1)) * 3.0


def reference_curves(kind, predict, inputs, heatmaps, target, steps, background):
    """One image at a time, straight from the definition."""
    count, pixels = len(inputs), heatmaps[0].size
    curves = np.zeros((count, steps + 1))
    for n in range(count):
        order = np.argsort(-heatmaps[n].ravel(), kind="stable")
        for i in range(steps + 1):
            chosen = np.zeros(pixels, dtype=bool)
            chosen[order[: i * pixels // steps]] = True
            chosen = chosen.reshape(heatmaps[n].shape)[None]
            if kind == "deletion":
                image = np.where(chosen, background[n], inputs[n])
            else:
                image = np.where(chosen, inputs[n], background[n])
            outputs = predict(image[None])[0]
            probabilities = np.exp(outputs) / np.exp(outputs).sum()
            curves[n, i] = probabilities[target[n]]
    return curves


@pytest.mark.parametrize("kind", ["deletion", "insertion"])
def test_curves_match_the_definition_for_any_batch_size(rng, kind):
    inputs = rng.normal(size=(3, 2, 6, 5))
    maps = rng.random((3, 6, 5))
    maps[0, :3] = 0.5  # ties
    metric = deletion if kind == "deletion" else insertion
    small = metric(nonlinear_model, inputs, maps, steps=10, baseline="mean", batch_size=1)
    large = metric(nonlinear_model, inputs, maps, steps=10, baseline="mean", batch_size=1000)
    odd = metric(nonlinear_model, inputs, maps, steps=10, baseline="mean", batch_size=7)
    np.testing.assert_array_equal(small.curves, large.curves)
    np.testing.assert_array_equal(small.curves, odd.curves)
    np.testing.assert_array_equal(small.target, np.argmax(nonlinear_model(inputs), axis=1))
    mean = np.broadcast_to(inputs.mean(axis=(2, 3), keepdims=True), inputs.shape)
    expected = reference_curves(kind, nonlinear_model, inputs, maps, small.target, 10, mean)
    np.testing.assert_allclose(small.curves, expected, rtol=1e-12)


def test_ties_are_removed_in_raster_order():
    seen: list[np.ndarray] = []

    def recording(images):
        seen.extend(images[:, 0].copy())
        return sum_model(images)

    heat = np.array([[[1.0, 2.0, 1.0], [2.0, 1.0, 2.0], [1.0, 1.0, 1.0]]])
    deletion(recording, np.ones((1, 1, 3, 3)), heat, target=0, steps=9, score="logit")
    raster = [1, 3, 5, 0, 2, 4, 6, 7, 8]  # the 2s in raster order, then the 1s
    removed_sets = sorted((np.flatnonzero(image.ravel() == 0).tolist() for image in seen), key=len)
    assert removed_sets == [sorted(raster[:i]) for i in range(10)]

    # Four levels over 64 pixels: numpy's default (unstable) sort would scramble the ties here.
    seen.clear()
    levels = np.random.default_rng(1).integers(0, 4, size=(1, 8, 8)).astype(float)
    deletion(recording, np.ones((1, 1, 8, 8)), levels, target=0, steps=64, score="logit")
    expected = sorted(range(64), key=lambda p: (-levels.ravel()[p], p))
    removed_sets = sorted((np.flatnonzero(image.ravel() == 0).tolist() for image in seen), key=len)
    assert removed_sets == [sorted(expected[:i]) for i in range(65)]

    seen.clear()
    flat = np.zeros((1, 3, 3))
    deletion(recording, np.ones((1, 1, 3, 3)), flat, target=0, steps=9, score="logit")
    removed_sets = sorted((np.flatnonzero(image.ravel() == 0).tolist() for image in seen), key=len)
    assert removed_sets == [list(range(i)) for i in range(10)]


def test_channels_last_gives_the_same_curves(rng):
    inputs = rng.normal(size=(2, 3, 4, 5))
    maps = rng.random((2, 4, 5))

    def last(images):  # the same model, reading channels-last images
        return nonlinear_model(np.moveaxis(images, -1, 1))

    first = deletion(nonlinear_model, inputs, maps, steps=5, baseline="blur")
    moved = deletion(last, np.moveaxis(inputs, 1, -1), maps, steps=5, baseline="blur", input_layout="channels_last")
    np.testing.assert_allclose(first.curves, moved.curves, rtol=1e-12)


@pytest.mark.parametrize(
    ("baseline", "expected"),
    [
        ("zeros", lambda x: np.zeros_like(x)),
        (0.25, lambda x: np.full_like(x, 0.25)),
        ("mean", lambda x: np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape)),
        ("blur", lambda x: blur(x)),
        (
            np.array([1.0, -1.0])[:, None, None],
            lambda x: np.broadcast_to(np.array([1.0, -1.0])[:, None, None], x.shape),
        ),
    ],
)
def test_every_pixel_deleted_is_the_baseline(rng, baseline, expected):
    seen: list[np.ndarray] = []

    def recording(images):
        seen.extend(images.copy())
        return sum_model(images)

    inputs = rng.normal(size=(2, 2, 12, 12)).astype(np.float32)
    deletion(recording, inputs, rng.random((2, 12, 12)), target=0, steps=1, baseline=baseline)
    finals = [image for image in seen if not any(np.array_equal(image, x) for x in inputs)]
    np.testing.assert_allclose(np.stack(finals), expected(inputs), rtol=1e-6, atol=1e-6)
    assert all(image.dtype == np.float32 for image in seen)


def test_insertion_starts_from_the_blurred_image_by_default(rng):
    inputs = rng.normal(size=(1, 1, 10, 10))
    result = insertion(sum_model, inputs, rng.random((1, 10, 10)), target=0, steps=4, score="logit")
    assert result.curves[0, 0] == pytest.approx(blur(inputs).sum())
    assert result.curves[0, -1] == pytest.approx(inputs.sum())


# --------------------------------------------------------------------------------------------
# Blur


def test_blur_of_a_point_is_the_truncated_gaussian():
    point = np.zeros((1, 1, 41, 41))
    point[0, 0, 20, 20] = 1.0
    offsets = np.arange(-8, 9)  # truncated at 4σ
    kernel = np.exp(-(offsets**2) / 8.0)
    kernel /= kernel.sum()
    expected = np.zeros((41, 41))
    expected[12:29, 12:29] = np.outer(kernel, kernel)
    np.testing.assert_allclose(blur(point, sigma=2.0)[0, 0], expected, atol=1e-15)
    np.testing.assert_allclose(blur(point, sigma=0.0), point)


def test_blur_keeps_constants_at_the_edges_and_respects_the_layout(rng):
    constant = np.full((2, 3, 7, 9), 0.75)
    np.testing.assert_allclose(blur(constant, sigma=3.0), constant)
    image = rng.random((2, 3, 7, 9))
    np.testing.assert_allclose(
        blur(np.moveaxis(image, 1, -1), sigma=1.5, input_layout="channels_last"),
        np.moveaxis(blur(image, sigma=1.5), 1, -1),
    )


# --------------------------------------------------------------------------------------------
# Targets and scores


def three_class_model(images):
    flat = images.reshape(len(images), -1)
    return np.stack([flat.sum(axis=1), flat[:, 0] * 4, -flat.sum(axis=1)], axis=1)


def test_target_forms_and_scores(rng):
    inputs = rng.normal(size=(4, 1, 3, 3))
    maps = rng.random((4, 3, 3))
    outputs = three_class_model(inputs)
    probabilities = np.exp(outputs) / np.exp(outputs).sum(axis=1, keepdims=True)
    rows = np.arange(4)

    def first(**kw):
        return deletion(three_class_model, inputs, maps, steps=3, **kw).curves[:, 0]

    argmax = np.argmax(outputs, axis=1)
    np.testing.assert_allclose(first(), probabilities[rows, argmax])
    np.testing.assert_allclose(first(target=2), probabilities[:, 2])
    np.testing.assert_allclose(first(target=[0, 1, 2, 0]), probabilities[rows, [0, 1, 2, 0]])
    np.testing.assert_allclose(first(target=np.array([[1], [1], [0], [0]])), probabilities[rows, [1, 1, 0, 0]])
    np.testing.assert_allclose(first(target=1, score="logit"), outputs[:, 1])
    np.testing.assert_allclose(first(target=1, score=sigmoid), sigmoid(outputs[:, 1]))
    np.testing.assert_allclose(first(target=lambda out: out[:, 0] - out[:, 2]), 2 * outputs[:, 0])
    by_function = deletion(three_class_model, inputs, maps, target=lambda out: out[:, 0], steps=3)
    assert by_function.target is None


class NumpyBackend(Backend):
    """A NumPy stand-in for a framework adapter: channels-last, predict only."""

    name = "numpy"

    def __init__(self, model, layers, *, output=None, input_layout=None):
        self.layer_names = tuple(layers)
        self.input_layout = input_layout or "channels_last"

    def capture(self, inputs, target, *, gradients=True):
        raise AssertionError("metrics must only call predict")

    def predict(self, inputs):
        return sum_model(np.moveaxis(inputs, -1, 1)).astype(np.float32)


def test_an_explainer_is_run_through_its_backend(monkeypatch):
    monkeypatch.setattr(backends, "load", lambda name, model=None: NumpyBackend)
    explainer = anycam.Explainer(object(), "features", backend="torch")
    image = np.array([[[[1.0], [2.0]], [[3.0], [4.0]]]])  # (1, 2, 2, 1): channels last
    heat = np.array([[[0.0, 1.0], [2.0, 3.0]]])
    for predict in (explainer, explainer.backend):
        result = deletion(predict, image, heat, target=0, steps=4, score="logit")
        np.testing.assert_array_equal(result.curves, [[10, 6, 3, 1, 0]])


# --------------------------------------------------------------------------------------------
# Average Drop / Increase in Confidence


def test_average_drop_and_increase_closed_forms():
    weights = np.array([[[1.0, 1.0], [1.0, -1.0]]])  # the bottom-right pixel argues against

    def linear(images):
        logit = (images * weights).sum(axis=(1, 2, 3))
        return np.stack([logit, np.zeros_like(logit)], axis=1)

    inputs = np.ones((3, 1, 2, 2))
    inputs[:2, 0, 1, 1] = 0.0  # Y = 3, 3, 2
    maps = np.ones((3, 2, 2))
    maps[0] = 0.25  # O = Y / 4: a 75 % drop
    maps[2, 1, 1] = 0.0  # hides the negative pixel: O = 3 > Y = 2
    result = average_drop_increase(linear, inputs, maps, target=0, score="logit", batch_size=2)
    np.testing.assert_allclose(result.original, [3, 3, 2])
    np.testing.assert_allclose(result.masked, [0.75, 3, 3])
    np.testing.assert_allclose(result.drop, [75, 0, 0])
    assert result.average_drop == pytest.approx(25.0)
    assert result.increase_in_confidence == pytest.approx(100 / 3)

    probabilities = average_drop_increase(linear, inputs, maps, target=0)
    y, o = sigmoid(np.array([3.0, 3.0, 2.0])), sigmoid(np.array([0.75, 3.0, 3.0]))
    drop = np.maximum(0, y - o) / y * 100
    assert probabilities.average_drop == pytest.approx(drop.mean())
    assert probabilities.increase_in_confidence == pytest.approx(100 / 3)


def test_average_drop_rejects_unnormalised_maps_and_non_positive_scores():
    inputs = np.ones((1, 1, 2, 2))
    with pytest.raises(anycam.InputError, match=r"\[0, 1\]"):
        average_drop_increase(sum_model, inputs, np.full((1, 2, 2), 2.0), target=0)
    with pytest.raises(anycam.InputError, match="probability"):
        average_drop_increase(sum_model, -inputs, np.ones((1, 2, 2)), target=0, score="logit")


# --------------------------------------------------------------------------------------------
# Pointing games


def peak_maps(shape, peaks):
    maps = np.zeros(shape)
    for n, peak in enumerate(peaks):
        maps[(n, *peak)] = 1.0
    return maps


def test_pointing_game_hand_cases():
    maps = peak_maps((4, 5, 5), [(1, 1), (4, 4), (2, 2), (1, 1)])
    boxes = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [3, 3, 5, 5], [0, 0, 1, 1]])
    np.testing.assert_array_equal(pointing_game(maps, boxes), [True, False, False, False])
    # (2, 2) is √2 from the box's corner pixel (3, 3): Euclidean, so 1 pixel is not enough.
    # (1, 1) is √2 from (0, 0), the only pixel of [0, 1) × [0, 1): exclusive ends.
    hits = [pointing_game(maps, boxes, tolerance=t).tolist() for t in (1, 2)]
    assert hits == [[True, False, False, False], [True, False, True, True]]
    masks = np.zeros((4, 5, 5), dtype=bool)
    for n, (r0, c0, r1, c1) in enumerate(boxes):
        masks[n, r0:r1, c0:c1] = True
    np.testing.assert_array_equal(pointing_game(maps, masks), pointing_game(maps, boxes))


def test_pointing_game_the_original_15_pixels():
    maps = peak_maps((2, 40, 40), [(20, 20), (20, 20)])
    boxes = np.array([[0, 0, 5, 40], [0, 0, 6, 40]])  # last rows 4 and 5: 16 and 15 pixels away
    np.testing.assert_array_equal(pointing_game(maps, boxes, tolerance=15), [False, True])


def test_pointing_game_ties_several_boxes_and_empty_regions():
    ties = np.zeros((3, 4, 4))
    ties[0, 0, 0] = ties[0, 3, 3] = 1.0  # two maxima, only (3, 3) inside
    boxes = [np.array([[3, 3, 4, 4]]), np.array([[0, 0, 1, 1], [2, 2, 3, 4]]), np.zeros((0, 4))]
    ties[1, 2, 3] = 1.0
    # Sample 2: a constant map hits any non-empty region, but its region is empty.
    np.testing.assert_array_equal(pointing_game(ties, boxes), [True, True, False])
    flat = np.zeros((1, 4, 4))
    assert pointing_game(flat, np.array([[1, 1, 2, 2]]))[0]
    stacked = np.array([[[0, 0, 1, 1], [3, 3, 4, 4]]])
    assert pointing_game(ties[:1], stacked)[0]
    # Fractional edges take every pixel the box touches; edges outside the map are clipped.
    assert pointing_game(peak_maps((1, 4, 4), [(3, 3)]), np.array([[2.5, 2.5, 9.0, 9.0]]))[0]


@pytest.mark.parametrize("shape", [(6, 11, 13), (4, 5, 6, 7)])
def test_pointing_game_matches_brute_force_distances(rng, shape):
    maps = rng.random(shape)
    masks = rng.random(shape) > 0.97
    for tolerance in (0, 1, 2, 3, 5):
        expected = []
        for n in range(shape[0]):
            peak = np.array(np.unravel_index(np.argmax(maps[n]), shape[1:]))
            inside = np.argwhere(masks[n])
            distance = np.sqrt(((inside - peak) ** 2).sum(axis=1)).min() if len(inside) else np.inf
            expected.append(distance <= tolerance)
        np.testing.assert_array_equal(pointing_game(maps, masks, tolerance), expected)


def test_energy_pointing_game_closed_form_and_zero_map():
    maps = np.zeros((3, 4, 4))
    maps[0] = 1.0
    maps[1] = np.arange(16).reshape(4, 4)
    boxes = np.array([[0, 0, 2, 2], [2, 2, 4, 4], [0, 0, 4, 4]])
    expected = [4 / 16, (10 + 11 + 14 + 15) / 120, 0.0]
    np.testing.assert_allclose(energy_pointing_game(maps, boxes), expected)
    with np.errstate(all="raise"):
        assert energy_pointing_game(np.zeros((1, 3, 3)), np.ones((1, 3, 3), dtype=bool))[0] == 0.0


# --------------------------------------------------------------------------------------------
# Progress bar


class RecordingBar:
    """Stands in for tqdm, so the test needs no tqdm installed."""

    made: ClassVar[list[RecordingBar]] = []

    def __init__(self, total, desc, **options):
        self.total, self.desc, self.count, self.closed = total, desc, 0, False
        self.delay = options.get("delay", 0)
        RecordingBar.made.append(self)

    def update(self, count):
        self.count += count

    def close(self):
        self.closed = True


def test_progress_bar_counts_every_image(rng, monkeypatch):
    # The one rule of anycam._progress: True always, False never, None a bar that tqdm shows
    # only after 2 s (its delay). (Before, metrics showed one for None only beyond 20 passes.)
    fake = types.ModuleType("tqdm.auto")
    fake.tqdm = RecordingBar  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tqdm.auto", fake)
    monkeypatch.setattr(RecordingBar, "made", [])
    inputs, maps = rng.normal(size=(2, 1, 4, 4)), rng.random((2, 4, 4))
    plain = deletion(sum_model, inputs, maps, target=0, steps=8, progress=False)
    assert RecordingBar.made == []
    auto_few = deletion(sum_model, inputs, maps, target=0, steps=8)  # 2 forward passes
    at_limit = deletion(sum_model, inputs, maps, target=0, steps=9, batch_size=1)  # 2 + 18
    deletion(sum_model, inputs, maps, target=0, steps=10, batch_size=1)  # 2 + 20 passes
    shown = insertion(sum_model, inputs, maps, target=0, steps=8, batch_size=3, progress=True)
    few, limit, first, second = RecordingBar.made
    assert (few.total, few.count, few.closed, few.delay) == (18, 18, True, 2.0)
    assert (limit.total, limit.count, limit.closed, limit.delay) == (20, 20, True, 2.0)
    assert (first.desc, first.total, first.count, first.closed, first.delay) == ("deletion", 22, 22, True, 2.0)
    assert (second.desc, second.total, second.count, second.closed, second.delay) == ("insertion", 18, 18, True, 0)
    np.testing.assert_array_equal(plain.curves, auto_few.curves)
    np.testing.assert_array_equal(at_limit.curves[:, [0, 9]], plain.curves[:, [0, 8]])
    assert shown.kind == "insertion"

    def failing(images):
        raise RuntimeError("model broke")

    with pytest.raises(RuntimeError, match="model broke"):
        deletion(failing, inputs, maps, target=0, steps=8, progress=True)
    assert RecordingBar.made[-1].closed


def test_no_tqdm_means_no_bar_for_none_and_an_error_for_true(rng, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    inputs, maps = rng.normal(size=(2, 1, 4, 4)), rng.random((2, 4, 4))
    missing = deletion(sum_model, inputs, maps, target=0, steps=8)
    plain = deletion(sum_model, inputs, maps, target=0, steps=8, progress=False)
    np.testing.assert_array_equal(plain.curves, missing.curves)
    assert capsys.readouterr().err == ""
    # progress=True asks for a bar: without tqdm that is an error naming the install (it was
    # silently none before the one progress rule).
    with pytest.raises(anycam.MissingExtraError, match="pip install tqdm"):
        deletion(sum_model, inputs, maps, target=0, steps=8, progress=True)


# --------------------------------------------------------------------------------------------
# Errors


INPUTS = np.ones((2, 1, 4, 4))
MAPS = np.ones((2, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"heatmaps": np.ones((2, 2, 2))}, anycam.InputError, "resize"),
        ({"heatmaps": np.ones((2, 3, 4, 4))}, anycam.InputError, "several maps"),
        ({"heatmaps": np.full((2, 4, 4), np.nan)}, anycam.InputError, "NaN"),
        ({"inputs": np.ones((2, 1, 4, 4), dtype=np.uint8)}, anycam.InputError, "floating"),
        ({"inputs": np.ones((2, 4))}, anycam.InputError, "spatial"),
        ({"target": [0, 1, 0]}, anycam.TargetError, "3 targets for a batch of 2"),
        ({"target": np.zeros((2, 2), dtype=int)}, anycam.TargetError, "one class per sample"),
        ({"target": anycam.top_k(2)}, anycam.TargetError, "top_k"),
        ({"target": 5}, anycam.TargetError, "out of range"),
        ({"target": 1.5}, anycam.TargetError, "integer"),
        ({"steps": 17}, ValueError, "16 pixels"),
        ({"steps": 0}, ValueError, "steps"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"baseline": "noise"}, ValueError, "unknown baseline"),
        ({"baseline": np.ones(3)}, anycam.InputError, "broadcast"),
        ({"score": "softmax"}, ValueError, "unknown score"),
        ({"predict": lambda x: x.sum(axis=(1, 2, 3))}, anycam.TargetError, "classes"),
        ({"predict": lambda x: np.full((len(x), 2), np.nan)}, anycam.NonFiniteError, "NaN"),
        ({"predict": "model"}, TypeError, "callable"),
        ({"target": lambda out: out}, anycam.TargetError, "callable target"),
    ],
)
def test_bad_arguments_are_explained(kwargs, error, match):
    arguments = {"predict": sum_model, "inputs": INPUTS, "heatmaps": MAPS, "target": 0, "steps": 4}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        deletion(**arguments)


@pytest.mark.parametrize(
    ("regions", "tolerance", "match"),
    [
        (np.ones((2, 4, 4)), 0, "astype"),
        (np.ones((2, 4, 5), dtype=bool), 0, "do not match"),
        (np.array([[0, 0, 1, 1]]), 0, "neither"),
        ([np.array([0, 0, 1, 1])], 0, "1 regions for 2"),
        (np.array([[2, 0, 1, 1], [0, 0, 1, 1]]), 0, "row0 <= row1"),
        (np.array([[0, 0, 1, 1], [0, 0, 1, 1]]), -1, "tolerance"),
        (np.array([[0, 0, 1, 1], [0, 0, 1, 1]]), 1.5, "tolerance"),
    ],
)
def test_bad_regions_are_explained(regions, tolerance, match):
    with pytest.raises(anycam.InputError, match=match):
        pointing_game(MAPS, regions, tolerance)


def test_boxes_need_two_dimensional_maps_and_energy_needs_non_negative_maps():
    with pytest.raises(anycam.InputError, match="2-D"):
        pointing_game(np.ones((1, 3, 3, 3)), np.array([[0, 0, 1, 1]]))
    with pytest.raises(anycam.InputError, match="non-negative"):
        energy_pointing_game(-MAPS, np.array([[0, 0, 1, 1], [0, 0, 1, 1]]))


def test_importing_the_metrics_imports_no_framework():
    code = (
        "import sys, anycam.metrics; print(sorted({'torch', 'tensorflow', 'jax', 'keras', 'scipy'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
