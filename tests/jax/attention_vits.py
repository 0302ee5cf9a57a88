"""Small ViTs in Flax linen, Flax NNX and Equinox, and their oracle: a ViT written in plain ``jnp``.

Each ViT: 16×16×3 input, 4×4 patches (a reshape and a dense patch embedding), a class token,
learned positions, 2 pre-norm blocks of 2-head self-attention and a GELU MLP, the class token
into a 5-class head. ``canonical_*`` reads a model's weights into one dict; ``oracle`` runs that
dict with the softmax written out and a zero ``delta`` added to each block's probabilities, so
``jax.grad`` over the deltas is ∂score/∂A — independent of anycam.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DIM, HEADS, BLOCKS, CLASSES, PATCH, SIDE = 16, 2, 2, 5, 4, 16
TOKENS = 1 + (SIDE // PATCH) ** 2


def patchify(x: jax.Array) -> jax.Array:
    """(N, H, W, C) → (N, patches, P·P·C), patches row-major, features (row, column, channel)."""
    n, h, w, c = x.shape
    grid = x.reshape(n, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(n, (h // PATCH) * (w // PATCH), PATCH * PATCH * c)


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def oracle(p: dict[str, Any], x: jax.Array, deltas: Any = None) -> tuple[jax.Array, list[jax.Array]]:
    """Returns (logits (N, classes), attention probabilities per block (N, H, T, T)); x is NHWC."""
    eps = p["eps"]
    tokens = patchify(x) @ p["embed_w"] + p["embed_b"]
    cls = jnp.broadcast_to(p["cls"], (x.shape[0], 1, DIM))
    tokens = jnp.concatenate([cls, tokens], axis=1) + p["pos"]
    probabilities = []
    for index, block in enumerate(p["blocks"]):
        h = _layer_norm(tokens, block["ln1_s"], block["ln1_b"], eps)
        q = jnp.einsum("ntd,dhk->nthk", h, block["wq"]) + block["bq"]
        k = jnp.einsum("ntd,dhk->nthk", h, block["wk"]) + block["bk"]
        v = jnp.einsum("ntd,dhk->nthk", h, block["wv"]) + block["bv"]
        logits = jnp.einsum("nqhk,nshk->nhqs", q, k) / np.sqrt(q.shape[-1])
        shifted = jnp.exp(logits - logits.max(-1, keepdims=True))
        a = shifted / shifted.sum(-1, keepdims=True)
        probabilities.append(a)
        if deltas is not None:
            a = a + deltas[index]
        o = jnp.einsum("nhqs,nshk->nqhk", a, v)
        tokens = tokens + jnp.einsum("nqhk,hkd->nqd", o, block["wo"]) + block["bo"]
        h = _layer_norm(tokens, block["ln2_s"], block["ln2_b"], eps)
        tokens = tokens + jax.nn.gelu(h @ block["w1"] + block["b1"]) @ block["w2"] + block["b2"]
    head = _layer_norm(tokens[:, 0], p["ln_s"], p["ln_b"], eps)
    return head @ p["head_w"] + p["head_b"], probabilities


def oracle_gradients(p: dict[str, Any], x: jax.Array, classes: np.ndarray) -> list[np.ndarray]:
    """Returns ∂ logit[n, classes[n, k]] / ∂A per block, (N, K, H, T, T), by jax.grad of the oracle."""
    zeros = [jnp.zeros((x.shape[0], HEADS, TOKENS, TOKENS), jnp.float32) for _ in p["blocks"]]
    columns = []
    for k in range(classes.shape[1]):
        picked = jnp.asarray(classes[:, k])

        def score(deltas: Any, picked: jax.Array = picked) -> jax.Array:
            logits, _ = oracle(p, x, deltas)
            return jnp.take_along_axis(logits, picked[:, None], axis=1).sum()

        columns.append(jax.grad(score)(zeros))
    return [np.stack([np.asarray(c[b]) for c in columns], axis=1) for b in range(len(p["blocks"]))]


def images(n: int = 3, seed: int = 0, channels_first: bool = False) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, SIDE, SIDE, 3)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if channels_first else x


# -- Flax NNX ----------------------------------------------------------------------------------


def nnx_vit(seed: int = 0) -> Any:
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.ln1 = nnx.LayerNorm(DIM, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=DIM, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(DIM, rngs=rngs)
            self.fc1 = nnx.Linear(DIM, 2 * DIM, rngs=rngs)
            self.fc2 = nnx.Linear(2 * DIM, DIM, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            x = x + self.attn(self.ln1(x))
            return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))

    class ViT(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.embed = nnx.Linear(PATCH * PATCH * 3, DIM, rngs=rngs)
            self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, DIM)))
            self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, TOKENS, DIM)))
            self.blocks = nnx.List([Block(rngs) for _ in range(BLOCKS)])
            self.ln = nnx.LayerNorm(DIM, rngs=rngs)
            self.head = nnx.Linear(DIM, CLASSES, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            tokens = self.embed(patchify(x))
            cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, DIM))
            tokens = jnp.concatenate([cls, tokens], axis=1) + self.pos[...]
            for block in self.blocks:
                tokens = block(tokens)
            return self.head(self.ln(tokens[:, 0]))

    return ViT(nnx.Rngs(seed))


def canonical_nnx(model: Any) -> dict[str, Any]:
    def block(b: Any) -> dict[str, Any]:
        a = b.attn
        return {
            "ln1_s": b.ln1.scale[...], "ln1_b": b.ln1.bias[...], "ln2_s": b.ln2.scale[...], "ln2_b": b.ln2.bias[...],
            "wq": a.query.kernel[...], "bq": a.query.bias[...], "wk": a.key.kernel[...], "bk": a.key.bias[...],
            "wv": a.value.kernel[...], "bv": a.value.bias[...], "wo": a.out.kernel[...], "bo": a.out.bias[...],
            "w1": b.fc1.kernel[...], "b1": b.fc1.bias[...], "w2": b.fc2.kernel[...], "b2": b.fc2.bias[...],
        }  # fmt: skip

    return {
        "eps": model.ln.epsilon, "embed_w": model.embed.kernel[...], "embed_b": model.embed.bias[...],
        "cls": model.cls[...], "pos": model.pos[...], "blocks": [block(b) for b in model.blocks],
        "ln_s": model.ln.scale[...], "ln_b": model.ln.bias[...],
        "head_w": model.head.kernel[...], "head_b": model.head.bias[...],
    }  # fmt: skip


# -- Flax linen --------------------------------------------------------------------------------


def linen_vit(seed: int = 0) -> tuple[Any, Any]:
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(nn.LayerNorm(name="ln1")(x))
            h = nn.Dense(2 * DIM, name="fc1")(nn.LayerNorm(name="ln2")(x))
            return x + nn.Dense(DIM, name="fc2")(jax.nn.gelu(h))

    class ViT(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            tokens = nn.Dense(DIM, name="embed")(patchify(x))
            cls = self.param("cls", nn.initializers.normal(1.0), (1, 1, DIM))
            pos = self.param("pos", nn.initializers.normal(1.0), (1, TOKENS, DIM))
            tokens = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, DIM)), tokens], axis=1) + pos
            for index in range(BLOCKS):
                tokens = Block(name=f"block{index}")(tokens)
            return nn.Dense(CLASSES, name="head")(nn.LayerNorm(name="ln")(tokens[:, 0]))

    module = ViT()
    variables = module.init(jax.random.key(seed), jnp.zeros((1, SIDE, SIDE, 3)))
    return module, variables


def canonical_linen(variables: Any) -> dict[str, Any]:
    p = variables["params"]

    def block(b: Any) -> dict[str, Any]:
        a = b["attn"]
        return {
            "ln1_s": b["ln1"]["scale"], "ln1_b": b["ln1"]["bias"],
            "ln2_s": b["ln2"]["scale"], "ln2_b": b["ln2"]["bias"],
            "wq": a["query"]["kernel"], "bq": a["query"]["bias"], "wk": a["key"]["kernel"], "bk": a["key"]["bias"],
            "wv": a["value"]["kernel"], "bv": a["value"]["bias"], "wo": a["out"]["kernel"], "bo": a["out"]["bias"],
            "w1": b["fc1"]["kernel"], "b1": b["fc1"]["bias"], "w2": b["fc2"]["kernel"], "b2": b["fc2"]["bias"],
        }  # fmt: skip

    return {
        "eps": 1e-6, "embed_w": p["embed"]["kernel"], "embed_b": p["embed"]["bias"], "cls": p["cls"], "pos": p["pos"],
        "blocks": [block(p[f"block{i}"]) for i in range(BLOCKS)], "ln_s": p["ln"]["scale"], "ln_b": p["ln"]["bias"],
        "head_w": p["head"]["kernel"], "head_b": p["head"]["bias"],
    }  # fmt: skip


# -- Equinox -----------------------------------------------------------------------------------


def equinox_vit(seed: int = 0) -> Any:
    import equinox as eqx

    class Block(eqx.Module):
        ln1: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        ln2: eqx.nn.LayerNorm
        fc1: eqx.nn.Linear
        fc2: eqx.nn.Linear

        def __init__(self, key: jax.Array) -> None:
            k1, k2, k3 = jax.random.split(key, 3)
            self.ln1, self.ln2 = eqx.nn.LayerNorm(DIM), eqx.nn.LayerNorm(DIM)
            self.attn = eqx.nn.MultiheadAttention(
                HEADS, DIM, use_query_bias=True, use_key_bias=True, use_value_bias=True, use_output_bias=True, key=k1
            )
            self.fc1, self.fc2 = eqx.nn.Linear(DIM, 2 * DIM, key=k2), eqx.nn.Linear(2 * DIM, DIM, key=k3)

        def __call__(self, x: jax.Array) -> jax.Array:
            h = jax.vmap(self.ln1)(x)
            x = x + self.attn(h, h, h)
            h = jax.vmap(self.ln2)(x)
            return x + jax.vmap(self.fc2)(jax.nn.gelu(jax.vmap(self.fc1)(h)))

    class ViT(eqx.Module):
        embed: eqx.nn.Linear
        cls: jax.Array
        pos: jax.Array
        blocks: list[Any]
        ln: eqx.nn.LayerNorm
        head: eqx.nn.Linear

        def __init__(self, key: jax.Array) -> None:
            keys = jax.random.split(key, 4 + BLOCKS)
            self.embed = eqx.nn.Linear(PATCH * PATCH * 3, DIM, key=keys[0])
            self.cls = jax.random.normal(keys[1], (1, DIM))
            self.pos = jax.random.normal(keys[2], (TOKENS, DIM))
            self.blocks = [Block(k) for k in keys[4:]]
            self.ln = eqx.nn.LayerNorm(DIM)
            self.head = eqx.nn.Linear(DIM, CLASSES, key=keys[3])

        def __call__(self, x: jax.Array) -> jax.Array:  # one sample, (C, H, W)
            patches = patchify(x.transpose(1, 2, 0)[None])[0]
            tokens = jnp.concatenate([self.cls, jax.vmap(self.embed)(patches)], axis=0) + self.pos
            for block in self.blocks:
                tokens = block(tokens)
            return self.head(self.ln(tokens[0]))

    return ViT(jax.random.key(seed))


def canonical_equinox(model: Any) -> dict[str, Any]:
    def heads(linear: Any) -> jax.Array:  # Linear(D → H·hd), weight (H·hd, D) → (D, H, hd)
        return linear.weight.T.reshape(DIM, HEADS, -1)

    def block(b: Any) -> dict[str, Any]:
        a = b.attn
        return {
            "ln1_s": b.ln1.weight, "ln1_b": b.ln1.bias, "ln2_s": b.ln2.weight, "ln2_b": b.ln2.bias,
            "wq": heads(a.query_proj), "bq": a.query_proj.bias.reshape(HEADS, -1),
            "wk": heads(a.key_proj), "bk": a.key_proj.bias.reshape(HEADS, -1),
            "wv": heads(a.value_proj), "bv": a.value_proj.bias.reshape(HEADS, -1),
            "wo": a.output_proj.weight.T.reshape(HEADS, -1, DIM), "bo": a.output_proj.bias,
            "w1": b.fc1.weight.T, "b1": b.fc1.bias, "w2": b.fc2.weight.T, "b2": b.fc2.bias,
        }  # fmt: skip

    return {
        "eps": model.ln.eps, "embed_w": model.embed.weight.T, "embed_b": model.embed.bias,
        "cls": model.cls[None], "pos": model.pos[None], "blocks": [block(b) for b in model.blocks],
        "ln_s": model.ln.weight, "ln_b": model.ln.bias, "head_w": model.head.weight.T, "head_b": model.head.bias,
    }  # fmt: skip
