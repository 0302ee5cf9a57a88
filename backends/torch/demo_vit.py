"""A small vision transformer for the demo canvases, in plain PyTorch (issue 22's quality table).

Patch embedding (an 8 × 8 convolution with stride 8: 64 × 64 canvases give an 8 × 8 grid), a
class token, learned position embeddings, pre-norm blocks whose attention calls
``F.scaled_dot_product_attention`` — the fused path that never builds the attention matrix,
which is what anycam's attention capture has to survive — and a linear head on the class token.
The weights ``scripts/train_demo_vit.py`` trains ship in ``anycam/demo/vit.npz`` under these
module names.

>>> model = build_demo_vit()
>>> model(torch.zeros(2, 1, 64, 64)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from anycam.demo.data import NUM_CLASSES

PATCH = 8
WIDTH = 64
HEADS = 4
DEPTH = 4
MLP = 128
SIZE = 64


class Attention(nn.Module):
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


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
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
        self.blocks = nn.ModuleList(Block(WIDTH, HEADS, MLP) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens)[:, 0])


def build_demo_vit(weights: Mapping[str, np.ndarray] | None = None) -> DemoViT:
    """Returns the demo ViT in eval mode, with ``weights`` (state-dict names → arrays) if given."""
    model = DemoViT()
    if weights is not None:
        model.load_state_dict({name: torch.from_numpy(np.asarray(value)) for name, value in weights.items()})
    return model.eval()
