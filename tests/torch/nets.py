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
