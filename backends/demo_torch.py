"""The demo CNN of ``anycam.demo_data.DEMO_ARCHITECTURE`` in PyTorch.

>>> from anycam.demo_data import load_demo
>>> from anycam.backends.demo_torch import build_demo_model
>>> demo = load_demo()
>>> model = build_demo_model(demo["weights"])
>>> model(torch.from_numpy(demo["images"][:2])).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from anycam._errors import InputError
from anycam.demo_data import BN_EPS, NUM_CLASSES

INPUT_LAYOUT = "channels_first"
"""The demo model takes ``(N, 1, 64, 64)`` batches, as ``load_demo()["images"]``."""


class ConvBNReLU(nn.Module):
    """conv 3x3 (explicit padding 1, no bias) → BatchNorm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    """ReLU(x + BN(conv(ReLU(BN(conv(x)))))) at a constant channel count."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu(x + residual)


class DownBlock(nn.Module):
    """A stride-2 ``ConvBNReLU`` (``down``) followed by a ``ResidualBlock`` (``block``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.down = ConvBNReLU(in_channels, out_channels, stride=2)
        self.block = ResidualBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.down(x))


class DemoNet(nn.Module):
    """stem → stage1 (↓2) → stage2 (residual) → stage3 (↓2 + residual) → GAP → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNReLU(1, 16)
        self.stage1 = ConvBNReLU(16, 32, stride=2)
        self.stage2 = ResidualBlock(32)
        self.stage3 = DownBlock(32, 64)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(features.mean(dim=(2, 3)))


def build_demo_model(weights: Mapping[str, np.ndarray] | None = None) -> nn.Module:
    """Returns the demo CNN in eval mode, with ``weights`` loaded if given.

    Args:
        weights: name → array under the model's ``state_dict`` names (``load_demo()["weights"]``);
            the BatchNorms' ``num_batches_tracked`` counters may be left out.

    Returns:
        A ``DemoNet`` (float32, eval mode); random initial weights if ``weights`` is None.

    Raises:
        InputError: if names are missing or unknown, or a shape does not fit.
    """
    model = DemoNet()
    if weights is not None:
        state = model.state_dict()
        optional = {name for name in state if name.endswith("num_batches_tracked")}
        missing = sorted(set(state) - set(weights) - optional)
        unknown = sorted(set(weights) - set(state))
        if missing or unknown:
            raise InputError(f"demo weights do not fit: missing {missing}, unknown {unknown}")
        for name, array in weights.items():
            if tuple(np.shape(array)) != tuple(state[name].shape):
                raise InputError(
                    f"demo weight {name!r} has shape {np.shape(array)}, expected {tuple(state[name].shape)}"
                )
            state[name] = torch.as_tensor(np.asarray(array), dtype=state[name].dtype)
        model.load_state_dict(state)
    return model.eval()
