"""Quiet native start-up logs: TensorFlow's C++ lines that ``TF_CPP_MIN_LOG_LEVEL`` cannot hide."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# TensorFlow >= 2.16 writes these from C++ while it is imported, before absl's logging is set up,
# so TF_CPP_MIN_LOG_LEVEL does not hide them: "I0000 00:00:17.. 1234 port.cc:153] oneDNN ...".
_ABSL_PREAMBLE = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$"
)
_ABSL_LINE = re.compile(r"^([IWE])\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.]+:\d+\] ")
_ABSL_LEVELS = {"I": 0, "W": 1, "E": 2}


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Hides the C++ start-up log lines that TF_CPP_MIN_LOG_LEVEL asks to hide, and nothing else.

    File descriptor 2 is captured while the block runs (C++ libraries write there directly,
    past ``sys.stderr``); afterwards every captured line is written back except absl log lines
    below the level ``TF_CPP_MIN_LOG_LEVEL`` sets (2: info and warnings hidden, errors kept)
    and absl's preamble, so real errors and the block's own output still appear.
    """
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    if level <= 0:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (an embedded interpreter): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                match = _ABSL_LINE.match(line)
                if _ABSL_PREAMBLE.match(line) or (match and _ABSL_LEVELS[match.group(1)] < level):
                    continue
                sys.stderr.write(line)
            sys.stderr.flush()
