"""The CLI hides absl's start-up log lines that TF_CPP_MIN_LOG_LEVEL asks to hide, and nothing else."""

from __future__ import annotations

import os

import pytest

from anycam.cli import quiet_native_logs

NOISE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796114662.933471    8885 port.cc:153] oneDNN custom operations are on.\n"
)
WARNING = "W0000 00:00:1796114662.933471    8885 cuda.cc:10] no GPU\n"
ERROR = "E0000 00:00:1796114662.933471    8885 io.cc:10] real trouble\n"


@pytest.mark.parametrize(
    ("level", "kept"),
    [("2", "hello\n" + ERROR), ("1", "hello\n" + WARNING + ERROR), ("0", NOISE + "hello\n" + WARNING + ERROR)],
)
def test_native_log_lines_below_the_level_are_dropped(
    level: str, kept: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
    with quiet_native_logs():
        os.write(2, (NOISE + "hello\n" + WARNING + ERROR).encode())  # as C++ code writes: past sys.stderr
    assert capfd.readouterr().err == kept


def test_output_of_a_failing_block_is_kept(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    with pytest.raises(RuntimeError), quiet_native_logs():
        os.write(2, b"partial output\n")
        raise RuntimeError("boom")
    assert capfd.readouterr().err == "partial output\n"
