"""``python -m anycam demo`` and ``evaluate`` end to end, in all three frameworks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anycam.__main__ import main


def test_demo_writes_a_picture_and_the_frameworks_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--method", "gradcam"]) == 0
    out = capsys.readouterr().out
    assert "backends torch, tensorflow, jax" in out
    for backend in ("torch", "tensorflow", "jax"):
        assert re.search(rf"{backend}\s+accuracy on the 48 held-out canvases: 100\.0%", out)
    agreement = float(re.search(r"logits agree across frameworks to (\S+)", out).group(1))
    assert agreement < 1e-3
    row = re.search(r"\| gradcam \| (\S+)% \| (\S+)% \| (\S+)% \| (\S+) \|", out)
    assert row is not None
    assert len({row.group(i) for i in (1, 2, 3)}) == 1  # the same pointing game in every framework
    assert float(row.group(1)) >= 90.0
    assert float(row.group(4)) < 1e-3
    picture = np.asarray(Image.open(tmp_path / "demo.png"))
    assert picture.ndim == 3 and picture.shape[2] in (3, 4) and picture.std() > 10


def test_evaluate_agrees_across_frameworks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["evaluate", "--out", str(tmp_path), "--method", "gradcam", "--count", "4", "--steps", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"\| (torch|tensorflow|jax) \| gradcam \| (\S+) \| (\S+) \| (\S+)% \| (\S+) \|", out)
    assert [r[0] for r in rows] == ["torch", "tensorflow", "jax"]
    values = np.array([[float(v) for v in r[1:]] for r in rows])
    # Same model, same maps: the same deletion, insertion and pointing game in every framework.
    np.testing.assert_allclose(values[:, :3], values[0:1, :3].repeat(3, 0), atol=2e-3)
    # Randomised weights come from each framework's own initialiser: only the conclusion agrees.
    assert np.all(np.abs(values[:, 3]) < 0.5)
    assert values[0, 0] < values[0, 1]  # deleting the evidence hurts more than revealing it first
    assert (tmp_path / "sanity.png").stat().st_size > 1000
