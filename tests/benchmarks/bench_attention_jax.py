"""Flax NNX, the attention methods against inference (run from ``bench_attention``).

A ViT-B/16-shaped ``nnx.Module`` on ``nnx.MultiHeadAttention`` (its default attention function
takes the fused ``jax.nn.dot_product_attention`` path), NHWC input, patches by reshape and a
dense embedding. Baselines: the jitted forward (inference) and the jitted gradient of the top
score to the input (forward+backward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .bench_attention import memory_of, report, vit_shape
from .timing import DeviceUnavailable


def build(quick: bool) -> tuple[Any, np.ndarray]:
    from flax import nnx

    s = vit_shape(quick)
    width, heads, patch, grid = s["width"], s["heads"], s["patch"], s["side"] // s["patch"]
    tokens = 1 + grid * grid

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.ln1 = nnx.LayerNorm(width, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=width, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(width, rngs=rngs)
            self.fc1 = nnx.Linear(width, s["mlp"], rngs=rngs)
            self.fc2 = nnx.Linear(s["mlp"], width, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            x = x + self.attn(self.ln1(x))
            return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))

    class ViT(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.embed = nnx.Linear(patch * patch * 3, width, rngs=rngs)
            self.cls = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, width)))
            self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, width)))
            self.blocks = nnx.List([Block(rngs) for _ in range(s["blocks"])])
            self.ln = nnx.LayerNorm(width, rngs=rngs)
            self.head = nnx.Linear(width, s["classes"], rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            n = x.shape[0]
            p = x.reshape(n, grid, patch, grid, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, -1)
            t = self.embed(p)
            t = jnp.concatenate([jnp.broadcast_to(self.cls[...], (n, 1, width)), t], axis=1) + self.pos[...]
            for block in self.blocks:
                t = block(t)
            return self.head(self.ln(t[:, 0]))

    model = ViT(nnx.Rngs(0))
    images = np.random.default_rng(0).normal(size=(s["batch"], s["side"], s["side"], 3)).astype(np.float32)
    return model, images


def calls(model: Any) -> dict[str, Callable[[Any], object]]:
    """The four cases as functions of the input (one set of jitted functions and Explainers)."""
    from flax import nnx

    import anycam

    graph, state = nnx.split(model)

    @jax.jit
    def forward(state: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graph, state)(x)

    @jax.jit
    def forward_backward(state: Any, x: jax.Array) -> jax.Array:
        return jax.grad(lambda x: nnx.merge(graph, state)(x).max(axis=1).sum())(x)

    rollout = anycam.Explainer(model, None, method="rollout")
    grad = anycam.Explainer(model, None, method="attention-grad")
    return {
        "inference": lambda x: jax.block_until_ready(forward(state, jnp.asarray(x))),
        "forward+backward": lambda x: jax.block_until_ready(forward_backward(state, jnp.asarray(x))),
        "rollout": lambda x: rollout.explain(x).heatmap,
        "attention-grad": lambda x: grad.explain(x).heatmap,
    }


def memory_case(case: str, quick: bool) -> int:
    """The peak resident memory (bytes) one call of ``case`` adds, in this fresh interpreter."""
    from .timing import peak_of

    model, images = build(quick)
    fn = calls(model)[case]
    return peak_of(lambda: fn(images))


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    if device != "cpu" and jax.default_backend() == "cpu":
        raise DeviceUnavailable("JAX sees no accelerator")
    s = vit_shape(quick)
    memory = memory_of("bench_attention_jax", quick) if device == "cpu" else {}
    model, images = build(quick)
    name = ("ViT-B/16-shaped" if not quick else "tiny ViT") + f" {s['side']}², Flax NNX MultiHeadAttention"
    cases = {case: (lambda fn=fn: fn(images)) for case, fn in calls(model).items()}
    return report("flax-nnx", name, s["batch"], cases, s["repeats"], memory)
