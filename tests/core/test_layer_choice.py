"""Layer names and the automatic layer, framework-free (issue 20, item 6)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import anycam
from anycam.protocol.layers import LayerRecord, choice_note, choose_layer, layer_kind, layer_not_found

RESNET = ["", "conv1", "bn1", "relu", "maxpool", "layer1", "layer1.0", "layer1.0.conv1", "layer2", "layer3", "fc"]


def test_an_unknown_layer_with_no_close_name_lists_the_top_level_layers_and_auto() -> None:
    error = layer_not_found("stage_four", RESNET)
    message = str(error)
    assert isinstance(error, anycam.LayerError)
    assert "top-level layers: 'conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'fc'" in message
    assert "layer1.0" not in message and "layer=None" in message


def test_an_unknown_layer_with_close_names_lists_those() -> None:
    message = str(layer_not_found("layr2", RESNET))
    assert "closest: 'layer2'" in message and "top-level" not in message


def test_a_long_list_of_top_level_layers_is_cut_with_a_count() -> None:
    names = [f"block{i}" for i in range(30)]
    message = str(layer_not_found("zzz", names, listed=4))
    assert "'block0', 'block1', 'block2', 'block3', … (26 more)" in message


@pytest.mark.parametrize(
    ("type_name", "kind"),
    [
        ("BatchNorm2d", "normalization"),
        ("BatchNormalization", "normalization"),
        ("GroupNorm", "normalization"),
        ("ReLU", "activation"),
        ("MemoryEfficientSwish", "activation"),
        ("Activation", "activation"),
        ("Conv2d", None),
        ("AdaptiveAvgPool2d", None),
        ("Linear", None),
    ],
)
def test_layer_kinds_are_read_from_any_frameworks_class_name(type_name: str, kind: str | None) -> None:
    assert layer_kind(type_name) == kind


def _efficientnet_tail(swish_calls: int) -> list[LayerRecord]:
    """EfficientNet-Lite's end: head conv → BN → swish (one module, shared) → pooling → fc."""
    return [
        LayerRecord("_conv_head", (2, 1280, 7, 7), kind=None),
        LayerRecord("_bn1", (2, 1280, 7, 7), kind="normalization"),
        LayerRecord("_swish", (2, 1280, 7, 7), calls=swish_calls, kind="activation"),
        LayerRecord("_avg_pooling", (2, 1280, 1, 1)),
        LayerRecord("_fc", (2, 1000)),
    ]


def test_the_auto_rule_takes_an_activation_after_the_normalisation_when_it_runs_once() -> None:
    records = _efficientnet_tail(swish_calls=1)
    assert choose_layer(records, (224, 224)) == "_swish"
    assert choice_note(records, "_swish") is None


def test_a_pre_activation_choice_says_why_and_names_the_post_activation_map() -> None:
    records = _efficientnet_tail(swish_calls=17)
    chosen = choose_layer(records, (224, 224))
    assert chosen == "_bn1"
    note = choice_note(records, chosen)
    assert note is not None and "'_swish' runs 17 times" in note and "'_avg_pooling:input'" in note


def test_the_repr_shows_the_note_of_an_automatic_choice() -> None:
    explainer = anycam.Explainer.__new__(anycam.Explainer)
    explainer.method = "gradcam"
    explainer.backend = SimpleNamespace(name="torch", layer_names=("_bn1",), auto_layer=True, auto_note="why")
    assert repr(explainer) == "Explainer(method='gradcam', backend='torch', layer=[_bn1] (auto); note: why)"
