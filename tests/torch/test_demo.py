"""The shipped demo CNN built in PyTorch from the npz: names, shapes, outputs and accuracy; its 1-D/3-D variants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anycam.backends.torch.demo import build_demo_model

import anycam
from anycam.demo.data import BN_EPS, EXPLAIN_LAYERS, load_demo
from anycam.demo.weights import demo_weight_shapes, random_demo_weights


@pytest.fixture(scope="module")
def demo():
    return load_demo()


def test_npz_weights_match_the_state_dict(demo):
    state = build_demo_model().state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in demo["weights"].items()} == expected


def test_model_reproduces_the_reported_held_out_accuracy(demo):
    model = build_demo_model(demo["weights"])
    assert not model.training
    with torch.no_grad():
        logits = model(torch.from_numpy(demo["images"])).numpy()
    np.testing.assert_allclose(logits, demo["logits"], rtol=1e-5, atol=1e-5)
    accuracy = float((logits.argmax(1) == demo["labels"]).mean())
    assert accuracy == demo["accuracy"]
    assert accuracy > 0.9


def test_weights_are_loaded_exactly(demo):
    model = build_demo_model(demo["weights"])
    for name, tensor in model.state_dict().items():
        if name in demo["weights"]:
            np.testing.assert_array_equal(tensor.numpy(), demo["weights"][name])


def test_layers_to_explain_and_their_shapes(demo):
    model = build_demo_model(demo["weights"])
    modules = dict(model.named_modules())
    shapes = {}
    hooks = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name in ("stem", "stage1", "stage2", "stage3")
    ]
    try:
        with torch.no_grad():
            model(torch.from_numpy(demo["images"][:2]))
    finally:
        for hook in hooks:
            hook.remove()
    assert shapes == {
        "stem": (2, 16, 64, 64),
        "stage1": (2, 32, 32, 32),
        "stage2": (2, 32, 32, 32),
        "stage3": (2, 64, 16, 16),
    }
    assert set(EXPLAIN_LAYERS) <= set(shapes)


def test_every_conv_pads_one_explicitly_and_every_bn_uses_the_documented_eps():
    model = build_demo_model()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 7
    assert all(c.padding == (1, 1) and c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert sorted(c.stride[0] for c in convs) == [1, 1, 1, 1, 1, 2, 2]
    assert all(n.eps == BN_EPS for n in norms)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda w: w.pop("fc.bias"), "missing"),
        (lambda w: w.__setitem__("fc.extra", np.zeros(1)), "unknown"),
        (lambda w: w.__setitem__("fc.bias", np.zeros(3, np.float32)), "shape"),
    ],
)
def test_bad_weights_are_named(demo, edit, match):
    weights = dict(demo["weights"])
    edit(weights)
    with pytest.raises(anycam.InputError, match=match):
        build_demo_model(weights)


VARIANTS = [(1, 3, (37,)), (2, 2, (20, 17)), (3, 2, (9, 12, 10))]
"""(spatial_dims, in_channels, spatial size): odd sizes so stride-2 convs must floor as documented."""


@pytest.mark.parametrize(("spatial_dims", "in_channels", "size"), VARIANTS)
def test_every_variant_has_the_same_names_and_the_documented_ops(spatial_dims, in_channels, size):
    model = build_demo_model(spatial_dims=spatial_dims, in_channels=in_channels)
    conv_type = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[spatial_dims]
    norm_type = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[spatial_dims]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(convs) == len(norms) == 7
    assert all(type(c) is conv_type and c.padding == (1,) * spatial_dims and c.bias is None for c in convs)
    assert all(c.kernel_size == (3,) * spatial_dims for c in convs)
    assert all(type(n) is norm_type and n.eps == BN_EPS for n in norms)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert state == demo_weight_shapes(spatial_dims, in_channels)
    assert list(state) == list(demo_weight_shapes())


@pytest.mark.parametrize(("spatial_dims", "in_channels", "size"), VARIANTS)
def test_random_weights_fit_every_variant_and_are_loaded_exactly(spatial_dims, in_channels, size):
    weights = random_demo_weights(spatial_dims, in_channels, seed=3)
    model = build_demo_model(weights, spatial_dims=spatial_dims, in_channels=in_channels)
    state = model.state_dict()
    for name, array in weights.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(state[name].numpy(), array)
    assert {k for k in state if not k.endswith("num_batches_tracked")} == set(weights)
    assert all(weights[k].min() > 0 for k in weights if k.endswith("running_var"))

    x = torch.from_numpy(np.random.default_rng(0).random((2, in_channels, *size), dtype=np.float32))
    modules = dict(model.named_modules())
    shapes = {}
    hooks = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name in EXPLAIN_LAYERS
    ]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    half = tuple((s - 1) // 2 + 1 for s in size)
    quarter = tuple((s - 1) // 2 + 1 for s in half)
    assert shapes == {"stage1": (2, 32, *half), "stage3": (2, 64, *quarter)}
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_random_weights_are_reproducible_and_seeded():
    first, again, other = (random_demo_weights(3, 2, seed=s) for s in (5, 5, 6))
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["stem.conv.weight"], other["stem.conv.weight"])
    assert first["stem.conv.weight"].shape == (16, 2, 3, 3, 3)


@pytest.mark.parametrize(("spatial_dims", "in_channels"), [(0, 1), (4, 1), (True, 1), (2, 0), (2, 1.5)])
def test_bad_variants_are_named(spatial_dims, in_channels):
    with pytest.raises(anycam.InputError, match="spatial_dims" if in_channels == 1 else "in_channels"):
        build_demo_model(spatial_dims=spatial_dims, in_channels=in_channels)
    with pytest.raises(anycam.InputError):
        random_demo_weights(spatial_dims, in_channels)


def test_a_variants_weights_do_not_fit_another_variant():
    with pytest.raises(anycam.InputError, match=r"stem\.conv\.weight.*shape"):
        build_demo_model(random_demo_weights(3, 1), spatial_dims=2)
