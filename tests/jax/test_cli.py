"""``anycam explain`` with a Flax linen model from a factory, against ``jax.vjp`` of the head."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import anycam
from anycam.__main__ import main

FACTORY = textwrap.dedent(
    """
    import flax.linen as nn
    import jax
    import numpy as np
    from anycam.cli import ModelSpec


    class Backbone(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.relu(nn.Conv(4, (3, 3), name="conv")(x))


    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(Backbone(name="backbone")(x).mean(axis=(1, 2)))


    def build():
        module = Net()
        variables = module.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
        return {"model": (module, variables), "layer": "backbone", "size": (8, 8), "labels": ["a", "b", "c"]}
    """
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "flax_models.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("flax_models", None)


def test_explain_a_flax_factory_equals_vjp_gradcam(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = np.random.default_rng(2).integers(0, 256, (11, 9, 3), dtype=np.uint8)
    Image.fromarray(image).save(workdir / "img.png")
    assert main(["explain", "img.png", "--model", "flax_models:build", "--target", "b", "--out", "maps"]) == 0
    assert "gradcam, class 1 b: maps/img_gradcam_1.png" in capsys.readouterr().out

    import flax_models

    spec = flax_models.build()
    _, variables = spec["model"]
    resized = np.asarray(Image.fromarray(image).resize((8, 8), Image.Resampling.BILINEAR), dtype=np.float32)
    x = jnp.asarray((resized / 255.0)[None])  # channels last: Flax's convention
    backbone = {"params": variables["params"]["backbone"]}
    activations = flax_models.Backbone().apply(backbone, x)
    dense = variables["params"]["head"]

    def score(a: jax.Array) -> jax.Array:
        return (a.mean(axis=(1, 2)) @ dense["kernel"] + dense["bias"])[0, 1]

    gradients = jax.grad(score)(activations)
    cam = jax.nn.relu((gradients.mean(axis=(1, 2), keepdims=True) * activations).sum(-1))[0]
    up = np.asarray(jax.image.resize(cam, (8, 8), "linear"), dtype=np.float64)  # same size: identity
    heat = (up - up.min()) / (up.max() - up.min())
    expected = anycam.overlay(image, heat.astype(np.float32))
    written = np.asarray(Image.open(workdir / "maps" / "img_gradcam_1.png"))
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
