"""What consumes native outputs in torch: TTA on the device, the metrics, the dataset runner (issue 21.2).

Oracles: the NumPy mode of the same explainer (TTA), the same values given as NumPy arrays (the
metrics and the runner), and the host-copy probe of tests/torch/test_native_arrays.py, which
records every ``.numpy()``, ``np.asarray``, ``.tolist()``, ``.item()`` and device-to-host copy.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anycam
from anycam import metrics
from anycam.dataset import MANIFEST
from tests.core.test_metrics_native import all_metrics, assert_same, boxes
from tests.dataset.models import batches, images, tiny_model
from tests.torch.test_native_arrays import HostCopies, device, no_host_copies

pytest.importorskip("array_api_compat")
pytestmark = pytest.mark.filterwarnings("ignore::anycam.ZeroMapWarning")

TTA_SETTINGS = {
    "identity": {},
    "scales-mean": {"scales": (1.0, 0.5, 1.25), "flip": True},
    "scales-max": {"scales": (0.75, 1.0), "flip": True, "combine": "max"},
}


def _cam_tolerance(reference: np.ndarray) -> np.ndarray:
    """1e-5 of each map's size: the float32 rounding of an 8-channel sum of non-negative terms
    (the tiny net's ReLU activations), resized and averaged by convex combinations, which add
    no error beyond their own float32 rounding."""
    scale = np.abs(reference).max(axis=(-2, -1), keepdims=True)
    return 1e-5 * scale + 1e-7


@pytest.mark.parametrize("target", [None, 3, anycam.top_k(2)], ids=["argmax", "int", "top-k"])
@pytest.mark.parametrize("setting", list(TTA_SETTINGS))
def test_native_tta_gives_device_tensors_equal_to_the_numpy_tta(setting: str, target: Any) -> None:
    model, x = tiny_model(), images(3)
    options = TTA_SETTINGS[setting]
    reference = anycam.TTAExplainer(anycam.Explainer(model, "features"), **options).explain(x, target)
    native = anycam.TTAExplainer(anycam.Explainer(model, "features", arrays="native"), **options).explain(x, target)
    for name in ("heatmap", "cam", "scores"):
        value = getattr(native, name)
        assert isinstance(value, torch.Tensor), name
        assert tuple(value.shape) == getattr(reference, name).shape, name
    assert native.heatmap.dtype == torch.float32 and native.cam.dtype == torch.float32
    assert all(isinstance(c, torch.Tensor) for c in native.cams) and native.weights is None
    np.testing.assert_array_equal(native.target, reference.target)
    cam, want = native.cam.numpy(), reference.cam
    error = np.abs(cam - want)
    assert np.all(error <= _cam_tolerance(want))
    # Min-max scaling moves each heatmap by at most 2·error/span.
    span = want.max(axis=(-2, -1)) - want.min(axis=(-2, -1))
    allowed = np.where(span > 0, 2 * error.max(axis=(-2, -1)) / np.where(span > 0, span, 1), 0) + 1e-6
    assert np.all(np.abs(native.heatmap.numpy() - reference.heatmap).max(axis=(-2, -1)) <= allowed)


def test_native_tta_on_channels_last_inputs_equals_the_numpy_tta() -> None:
    class ChannelsLast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.permute(0, 3, 1, 2))

    model = ChannelsLast().eval()
    x = np.ascontiguousarray(images(2, size=12).transpose(0, 2, 3, 1))
    options = {"scales": (1.0, 1.5), "flip": True}
    make = lambda **kw: anycam.Explainer(model, "net.features", input_layout="channels_last", **kw)  # noqa: E731
    reference = anycam.TTAExplainer(make(), **options).explain(x, 1)
    native = anycam.TTAExplainer(make(arrays="native"), **options).explain(torch.from_numpy(x), 1)
    assert isinstance(native.heatmap, torch.Tensor)
    assert np.all(np.abs(native.cam.numpy() - reference.cam) <= _cam_tolerance(reference.cam))


@pytest.mark.parametrize("setting", list(TTA_SETTINGS))
def test_native_tta_copies_no_view_map_or_average_to_the_host(setting: str) -> None:
    """Fails on any host copy larger than the (N, K) target indices: the input, a view, a cam or the
    combined maps. The input is a tensor on the model's device (a CUDA one when there is a GPU)."""
    model = tiny_model().to(device())
    x = torch.from_numpy(images(2)).to(device())
    tta = anycam.TTAExplainer(anycam.Explainer(model, "features", arrays="native"), **TTA_SETTINGS[setting])
    with no_host_copies(allowed=4):  # (N, K) = (2, 2)
        explanation = tta.explain(x, anycam.top_k(2))
    assert explanation.heatmap.device == x.device and explanation.heatmap.shape == (2, 2, 16, 16)


def test_native_tta_moves_a_numpy_batch_to_the_device_once_and_refuses_integer_images() -> None:
    tta = anycam.TTAExplainer(anycam.Explainer(tiny_model(), "features", arrays="native"), scales=(1.0, 0.5))
    assert isinstance(tta(images(2)), torch.Tensor)
    with pytest.raises(anycam.InputError, match="floating-point images"):
        tta(torch.zeros(2, 3, 16, 16, dtype=torch.int64))


def _hand_written_tta(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM TTA over scales (1, 0.5) × flips in plain torch, kept on the graph (``create_graph``):
    the views, the maps on the 16 × 16 grid, their mean and the min-max scaling. No anycam code."""
    maps = []
    for scale in (1.0, 0.5):
        view = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        for flipped in (False, True):
            seen = view.flip(-1) if flipped else view
            kept: list[torch.Tensor] = []
            handle = model.features.register_forward_hook(lambda module, args, out, kept=kept: kept.append(out))
            try:
                scores = model(seen)[torch.arange(len(seen)), target]
            finally:
                handle.remove()
            grads = torch.autograd.grad(scores.sum(), kept[0], create_graph=True)[0]
            cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * kept[0]).sum(dim=1, keepdim=True))
            up = F.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
            maps.append(up.flip(-1) if flipped else up)
    combined = torch.stack(maps).mean(0)
    low = combined.amin(dim=(1, 2), keepdim=True)
    high = combined.amax(dim=(1, 2), keepdim=True)
    return (combined - low) / (high - low)


def test_differentiable_tta_carries_the_hand_written_gradient_to_the_weights() -> None:
    """With ``differentiable=True`` the views, flips and average stay on the autograd graph: the
    gradient of a loss on the TTA heatmap w.r.t. every parameter equals the hand-written one's."""
    model, x = tiny_model(), torch.from_numpy(images(3))
    target = torch.tensor([1, 3, 0])
    explainer = anycam.Explainer(model, "features", differentiable=True)
    heatmap = anycam.TTAExplainer(explainer, scales=(1.0, 0.5), flip=True).explain(x, target.numpy()).heatmap
    expected = _hand_written_tta(model, x, target)
    np.testing.assert_allclose(heatmap.detach().numpy(), expected.detach().numpy(), atol=2e-5)
    weights = torch.rand(16, 16, generator=torch.Generator().manual_seed(2))
    parameters = list(model.parameters())
    got = torch.autograd.grad((heatmap * weights).sum(), parameters, allow_unused=True)
    want = torch.autograd.grad((expected * weights).sum(), parameters, allow_unused=True)
    for name, a, b in zip([n for n, _ in model.named_parameters()], got, want, strict=True):
        if b is None or not torch.any(b):
            assert a is None or not torch.any(a), name
            continue
        assert a is not None, name
        scale = float(b.abs().max())
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5 * scale, err_msg=name)


# --------------------------------------------------------------------------------------------
# The metrics


BOXES = boxes(4, 16)


@pytest.mark.parametrize("differentiable", [False, True], ids=["native", "differentiable"])
def test_the_metrics_give_the_numpy_numbers_for_native_heatmaps_and_explanations(differentiable: bool) -> None:
    """Native heatmaps (and differentiable ones, attached to the graph) score exactly as their
    values given as NumPy do; so does the Explanation itself passed as the heatmaps."""
    model, x = tiny_model(), images(4)
    explainer = anycam.Explainer(model, "features", arrays="native", differentiable=differentiable)
    explanation = explainer.explain(x)
    assert explanation.heatmap.requires_grad == differentiable
    target = explanation.target
    reference = all_metrics(explainer, x, explanation.heatmap.detach().numpy(), target, BOXES)
    assert_same(all_metrics(explainer, x, explanation.heatmap, target, BOXES), reference)
    assert_same(all_metrics(explainer, x, explanation, target, BOXES), reference)
    # Inputs, targets and regions as tensors too.
    tensors = (torch.from_numpy(x), explanation.heatmap, torch.from_numpy(target), torch.from_numpy(BOXES))
    assert_same(all_metrics(explainer, *tensors), reference)


def test_a_predict_returning_tensors_on_the_graph_scores_as_its_numpy_outputs() -> None:
    """``lambda x: model(torch.from_numpy(x))`` — outputs on the autograd graph — is accepted and
    gives the numbers of the same function returning ``.detach().numpy()``."""
    model, x = tiny_model(), images(4)
    maps = anycam.Explainer(model, "features")(x)

    def graph(batch: np.ndarray) -> torch.Tensor:
        return model(torch.from_numpy(batch))

    def plain(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch)).detach().numpy()

    for target in (None, 2, lambda out: out[:, 1] - out[:, 0]):
        want = metrics.deletion(plain, x, maps, target, steps=4, progress=False).curves
        got = metrics.deletion(graph, x, maps, target, steps=4, progress=False).curves
        np.testing.assert_array_equal(got, want)
    assert graph(x).requires_grad  # the case the test is about


