"""The shipped demo ViT (issue 22's quality table): its weights load and still classify as trained."""

from __future__ import annotations

import importlib.util
from copy import deepcopy
from pathlib import Path
from typing import Any

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


# -- the quality table's new pieces (scripts/evaluate_demo_vit.py): ROAD and the cascade per block --

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "evaluate_demo_vit.py"


@pytest.fixture(scope="module")
def script() -> Any:
    spec = importlib.util.spec_from_file_location("evaluate_demo_vit", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cascade_randomises_the_vit_block_by_block_from_the_head_down(script: Any) -> None:
    import anycam

    layers = anycam.Explainer(build_demo_vit(), method="rollout").backend.parameter_layers()
    steps = script.cascade_steps(layers)
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "fc1", "fc2"]
    expected = {"patch embedding": ["patch"]}
    expected |= {f"block {i}": [f"blocks.{i}.{name}" for name in block] for i in range(4)}
    expected["norm + head"] = ["norm", "head"]
    assert steps == expected
    assert list(steps) == list(expected)  # input to output: the cascade runs it backwards


def test_each_cascade_step_equals_spearman_of_maps_of_a_copy_randomised_by_hand(script: Any) -> None:
    """Step k re-draws the k + 1 groups nearest the head, seeded seed + k, layers in model order."""
    import anycam

    stats = pytest.importorskip("scipy.stats")
    demo = load_demo()
    x, labels = torch.from_numpy(demo["images"][:4]), demo["labels"][:4]
    model = script.load_vit()
    result = script.cascade(anycam.Explainer(model, method="attention-grad"), x, labels, seed=3)
    groups = list(script.cascade_steps(anycam.Explainer(model, method="rollout").backend.parameter_layers()).items())
    assert result.layers == tuple(name for name, _ in reversed(groups))

    def signed_map(net: torch.nn.Module) -> np.ndarray:
        return anycam.Explainer(net, method="attention-grad", relu=False).explain(x, labels).cam.reshape(4, -1)

    reference = signed_map(model)
    for step in range(len(groups)):
        copy = deepcopy(model)
        modules = dict(copy.named_modules())
        torch.manual_seed(3 + step)
        for _, members in reversed(groups[len(groups) - 1 - step :]):
            for name in members:
                modules[name].reset_parameters()
        flipped = signed_map(copy)
        expected = [stats.spearmanr(reference[i], flipped[i]).statistic for i in range(4)]
        np.testing.assert_allclose(result.spearman[step], expected, rtol=1e-9, atol=1e-12)
    # The head alone changes attention-grad's map; with every block re-drawn nothing of it is left.
    assert result.spearman[0].mean() < 0.9 and abs(result.spearman[-1].mean()) < 0.3


def test_the_table_row_reports_road_means_and_combined_from_the_curves(script: Any) -> None:
    """ROAD's columns: mean MoRF, mean LeRF and (LeRF − MoRF) / 2, averaged over the canvases."""
    import anycam
    from anycam.metrics import road

    demo = load_demo()
    images, labels, boxes = demo["images"][:4], demo["labels"][:4], demo["boxes"][:4]
    model = script.load_vit()
    scorer = anycam.Explainer(model, method="rollout")
    heat = scorer(torch.from_numpy(images), labels)
    fractions = (0.1, 0.5, 0.9)
    row = script.scores(scorer, images, heat, labels, boxes, steps=4, percentages=fractions)
    curves = road(scorer, images, heat, labels, percentages=fractions, noise=script.ROAD_NOISE, seed=0, progress=False)
    assert curves.morf is not None and curves.lerf is not None
    assert row["road_morf"] == pytest.approx(curves.morf.mean(), rel=1e-12)
    assert row["road_lerf"] == pytest.approx(curves.lerf.mean(), rel=1e-12)
    assert row["road"] == pytest.approx(((curves.lerf.mean(axis=1) - curves.morf.mean(axis=1)) / 2).mean(), rel=1e-12)
    # The pointing game by hand: a maximum of the map inside the digit's box (row0, col0, row1, col1).
    hits = [(h[r0:r1, c0:c1] == h.max()).any() for h, (r0, c0, r1, c1) in zip(heat, boxes, strict=True)]
    assert row["pointing"] == pytest.approx(100 * np.mean(hits))


def test_a_step_mapping_in_full_mode_reproduces_the_cascades_last_step_and_bad_steps_are_refused(script: Any) -> None:
    import anycam
    from anycam.metrics.sanity import sanity_check

    demo = load_demo()
    x, labels = torch.from_numpy(demo["images"][:2]), demo["labels"][:2]
    explainer = anycam.Explainer(script.load_vit(), method="attention-grad")
    steps = script.cascade_steps(explainer.backend.parameter_layers())
    cascade = sanity_check(explainer, x, labels, mode="cascading", layers=steps, seed=1, progress=False)
    full = sanity_check(explainer, x, labels, mode="full", layers=steps, seed=1, progress=False)
    independent = sanity_check(explainer, x, labels, mode="independent", layers=steps, seed=1, progress=False)
    np.testing.assert_array_equal(full.spearman[0], cascade.spearman[-1])
    # Independent and cascading agree on the first step (the head group alone, the same seed).
    np.testing.assert_array_equal(independent.spearman[0], cascade.spearman[0])
    assert independent.layers == cascade.layers == tuple(reversed(steps))
    with pytest.raises(anycam.ConfigError, match="'empty' name no layers"):
        sanity_check(explainer, x, labels, layers={"empty": [], **steps}, progress=False)
    with pytest.raises(anycam.ConfigTypeError, match="string"):
        sanity_check(explainer, x, labels, layers={"head": "head"}, progress=False)
