"""Layouts (channels first/last, tokens) and targets (parsing, resolving, one-hot)."""

from __future__ import annotations

import numpy as np
import pytest

import anycam
from anycam import core

# --- layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("channels_first", "channels_first"),
        ("channels_last", "channels_last"),
        ("tokens", "tokens"),
        ("NCHW", "channels_first"),
        ("nchw", "channels_first"),
        ("NCL", "channels_first"),
        ("NCDHW", "channels_first"),
        ("NHWC", "channels_last"),
        ("nhwc", "channels_last"),
        ("NLC", "channels_last"),
        ("NDHWC", "channels_last"),
    ],
)
def test_layout_spellings(spelling, canonical):
    assert core.canonical_layout(spelling) == canonical


@pytest.mark.parametrize("spelling", ["NC", "NHW", "CHW", "HWC", "N1HWC", "channel_first", "", None, 3])
def test_unknown_layout_spellings(spelling):
    with pytest.raises(anycam.ConfigError, match="unknown layout"):
        core.canonical_layout(spelling)


def test_input_error_is_a_value_error():
    assert issubclass(anycam.InputError, ValueError) and issubclass(anycam.InputError, anycam.AnycamError)


def test_channels_last_moves_the_channel_axis_after_the_lead_axes():
    rng = np.random.default_rng(0)
    first = rng.standard_normal((2, 5, 4, 3))  # (N, C, H, W)
    last = first.transpose(0, 2, 3, 1).copy()  # (N, H, W, C)
    np.testing.assert_array_equal(core.to_channels_first(last, "channels_last"), first)
    np.testing.assert_array_equal(core.to_channels_first(last, "NHWC"), first)
    assert core.to_channels_first(first, "NCHW") is first  # no copy where none is needed
    # Gradients carry a K axis: (N, K, H, W, C) → (N, K, C, H, W).
    grads_first = rng.standard_normal((2, 3, 5, 4, 3))
    grads_last = grads_first.transpose(0, 1, 3, 4, 2).copy()
    np.testing.assert_array_equal(core.to_channels_first(grads_last, "channels_last", lead=2), grads_first)
    # 1-D and 3-D.
    volume = rng.standard_normal((1, 2, 3, 4, 5))
    np.testing.assert_array_equal(core.to_channels_first(np.moveaxis(volume, 1, -1), "NDHWC"), volume)


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_tokens_round_trip_a_patch_grid_with_prefix_tokens(prefix):
    # Build tokens the way a ViT does (row-major patches after `prefix` class/register tokens)
    # and get the grid back.
    rng = np.random.default_rng(1)
    grid = rng.standard_normal((2, 6, 4, 4))  # (N, C, H, W)
    patches = grid.reshape(2, 6, 16).transpose(0, 2, 1)  # (N, T, C)
    tokens = np.concatenate([np.full((2, prefix, 6), 99.0), patches], axis=1)
    np.testing.assert_array_equal(core.to_channels_first(tokens, "tokens"), grid)
    # With K: (N, K, T, C).
    stacked = np.stack([tokens, -tokens], axis=1)
    out = core.to_channels_first(stacked, "tokens", lead=2)
    np.testing.assert_array_equal(out, np.stack([grid, -grid], axis=1))


def test_tokens_with_an_explicit_non_square_grid():
    patches = np.arange(2 * 6 * 3, dtype=float).reshape(1, 6, 2 * 3).transpose(0, 2, 1)  # (1, T=6, C=6)
    tokens = np.concatenate([np.zeros((1, 1, 6)), patches], axis=1)
    out = core.to_channels_first(tokens, "tokens", grid=(2, 3))
    np.testing.assert_array_equal(out, np.arange(36.0).reshape(1, 6, 2, 3))


@pytest.mark.parametrize(
    ("tokens", "prefix", "grid"),
    [(196, 0, (14, 14)), (197, 1, (14, 14)), (201, 5, (14, 14)), (50, 1, (7, 7)), (5, 1, (2, 2)), (1, 0, (1, 1))],
)
def test_token_grid_inference(tokens, prefix, grid):
    assert core.token_grid(tokens) == (prefix, grid)


def test_token_grid_explicit_and_errors():
    assert core.token_grid(197, (14, 14)) == (1, (14, 14))
    assert core.token_grid(13, (3, 4)) == (1, (3, 4))
    with pytest.raises(anycam.InputError, match=r"token_grid \(14, 15\) needs 210 tokens, the layer has 197"):
        core.token_grid(197, (14, 15))
    # 110 tokens: 110..102 holds no square (100 would need 10 prefix tokens, more than 8).
    with pytest.raises(anycam.InputError, match="cannot infer a square patch grid from 110 tokens"):
        core.token_grid(110)


