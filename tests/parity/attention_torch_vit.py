"""A plain torch ViT with the layout of the Keras ViT of ``attention_keras_run``, and its weights loader.

Same function as ``attention_keras_run.keras_vit``: a 4 × 4 stride-4 conv patch embedding, a
class token and learned positions, ``BLOCKS`` pre-norm blocks (LayerNorm ε = 1e-6, attention with
``HEADS`` heads of ``DIM // HEADS``, a tanh-GELU MLP of width ``2 · DIM``), a final LayerNorm on
the class token and a linear head. The attention runs either through
``F.scaled_dot_product_attention`` (``attention="sdpa"``, separate q/k/v projections) or through
``nn.MultiheadAttention`` (``attention="mha"``, one packed input projection): the two ways torch
models attend, and the two places the torch adapter intercepts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from tests.parity.attention_keras_run import BLOCKS, CLASSES, DIM, HEADS, PATCH, TOKENS


class SdpaAttention(nn.Module):
    """Self-attention through the fused ``F.scaled_dot_product_attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape

        def heads(layer: nn.Linear) -> torch.Tensor:
            return layer(x).reshape(batch, tokens, HEADS, DIM // HEADS).transpose(1, 2)

        mixed = functional.scaled_dot_product_attention(heads(self.query), heads(self.key), heads(self.value))
        return self.out(mixed.transpose(1, 2).reshape(batch, tokens, DIM))


class MhaAttention(nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` (batch first)."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, attention: str) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM, eps=1e-6)
        self.attn = SdpaAttention() if attention == "sdpa" else MhaAttention()
        self.ln2 = nn.LayerNorm(DIM, eps=1e-6)
        self.fc1 = nn.Linear(DIM, 2 * DIM)
        self.fc2 = nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(functional.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class TorchViT(nn.Module):
    """``(N, 3, 16, 16)`` → ``(N, CLASSES)``; tokens: the class token, then the 4 × 4 patches in raster order."""

    def __init__(self, attention: str = "sdpa") -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.cls = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos = nn.Parameter(torch.zeros(1, TOKENS, DIM))
        self.blocks = nn.ModuleList(Block(attention) for _ in range(BLOCKS))
        self.ln = nn.LayerNorm(DIM, eps=1e-6)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.ln(tokens[:, 0]))


def torch_from_keras(model: Any, attention: str) -> TorchViT:
    """Returns a ``TorchViT`` holding the Keras ViT's weights (eval mode).

    Keras kernels are ``(in, out)`` where torch's ``Linear`` weights are ``(out, in)``; the conv
    kernel ``(4, 4, 3, D)`` becomes ``(D, 3, 4, 4)``. Keras's query/key/value kernels
    ``(D, heads, head_dim)`` flatten to ``(D, D)`` with the heads major, the split
    ``nn.MultiheadAttention`` and the ``reshape`` above both make; the output kernel
    ``(heads, head_dim, D)`` flattens the same way.
    """
    vit = TorchViT(attention)

    def weights(name: str) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(w, dtype=np.float32)) for w in model.get_layer(name).get_weights()]

    def dense(layer: nn.Linear, kernel: torch.Tensor, bias: torch.Tensor) -> None:
        layer.weight.copy_(kernel.T)
        layer.bias.copy_(bias.reshape(-1))

    with torch.no_grad():
        kernel, bias = weights("embed")
        vit.embed.weight.copy_(kernel.permute(3, 2, 0, 1))
        vit.embed.bias.copy_(bias)
        cls, pos = weights("tokens")
        vit.cls.copy_(cls)
        vit.pos.copy_(pos)
        for index, block in enumerate(vit.blocks):
            for norm, name in ((block.ln1, "ln1"), (block.ln2, "ln2")):
                scale, shift = weights(f"block{index}_{name}")
                norm.weight.copy_(scale)
                norm.bias.copy_(shift)
            wq, bq, wk, bk, wv, bv, wo, bo = weights(f"block{index}_attn")
            # Keras's (D, heads, head_dim) → (D, D), heads major; the output kernel likewise.
            q, k, v = (w.reshape(DIM, DIM) for w in (wq, wk, wv))
            out = wo.reshape(DIM, DIM)
            if attention == "sdpa":
                attn = block.attn
                assert isinstance(attn, SdpaAttention)
                for layer, w, b in ((attn.query, q, bq), (attn.key, k, bk), (attn.value, v, bv), (attn.out, out, bo)):
                    dense(layer, w, b)
            else:
                mha = block.attn.mha
                assert isinstance(mha, nn.MultiheadAttention)
                mha.in_proj_weight.copy_(torch.cat([q.T, k.T, v.T]))
                mha.in_proj_bias.copy_(torch.cat([bq.reshape(-1), bk.reshape(-1), bv.reshape(-1)]))
                mha.out_proj.weight.copy_(out.T)
                mha.out_proj.bias.copy_(bo)
            dense(block.fc1, *weights(f"block{index}_fc1"))
            dense(block.fc2, *weights(f"block{index}_fc2"))
        scale, shift = weights("ln")
        vit.ln.weight.copy_(scale)
        vit.ln.bias.copy_(shift)
        dense(vit.head, *weights("head"))
    return vit.eval()
