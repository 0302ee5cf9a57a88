"""The shipped demo CNN built in PyTorch from the npz: names, shapes, outputs and accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anycam.backends.demo_torch import build_demo_model

import anycam
from anycam.demo_data import BN_EPS, EXPLAIN_LAYERS, load_demo


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