def test_layout_errors():
    with pytest.raises(anycam.InputError, match="no spatial axis"):
        core.to_channels_first(np.zeros((2, 8)), "channels_first")
    with pytest.raises(anycam.InputError, match="no spatial axis"):
        core.to_channels_first(np.zeros((2, 3, 8)), "channels_last", lead=2)
    with pytest.raises(anycam.InputError, match=r"token layout needs \(N, T, C\)"):
        core.to_channels_first(np.zeros((2, 5, 4, 3)), "tokens")
    with pytest.raises(anycam.ConfigError, match="unknown layout"):
        core.to_channels_first(np.zeros((2, 5, 4, 3)), "HWC")


@pytest.mark.parametrize(
    ("shape", "layout", "spatial"),
    [
        ((2, 3, 224, 200), "channels_first", (224, 200)),
        ((2, 3, 224, 200), "NCHW", (224, 200)),
        ((2, 224, 200, 3), "channels_last", (224, 200)),
        ((2, 224, 200, 3), "NHWC", (224, 200)),
        ((1, 1, 16000), "NCL", (16000,)),
        ((1, 8, 9, 10, 2), "NDHWC", (8, 9, 10)),
    ],
)
def test_spatial_shape(shape, layout, spatial):
    assert core.spatial_shape(shape, layout) == spatial


def test_spatial_shape_errors():
    with pytest.raises(anycam.InputError, match="no spatial axis"):
        core.spatial_shape((2, 10), "channels_first")
    with pytest.raises(anycam.InputError, match="cannot be in a token layout"):
        core.spatial_shape((2, 197, 768), "tokens")


# --- targets ------------------------------------------------------------------------------


def test_parse_none_int_and_top_k():
    spec = core.parse_target(None)
    assert (spec.kind, spec.squeeze) == ("argmax", True)
    for value in (3, np.int64(3), np.uint8(3)):
        spec = core.parse_target(value)
        assert (spec.kind, spec.squeeze) == ("index", True)
        np.testing.assert_array_equal(spec.indices, [[3]])
    spec = core.parse_target(anycam.top_k(4))
    assert (spec.kind, spec.squeeze, spec.k) == ("topk", False, 4)
    assert core.top_k(np.int64(2)) == core.TopK(2)


def test_parse_callable():
    def fn(output):
        return output[:, 0]

    spec = core.parse_target(fn)
    assert (spec.kind, spec.squeeze, spec.fn) == ("callable", True, fn)
    assert core.parse_target(len).kind == "callable"


@pytest.mark.parametrize(
    ("target", "indices", "squeeze"),
    [
        ([3, 1, 4], [[3], [1], [4]], True),
        ((3, 1), [[3], [1]], True),
        (np.array([0, 2], np.int32), [[0], [2]], True),
        (np.array([0, 2], np.uint16), [[0], [2]], True),
        (np.array([[1, 2, 3], [4, 5, 6]]), [[1, 2, 3], [4, 5, 6]], False),
        ([[7]], [[7]], False),
        (np.array([1.0, 2.0]), [[1], [2]], True),  # integral floats are accepted
    ],
)
def test_parse_index_arrays(target, indices, squeeze):
    spec = core.parse_target(target)
    assert (spec.kind, spec.squeeze) == ("indices", squeeze)
    assert spec.indices.dtype == np.int64
    np.testing.assert_array_equal(spec.indices, indices)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (True, "got the bool True"),
        (False, "got the bool False"),
        (-1, "must be >= 0, got -1"),
        ([1, -2], "must be >= 0, got -2"),
        (1.5, "integer class indices"),
        ([0.5, 1.0], "integer class indices"),
        ([np.nan], "integer class indices"),
        ([np.inf], "integer class indices"),
        ([1e30], "too large"),
        (np.array([2**63], np.uint64), "too large"),
        (2**63, "too large"),
        ([], "integer class indices"),
        (np.zeros((0, 2), int), "integer class indices"),
        ("cat", "integer class indices"),
        (["a", "b"], "integer class indices"),
        ([True, False], "integer class indices"),
        ({"class": 1}, "integer class indices"),
        ([[1, 2], [3]], "unsupported target|integer class indices"),
        (np.zeros((2, 2, 2), int), r"must be \(N,\) or \(N, K\), got shape \(2, 2, 2\)"),
        (np.array(3), r"must be \(N,\) or \(N, K\), got shape \(\)"),
        (2.0, r"must be \(N,\) or \(N, K\)"),
    ],
)
def test_parse_bad_targets(target, message):
    with pytest.raises(anycam.TargetError, match=message):
        core.parse_target(target)


