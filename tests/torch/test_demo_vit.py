"""The shipped demo ViT (issue 22's quality table): its weights load and still classify as trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from anycam.backends.torch.demo import build_demo_vit  # noqa: E402

from anycam.demo.data import load_demo  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[2] / "src" / "anycam" / "demo" / "vit.npz"


def test_the_shipped_vit_reproduces_the_accuracy_its_training_script_recorded():
    with np.load(WEIGHTS) as arrays:
        weights = {k.removeprefix("weights/"): arrays[k] for k in arrays.files if k.startswith("weights/")}
        recorded = float(arrays["accuracy"])
    demo = load_demo()
    with torch.no_grad():
        logits = build_demo_vit(weights)(torch.from_numpy(demo["images"])).numpy()
    # The training script measured it on the same 48 canvases: one canvas is 1/48.
    assert float((logits.argmax(1) == demo["labels"]).mean()) == pytest.approx(recorded, abs=1e-9)
    assert recorded > 0.8  # well above chance (0.1): the maps of a model that learned something


def test_the_vit_attends_through_the_fused_kernel_and_equals_the_explicit_softmax_form():
    """The model calls F.scaled_dot_product_attention; the same weights written out by hand agree."""
    model = build_demo_vit()
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    block = model.blocks[0]
    tokens = torch.randn(3, 65, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = block.attn(tokens)
        qkv = block.attn.qkv(tokens).reshape(3, 65, 3, 4, 16).permute(2, 0, 3, 1, 4)
        probabilities = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / 4.0, dim=-1)
        explicit = block.attn.proj((probabilities @ qkv[2]).transpose(1, 2).reshape(3, 65, 64))
        assert model(x).shape == (3, 10)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)