def test_the_bfloat16_heatmaps_of_a_half_precision_tensor_are_read_as_float32() -> None:
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    want = metrics.energy_pointing_game(maps.float().numpy(), BOXES[:2])
    np.testing.assert_array_equal(metrics.energy_pointing_game(maps, BOXES[:2]), want)


@pytest.mark.parametrize(
    ("heatmaps", "match"),
    [
        ({"a": 1}, "heatmaps must be a numeric array"),
        ("maps", "heatmaps must be a numeric array"),
        (torch.zeros(4), r"heatmaps must be \(N, \*spatial\)"),
        (torch.full((4, 16, 16), float("nan")), "heatmaps hold NaN or inf"),
    ],
)
def test_bad_heatmaps_of_any_kind_raise_input_errors(heatmaps: Any, match: str) -> None:
    with pytest.raises(anycam.InputError, match=match):
        metrics.pointing_game(heatmaps, BOXES)


def test_a_predict_returning_something_that_is_not_an_array_is_refused_clearly() -> None:
    maps = np.ones((4, 16, 16), np.float32)
    with pytest.raises(anycam.InputError, match="predict must return an array of numbers"):
        metrics.deletion(lambda batch: {"logits": batch}, images(4), maps, 0, steps=2, progress=False)


# --------------------------------------------------------------------------------------------
# The dataset runner


