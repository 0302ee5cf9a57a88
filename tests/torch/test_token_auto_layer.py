"""Issue 22.3: ``layer=None`` on a token model picks the last block's first normalisation, not the patch embedding.

The rule (``backends/torch/layers.py``): on a model whose last attention call attends over the
whole token sequence, the last module that ends with ``(N, T, C)`` tokens before the module making
that call starts — ``layernorm_before`` (HF ViT/DeiT), ``norm1`` (DINOv2, timm), ``layer_norm1``
(CLIP). The expected names are written out here per family; the maps are checked against Grad-CAM
at the named layer.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import anycam

from .test_attention_torch import TinyViT

transformers = pytest.importorskip("transformers")

# Hidden size 24 and 8 × 8 patches: real ViTs' shapes (C not a square + few tokens, many patches).
OPTIONS = {"image_size": 64, "patch_size": 8, "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 32}  # fmt: skip


def build(kind: str) -> tuple[torch.nn.Module, str]:
    """(model, the expected choice's name suffix)."""
    torch.manual_seed(0)
    if kind == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=5, **OPTIONS))
        expected = "1.layernorm_before"
    elif kind == "deit":
        config = transformers.DeiTConfig(num_labels=5, **OPTIONS)
        model = transformers.DeiTForImageClassificationWithTeacher(config)
        expected = "1.layernorm_before"
    elif kind == "dinov2":
        config = transformers.Dinov2WithRegistersConfig(num_labels=5, num_register_tokens=4, **OPTIONS)
        model = transformers.Dinov2WithRegistersForImageClassification(config)
        expected = "1.norm1"
    else:
        model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(projection_dim=5, **OPTIONS))
        expected = "1.layer_norm1"
    return model.eval(), expected


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2", "clip"])
def test_layer_none_on_a_hugging_face_token_model_is_the_last_blocks_first_norm(kind: str) -> None:
    model, expected = build(kind)
    output = "image_embeds" if kind == "clip" else "logits"
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    explainer = anycam.Explainer(model, None, method="gradcam", output=output)
    auto = explainer.explain({"pixel_values": pixels}, target=1)
    (chosen,) = explainer.layer_names
    assert chosen.endswith(expected), chosen
    assert "patch" not in chosen and "embed" not in chosen
    assert "token model" in repr(explainer)
    named = anycam.Explainer(model, chosen, method="gradcam", output=output, layout="tokens")
    np.testing.assert_array_equal(auto.heatmap, named.explain({"pixel_values": pixels}, target=1).heatmap)
    assert auto.cam.shape == (2, 8, 8) and float(auto.cam.max()) > 0  # not the zero map of the last block


def test_layer_none_on_a_multihead_attention_vit_is_the_last_blocks_norm1() -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    explainer = anycam.Explainer(model, None, method="gradcam", layout="tokens")
    explainer.explain(torch.randn(2, 3, 16, 16))
    assert explainer.layer_names == ("blocks.2.norm1",)


def test_windowed_attention_and_cnns_keep_the_general_rule() -> None:
    torch.manual_seed(0)
    config = transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=5
    )
    swin = transformers.SwinForImageClassification(config).eval()
    explainer = anycam.Explainer(swin, None, output="logits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anycam.AnycamWarning)
        explainer.explain({"pixel_values": torch.randn(2, 3, 32, 32)})
    assert "token model" not in repr(explainer)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()  # fmt: skip
    explainer = anycam.Explainer(cnn, None)
    explainer.explain(torch.randn(2, 3, 8, 8))
    assert explainer.layer_names == ("1",)
