"""``python -m anycam demo`` with one framework: no cross-framework column, a picture, or a note."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch  # noqa: F401  (the session's framework: a broken install fails here)

from anycam.__main__ import main


def test_one_framework_prints_no_difference_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--backend", "torch", "--method", "gradcam", "--rows", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "difference" not in out and "agree across frameworks" not in out
    assert re.search(r"^\| gradcam \| \d+\.\d% \|$", out, re.MULTILINE)
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_without_matplotlib_the_demo_still_exits_0_after_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["demo", "--backend", "torch", "--method", "gradcam", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| gradcam |" in out
    assert "no picture" in out and "anycam[viz]" in out
    assert not (tmp_path / "demo.png").exists()