def _runner_copies(fields: tuple[str, ...], with_metrics: bool, tmp: Path | None) -> list[tuple[str, tuple[int, ...]]]:
    """The host copies one native-mode run of explain_dataset makes, NumPy batches in (so that
    only the Explanation's arrays can be copied back)."""
    model = tiny_model().to(device())
    explainer = anycam.Explainer(model, "features", arrays="native")
    streaming = anycam.StreamingMetrics(explainer, ("energy_pointing_game",)) if with_metrics else None
    data = [{"image": images(4), "regions": BOXES}]
    probe = HostCopies(allowed=4)
    with probe:
        result = anycam.explain_dataset(explainer, data, fields=fields, metrics=streaming, out=tmp, progress=False)
        if tmp is None:
            list(result)  # type: ignore[arg-type]
    return probe.copies


@pytest.mark.parametrize(
    "fields", [("heatmap",), ("heatmap", "cam"), ("scores",), ("cam", "scores", "target")], ids="+".join
)
@pytest.mark.parametrize("with_metrics", [False, True], ids=["no-metrics", "metrics"])
def test_the_runner_copies_only_the_fields_it_keeps_each_once(fields: tuple[str, ...], with_metrics: bool) -> None:
    """The weights, cams and unkept fields stay on the device; a kept field crosses once, and the
    metrics score that same host copy of the heatmap (never a second one)."""
    shapes = {"heatmap": (4, 16, 16), "cam": (4, 8, 8), "scores": (4,)}
    copies = _runner_copies(fields, with_metrics, None)
    wanted = {name for name in fields if name in shapes} | ({"heatmap"} if with_metrics else set())
    # (4,) scores are at the probe's allowance, so only the maps are seen: count those.
    seen = sorted(shape for _, shape in copies)
    assert seen == sorted(shapes[n] for n in wanted if n != "scores"), copies


def test_a_native_store_is_byte_equal_to_a_numpy_store_of_the_same_maps_and_resumes(tmp_path: Path) -> None:
    """The store of a native-mode run equals, byte for byte, the store the NumPy-mode runner writes
    from the same maps as NumPy arrays (its manifest also records the mode); and a native run
    stopped after one part resumes to it."""
    model, data = tiny_model(), batches(images(6), 2)
    fields = ("heatmap", "cam", "scores", "target")
    native = anycam.Explainer(model, "features", arrays="native")
    host = anycam.Explainer(model, "features")

    def as_numpy(inputs: Any, target: Any = None) -> anycam.Explanation:
        explanation = native.explain(inputs, target)
        arrays = {n: getattr(explanation, n).numpy() for n in ("heatmap", "cam", "scores")}
        return dataclasses.replace(explanation, **arrays, cams=(arrays["cam"],))

    host.explain = as_numpy  # type: ignore[method-assign]
    options: dict[str, Any] = {"fields": fields, "part_size": 2, "progress": False}
    anycam.explain_dataset(host, data, out=tmp_path / "numpy", **options)
    anycam.explain_dataset(native, data, out=tmp_path / "whole", **options)

    def stopping() -> Any:
        yield from data[:2]
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        anycam.explain_dataset(native, stopping(), out=tmp_path / "resumed", **options)
    anycam.explain_dataset(native, data, out=tmp_path / "resumed", **options)
    files = {name: {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())} for name in ("numpy", "whole")}
    resumed = {p.name: p.read_bytes() for p in sorted((tmp_path / "resumed").iterdir())}
    assert resumed == files["whole"]
    # The parts are byte-equal; the manifests differ only in the recorded mode (a store holds one).
    manifests = {name: json.loads(files[name].pop(MANIFEST)) for name in ("numpy", "whole")}
    assert manifests["whole"]["config"].pop("arrays") == "native" and "arrays" not in manifests["numpy"]["config"]
    assert manifests["whole"] == manifests["numpy"] and files["whole"] == files["numpy"]
    stored = anycam.dataset.ExplanationStore(tmp_path / "whole").read("heatmap")
    assert stored.dtype == np.float32 and stored.shape == (6, 16, 16)
