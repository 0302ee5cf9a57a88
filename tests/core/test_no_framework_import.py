"""``import anycam`` must not import a framework the user did not import (cf. array-api-compat's
``test_no_dependencies``): checked in a fresh interpreter, where nothing else imported them."""

from __future__ import annotations

import json
import subprocess
import sys

FRAMEWORKS = ("torch", "tensorflow", "jax", "jaxlib", "keras", "flax", "equinox")


def modules_imported_by(code: str, roots: tuple[str, ...]) -> list[str]:
    """Runs ``code`` in a fresh interpreter; returns the loaded modules under ``roots``."""
    probe = (
        f"import json, sys\n{code}\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {roots!r})))\n"
    )
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


USE_ANYCAM = """
import numpy as np
import anycam
import anycam.core
import anycam.backends
ones = np.ones((1, 2, 3, 3))
anycam.core.heatmaps([anycam.core.layer_cam("gradcam", ones, ones[:, None], "NCHW").cam], (6, 6))
"""


def test_import_anycam_imports_no_framework():
    assert modules_imported_by(USE_ANYCAM, FRAMEWORKS) == []


def test_the_probe_sees_what_was_imported():
    # The check above must be able to fail: a module imported in the probe shows up.
    assert modules_imported_by(USE_ANYCAM + "import fractions\n", (*FRAMEWORKS, "fractions")) == ["fractions"]