@pytest.mark.parametrize("k", [0, -1, True, 1.5, "3", None])
def test_bad_top_k(k):
    with pytest.raises(anycam.TargetError, match="top_k needs a positive integer"):
        anycam.top_k(k)


def test_target_error_is_a_value_error():
    assert issubclass(anycam.TargetError, ValueError) and issubclass(anycam.TargetError, anycam.AnycamError)


OUTPUTS = np.array(
    [
        [0.1, 2.0, -1.0, 0.5],
        [3.0, 1.0, 3.0, 2.0],  # a tie between classes 0 and 2
        [-5.0, -4.0, -6.0, -4.0],  # a tie between classes 1 and 3
    ]
)


def test_resolve_argmax():
    indices = core.resolve_indices(core.parse_target(None), OUTPUTS)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, [[1], [0], [1]])


def test_resolve_one_index_broadcasts_to_the_batch():
    # pytorch-grad-cam #264: one target for a batch explained only image 0.
    indices = core.resolve_indices(core.parse_target(2), OUTPUTS)
    np.testing.assert_array_equal(indices, [[2], [2], [2]])
    assert indices.flags.c_contiguous and indices.flags.writeable


def test_resolve_top_k_keeps_ties_in_class_order():
    indices = core.resolve_indices(core.parse_target(anycam.top_k(3)), OUTPUTS)
    np.testing.assert_array_equal(indices, [[1, 3, 0], [0, 2, 3], [1, 3, 0]])
    np.testing.assert_array_equal(
        core.resolve_indices(core.parse_target(anycam.top_k(4)), OUTPUTS)[:, 0],
        core.resolve_indices(core.parse_target(None), OUTPUTS)[:, 0],
    )


def test_resolve_per_sample_and_k_targets():
    np.testing.assert_array_equal(core.resolve_indices(core.parse_target([3, 0, 1]), OUTPUTS), [[3], [0], [1]])
    two = np.array([[0, 3], [1, 1], [2, 0]])
    np.testing.assert_array_equal(core.resolve_indices(core.parse_target(two), OUTPUTS), two)


def test_resolve_errors():
    with pytest.raises(anycam.TargetError, match="got 2 targets for a batch of 3"):
        core.resolve_indices(core.parse_target([0, 1]), OUTPUTS)
    with pytest.raises(anycam.TargetError, match="target class 4 is out of range: the model has 4 outputs"):
        core.resolve_indices(core.parse_target(4), OUTPUTS)
    with pytest.raises(anycam.TargetError, match="target class 9 is out of range"):
        core.resolve_indices(core.parse_target([[0, 9], [1, 1], [2, 0]]), OUTPUTS)
    with pytest.raises(anycam.TargetError, match=r"top_k\(5\) asks for more classes than the model has \(4\)"):
        core.resolve_indices(core.parse_target(anycam.top_k(5)), OUTPUTS)
    with pytest.raises(anycam.TargetError, match=r"need a model output of shape \(N, classes\), got \(3, 4, 2\)"):
        core.resolve_indices(core.parse_target(None), np.zeros((3, 4, 2)))
    with pytest.raises(anycam.TargetError, match=r"got \(3,\)"):
        core.resolve_indices(core.parse_target(1), np.zeros(3))
    with pytest.raises(anycam.TargetError, match="callable targets have no class indices"):
        core.resolve_indices(core.parse_target(lambda out: out[:, 0]), OUTPUTS)


def test_one_hot_against_a_loop():
    indices = np.array([[2, 0], [1, 1], [0, 3]])  # (N=3, K=2)
    out = core.one_hot(indices, 4)
    expected = np.zeros((2, 3, 4), np.float32)
    for n in range(3):
        for k in range(2):
            expected[k, n, indices[n, k]] = 1
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(core.one_hot(indices, 4, dtype=np.float64).sum(axis=-1), np.ones((2, 3)))


# --- layouts checked against the input (issue 10, items 1-4) -------------------------------


def test_a_fitting_guess_is_kept():
    reading = core.read_layer((2, 8, 6, 5), (12, 10), guess="channels_first")
    assert (reading.layout, reading.spatial, reading.aligned) == ("channels_first", (6, 5), ((6, 5), (12, 10)))


