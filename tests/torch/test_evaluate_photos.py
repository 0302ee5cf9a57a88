"""The real-photo table (scripts/evaluate_photos.py) end to end on a small torch stand-in.

A small CNN and two photo-sized random images replace EfficientNet-Lite0 and scikit-image's
photos; the table must hold every method and the three control maps, and the per-pixel noise
row's deletion AUC must equal the same deletion written here with plain torch ops.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("scipy")

import anycam  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "evaluate_photos.py"
SIZE = 16
STEPS = 4


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evaluate_photos", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["evaluate_photos"] = module
    spec.loader.exec_module(module)
    return module


def _model(activation: type = torch.nn.ReLU) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), activation(),
        torch.nn.Conv2d(6, 8, 3, padding=1), activation(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5),
    ).eval()  # fmt: skip


def _photos() -> np.ndarray:
    # Smooth blobs, not white noise: a map's order then matters to the model.
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, (2, 4, 4, 3)).astype(np.float64)
    return np.repeat(np.repeat(coarse, SIZE // 4, axis=1), SIZE // 4, axis=2).astype(np.uint8)


def _deletion_by_hand(model: torch.nn.Module, images: np.ndarray, order_map: np.ndarray) -> np.ndarray:
    """RISE deletion with zeros, the target's softmax probability, trapezoid rule: plain torch."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    pixels = SIZE * SIZE
    aucs = []
    with torch.no_grad():
        for i in range(len(x)):
            target = int(model(x[i : i + 1]).argmax())
            order = torch.from_numpy(np.argsort(-order_map[i].reshape(-1), kind="stable").copy())
            curve = []
            for step in range(STEPS + 1):
                keep = torch.ones(pixels)
                keep[order[: step * pixels // STEPS]] = 0.0
                image = x[i : i + 1] * keep.view(1, 1, SIZE, SIZE)
                curve.append(float(torch.softmax(model(image), dim=1)[0, target]))
            aucs.append(sum((a + b) / 2 / STEPS for a, b in itertools.pairwise(curve)))
    return np.array(aucs)


def test_the_photo_table_holds_every_method_and_the_controls_end_to_end(script: ModuleType, tmp_path: Path) -> None:
    model = _model()
    images = _photos()
    table = script.evaluate(
        model,
        "3",
        images,
        ["one", "two"],
        steps=STEPS,
        percentages=(0.2, 0.5, 0.8),
        scorecam_top_k=None,
        log=lambda _: None,
    )
    cam_methods = [name for name in anycam.core.METHODS if name not in anycam.core.ATTENTION_METHODS]
    assert list(table.scores) == [*cam_methods, *script.CONTROLS]  # on ReLU nothing is skipped
    assert table.skipped == {}
    for name, scores in table.scores.items():
        assert set(scores) == {key for key, _ in script.COLUMNS}
        assert all(value.shape == (2,) for value in scores.values())
        for key in ("deletion", "deletion_blur", "insertion", "road_morf", "road_lerf"):
            assert np.all((scores[key] >= 0) & (scores[key] <= 1)), (name, key)
        np.testing.assert_allclose(scores["road"], (scores["road_lerf"] - scores["road_morf"]) / 2, rtol=1e-12)
        # The sanity check is the methods' column only: a control map has no model to randomise.
        sanity = scores["sanity"]
        assert np.all(np.isnan(sanity)) if name in script.CONTROLS else np.all(np.abs(sanity) <= 1), name

    # The oracle: the noise row's deletion, recomputed from the documented seed with plain torch.
    noise = np.random.default_rng(0).random((2, SIZE, SIZE))
    want = _deletion_by_hand(model, images, noise)
    np.testing.assert_allclose(table.scores[script.CONTROLS[0]]["deletion"], want, rtol=1e-5, atol=1e-6)

    page = tmp_path / "evaluation.md"
    page.write_text(f"# Evaluation\n\n{script.BEGIN}\n{script.END}\n\nend\n")
    script.write_block(page, script.markdown(table, "python scripts/evaluate_photos.py"))
    text = page.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(cam_methods) + len(script.CONTROLS)
    assert all(len(row.split("|")) == len(script.COLUMNS) + 3 for row in rows)
    noise_row = next(row for row in rows if row.startswith(f"| *{script.CONTROLS[0]}*"))
    assert noise_row.split("|")[2].strip() == f"{want.mean():.3f}"
    assert text.startswith("# Evaluation\n\n") and text.endswith(f"{script.END}\n\nend\n")


def test_a_method_that_anycam_warns_about_is_skipped_with_the_reason(script: ModuleType) -> None:
    # On ReLU6 the guided rule has no ReLU to act on: anycam warns, and the table leaves it out.
    table = script.evaluate(
        _model(torch.nn.ReLU6), "3", _photos(), ["one", "two"], methods=["guided-backprop"], steps=2, log=lambda _: None
    )
    assert "guided-backprop" not in table.scores and table.skipped["guided-backprop"]
    assert list(table.scores) == list(script.CONTROLS)
