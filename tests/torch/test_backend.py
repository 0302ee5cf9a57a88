"""PyTorch-specific behaviour: the model is left untouched, odd models and outputs work."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import anycam
from anycam import core


class InPlaceAfterLayer(nn.Module):
    """conv → (explained) → relu_ in place → GAP → linear, the case hooks get wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y.relu_()
        return self.fc(y.mean((2, 3)))


def _seeded(factory, *args):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return factory(*args)


@pytest.fixture
def net() -> InPlaceAfterLayer:
    torch.manual_seed(0)
    return InPlaceAfterLayer().eval()


def test_in_place_ops_after_the_layer_do_not_corrupt_the_capture(net: InPlaceAfterLayer) -> None:
    x = torch.randn(2, 3, 8, 8)
    result = anycam.Explainer(net, "conv", normalize=None).explain(x, target=[1, 3])
    with torch.no_grad():
        activations = net.conv(x).numpy()
    # d score_c / d A = W[c] / Z where A > 0 (relu_), 0 elsewhere: the GAP → linear closed form.
    weights = net.fc.weight.detach().numpy()[[1, 3]]
    gradients = (activations > 0) * weights[:, :, None, None] / 64.0
    alpha = gradients.mean(axis=(2, 3))
    expected = np.maximum(np.einsum("nc,nchw->nhw", alpha, activations), 0)
    np.testing.assert_allclose(result.cam, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.weights, alpha, rtol=1e-5, atol=1e-8)


def test_gradcam_equals_cam_over_z_on_a_gap_linear_head() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()
    x = torch.randn(4, 3, 9, 11)
    with torch.no_grad():
        activations = model[1](model[0](x)).numpy()
    head = model[4].weight.detach().numpy()
    for method in ("gradcam", "hirescam", "xgradcam"):
        result = anycam.Explainer(model, "1", method=method).explain(x, target=2)
        cam = core.class_activation_map(activations, np.broadcast_to(head[2], (4, 5)))
        z = activations.shape[2] * activations.shape[3]
        expected = np.maximum(cam, 0) / z
        if method == "xgradcam":  # w_k = Σ G A / Σ A = W_ck / Z as well, for A ≥ 0
            expected = np.maximum(cam, 0) / z
        np.testing.assert_allclose(result.cam, expected, rtol=1e-4, atol=1e-7)


def test_model_is_left_untouched(net: InPlaceAfterLayer) -> None:
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for p in net.parameters():
        assert p.grad is None
    explainer = anycam.Explainer(net, "conv", method="gradcam++")
    explainer(torch.randn(3, 3, 8, 8), target=anycam.top_k(2))
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in net.parameters())
    assert not net.conv._forward_hooks and not net._forward_hooks
    assert not net.training


def test_user_grads_are_kept(net: InPlaceAfterLayer) -> None:
    net(torch.randn(1, 3, 8, 8)).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    anycam.Explainer(net, "conv")(torch.randn(2, 3, 8, 8))
    for p, g in zip(net.parameters(), grads, strict=False):
        assert torch.equal(p.grad, g)


