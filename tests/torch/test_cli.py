"""``anycam explain`` with a tiny PyTorch model from a factory, against torch's own autograd, and
``python -m anycam demo`` with torch alone (no cross-framework column; a picture, or a note).

The factory files are written into the test's folder, as a user would write ``my_models.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anycam
from anycam.__main__ import main

FACTORY = textwrap.dedent(
    """
    import torch
    from anycam.cli import ModelSpec

    LABELS = ["cat", "dog", "bird"]


    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.features(x).mean(dim=(2, 3)))


    def tiny():
        torch.manual_seed(0)
        return Tiny().eval()


    def spec():
        return ModelSpec(tiny(), layer="features", size=(12, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                         labels=LABELS)


    def as_dict():
        return {"model": tiny(), "layer": "features", "size": (12, 16), "labels": LABELS}


    def unknown():
        return "not a model"


    def broken():
        raise RuntimeError("weights file missing")


    def bad_keys():
        return {"model": tiny(), "layers": "features"}

    def gray():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
        return ModelSpec(model, layer="1", channels=1, preprocess=None)


    def custom():
        def preprocess(image):
            assert image.dtype.name == "uint8" and image.shape[2] == 3
            return image[::2, ::2].transpose(2, 0, 1).astype("float32") / 255
        return ModelSpec(tiny(), layer="features", preprocess=preprocess)

    not_callable = 3


    def big():
        return ModelSpec(tiny(), layer="features", size=(96, 96), labels=LABELS)


    def as_is():
        return ModelSpec(tiny(), layer="features", preprocess=lambda image: image.transpose(2, 0, 1) / 255.0)


    def full_size():
        return ModelSpec(tiny(), layer="features")


    def training():
        torch.manual_seed(0)
        model = Tiny()
        model.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()
        )
        return ModelSpec(model.train(), layer="features")
    """
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "my_models.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_models", None)
    yield tmp_path
    sys.modules.pop("my_models", None)  # the next test's folder has its own my_models.py


def reference_heatmap(model: torch.nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM by torch autograd: α = mean of ∂y/∂A, ReLU(Σ α A), bilinear upsample, min-max."""
    activations = model.features(x)
    activations.retain_grad()
    model.head(activations.mean(dim=(2, 3)))[0, target].backward()
    alpha = activations.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((alpha * activations).sum(dim=1, keepdim=True))
    up = torch.nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]
    up = up.detach().numpy().astype(np.float64)
    return (up - up.min()) / (up.max() - up.min())


def preprocessed(path: Path, mean: float, std: float) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((16, 12), Image.Resampling.BILINEAR)
    pixels = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
    return torch.from_numpy(pixels.transpose(2, 0, 1)[None].copy())


