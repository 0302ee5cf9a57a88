"""Contract kit for PyTorch: small nets with a nonlinear head, reference by plain autograd."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .kit import Case

BATCH, CLASSES = 3, 5


class Split(nn.Module):
    """``head(features(x))``; the explained layer is ``features``."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv(spatial: int) -> tuple[type[nn.Module], type[nn.Module]]:
    return {
        1: (nn.Conv1d, nn.AdaptiveAvgPool1d),
        2: (nn.Conv2d, nn.AdaptiveAvgPool2d),
        3: (nn.Conv3d, nn.AdaptiveAvgPool3d),
    }[spatial]


def conv_net(spatial: int) -> Split:
    conv, pool = _conv(spatial)
    features = _features(conv)
    head = nn.Sequential(conv(8, 8, 1), nn.Tanh(), pool(1), nn.Flatten(), nn.Linear(8, CLASSES))
    return Split(features, head)


def _features(conv: type[nn.Module]) -> nn.Sequential:
    """Two convolutions, the last one ReLU'd: the explained layer of every kit net."""
    return nn.Sequential(conv(3, 6, 3, padding=1), nn.ReLU(), conv(6, 8, 3, padding=1, stride=2), nn.ReLU(inplace=True))


class MaxPooledHead(nn.Module):
    """Global max pooling written as ``amax`` over the spatial axes, then a dense layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.amax(dim=(2, 3)))


def pooled_head_net(kind: str) -> Split:
    """The layer read by nothing but a global pooling: mean → flatten → dense → softmax, or max → dense."""
    if kind == "pooled_head":
        head: nn.Module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES), nn.Softmax(dim=1))
    else:
        head = MaxPooledHead()
    return Split(_features(nn.Conv2d), head)


class Tokens(nn.Module):
    """Patch embedding + class token → (N, 1 + 16, D), then a residual MLP block."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.mlp(tokens)