def test_singleton_axes_are_dropped_when_that_makes_the_ranks_agree():
    # A 1-D model written with Conv2d on x[..., None]: (N, C, 64, 1) under a (1024,) signal.
    reading = core.read_layer((2, 8, 64, 1), (1024,), guess="channels_first")
    assert reading.layout == "channels_first" and reading.aligned == ((64,), (1024,))
    # The other way round: a (1, 1024) "image" and a 1-D layer.
    assert core.read_layer((2, 8, 64), (1, 1024), guess="channels_first").aligned == ((64,), (1024,))
    # Equal ranks are compared as they are: a pooled (1, 1) map of a 2-D input stays 2-D.
    assert core.read_layer((2, 8, 1, 1), (8, 8), guess="channels_first").aligned == ((1, 1), (8, 8))


def test_heatmaps_follow_the_alignment():
    # A (N, K, 4, 1) map of a (8,) signal: upsampled as 1-D, returned at the input's shape.
    cam = np.arange(4.0).reshape(1, 1, 4, 1)
    expected = core.normalize(core.resize(cam[..., 0], (8,)), spatial_ndim=1)
    heat = core.heatmaps([cam], (8,), aligned=[((4,), (8,))])
    assert heat.shape == (1, 1, 8)
    np.testing.assert_allclose(heat, expected, atol=1e-7)
    # A 1-D map of a (1, 8) input comes back (1, 8).
    heat = core.heatmaps([cam[..., 0]], (1, 8), aligned=[((4,), (8,))])
    np.testing.assert_allclose(heat, expected[:, :, None, :], atol=1e-7)


# 16 channels of length 8 are also 16 tokens of a 4×4 grid (2×2 patches): that one reads as tokens.
@pytest.mark.parametrize("channels", [6, 10, 32])
def test_a_one_dim_layer_under_a_two_dim_input_is_refused_naming_both_shapes(channels):
    with pytest.raises(anycam.InputError) as info:
        core.read_layer((2, channels, 8), (8, 8), guess="channels_first", name="conv1d", input_shape=(2, 3, 8, 8))
    message = str(info.value)
    assert f"(2, {channels}, 8)" in message and "(2, 3, 8, 8)" in message and "layout=" in message


@pytest.mark.parametrize(
    ("shape", "inputs", "grid"),
    [((2, 197, 768), (224, 224), (14, 14)), ((2, 49, 768), (224, 224), (7, 7)), ((2, 17, 8), (16, 16), (4, 4))],
)
def test_tokens_are_detected_under_a_two_dim_input(shape, inputs, grid):
    for guess in ("channels_first", "channels_last"):
        reading = core.read_layer(shape, inputs, guess=guess)
        assert (reading.layout, reading.grid) == ("tokens", grid)


def test_token_detection_is_strict_but_token_grid_is_trusted():
    # 1 + 14*15 tokens: no square grid; with token_grid= given, tokens fit.
    with pytest.raises(anycam.InputError, match="does not fit"):
        core.read_layer((2, 211, 64), (224, 240), guess="channels_first")
    reading = core.read_layer((2, 211, 64), (224, 240), guess="channels_first", grid=(14, 15))
    assert (reading.layout, reading.grid) == ("tokens", (14, 15))


def test_the_input_layout_is_inferred_when_only_the_other_reading_fits():
    # A Flax (features, head) pair cut from an NHWC model, read channels-first by default.
    inputs = [("channels_first", (24, 3)), ("channels_last", (24, 24))]
    layout, spatial, readings = core.read_layouts([(2, 12, 12, 16)], ["channels_first"], inputs, follow=True)
    assert (layout, spatial, readings[0].layout) == ("channels_last", (24, 24), "channels_last")
    # A torch model that takes NHWC and permutes inside: its layers stay channels-first.
    layout, _, readings = core.read_layouts([(2, 16, 12, 12)], ["channels_first"], inputs)
    assert (layout, readings[0].layout) == ("channels_last", "channels_first")
    # Only the first reading is tried when it fits.
    assert core.read_layouts([(2, 8, 12, 2)], ["channels_first"], inputs)[0] == "channels_first"


def test_the_input_layout_is_not_inferred_when_none_fits():
    inputs = [("channels_first", (24, 3)), ("channels_last", (24, 24))]
    with pytest.raises(anycam.InputError, match="does not fit"):
        core.read_layouts([(2, 64, 64, 48)], ["channels_first"], inputs, names=["block"])


