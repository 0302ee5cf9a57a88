"""Issue 22: attention capture in plain torch: MultiheadAttention, TransformerEncoder, scaled_dot_product_attention.

The oracle is written here with plain torch ops: every block's multi-head attention spelt out
(softmax(q kᵀ/√d) per head, checked to give the model's logits) and ``torch.autograd.grad`` on
those probabilities.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from anycam.backends.torch.attention import AttentionMode, explicit_sdpa
from torch import nn

import anycam


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        # need_weights=False: PyTorch's fused path (scaled_dot_product_attention / fast path).
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A ViT with a class token: 4 × 4 patches of 4 pixels, 3 blocks of nn.MultiheadAttention."""

    def __init__(self, width: int = 16, heads: int = 2, depth: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 17, width) * 0.5)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def heads_attention(attn: nn.MultiheadAttention, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.MultiheadAttention spelt out with plain ops: (output, per-head softmax(q kᵀ/√d) (N, H, T, T))."""
    n, t, width = h.shape
    heads = attn.num_heads
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (z.reshape(n, t, heads, width // heads).transpose(1, 2) for z in (q, k, v))
    probabilities = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(width // heads), dim=-1)
    merged = (probabilities @ v).transpose(1, 2).reshape(n, t, width)
    return attn.out_proj(merged), probabilities


def reference(model: TinyViT, x: torch.Tensor, targets: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The forward spelt out with every block's attention by hand; ∂score/∂A by autograd."""
    h = model.embed(x)
    attentions = []
    for block in model.blocks:
        normed = block.norm1(h)
        out, probabilities = heads_attention(block.attn, normed)
        attentions.append(probabilities)
        h = h + out
        h = h + block.mlp(block.norm2(h))
    logits = model.head(model.norm(h)[:, 0])
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)  # the spelt-out forward is the model's
    scores = logits.gather(1, targets)
    columns = [torch.autograd.grad(scores[:, k].sum(), attentions, retain_graph=True) for k in range(targets.shape[1])]
    grads = [torch.stack([c[b] for c in columns], dim=1) for b in range(len(attentions))]
    return [a.detach() for a in attentions], grads


def rollout_map(attentions: list[torch.Tensor]) -> torch.Tensor:
    rolled = torch.eye(attentions[0].shape[-1], dtype=torch.float64)
    for attention in attentions:
        step = attention.double().mean(dim=1) + torch.eye(attention.shape[-1], dtype=torch.float64)
        rolled = (step / step.sum(dim=-1, keepdim=True)) @ rolled
    return rolled[:, 0, 1:].reshape(-1, 4, 4)