class TokenHead(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.mix = nn.Linear(dim, dim)
        self.fc = nn.Linear(2 * dim, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mixed = torch.tanh(self.mix(tokens))
        return self.fc(torch.cat([mixed[:, 0], mixed[:, 1:].mean(1)], dim=1))


class _GuidedReLUFunction(torch.autograd.Function):
    """The guided rule written out for the oracle: ReLU forward, ReLU(grad)·[x > 0] backward."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0).float()


class _GuidedReLUModule(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedReLUFunction.apply(x)  # type: ignore[no-any-return]


def guided_copy(model: nn.Module) -> nn.Module:
    """Returns a deep copy of ``model`` with every ``nn.ReLU`` module replaced by the guided one."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, _GuidedReLUModule())
    return twin


def upsample(maps: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    tensor = torch.as_tensor(np.ascontiguousarray(maps), dtype=torch.float64)
    return F.interpolate(tensor, size=size, mode=mode, align_corners=False).numpy()


class SignalAsImage(nn.Module):
    """A 1-D model written with Conv2d on ``x[..., None]``: (N, 3, L) → features (N, 8, L/2, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, (3, 1), padding=(1, 0)), nn.ReLU(), nn.Conv2d(6, 8, (3, 1), stride=(2, 1), padding=(1, 0))
        )
        self.head = nn.Sequential(
            nn.Conv2d(8, 8, 1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x[..., None]))


class ImageToSignal(Split):
    """(N, 3, 10, 10) → features (N, 8, 10): a 2-D input whose explained layer is 1-D."""

    def __init__(self) -> None:
        features = nn.Sequential(nn.Conv2d(3, 8, (10, 1)), nn.Flatten(2))
        head = nn.Sequential(
            nn.Conv1d(8, 8, 1), nn.Tanh(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, CLASSES)
        )
        super().__init__(features, head)


class Block(nn.Module):
    """A residual block as torchvision's ``BasicBlock`` writes it: ``out += identity`` in place after ``bn2``.

    Its two ReLUs are separate modules (torchvision shares one), so the first can be explained.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu2(out)


class Residual(nn.Module):
    """A stem convolution, two residual blocks, global mean pooling and a dense layer."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(Block(channels), Block(channels))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, CLASSES)
        # Statistics and affine parameters away from the identity, as in a trained network.
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                nn.init.normal_(module.weight, 1.0, 0.5)
                nn.init.normal_(module.bias, 0.0, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


# The module each of kit.POSITIONS names in ``Residual``.
POSITION_LAYERS = {
    "skip_inplace": "blocks.1.bn2",
    "inside_block": "blocks.0.relu1",
    "after_add": "blocks.0",
    "before_pool": "blocks.1",
}


def position_case(kind: str) -> Case:
    """A residual network explained at one of kit.POSITIONS; every reference reruns the whole model."""
    torch.manual_seed(0)
    model = Residual().eval()
    inputs = torch.randn(BATCH, 3, 10, 9)
    layer = POSITION_LAYERS[kind]
    module = model.get_submodule(layer)

    def replaced(function):  # type: ignore[no-untyped-def]
        """Runs the whole model with the layer's output replaced by ``function(output)``."""

        def hook(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
            return function(out)

        handle = module.register_forward_hook(hook)
        try:
            return model(inputs)
        finally:
            handle.remove()

    def reference(cotangents: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        leaves: list[torch.Tensor] = []

        def keep(out: torch.Tensor) -> torch.Tensor:
            leaves.append(out.detach().clone().requires_grad_())
            # The network goes on with a copy: the block adds the identity to it in place.
            return leaves[-1].clone()

        with torch.enable_grad():
            outputs = replaced(keep)
            (leaf,) = leaves
            if cotangents is None:
                return leaf.detach().numpy(), None, outputs.detach().numpy()
            grads = [
                torch.autograd.grad(outputs, leaf, grad_outputs=torch.as_tensor(c), retain_graph=True)[0]
                for c in cotangents
            ]
        return leaf.detach().numpy(), torch.stack(grads, dim=1).numpy(), outputs.detach().numpy()

    def ablated_outputs(channel: int) -> np.ndarray:
        def zero(out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[:, channel] = 0
            return out

        with torch.no_grad():
            return replaced(zero).numpy()  # type: ignore[no-any-return]

    def head_reference(replacement: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return replaced(lambda out: torch.as_tensor(replacement).clone()).numpy()  # type: ignore[no-any-return]

    def linear_target(weights: np.ndarray):  # type: ignore[no-untyped-def]
        w = torch.as_tensor(weights, dtype=torch.float32)
        return lambda output: output @ w

    return Case(
        model=model,
        layer=layer,
        inputs=inputs,
        layout=None,
        true_layout="channels_first",
        input_spatial=tuple(inputs.shape[2:]),
        reference=reference,
        linear_target=linear_target,
        ablated_outputs=ablated_outputs,
        head_reference=head_reference,
        upsample=upsample,
    )


class TorchKit:
    name = "torch"

    def odd_case(self, kind: str) -> Case:
        """``"signal_as_image"`` (1-D input, 2-D layer) or ``"image_to_signal"`` (the reverse)."""
        torch.manual_seed(0)
        if kind == "signal_as_image":
            model: nn.Module = SignalAsImage()
            inputs = torch.randn(BATCH, 3, 17)

            def features(x: torch.Tensor) -> torch.Tensor:
                return model.features(x[..., None])

        else:
            model = ImageToSignal()
            inputs = torch.randn(BATCH, 3, 10, 10)
            features = model.features
        model.eval()

        def reference(cotangents: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
            with torch.no_grad():
                activations = features(inputs)
            leaf = activations.clone().requires_grad_()
            outputs = model.head(leaf)
            if cotangents is None:
                return activations.numpy(), None, outputs.detach().numpy()
            grads = [
                torch.autograd.grad(outputs, leaf, grad_outputs=torch.as_tensor(c), retain_graph=True)[0]
                for c in cotangents
            ]
            return activations.numpy(), torch.stack(grads, dim=1).numpy(), outputs.detach().numpy()

        return Case(
            model=model,
            layer="features",
            inputs=inputs,
            layout=None,
            true_layout="channels_first",
            input_spatial=tuple(inputs.shape[2:]),
            reference=reference,
            linear_target=lambda w: None,
        )

    def case(self, kind: str) -> Case:
        if kind in POSITION_LAYERS:
            return position_case(kind)
        torch.manual_seed(0)
        layout: str | None = None
        true_layout = "channels_first"
        if kind in ("conv2d", "channels_last"):
            model, shape = conv_net(2), (BATCH, 3, 12, 10)
        elif kind == "conv1d":
            model, shape = conv_net(1), (BATCH, 3, 17)
        elif kind == "conv3d":
            model, shape = conv_net(3), (BATCH, 3, 6, 8, 5)
        elif kind in ("pooled_head", "max_pooled_head"):
            model, shape = pooled_head_net(kind), (BATCH, 3, 12, 10)
        elif kind == "tokens":
            model, shape = Split(Tokens(), TokenHead()), (BATCH, 3, 16, 16)
            layout = true_layout = "tokens"
        else:
            raise ValueError(kind)
        model.eval()
        inputs = torch.randn(*shape)
        if kind == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            inputs = inputs.contiguous(memory_format=torch.channels_last)

        def reference(cotangents: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
            with torch.no_grad():
                activations = model.features(inputs)
            leaf = activations.clone().requires_grad_()
            outputs = model.head(leaf)
            if cotangents is None:
                return activations.numpy(), None, outputs.detach().numpy()
            grads = [
                torch.autograd.grad(outputs, leaf, grad_outputs=torch.as_tensor(c), retain_graph=True)[0]
                for c in cotangents
            ]
            stacked = torch.stack(grads, dim=1)
            return activations.numpy(), stacked.numpy(), outputs.detach().numpy()

        def linear_target(weights: np.ndarray):  # type: ignore[no-untyped-def]
            w = torch.as_tensor(weights, dtype=torch.float32)
            return lambda output: output @ w

        def ablated_outputs(channel: int) -> np.ndarray:
            def zero(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
                out = out.clone()
                if true_layout == "tokens":
                    out[..., channel] = 0
                else:
                    out[:, channel] = 0
                return out

            handle = model.features.register_forward_hook(zero)
            try:
                with torch.no_grad():
                    return model(inputs).numpy()
            finally:
                handle.remove()

        def head_reference(replacement: np.ndarray) -> np.ndarray:
            # The model is head(features(x)): run again with features' output replaced.
            with torch.no_grad():
                return model.head(torch.as_tensor(replacement)).numpy()

        def masked_outputs(masks: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                masked = inputs * torch.as_tensor(masks, dtype=torch.float32)[:, None]
                return model(masked).numpy()

        def guided(cotangents: np.ndarray) -> np.ndarray:
            twin = guided_copy(model)
            leaf = inputs.detach().clone().requires_grad_()
            outputs = twin(leaf)
            grads = [
                torch.autograd.grad(outputs, leaf, grad_outputs=torch.as_tensor(c), retain_graph=True)[0]
                for c in cotangents
            ]
            return torch.stack(grads, dim=1).numpy()

        return Case(
            head_reference=head_reference,
            ablated_outputs=ablated_outputs,
            masked_outputs=masked_outputs,
            upsample=upsample,
            guided=guided,
            has_relu=kind != "tokens",
            model=model,
            layer="features",
            inputs=inputs,
            layout=layout,
            true_layout=true_layout,
            input_spatial=tuple(shape[2:]),
            reference=reference,
            linear_target=linear_target,
        )


KIT = TorchKit()