def test_explain_writes_overlays_equal_to_autograd_gradcam(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import my_models

    assert main(["explain", "a.png", "b.png", "--model", "my_models:spec", "--out", "maps"]) == 0
    out = capsys.readouterr().out
    model = my_models.tiny()
    for name in ("a", "b"):
        x = preprocessed(workdir / f"{name}.png", 0.5, 0.25)
        with torch.no_grad():
            logits = model(x)[0].numpy().astype(np.float64)
        best = int(logits.argmax())
        probability = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        # The top classes printed: label, raw score and softmax, best first.
        line = re.search(rf"{name}\.png\n  top classes: (.*)\n", out).group(1)
        first = line.split("), ")[0]
        assert first == f"{best} {my_models.LABELS[best]} (score {logits[best]:.3g}, softmax {probability[best]:.3f}"
        assert len(line.split("), ")) == 3  # three classes, fewer than --top 5
        heat = reference_heatmap(model, x, best)
        original = np.asarray(Image.open(workdir / f"{name}.png").convert("RGB"))
        expected = anycam.overlay(original, heat.astype(np.float32))
        written = np.asarray(Image.open(workdir / "maps" / f"{name}_gradcam.png"))
        assert written.shape == original.shape
        # Equal up to a rounding step of the uint8 colour.
        assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
        assert f"gradcam, class {best} {my_models.LABELS[best]}: maps/{name}_gradcam.png" in out
    assert "wrote 2 overlay(s) to maps" in out


def test_explain_targets_methods_and_a_dict_factory(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["explain", "a.png", "--model", "my_models:as_dict", "--target", "dog,2", "--method", "gradcam"]
    assert main([*args, "--method", "layercam", "--out", "k"]) == 0
    out = capsys.readouterr().out
    for method in ("gradcam", "layercam"):
        for label in ("1 dog", "2 bird"):
            index = label.split()[0]
            assert f"{method}, class {label}: k/a_{method}_{index}.png" in out
            assert (workdir / "k" / f"a_{method}_{index}.png").is_file()
    assert main(["explain", "a.png", "--model", "my_models:as_dict", "--target", "top:2", "--out", "t"]) == 0
    assert len(list((workdir / "t").glob("a_gradcam_*.png"))) == 2


def test_explain_layer_auto_picks_the_last_spatial_layer(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import my_models

    # The bare model gives no layer: --layer auto, also the default, picks `features`.
    for extra in (["--layer", "auto"], []):
        assert main(["explain", "a.png", "--model", "my_models:tiny", "--out", "auto", *extra]) == 0
        assert "layer auto chose features\n" in capsys.readouterr().out
    original = np.asarray(Image.open(workdir / "a.png").convert("RGB"))
    x = torch.from_numpy((original.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy())
    model = my_models.tiny()
    with torch.no_grad():
        best = int(model(x)[0].argmax())
    expected = anycam.overlay(original, reference_heatmap(model, x, best).astype(np.float32))
    written = np.asarray(Image.open(workdir / "auto" / "a_gradcam.png"))
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1


def test_explain_factory_from_a_file_with_explicit_layer(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.chdir(workdir.parent)  # the file form needs no import path
    factory = f"{workdir / 'my_models.py'}:tiny"
    assert (
        main(["explain", str(workdir / "b.png"), "--model", factory, "--layer", "features", "--out", str(workdir)]) == 0
    )
    written = np.asarray(Image.open(workdir / "b_gradcam.png"))
    assert written.shape == (9, 13, 3)
    # No labels: the classes are printed as indices.
    assert re.search(r"top classes: \d \(score [^)]*\), \d \(score", capsys.readouterr().out)


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("my_models", [], "is not PACKAGE.MODULE:FACTORY"),
        ("no_such_module:build", [], "cannot import module 'no_such_module'"),
        ("my_models:spek", [], "has no 'spek'; closest: 'spec'"),
        ("my_models:not_callable", [], "is a int, not a function"),
        ("my_models:unknown", [], "returned a builtins.str, which is no model anycam knows"),
        ("my_models:broken", [], "raised RuntimeError: weights file missing"),
        ("my_models:bad_keys", [], "unknown keys ['layers']"),
        ("my_models:tiny", ["--layer", "featurs"], "featurs"),
        ("my_models:spec", ["--target", "dgo"], "'dgo' is neither a class index nor a label; closest: 'dog'"),
        ("missing.py:tiny", [], "no file 'missing.py'"),
    ],
)
def test_explain_errors_say_what_is_wrong(
    workdir: Path, capsys: pytest.CaptureFixture[str], model: str, extra: list[str], message: str
) -> None:
    assert main(["explain", "a.png", "--model", model, *extra]) == 2
    error = capsys.readouterr().err
    assert error.startswith("anycam explain: ")
    assert message in error


def test_explain_reports_an_unreadable_image(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "notes.txt").write_text("not an image")
    assert main(["explain", "notes.txt", "--model", "my_models:spec"]) == 2
    assert "cannot read image 'notes.txt'" in capsys.readouterr().err
    assert main(["explain", "gone.png", "--model", "my_models:spec"]) == 2
    assert "image 'gone.png' does not exist" in capsys.readouterr().err


def test_every_option_of_every_command_has_help() -> None:
    from anycam import __main__ as cli

    parsers: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> argparse.Namespace:
        parsers.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        with pytest.raises(SystemExit):
            cli.main(["--help"])
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    (parser,) = parsers
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subcommands.choices) == {"demo", "evaluate", "explain"}
    for name, command in subcommands.choices.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


def test_demo_without_the_picture_libraries_prints_its_table_and_exits_0(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['PIL'] = None\n"
        "from anycam.__main__ import main\n"
        f"sys.exit(main(['demo', '--backend', 'torch', '--method', 'gradcam', '--out', {str(tmp_path)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\| gradcam \| \d+\.\d% \|", result.stdout)
    assert "no picture: it needs matplotlib and Pillow" in result.stdout
    assert result.stdout.count('pip install "anycam[viz]"') == 1
    assert not (tmp_path / "demo.png").exists()


def test_explain_grayscale_and_custom_preprocessing(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A one-channel model reads the images as grayscale; the overlay is still RGB at the image's size.
    assert main(["explain", "a.png", "b.png", "--model", "my_models:gray", "--out", "gray"]) == 0
    for name, shape in (("a", (20, 24, 3)), ("b", (9, 13, 3))):
        assert np.asarray(Image.open(workdir / "gray" / f"{name}_gradcam.png")).shape == shape
    # A custom preprocess (here: every second pixel) feeds the model; images of two sizes are
    # explained in two batches.
    assert main(["explain", "a.png", "b.png", "--model", "my_models:custom", "--out", "custom"]) == 0
    assert "wrote 2 overlay(s) to custom" in capsys.readouterr().out
    assert np.asarray(Image.open(workdir / "custom" / "b_gradcam.png")).shape == (9, 13, 3)
    import my_models

    original = np.asarray(Image.open(workdir / "a.png").convert("RGB"))
    x = torch.from_numpy(original[::2, ::2].transpose(2, 0, 1)[None].astype(np.float32) / 255)
    model = my_models.tiny()
    with torch.no_grad():
        best = int(model(x)[0].argmax())
    expected = anycam.overlay(original, reference_heatmap(model, x, best).astype(np.float32))
    written = np.asarray(Image.open(workdir / "custom" / "a_gradcam.png"))
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1


def test_one_framework_prints_no_difference_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--backend", "torch", "--method", "gradcam", "--rows", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # What the picture shows, truly: two of the 48 canvases.
    assert "the first 2 of the 48 held-out canvases" in out
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


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_16_bit_and_float_images_give_the_overlay_of_their_8_bit_copy(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(1)
    deep = rng.integers(0, 65536, (20, 24), dtype=np.uint16)
    Image.fromarray(deep).save("deep.png")
    assert Image.open("deep.png").mode.startswith("I")  # Pillow's 16-bit mode, which convert() clips
    # The 8-bit copies, by plain NumPy: 65535 / 255 = 257 per step.
    Image.fromarray(np.rint(deep / 257.0).astype(np.uint8)).save("deep8.png")
    exact = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    Image.fromarray(exact.astype(np.uint16) * 257).save("exact.png")
    Image.fromarray(exact).save("exact8.png")
    intensities = rng.random((20, 24)).astype(np.float32)
    Image.fromarray(intensities).save("float.tif")
    assert Image.open("float.tif").mode == "F"
    Image.fromarray(np.rint(intensities.astype(np.float64) * 255.0).astype(np.uint8)).save("float8.png")
    images = ["deep.png", "deep8.png", "exact.png", "exact8.png", "float.tif", "float8.png"]
    assert main(["explain", *images, "--model", "my_models:spec", "--out", "maps"]) == 0
    out = capsys.readouterr().out
    for wide, narrow in (("deep", "deep8"), ("exact", "exact8"), ("float", "float8")):
        # The model sees the same pixels: the same top classes and the same overlay, exactly.
        classes = {name: re.search(rf"{name}\.\w+\n  top classes: (.*)\n", out).group(1) for name in (wide, narrow)}
        assert classes[wide] == classes[narrow]
        written = _read(workdir / "maps" / f"{wide}_gradcam.png")
        np.testing.assert_array_equal(written, _read(workdir / "maps" / f"{narrow}_gradcam.png"))
    assert len(np.unique(_read(workdir / "maps" / "deep_gradcam.png"))) > 100  # not a saturated picture


def test_images_that_share_a_file_name_never_overwrite_each_other(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shapes = {"one/x.png": (20, 24), "two/x.png": (9, 13), "x-1.png": (12, 10), "three/x.jpg": (7, 11)}
    for name, shape in shapes.items():
        (workdir / name).parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((*shape, 3), 128, dtype=np.uint8)).save(workdir / name)
    assert main(["explain", *shapes, "--model", "my_models:spec", "--out", "maps"]) == 0
    out = capsys.readouterr().out
    reported = re.findall(r"gradcam, class [^:]*: (\S+)", out)
    assert len(reported) == len(set(reported)) == len(shapes)
    assert len(list((workdir / "maps").iterdir())) == len(shapes)
    # Each reported overlay is its own image's: the blocks name the image, then its file.
    for name, shape in shapes.items():
        path = re.search(rf"{re.escape(name)}\n  top classes: .*\n  gradcam, class [^:]*: (\S+)", out).group(1)
        assert _read(workdir / path).shape == (*shape, 3)


def test_bad_inputs_are_one_line_with_exit_2(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (workdir / "a_file").write_text("")
    (workdir / "folder.png").mkdir()
    Image.fromarray(np.full((4, 4), 3.0, dtype=np.float32)).save(workdir / "hdr.tif")
    cases = [
        (["a.png", "--out", "a_file"], "--out 'a_file' is a file, not a folder"),
        (["a.png", "--out", "a_file/maps"], "--out 'a_file/maps': cannot create the folder"),
        (["hdr.tif"], "float image with values in [3, 3]"),
        (["folder.png"], "image 'folder.png' is a folder"),
    ]
    for arguments, message in cases:
        assert main(["explain", *arguments, "--model", "my_models:spec"]) == 2, arguments
        captured = capsys.readouterr()
        assert captured.err.startswith("anycam explain: ") and captured.err.count("\n") == 1, captured.err
        assert message in captured.err
    import PIL.Image

    # A decompression bomb: more than twice Pillow's pixel limit (lowered here to keep the file small).
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
    assert main(["explain", "a.png", "--model", "my_models:spec"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("anycam explain: image 'a.png' is too large for Pillow") and error.count("\n") == 1
    assert "MAX_IMAGE_PIXELS" in error


def test_method_all_writes_what_can_run_and_names_what_was_skipped(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 96 x 96 positions at `features`: over KPCA-CAM's limit of 8,192; every other method runs.
    assert 96 * 96 > anycam.core.methods.KPCA_MAX_POSITIONS
    assert main(["explain", "a.png", "--model", "my_models:big", "--method", "all", "--out", "all"]) == 0
    captured = capsys.readouterr()
    # The attention methods (issue 22) take no layer: skipped on this CNN explained at a layer.
    attention = anycam.core.methods.ATTENTION_METHODS
    others = [method for method in anycam.core.METHODS if method != "kpcacam" and method not in attention]
    assert sorted(path.name for path in (workdir / "all").iterdir()) == sorted(f"a_{m}.png" for m in others)
    assert f"wrote {len(others)} overlay(s) to all" in captured.out
    skipped = {line.split(":")[1].split()[-1]: line for line in captured.err.splitlines() if "skipped" in line}
    assert sorted(skipped) == sorted(["kpcacam", *attention])
    assert "8192" in skipped["kpcacam"].replace(",", "")
    assert all(
        skipped[m].startswith(f"anycam explain: skipped {m}: ") and "takes no layer" in skipped[m] for m in attention
    )
    # Nothing written: exit 2 and the reason, on one line.
    assert main(["explain", "a.png", "--model", "my_models:big", "--method", "kpcacam", "--out", "none"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("anycam explain: ") and error.count("\n") == 1 and "8192" in error.replace(",", "")
    assert not list((workdir / "none").iterdir())
    # A method that fails on some images only: written for the others, and the skipped images named.
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (100, 100, 3), dtype=np.uint8)).save("wide.png")
    arguments = ["a.png", "wide.png", "--method", "kpcacam", "--method", "gradcam", "--out", "some"]
    assert main(["explain", *arguments, "--model", "my_models:as_is"]) == 0
    captured = capsys.readouterr()
    written = sorted(path.name for path in (workdir / "some").iterdir())
    assert written == ["a_gradcam.png", "a_kpcacam.png", "wide_gradcam.png"]
    assert captured.err.startswith("anycam explain: skipped kpcacam for wide.png: ") and captured.err.count("\n") == 1


def test_several_images_print_one_block_each(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["a.png", "b.png", "--method", "gradcam", "--method", "layercam"]
    assert main(["explain", *arguments, "--model", "my_models:spec", "--out", "maps"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Both images go through the model in one batch; the output still reads image by image.
    start = lines.index("a.png")
    block_a, block_b = lines[start : start + 5], lines[start + 5 : start + 9]
    assert block_a[1].startswith("  top classes: ") and block_a[4] == ""
    assert block_a[2].endswith("maps/a_gradcam.png") and block_a[3].endswith("maps/a_layercam.png")
    assert block_b[0] == "b.png" and block_b[1].startswith("  top classes: ")
    assert block_b[2].endswith("maps/b_gradcam.png") and block_b[3].endswith("maps/b_layercam.png")


def test_warnings_print_as_one_readable_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "a.png", "--model", "my_models:training", "--out", "maps"]) == 0
    error = capsys.readouterr().err
    warned = [line for line in error.splitlines() if "TrainingModeWarning" in line]
    assert warned, error
    for line in warned:
        assert line.startswith("anycam explain: warning: ") and line.endswith("(TrainingModeWarning)")
    # Not Python's format: no file:line, no source line of the console script.
    assert "sys.exit" not in error and ".py:" not in error and "warnings.warn" not in error


def test_a_bare_model_says_what_it_assumes_and_shrinks_large_photos(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import my_models

    photo = np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(photo).save("photo.png")
    assert main(["explain", "photo.png", "--model", "my_models:tiny", "--out", "maps"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "bare model" in first and "[0, 1]" in first and "224" in first and "ModelSpec(" in first
    # The model saw the photo shrunk to a short side of 224 (300 x 400 -> 224 x 299), pixels / 255.
    shrunk = Image.fromarray(photo).resize((round(400 * 224 / 300), 224), Image.Resampling.BILINEAR)
    x = torch.from_numpy((np.asarray(shrunk, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None].copy())
    model = my_models.tiny()
    with torch.no_grad():
        best = int(model(x)[0].argmax())
    expected = anycam.overlay(photo, reference_heatmap(model, x, best).astype(np.float32))
    difference = np.abs(_read(workdir / "maps" / "photo_gradcam.png").astype(int) - expected.astype(int))
    # Float rounding can move a heat value across one of the colormap's 256 entries: a colour
    # step of at most alpha * 255 * (largest jump between neighbouring jet entries), rarely.
    import matplotlib

    table = matplotlib.colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3]
    one_entry = int(np.ceil(0.5 * 255 * np.abs(np.diff(table, axis=0)).max()))
    assert difference.max() <= one_entry and (difference > 1).mean() < 1e-4


def test_an_absurd_size_the_factory_did_not_ask_for_is_refused_with_the_fix(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    side = 2049  # one pixel more than 2048 per side: over the 2048 x 2048 fed unasked
    Image.fromarray(np.zeros((side, side, 3), dtype=np.uint8)).save("huge.png")
    assert main(["explain", "huge.png", "--model", "my_models:full_size", "--out", "maps"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("anycam explain: image 'huge.png' is 2049 x 2049 pixels")
    assert "ModelSpec(model, size=(224, 224)" in error and error.count("\n") == 1
    # The same picture with a size asked for runs.
    assert main(["explain", "huge.png", "--model", "my_models:spec", "--out", "maps"]) == 0


def test_demo_bad_options_are_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a_file").write_text("")
    for arguments, message in (
        (["--out", str(tmp_path / "a_file")], "is a file, not a folder"),
        (["--rows", "0", "--out", str(tmp_path)], "--rows must be a positive integer, got 0"),
    ):
        assert main(["demo", "--backend", "torch", "--method", "gradcam", *arguments]) == 2
        error = capsys.readouterr().err
        assert error.startswith("anycam demo: ") and error.count("\n") == 1 and message in error
