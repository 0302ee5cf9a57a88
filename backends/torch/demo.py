"""The demo CNN of ``anycam.demo.data.DEMO_ARCHITECTURE`` in PyTorch, as a 1-D, 2-D or 3-D network.

``spatial_dims=2`` is the shipped image model; 1 and 3 swap every ``Conv2d``/``BatchNorm2d``
for its 1-D/3-D sibling and average over every spatial axis, keeping the module names, so one
weight dict (``anycam.demo.weights.random_demo_weights``) fits the PyTorch, Keras and Flax ports.

>>> from anycam.demo.data import load_demo
>>> from anycam.backends.torch.demo import build_demo_model
>>> demo = load_demo()
>>> model = build_demo_model(demo["weights"])
>>> model(torch.from_numpy(demo["images"][:2])).shape
torch.Size([2, 10])
>>> build_demo_model(spatial_dims=1, in_channels=3)(torch.zeros(2, 3, 40)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from anycam._errors import InputError
from anycam.demo.data import BN_EPS, NUM_CLASSES
from anycam.demo.weights import demo_weight_shapes

INPUT_LAYOUT = "channels_first"
"""The demo model takes ``(N, 1, 64, 64)`` batches, as ``load_demo()["images"]`` (``(N, C, *S)`` in general)."""

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class ConvBNReLU(nn.Module):
    """conv 3 per spatial axis (explicit padding 1, no bias) → BatchNorm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, spatial_dims: int = 2) -> None:
        super().__init__()
        self.conv = _CONV[spatial_dims](in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn = _BATCH_NORM[spatial_dims](out_channels, eps=BN_EPS)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    """ReLU(x + BN(conv(ReLU(BN(conv(x)))))) at a constant channel count."""

    def __init__(self, channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.conv1 = _CONV[spatial_dims](channels, channels, 3, padding=1, bias=False)
        self.bn1 = _BATCH_NORM[spatial_dims](channels, eps=BN_EPS)
        self.relu1 = nn.ReLU()
        self.conv2 = _CONV[spatial_dims](channels, channels, 3, padding=1, bias=False)
        self.bn2 = _BATCH_NORM[spatial_dims](channels, eps=BN_EPS)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu(x + residual)


class DownBlock(nn.Module):
    """A stride-2 ``ConvBNReLU`` (``down``) followed by a ``ResidualBlock`` (``block``)."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.down = ConvBNReLU(in_channels, out_channels, stride=2, spatial_dims=spatial_dims)
        self.block = ResidualBlock(out_channels, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.down(x))


class DemoNet(nn.Module):
    """stem → stage1 (↓2) → stage2 (residual) → stage3 (↓2 + residual) → GAP → fc."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.stem = ConvBNReLU(in_channels, 16, spatial_dims=spatial_dims)
        self.stage1 = ConvBNReLU(16, 32, stride=2, spatial_dims=spatial_dims)
        self.stage2 = ResidualBlock(32, spatial_dims)
        self.stage3 = DownBlock(32, 64, spatial_dims)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(features.mean(dim=tuple(range(2, 2 + self.spatial_dims))))


def build_demo_model(
    weights: Mapping[str, np.ndarray] | None = None, *, spatial_dims: int = 2, in_channels: int = 1
) -> nn.Module:
    """Returns the demo CNN in eval mode, with ``weights`` loaded if given.

    Args:
        weights: name → array under the model's ``state_dict`` names (``load_demo()["weights"]``
            for the default 2-D model); the BatchNorms' ``num_batches_tracked`` counters may be left out.
        spatial_dims: 1 (input ``(N, C, L)``), 2 (``(N, C, H, W)``, the shipped model) or 3 (``(N, C, D, H, W)``).
        in_channels: ``C``, the input channels.

    Returns:
        A ``DemoNet`` (float32, eval mode); random initial weights if ``weights`` is None.

    Raises:
        InputError: for a bad ``spatial_dims`` or ``in_channels``, if names are missing or unknown,
            or a shape does not fit.
    """
    demo_weight_shapes(spatial_dims, in_channels)  # validates the variant before torch sees it
    model = DemoNet(spatial_dims, in_channels)
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


# The demo ViT (issue 22's quality table): a small vision transformer for the demo canvases.
# Patch embedding (an 8 × 8 convolution with stride 8: 64 × 64 canvases give an 8 × 8 grid), a
# class token, learned position embeddings, pre-norm blocks whose attention calls
# F.scaled_dot_product_attention — the fused path that never builds the attention matrix, which is
# what anycam's attention capture has to survive — and a linear head on the class token. The
# weights scripts/train_demo_vit.py trains ship in anycam/demo/vit.npz under these module names.
PATCH = 8
WIDTH = 64
HEADS = 4
DEPTH = 4
MLP = 128
SIZE = 64


class ViTAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        mixed = functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(mixed.transpose(1, 2).reshape(batch, tokens, width))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(functional.gelu(self.fc1(self.norm2(x))))


class DemoViT(nn.Module):
    """``(N, 1, 64, 64)`` canvases → ``(N, 10)`` logits; tokens: the class token, then 8 × 8 patches."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        grid = SIZE // PATCH
        self.patch = nn.Conv2d(channels, WIDTH, PATCH, stride=PATCH)
        self.cls = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos = nn.Parameter(torch.randn(1, 1 + grid * grid, WIDTH) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(WIDTH, HEADS, MLP) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens)[:, 0])


def build_demo_vit(weights: Mapping[str, np.ndarray] | None = None) -> DemoViT:
    """Returns the demo ViT in eval mode, with ``weights`` (state-dict names → arrays) if given.

    >>> build_demo_vit()(torch.zeros(2, 1, 64, 64)).shape
    torch.Size([2, 10])
    """
    model = DemoViT()
    if weights is not None:
        model.load_state_dict({name: torch.from_numpy(np.asarray(value)) for name, value in weights.items()})
    return model.eval()