def test_a_given_layout_is_checked_not_trusted():
    # NCHW (N, 64, 6, 5) under (12, 10): as channels_last its spatial (64, 6) exceeds the input.
    with pytest.raises(anycam.InputError, match=r"layout='channels_last' contradicts the shapes.*'channels_first'"):
        core.read_layer((2, 64, 6, 5), (12, 10), guess="channels_first", given="channels_last")
    with pytest.raises(anycam.InputError, match="layout='tokens' contradicts"):
        core.read_layer((2, 64, 6, 5), (12, 10), guess="channels_first", given="tokens")
    assert core.read_layer((2, 64, 6, 5), (12, 10), guess="channels_last", given="NCHW").layout == "channels_first"
    # A given token layout trusts a non-square-tiling grid (only the sizes are checked).
    assert core.read_layer((2, 17, 8), (15, 15), guess="channels_first", given="tokens").grid == (4, 4)


def test_a_layer_without_spatial_axes_is_refused():
    with pytest.raises(anycam.InputError, match="no spatial axis"):
        core.read_layer((2, 10), (8, 8), guess="channels_first")


# --- an undecided layout (issue 19.3): guess=None takes only a reading that fits alone ---------


def test_an_undecided_layout_that_fits_both_ways_is_refused_asking_for_layout():
    # (N, 8, 8, 6) under 8 × 8: 8 channels over 8 × 6, or 6 channels over 8 × 8.
    with pytest.raises(anycam.InputError) as info:
        core.read_layer((2, 8, 8, 6), (8, 8), guess=None, name="mix", input_shape=(2, 3, 8, 8))
    message = str(info.value)
    assert "cannot tell" in message and "(2, 8, 8, 6)" in message and "(2, 3, 8, 8)" in message
    assert "layout=" in message and "channels_first" in message and "channels_last" in message
    # The same shapes with a guess keep the guess: only None refuses.
    assert core.read_layer((2, 8, 8, 6), (8, 8), guess="channels_first").spatial == (8, 6)


@pytest.mark.parametrize(
    ("shape", "inputs", "layout", "spatial"),
    [
        ((2, 8, 8, 10), (8, 8), "channels_last", (8, 8)),  # channels first: 8 × 10 exceeds 8 × 8
        ((2, 10, 8, 8), (8, 8), "channels_first", (8, 8)),
        ((2, 197, 768), (224, 224), "tokens", (14, 14)),  # ViT tokens: no channel reading fits
    ],
)
def test_an_undecided_layout_takes_the_only_reading_that_fits(shape, inputs, layout, spatial):
    reading = core.read_layer(shape, inputs, guess=None)
    assert (reading.layout, reading.spatial) == (layout, spatial)


def test_a_given_layout_decides_an_undecided_layer():
    assert core.read_layer((2, 8, 8, 6), (8, 8), guess=None, given="channels_last").spatial == (8, 8)
    assert core.read_layer((2, 8, 8, 6), (8, 8), guess=None, given="channels_first").spatial == (8, 6)
    _, _, readings = core.read_layouts(
        [(2, 8, 8, 6), (2, 8, 8, 6)], [None, "channels_first"], [("channels_first", (8, 8))], given="channels_last"
    )
    assert [r.layout for r in readings] == ["channels_last", "channels_last"]


def test_an_undecided_layout_that_fits_no_reading_says_so():
    with pytest.raises(anycam.InputError, match="does not fit"):
        core.read_layer((2, 64, 64, 48), (24, 24), guess=None)


def test_an_undecided_input_that_reads_both_ways_is_refused_unless_layout_decides():
    # JAX, no convention: (N, 77, 26) with a (N, 77, 16) layer is 16 positions of 77 channels
    # (input 26 positions) or 77 positions of 16 channels (input 77 positions).
    inputs = [("channels_first", (26,)), ("channels_last", (77,))]
    with pytest.raises(anycam.InputError) as info:
        core.read_layouts([(2, 77, 16)], [None], inputs, follow=True, input_shape=(2, 77, 26))
    message = str(info.value)
    assert "(2, 77, 26)" in message and "(2, 77, 16)" in message and "input_layout=" in message
    assert "layout=" in message.replace("input_layout=", "")
    layout, spatial, readings = core.read_layouts([(2, 77, 16)], [None], inputs, follow=True, given="channels_last")
    assert (layout, spatial, readings[0].spatial) == ("channels_last", (77,), (77,))
    # With a convention (a guess), the first reading is kept as before.
    assert core.read_layouts([(2, 77, 16)], ["channels_first"], inputs, follow=True)[0] == "channels_first"
    # Undecided but only one input reading fits: taken.
    layout, _, readings = core.read_layouts([(2, 77, 64)], [None], inputs, follow=True)
    assert (layout, readings[0].layout, readings[0].spatial) == ("channels_last", "channels_last", (77,))
