"""What several test files of tests/torch share: a residual network, a two-input batch, and Grad-CAM
written in plain torch autograd (the oracle)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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


def torch_gradcam(activations: torch.Tensor, head, target: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """ReLU(Σ_k mean_s(∂y_t/∂A_k) A_k), by autograd on a leaf copy of the activations."""
    leaf = activations.detach().clone().requires_grad_()
    scores = head(leaf)[torch.arange(leaf.shape[0]), torch.as_tensor(target)]
    (grads,) = torch.autograd.grad(scores.sum(), leaf)
    weights = grads.mean(dim=tuple(range(2, grads.ndim)), keepdim=True)
    return torch.relu((weights * leaf).sum(1)).detach().numpy()


IMAGE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


META = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))


TARGET = [1, 3]


def hooked(model: nn.Module, layer: nn.Module, x: torch.Tensor, function) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Runs the model without grad with ``layer``'s output replaced by ``function(output)`` (None: kept)."""
    handle = layer.register_forward_hook(lambda module, args, out: function(out))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        handle.remove()


def brute_force_ablation(
    model: nn.Module, name: str, x: torch.Tensor, classes: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Ablation-CAM by brute force: (activations (N, C, ...), weights (N, C)), a hook's copy of the
    layer output, and (y - y_k) / y with channel k zeroed by a hook in a rerun of the whole model."""
    layer = model.get_submodule(name)
    index = torch.as_tensor(classes)[:, None]
    kept: list[torch.Tensor] = []
    y = hooked(model, layer, x, lambda out: kept.append(out.clone())).gather(1, index)[:, 0].double()
    weights = []
    for channel in range(kept[0].shape[1]):

        def zero(out: torch.Tensor, channel: int = channel) -> torch.Tensor:
            out = out.clone()
            out[:, channel] = 0
            return out

        ablated = hooked(model, layer, x, zero).gather(1, index)[:, 0].double()
        weights.append(((y - ablated) / y).numpy())
    return kept[0].numpy(), np.stack(weights, axis=-1)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``, written out: one shared in-place ReLU, ``out += identity``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet18Shaped(nn.Module):
    """torchvision's ``resnet18`` structure (stem, 4 stages of 2 blocks, avgpool, fc), narrow widths."""

    def __init__(self, widths: tuple[int, ...] = (4, 6, 8, 8), classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        inplanes = widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, classes)
        # Random statistics and affine parameters: a BatchNorm at its identity initialisation
        # would hide what a trained network shows.
        generator = torch.Generator().manual_seed(3)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.running_mean.copy_(0.5 * torch.randn(channels, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(channels, generator=generator))
                with torch.no_grad():
                    module.weight.copy_(1.0 + 0.5 * torch.randn(channels, generator=generator))
                    module.bias.copy_(0.5 * torch.randn(channels, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)
