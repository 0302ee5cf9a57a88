"""Figures anycam returns display in a fresh Jupyter kernel as returned, and ``fig.show()`` works there.

The notebook is executed for real (nbclient, a fresh ipykernel): no ``%matplotlib inline``, no
pyplot import, exactly what a newcomer types. Outside a kernel ``show()`` either opens pyplot's
window or says why it cannot.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="figures need matplotlib (anycam[viz])")
nbformat = pytest.importorskip("nbformat", reason="executing a notebook needs nbformat (test group viz)")
nbclient = pytest.importorskip("nbclient", reason="executing a notebook needs nbclient (test group viz)")
pytest.importorskip("ipykernel", reason="executing a notebook needs ipykernel (test group viz)")

import anycam  # noqa: E402
from anycam.viz.notebook import NotebookFigure  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SETUP = """\
import numpy as np
import anycam
from anycam.metrics.sanity import SanityResult
rng = np.random.default_rng(0)
images = rng.random((2, 16, 16, 3))
maps = rng.random((2, 16, 16))
"""

CELLS = {
    "plot as the cell's value": "anycam.plot(images, maps)",
    "plot then fig.show()": "fig = anycam.plot(images, {'a': maps, 'b': maps})\nfig.show()",
    "display(fig)": "from IPython.display import display\ndisplay(anycam.plot(None, maps))",
    "plot_sanity": (
        "result = SanityResult(method='gradcam', mode='cascading', layers=['fc', 'conv'],\n"
        "    spearman=rng.random((2, 2)), spearman_abs=rng.random((2, 2)), ssim=None)\n"
        "anycam.viz.plot_sanity(result)"
    ),
    # Last, as it changes the kernel: with pyplot's inline backend on, still exactly one picture.
    "after %matplotlib inline": "%matplotlib inline\nanycam.plot(images, maps)",
}


def _png_outputs(cell: object) -> list[bytes]:
    return [
        base64.b64decode(output["data"]["image/png"])
        for output in cell["outputs"]  # type: ignore[index]
        if "image/png" in output.get("data", {})
    ]


def test_figures_display_as_png_in_a_fresh_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A kernel of this very interpreter importing this very anycam, whatever kernels are installed.
    spec = tmp_path / "kernels" / "anycam-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "anycam test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    source = str(Path(anycam.__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])))
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(SETUP)] + [nbformat.v4.new_code_cell(code) for code in CELLS.values()]
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="anycam-test",
        timeout=240,
        allow_errors=True,  # every cell runs; each is judged below by name
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    assert not [o for o in notebook.cells[0]["outputs"] if o["output_type"] == "error"], notebook.cells[0]["outputs"]
    for (name, _), cell in zip(CELLS.items(), notebook.cells[1:], strict=True):
        images = _png_outputs(cell)
        errors = [f"{o['ename']}: {o['evalue']}" for o in cell["outputs"] if o["output_type"] == "error"]
        assert not errors, f"{name}: {errors}"
        texts = [output.get("data", {}).get("text/plain", "") for output in cell["outputs"]]
        assert len(images) == 1, f"{name}: expected one PNG output, got {len(images)} (text: {texts})"
        assert images[0].startswith(PNG_SIGNATURE), name
        # A drawn figure, not an empty canvas: a PNG of a few axes is several kilobytes.
        assert len(images[0]) > 2000, name


def test_a_figure_renders_itself_as_png_without_pyplot() -> None:
    rng = np.random.default_rng(0)
    figure = anycam.plot(rng.random((1, 8, 8, 3)), rng.random((1, 8, 8)))
    assert isinstance(figure, NotebookFigure)
    assert figure.canvas.manager is None  # nothing registered with pyplot
    import pickle

    assert isinstance(pickle.loads(pickle.dumps(figure)), NotebookFigure)  # the class is importable by name
    png = figure._repr_png_()
    assert png.startswith(PNG_SIGNATURE)
    import io

    from PIL import Image

    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    # The figure itself was drawn: the image's colours and the heatmap's, not a blank canvas.
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50


def test_show_outside_a_notebook_opens_pyplot_or_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    monkeypatch.setitem(sys.modules, "IPython", None)  # not in a kernel
    figure = anycam.plot(None, np.random.default_rng(0).random((1, 8, 8)))
    backend = matplotlib.get_backend()
    plt.switch_backend("agg")
    try:
        try:
            figure.show()
        except anycam.AnycamError as exc:
            assert isinstance(exc, AttributeError)
            assert "savefig" in str(exc)
        else:
            # pyplot adopted the figure (matplotlib >= 3.10): it now has a manager, and can be closed.
            assert figure.canvas.manager is not None
            plt.close(figure)
    finally:
        plt.switch_backend(backend)
