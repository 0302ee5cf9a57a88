"""ROAD's imputation against pytorch-grad-cam's ``NoisyLinearImputer`` (the paper authors' code), noise off.

pytorch-grad-cam imports torchvision at package import for image helpers the imputer does not
use; as in ``test_peers_methods``, a stub module stands in for it where torchvision is missing.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")


from anycam.metrics import noisy_linear_imputation  # noqa: E402

from .peer_stubs import stub_torchvision  # noqa: E402


@pytest.mark.parametrize("share", [0.1, 0.5, 0.9])
def test_imputation_equals_pytorch_grad_cams_noisy_linear_imputer(share, monkeypatch):
    pytest.importorskip("cv2")
    # Removed after the test: transformers, imported later, must not find a spec-less torchvision.
    stub_torchvision(lambda name, module: monkeypatch.setitem(sys.modules, name, module))
    road_peer = pytest.importorskip("pytorch_grad_cam.metrics.road")
    rng = np.random.default_rng(7)
    image = rng.normal(size=(3, 20, 24)).astype(np.float32)
    removed = rng.random((20, 24)) < share
    removed[0, 0] = False  # at least one kept pixel
    peer = road_peer.NoisyLinearImputer(noise=0.0)
    # The peer's mask is 1 where a pixel is kept, 0 where it is imputed; it works in float32.
    expected = peer(torch.from_numpy(image), torch.from_numpy((~removed).astype(np.float32))).numpy()
    ours = noisy_linear_imputation(image, removed, noise=0.0)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_the_dataset_runner_reports_road_average_gain_and_adcc():
    import anycam

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()
    explainer = anycam.Explainer(model, "0")
    data = np.random.default_rng(2).standard_normal((4, 3, 10, 10)).astype(np.float32)
    names = ("road", "average_gain", "adcc")
    metrics = anycam.StreamingMetrics(explainer, names, road_percentages=(0.3, 0.6))
    rows = list(anycam.explain_dataset(explainer, [data[:2], data[2:]], metrics=metrics))
    summary = metrics.summary()
    heat = explainer(data)
    target = explainer.explain(data).target
    parts = [
        anycam.metrics.road(explainer, data[s : s + 2], heat[s : s + 2], target[s : s + 2], percentages=(0.3, 0.6))
        for s in (0, 2)
    ]
    combined = np.concatenate([p.combined for p in parts])
    gain = anycam.metrics.average_gain(explainer, data, heat, target).gain
    adcc = anycam.metrics.adcc(explainer, data, heat, target, explain=explainer).per_sample
    np.testing.assert_allclose(np.concatenate([r["metric.road_combined"] for r in rows]), combined, rtol=1e-6)
    for key, values in (("road_combined", combined), ("average_gain", gain), ("adcc", adcc)):
        assert summary[key]["count"] == 4
        np.testing.assert_allclose(summary[key]["mean"], values.mean(), rtol=1e-6, atol=1e-9, err_msg=key)


def test_quantus_explain_func_gives_quantus_the_explainers_maps_and_rebuilds_for_other_models():
    quantus = pytest.importorskip("quantus")
    import copy

    import anycam

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()
    explainer = anycam.Explainer(model, "0")
    x = np.random.default_rng(5).standard_normal((3, 3, 12, 12)).astype(np.float32)
    y = np.array([0, 2, 1])
    explain_func = anycam.metrics.quantus_explain_func(explainer)
    maps = explain_func(model=model, inputs=x, targets=y)
    np.testing.assert_array_equal(maps, explainer(x, y)[:, None].astype(np.float32))
    # Another model (what Quantus's randomisation tests pass): a fresh Explainer on that model,
    # compared with one built by hand; the original's maps are not reused.
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.normal_()
    expected = anycam.Explainer(other, "0")(x, y)[:, None]
    np.testing.assert_allclose(explain_func(model=other, inputs=x, targets=y), expected, rtol=1e-6)
    assert not np.allclose(expected, maps)
    # The explainer's own model never goes through the factory; another model always does.
    built = []
    strict = anycam.metrics.quantus_explain_func(explainer, factory=lambda m: built.append(m) or explainer)
    strict(model=model, inputs=x, targets=y)
    assert built == []
    strict(model=other, inputs=x, targets=y)
    assert built == [other]
    # Quantus itself, end to end: its metric computed from explain_func equals the one from
    # the explainer's precomputed maps.
    metric = quantus.Sparseness(disable_warnings=True, display_progressbar=False)
    direct = metric(model=model, x_batch=x, y_batch=y, a_batch=explainer(x, y)[:, None], device="cpu")
    bridged = quantus.Sparseness(disable_warnings=True, display_progressbar=False)(
        model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func, device="cpu"
    )
    np.testing.assert_allclose(bridged, direct, rtol=1e-6)