def test_hooks_removed_when_the_model_raises() -> None:
    class Fails(InPlaceAfterLayer):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.conv(x)
            raise RuntimeError("boom")

    model = _seeded(Fails).eval()
    # The model's own exception keeps its type (issue 19.15), with a note naming the input.
    with pytest.raises(RuntimeError, match="boom") as info:
        anycam.Explainer(model, "conv")(torch.randn(1, 3, 8, 8))
    assert type(info.value) is RuntimeError
    assert any("(1, 3, 8, 8)" in note for note in getattr(info.value, "__notes__", []))
    assert not model.conv._forward_hooks
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_works_inside_no_grad_and_inference_mode(net: InPlaceAfterLayer, context: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    expected = anycam.Explainer(net, "conv")(x)
    manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with manager:
        got = anycam.Explainer(net, "conv")(x)
        assert not torch.is_grad_enabled()
    np.testing.assert_array_equal(got, expected)


def test_training_mode_warns_once(net: InPlaceAfterLayer) -> None:
    net.train()
    explainer = anycam.Explainer(net, "conv")
    with pytest.warns(UserWarning, match="training mode"):
        explainer(torch.randn(2, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explainer(torch.randn(2, 3, 8, 8))
    assert net.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_give_float32_maps(net: InPlaceAfterLayer, dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 8, 8)
    reference = anycam.Explainer(net, "conv").explain(x, target=[0, 1])
    half = anycam.Explainer(net.to(dtype), "conv").explain(x.to(dtype), target=[0, 1])
    assert half.heatmap.dtype == np.float32 and half.cam.dtype == np.float32
    np.testing.assert_allclose(half.heatmap, reference.heatmap, atol=0.08)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(net: InPlaceAfterLayer) -> None:
    x = torch.randn(2, 3, 8, 8)
    cpu = anycam.Explainer(net, "conv")(x, target=1)
    gpu = anycam.Explainer(net.cuda(), "conv")(x.cuda(), target=1)
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


def test_numpy_input_is_accepted(net: InPlaceAfterLayer) -> None:
    x = torch.randn(2, 3, 8, 8)
    explainer = anycam.Explainer(net, "conv")
    np.testing.assert_array_equal(explainer(x.numpy()), explainer(x))


def test_two_threads_share_a_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    x = torch.randn(4, 3, 16, 16)
    expected = {layer: anycam.Explainer(model, layer)(x, target=t) for layer, t in (("1", 0), ("3", 2))}
    results: dict[str, list[np.ndarray]] = {"1": [], "3": []}
    barrier = threading.Barrier(2)

    def work(layer: str, target: int) -> None:
        explainer = anycam.Explainer(model, layer)
        barrier.wait()
        for _ in range(20):
            results[layer].append(explainer(x, target=target))

    threads = [threading.Thread(target=work, args=a) for a in (("1", 0), ("3", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for layer, maps in results.items():
        assert len(maps) == 20
        for heat in maps:
            np.testing.assert_allclose(heat, expected[layer], atol=1e-6)


def _rss_bytes() -> int:
    # Free heap pages go back to the OS first (glibc's malloc_trim), so the resident size measures
    # live memory rather than how the allocator's arenas happen to be laid out on a busy machine.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_repeated_calls_do_not_grow_memory() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)
    ).eval()
    explainer = anycam.Explainer(model, "1")
    x = torch.randn(8, 3, 64, 64)
    for _ in range(10):
        explainer(x, target=anycam.top_k(3))
    gc.collect()
    tensors_before = sum(type(o) is torch.Tensor for o in gc.get_objects())
    rss = []
    for _ in range(100):
        explainer(x, target=anycam.top_k(3))
        rss.append(_rss_bytes())
    gc.collect()
    assert sum(type(o) is torch.Tensor for o in gc.get_objects()) <= tensors_before
    # The allocator's resident size swings by tens of MB from call to call; the floor does not
    # move unless memory leaks (one call allocates ~10 MB, so a leak would add ~1 GB here).
    assert min(rss[-30:]) - min(rss[:30]) < 16 * 2**20


def test_several_layers_and_layer_objects(net: InPlaceAfterLayer) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    single = [anycam.Explainer(model, layer).explain(x, target=1) for layer in ("1", "3")]
    both = anycam.Explainer(model, [model[1], "3"]).explain(x, target=1)
    assert both.layer == ("1", "3")
    np.testing.assert_allclose(both.cams[0], single[0].cam, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(both.cams[1], single[1].cam, rtol=1e-5, atol=1e-7)
    expected = core.normalize((single[0].heatmap + single[1].heatmap) / 2)
    np.testing.assert_allclose(both.heatmap, expected, atol=1e-5)


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    extra: torch.Tensor


class MultiOutput(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        features = torch.relu(self.conv(x))
        logits = self.fc(features.mean((2, 3)))
        if self.kind == "tuple":
            return features, logits
        if self.kind == "dict":
            return {"features": features, "logits": logits}
        return Output(logits=logits, extra=features)


@pytest.mark.parametrize(("kind", "selector"), [("tuple", 1), ("dict", "logits"), ("dataclass", "logits")])
def test_output_selectors(kind: str, selector: object) -> None:
    model = _seeded(MultiOutput, kind).eval()
    x = torch.randn(2, 3, 8, 8)
    plain = _seeded(MultiOutput, "tuple").eval()
    expected = anycam.Explainer(plain, "conv", output=lambda out: out[1])(x, target=[0, 2])
    got = anycam.Explainer(model, "conv", output=selector)(x, target=[0, 2])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    with pytest.raises(anycam.TargetError, match="output="):
        anycam.Explainer(model, "conv")(x)


class Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 6, 3, padding=1)
        self.classifier = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.encoder(x)))


def test_segmentation_mask_target_matches_autograd() -> None:
    model = _seeded(Segmenter).eval()
    x = torch.randn(2, 3, 10, 10)
    mask = torch.zeros(10, 10)
    mask[2:6, 3:8] = 1

    def score(output: torch.Tensor) -> torch.Tensor:
        return (output[:, 1] * mask).sum((1, 2))

    result = anycam.Explainer(model, "encoder", normalize=None).explain(x, target=score)
    leaf = model.encoder(x).detach().requires_grad_()
    (gradients,) = torch.autograd.grad(score(model.classifier(torch.relu(leaf))).sum(), leaf)
    alpha = gradients.mean((2, 3))
    expected = torch.relu(torch.einsum("nc,nchw->nhw", alpha, leaf.detach())).numpy()
    np.testing.assert_allclose(result.cam, expected, rtol=1e-5, atol=1e-7)
    assert result.target is None
    np.testing.assert_allclose(result.scores, score(model(x)).detach().numpy(), rtol=1e-6)


def test_embedding_similarity_target() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)
    ).eval()
    x = torch.randn(3, 3, 8, 8)
    reference = torch.randn(5)

    def similarity(embedding: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(embedding, reference[None], dim=1)

    result = anycam.Explainer(model, "1").explain(x, target=similarity)
    np.testing.assert_allclose(result.scores, similarity(model(x)).detach().numpy(), rtol=1e-5)
    assert result.heatmap.shape == (3, 8, 8)


def test_swin_style_channels_last_and_vit_tokens_by_layout() -> None:
    class Swin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 4, 2, stride=2)
            self.stage = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.embed(x).permute(0, 2, 3, 1)  # (N, H, W, C)
            return self.fc(torch.tanh(self.stage(tokens)).mean((1, 2)))

    model = _seeded(Swin).eval()
    x = torch.randn(2, 3, 8, 8)
    result = anycam.Explainer(model, "stage", layout="channels_last").explain(x, target=0)
    leaf = model.stage(model.embed(x).permute(0, 2, 3, 1)).detach().requires_grad_()
    (g,) = torch.autograd.grad(model.fc(torch.tanh(leaf).mean((1, 2)))[:, 0].sum(), leaf)
    expected = torch.relu(torch.einsum("nc,nhwc->nhw", g.mean((1, 2)), leaf.detach())).numpy()
    np.testing.assert_allclose(result.cam, expected, rtol=1e-5, atol=1e-7)


def test_layer_not_on_the_path_is_explained_clearly() -> None:
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(3, 4, 3)
            self.unused_output = nn.Conv2d(3, 4, 3)
            self.never_called = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.unused_output(x)
            return self.fc(self.used(x).mean((2, 3)))

    model = _seeded(Branches).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(anycam.LayerError, match="did not run"):
        anycam.Explainer(model, "never_called")(x)
    with pytest.raises(anycam.LayerError, match="does not (reach|depend)|not depend"):
        anycam.Explainer(model, "unused_output")(x)


def test_non_finite_activations_name_the_layer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(1, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    # A NaN input is caught at the input now (issue 10, item 6) ...
    with pytest.raises(anycam.NonFiniteError, match="NaN in the input"):
        anycam.Explainer(model, "0")(x)
    # ... and a finite input that overflows float32 inside the layer names the layer.
    with torch.no_grad():
        model[0].weight.fill_(1e38)
    with pytest.raises(anycam.NonFiniteError, match="activations of layer '0'"):
        anycam.Explainer(model, "0")(torch.ones(1, 3, 8, 8))


def test_bad_inputs_are_clear_errors(net: InPlaceAfterLayer) -> None:
    explainer = anycam.Explainer(net, "conv")
    with pytest.raises(anycam.InputError, match="floating-point input.*token ids"):
        explainer(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(anycam.InputError, match="no spatial axis"):
        explainer(torch.zeros(3, 8))
    with pytest.raises(anycam.InputError, match="torch.Tensor or a NumPy array"):
        explainer("an image")
    with pytest.raises(anycam.InputError, match="no input is a floating-point array with spatial axes"):
        explainer([[1.0]])  # a list is positional inputs, and none of these is an image
    with pytest.raises(anycam.LayerError, match="module name or a module object"):
        anycam.Explainer(net, 3)
    with pytest.raises(anycam.LayerError, match="not part of the model"):
        anycam.Explainer(net, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="unknown method"):
        anycam.Explainer(net, "conv", method="gradcam+++")
    with pytest.raises(TypeError, match="unknown option"):
        anycam.Explainer(net, "conv", colour="red")


def test_backend_detection_and_override(net: InPlaceAfterLayer) -> None:
    assert anycam.Explainer(net, "conv").backend.name == "torch"
    assert anycam.Explainer(net, "conv", backend="torch").backend.name == "torch"
    with pytest.raises(anycam.BackendError, match="cannot tell"):
        anycam.Explainer(object(), "conv")
    with pytest.raises(anycam.BackendError, match="unknown backend"):
        anycam.Explainer(net, "conv", backend="mxnet")
