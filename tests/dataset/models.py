"""A tiny torch CNN and deterministic batches shared by the dataset, TTA and Ray tests."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

CLASSES = 5


class TinyNet(nn.Module):
    """conv 3×3 → ReLU → conv 3×3 → ReLU (the explained ``features``) → global average → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.features = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(self.relu1(self.conv1(x)))
        return self.head(a.mean(dim=(2, 3)))


def tiny_model(seed: int = 0) -> TinyNet:
    """The tiny net with seeded weights, in eval mode (a picklable factory for Ray actors)."""
    torch.manual_seed(seed)
    return TinyNet().eval()


def images(count: int, size: int = 16, seed: int = 1) -> np.ndarray:
    """``(count, 3, size, size)`` float32 images from a fixed seed."""
    return np.random.default_rng(seed).standard_normal((count, 3, size, size)).astype(np.float32)


def batches(data: np.ndarray, batch: int, ids: bool = True) -> list:
    """``data`` cut into mapping batches with string ids ``"img-0007"``."""
    out = []
    for start in range(0, len(data), batch):
        chunk = data[start : start + batch]
        if ids:
            out.append({"image": chunk, "id": np.array([f"img-{i:04d}" for i in range(start, start + len(chunk))])})
        else:
            out.append(chunk)
    return out


class _CrashOnce(nn.Module):
    """The tiny net, except that the first process to reach its second call dies there (once)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.net = tiny_model()
        self.marker = marker
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            try:  # O_EXCL: exactly one process in the whole test wins the right to die
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(1)  # an actor crash (as an OOM kill or a lost node), not a Python error
        return self.net(x)


def crashing_tiny_model(marker: str) -> nn.Module:
    """A factory for a model whose actor dies once mid-run (use with ``functools.partial``)."""
    return _CrashOnce(marker).eval()