def chefer_map(attentions: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    n, k, t = grads[0].shape[0], grads[0].shape[1], attentions[0].shape[-1]
    relevance = torch.eye(t, dtype=torch.float64).expand(n, k, t, t)
    for attention, grad in zip(attentions, grads, strict=True):
        relevance = relevance + (grad.double() * attention.double()[:, None]).clamp(min=0).mean(dim=2) @ relevance
    return relevance[:, :, 0, 1:].reshape(n, k, 4, 4)


@pytest.fixture()
def vit() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT().eval()


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_multihead_attention_vit_rollout_and_attention_grad_equal_the_oracle(vit: TinyViT) -> None:
    targets = torch.tensor([[1, 4], [0, 2]])
    attentions, grads = reference(vit, X, targets)
    rollout = anycam.Explainer(vit, method="rollout", normalize=None).explain(X, target=targets.numpy())
    chefer = anycam.Explainer(vit, method="attention-grad", normalize=None).explain(X, target=targets.numpy())
    expected_rollout = rollout_map(attentions).numpy()
    for k in range(2):
        np.testing.assert_allclose(rollout.cam[:, k], expected_rollout, rtol=1e-5, atol=1e-7)
    expected = chefer_map(attentions, grads).numpy()
    np.testing.assert_allclose(chefer.cam, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert chefer.layer == ("blocks.0.attn", "blocks.1.attn", "blocks.2.attn")


def test_the_caller_of_multihead_attention_gets_what_it_asked_for() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        plain = {flags: mha(x, x, x, need_weights=flags[0], average_attn_weights=flags[1]) for flags in
                 [(False, True), (True, True), (True, False)]}  # fmt: skip
        with AttentionMode() as mode:
            seen = {flags: mha(x, x, x, need_weights=flags[0], average_attn_weights=flags[1]) for flags in plain}
    for flags, (output, weights) in plain.items():
        torch.testing.assert_close(seen[flags][0], output, rtol=1e-5, atol=1e-6)
        if weights is None:
            assert seen[flags][1] is None
        else:
            torch.testing.assert_close(seen[flags][1], weights)
    assert mode.shapes == [(2, 2, 5, 5)] * 3 and [tuple(a.shape) for a in mode.attentions] == [(4, 5, 5)] * 3


def test_transformer_encoder_fast_path_is_replaced_by_the_explicit_form() -> None:
    """nn.TransformerEncoder in eval under no_grad takes a fused fast path; in the mode the outputs agree."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        fused = encoder(x)
        with AttentionMode() as mode:
            explicit = encoder(x)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    assert len(mode.attentions) == 2
    # The rows of the recorded probabilities sum to 1: they are the softmax, not logits.
    torch.testing.assert_close(mode.attentions[0].reshape(mode.shapes[0]).sum(-1), torch.ones(2, 2, 7))


@pytest.mark.parametrize(
    "case", ["plain", "bool mask", "float mask", "causal", "scale", "gqa"]
)  # fmt: skip
def test_explicit_sdpa_equals_the_fused_kernel(case: str) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    kwargs: dict[str, object] = {}
    if case == "bool mask":
        kwargs["attn_mask"] = (torch.rand(6, 6, generator=g) > 0.3) | torch.eye(6, dtype=torch.bool)
    elif case == "float mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 6, 6, generator=g)
    elif case == "causal":
        kwargs["is_causal"] = True
    elif case == "scale":
        kwargs["scale"] = 0.3
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    fused = F.scaled_dot_product_attention(q, k, v, **kwargs)  # type: ignore[arg-type]
    output, probabilities = explicit_sdpa(q, k, v, **kwargs)  # type: ignore[arg-type]
    torch.testing.assert_close(output, fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 4, 6))
    if case == "plain":
        # By hand: softmax(q kᵀ / √d).
        expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
        torch.testing.assert_close(probabilities, expected)


class SdpaViT(TinyViT):
    """Blocks that call F.scaled_dot_product_attention themselves (timm's fused path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            h = block.norm1(x)
            attn = block.attn
            qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).reshape(len(x), -1, 3, 2, 8)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(len(x), -1, 16)
            x = x + attn.out_proj(y)
            x = x + block.mlp(block.norm2(x))
        return self.head(self.norm(x)[:, 0])


def test_a_model_calling_sdpa_itself_gives_the_multihead_attention_models_maps(vit: TinyViT) -> None:
    # The same weights: SdpaViT computes what TinyViT computes, through F.scaled_dot_product_attention.
    other = SdpaViT().eval()
    other.load_state_dict(vit.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(X), vit(X), rtol=1e-5, atol=1e-5)
    targets = torch.tensor([[3], [1]])
    attentions, grads = reference(vit, X, targets)
    result = anycam.Explainer(other, method="attention-grad", normalize=None).explain(X, target=[3, 1])
    expected = chefer_map(attentions, grads)[:, 0].numpy()
    np.testing.assert_allclose(result.cam, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_frozen_parameters_still_give_attention_gradients(vit: TinyViT) -> None:
    targets = torch.tensor([[2], [2]])
    attentions, grads = reference(vit, X, targets)
    for p in vit.parameters():
        p.requires_grad_(False)
    result = anycam.Explainer(vit, method="attention-grad", normalize=None).explain(X, target=2)
    expected = chefer_map(attentions, grads)[:, 0].numpy()
    np.testing.assert_allclose(result.cam, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert all(not p.requires_grad and p.grad is None for p in vit.parameters())


class RaisesAfterAttention(TinyViT):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0](self.embed(x))
        raise ValueError("boom")


@pytest.mark.parametrize("method", ["rollout", "attention-grad"])
def test_a_model_that_raises_keeps_its_exception_and_is_left_as_it_was(method: str) -> None:
    torch.manual_seed(0)
    model = RaisesAfterAttention().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match="boom"):
        anycam.Explainer(model, method=method).explain(X)
    assert {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()} == hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # No mode is left on the stack: F.scaled_dot_product_attention is the fused kernel again.
    assert torch._C._len_torch_function_stack() == 0
    assert all(p.grad is None for p in model.parameters())


def test_a_model_in_training_mode_keeps_its_flags(vit: TinyViT) -> None:
    vit.train()
    vit.blocks[1].eval()
    flags = {name: m.training for name, m in vit.named_modules()}
    with pytest.warns(anycam.AnycamWarning):
        anycam.Explainer(vit, method="attention-grad").explain(X)
    assert {name: m.training for name, m in vit.named_modules()} == flags


def test_a_model_without_attention_is_told_so() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with pytest.raises(anycam.InputError, match="no attention call"):
        anycam.Explainer(model, method="rollout").explain(X)
