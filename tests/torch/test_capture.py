"""Torch specifics of the issue-9 methods: functional ReLUs, residuals over the layer, the prefix
run once, fallbacks, a model left as it was, and the errors."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anycam


class _Guided(torch.autograd.Function):
    """The guided rule written out for the oracle (independent of anycam's)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0).to(grad.dtype)


class Functional(nn.Module):
    """Every way to spell ReLU in a forward; ``guided=True`` spells each as the oracle's rule."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)
        self.guided = False

    def relu(self, x: torch.Tensor, spelling: str) -> torch.Tensor:
        if self.guided:
            return _Guided.apply(x)  # type: ignore[no-any-return]
        if spelling == "F":
            return F.relu(x)
        if spelling == "torch":
            return torch.relu(x)
        if spelling == "method":
            return x.relu()
        if spelling == "inplace":
            x.relu_()  # the return value ignored on purpose: the in-place contract must hold
            return x
        if spelling == "F_inplace":
            return F.relu(x, inplace=True)
        return self.act(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x), "F")
        x = self.relu(x * 1.5 - 0.1, "torch")
        x = self.relu(self.conv2(x), "method")
        x = self.relu(x - 0.05, "inplace")
        x = self.relu(self.conv3(x), "F_inplace")
        x = self.relu(x - 0.01, "module")
        return self.fc(x.mean(dim=(2, 3)))


def _guided_oracle(model: Functional, x: torch.Tensor, classes: np.ndarray) -> np.ndarray:
    twin = copy.deepcopy(model)
    twin.guided = True
    leaf = x.clone().requires_grad_()
    out = twin(leaf)
    (grad,) = torch.autograd.grad(out.gather(1, torch.as_tensor(classes)[:, None]).sum(), leaf)
    return grad.numpy()


def _plain_gradient(model: nn.Module, x: torch.Tensor, classes: np.ndarray) -> np.ndarray:
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(leaf).gather(1, torch.as_tensor(classes)[:, None]).sum(), leaf)
    return grad.numpy()


@pytest.fixture
def functional() -> tuple[Functional, torch.Tensor]:
    torch.manual_seed(0)
    return Functional().eval(), torch.randn(2, 3, 8, 8)


def test_guided_backprop_catches_every_relu_spelling(functional) -> None:  # type: ignore[no-untyped-def]
    model, x = functional
    result = anycam.Explainer(model, "conv3", method="guided-backprop").explain(x)
    expected = _guided_oracle(model, x, result.target)
    np.testing.assert_allclose(result.attribution, expected, rtol=1e-4, atol=1e-7)
    # The test has teeth: the guided rule changes the gradient on this model.
    plain = _plain_gradient(model, x, result.target)
    assert np.abs(plain - expected).max() > 0.1 * np.abs(expected).max()


def test_guided_leaves_the_model_and_torch_as_they_were_also_after_an_exception(functional) -> None:  # type: ignore[no-untyped-def]
    model, x = functional
    state = copy.deepcopy(model.state_dict())
    explainer = anycam.Explainer(model, "conv3", method="guided-gradcam")
    explainer.explain(x, target=1)

    def broken(output: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("target failed")

    with pytest.raises(RuntimeError, match="target failed"):
        explainer.explain(x, target=broken)
    assert torch._C._len_torch_function_stack() == 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    # After the call the ReLUs are plain again: an ordinary backward gives the plain gradient.
    classes = np.array([1, 1])
    np.testing.assert_allclose(
        _plain_gradient(model, x, classes), _plain_gradient(copy.deepcopy(model), x, classes), rtol=0, atol=0
    )
    assert not np.allclose(_plain_gradient(model, x, classes), _guided_oracle(model, x, classes))


def test_a_model_without_relu_warns_that_guided_equals_the_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="no ReLU"):
        result = anycam.Explainer(model, "0", method="guided-backprop").explain(x, target=0)
    np.testing.assert_allclose(result.attribution, _plain_gradient(model, x, np.array([0, 0])), rtol=1e-5, atol=1e-7)


class Residual(nn.Module):
    """stem → block (conv1 → relu → conv2, plus the skip x) → head; the layer is inside the block."""

    def __init__(self, dynamic: bool = False, item: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.dynamic = dynamic
        self.item = item

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        if self.dynamic and float(x.mean()) < -1e9:  # data-dependent Python: untraceable
            x = -x
        y = self.bn(self.conv2(F.relu(self.conv1(x))))
        y = F.relu(y + x)  # the skip connection carries x *over* conv1
        if self.item:
            y = y / (1.0 + 0.0 * float(y.abs().max()))  # .item() inside the suffix: no vmap rule
        return self.fc(y.mean(dim=(2, 3)))


def _zeroing_oracle(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: np.ndarray) -> np.ndarray:
    """Ablation-CAM weights by really zeroing each channel of ``layer`` in a hooked full forward."""
    with torch.no_grad():
        y = model(x).gather(1, torch.as_tensor(classes)[:, None])[:, 0].double()
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, a, out: store.setdefault("a", out))
    with torch.no_grad():
        model(x)
    handle.remove()
    weights = []
    for channel in range(store["a"].shape[1]):

        def zero(module: nn.Module, args: object, out: torch.Tensor, channel: int = channel) -> torch.Tensor:
            out = out.clone()
            out[:, channel] = 0
            return out

        handle = layer.register_forward_hook(zero)
        with torch.no_grad():
            ablated = model(x).gather(1, torch.as_tensor(classes)[:, None])[:, 0].double()
        handle.remove()
        weights.append(((y - ablated) / y).numpy())
    return np.stack(weights, axis=1)


def _counting(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda m, a, out: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("variant", ["traced", "untraceable", "no_vmap_rule"])
def test_ablationcam_with_a_skip_over_the_layer_and_the_prefix_run_once(variant: str) -> None:
    torch.manual_seed(1)
    model = Residual(dynamic=variant == "untraceable", item=variant == "no_vmap_rule").eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(3, 3, 6, 6)
    explainer = anycam.Explainer(model, "conv1", method="ablationcam", batch_size=3)  # one copy per chunk
    stem_calls = _counting(model.stem)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = explainer.explain(x)
    expected = _zeroing_oracle(model, model.conv1, x, result.target)
    stem_calls[0] -= 2 + 6  # the oracle's forwards
    np.testing.assert_allclose(result.weights, expected, rtol=1e-4, atol=1e-6)
    if variant == "traced":
        # The capture's forward and one prefix for all 6 chunks: the stem ran twice.
        assert stem_calls[0] == 2
        assert not [w for w in caught if "vectorised" in str(w.message)]
    elif variant == "untraceable":
        assert stem_calls[0] == 1 + 6  # documented fallback: one prefix per chunk
    else:
        assert any("cannot be vectorised" in str(w.message) for w in caught)


def test_ablationcam_explains_a_layer_input_port() -> None:
    torch.manual_seed(2)
    model = Residual().eval()
    x = torch.randn(2, 3, 6, 6)
    result = anycam.Explainer(model, "conv2:input", method="ablationcam").explain(x, target=3)
    # conv2's input is relu(conv1(x)): zero channel k of it by a pre-hook.
    with torch.no_grad():
        y = model(x)[:, 3].double()
    weights = []
    for channel in range(6):

        def zero(module: nn.Module, args: tuple[torch.Tensor, ...], channel: int = channel) -> tuple[torch.Tensor]:
            value = args[0].clone()
            value[:, channel] = 0
            return (value,)

        handle = model.conv2.register_forward_pre_hook(zero)
        with torch.no_grad():
            weights.append(((y - model(x)[:, 3].double()) / y).numpy())
        handle.remove()
    np.testing.assert_allclose(result.weights, np.stack(weights, axis=1), rtol=1e-4, atol=1e-6)


def test_faster_scorecam_scores_only_the_top_variance_channels() -> None:
    torch.manual_seed(3)
    model = Residual().eval()
    x = torch.randn(2, 3, 6, 6)
    full = anycam.Explainer(model, "conv2", method="scorecam").explain(x, target=0)
    fast = anycam.Explainer(model, "conv2", method="scorecam", scorecam_top_k=2).explain(x, target=0)
    assert ((fast.weights != 0).sum(axis=1) == 2).all()
    kept = fast.weights != 0
    np.testing.assert_allclose(fast.weights[kept], full.weights[kept], rtol=1e-5)


def test_scorecam_on_a_model_without_class_scores_needs_a_callable() -> None:
    torch.manual_seed(4)
    segmenter = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    explainer = anycam.Explainer(segmenter, "1", method="scorecam")
    with pytest.raises(anycam.TargetError, match="callable target"):
        explainer.explain(x, target=1)
    result = explainer.explain(x, target=lambda out: out[:, 1].mean(dim=(1, 2)))
    assert result.heatmap.shape == (2, 6, 6) and np.isfinite(result.weights).all()


def test_configuration_errors() -> None:
    model = Residual().eval()
    with pytest.raises(anycam.ConfigError, match="batch_size must be a positive integer"):
        anycam.Explainer(model, "conv1", method="scorecam", batch_size=0)
    with pytest.raises(anycam.ConfigError, match="scorecam_top_k"):
        anycam.Explainer(model, "conv1", method="scorecam", scorecam_top_k=0)
    with pytest.raises(anycam.ConfigError, match="guided-backprop.*ablationcam|ablationcam.*guided-backprop"):
        anycam.Explainer(model, "conv1", method="ablation-cam")
    with pytest.raises(anycam.ConfigError, match="one layer"):
        anycam.Explainer(model, ["conv1", "conv2"], method="ablationcam")
    with pytest.raises(anycam.ConfigError, match="unknown scorecam"):
        anycam.Explainer(model, "conv1", method="scorecam", scorecam="paper")


def test_progress_bar_only_when_asked(capsys) -> None:  # type: ignore[no-untyped-def]
    model = Residual().eval()
    x = torch.randn(1, 3, 6, 6)
    anycam.Explainer(model, "conv1", method="ablationcam", progress=True, batch_size=2).explain(x)
    assert "anycam ablationcam" in capsys.readouterr().err
    anycam.Explainer(model, "conv1", method="scorecam", progress=False, batch_size=2).explain(x)
    assert "anycam" not in capsys.readouterr().err


def test_sanity_check_compares_guided_attributions_at_input_resolution(functional) -> None:  # type: ignore[no-untyped-def]
    from anycam.sanity import replace_explainer, sanity_check, spearman

    model, x = functional
    explainer = anycam.Explainer(model, "conv3", method="guided-backprop")
    result = sanity_check(explainer, x, target=1, mode="full")
    order = explainer.backend.parameter_layers(x)
    randomized = replace_explainer(
        explainer, backend=explainer.backend.randomized(list(reversed(order)), seed=len(order) - 1)
    )
    original, flipped = explainer.explain(x, 1).attribution, randomized.explain(x, 1).attribution
    signed = [a.sum(axis=1).reshape(len(x), -1) for a in (original, flipped)]
    np.testing.assert_allclose(result.spearman[-1], spearman(*signed), atol=1e-12)
    np.testing.assert_allclose(result.spearman_abs[-1], spearman(*(np.abs(m) for m in signed)), atol=1e-12)


class BatchMixing(nn.Module):
    """A head that mixes the samples of a batch (centres over the batch): copies must not share one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.conv(x)).mean(dim=(2, 3))
        return self.fc(features - features.mean(dim=0, keepdim=True)) + 2.0


def test_ablationcam_keeps_copies_apart_when_the_head_mixes_the_batch() -> None:
    torch.manual_seed(5)
    model = BatchMixing().eval()
    x = torch.randn(3, 3, 5, 5)
    result = anycam.Explainer(model, "conv", method="ablationcam").explain(x, target=1)
    expected = _zeroing_oracle(model, model.conv, x, np.array([1, 1, 1]))
    np.testing.assert_allclose(result.weights, expected, rtol=1e-4, atol=1e-6)


def test_progress_true_without_tqdm_names_the_package(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    model = Residual().eval()
    with pytest.raises(anycam.MissingExtraError, match="pip install tqdm"):
        anycam.Explainer(model, "conv1", method="ablationcam", progress=True).explain(torch.randn(1, 3, 6, 6))
    # progress=None quietly goes without a bar.
    anycam.Explainer(model, "conv1", method="ablationcam").explain(torch.randn(1, 3, 6, 6))
