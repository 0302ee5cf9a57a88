"""JAX: anycam's jitted Grad-CAM against a jitted forward of the same Flax network and batch.

The network is a Flax linen ResNet-50 (bottleneck blocks [3, 4, 6, 3], BatchNorm in inference
mode) defined here; random weights do not change the cost. Weights are drawn with NumPy from
the shapes of ``model.init``: compiling Flax's initialisers would take longer than the
benchmark.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import anycam

from .timing import interleaved, row


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = nn.BatchNorm(use_running_average=not train)
        out = self.planes * 4
        identity = x
        if self.stride != 1 or x.shape[-1] != out:
            identity = nn.BatchNorm(use_running_average=not train)(nn.Conv(out, (1, 1), self.stride, use_bias=False)(x))
        y = nn.relu(norm(nn.Conv(self.planes, (1, 1), use_bias=False)(x)))
        y = nn.relu(
            nn.BatchNorm(use_running_average=not train)(
                nn.Conv(self.planes, (3, 3), self.stride, padding=1, use_bias=False)(y)
            )
        )
        y = nn.BatchNorm(use_running_average=not train)(nn.Conv(out, (1, 1), use_bias=False)(y))
        return nn.relu(y + identity)


class Stage(nn.Module):
    planes: int
    blocks: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for index in range(self.blocks):
            x = Bottleneck(self.planes, self.stride if index == 0 else 1)(x, train)
        return x


class ResNet50(nn.Module):
    classes: int = 1000
    width: int = 64
    blocks: tuple[int, ...] = (3, 4, 6, 3)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(self.width, (7, 7), 2, padding=3, use_bias=False, name="conv1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for index, (blocks, stride) in enumerate(zip(self.blocks, (1, 2, 2, 2), strict=True)):
            x = Stage(self.width * 2**index, blocks, stride, name=f"layer{index + 1}")(x, train)
        return nn.Dense(self.classes, name="fc")(x.mean((1, 2)))


def random_variables(model: nn.Module, x: jax.Array, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if "var" in jax.tree_util.keystr(path) or "scale" in jax.tree_util.keystr(path):
            return jnp.ones(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        return jnp.asarray(rng.normal(size=leaf.shape).astype(np.float32) / np.sqrt(fan_in))

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(model.init, jax.random.key(0), x))


def run(quick: bool = False) -> list[dict]:
    size, batch, repeats, width = (64, 2, 2, 16) if quick else (224, 8, 5, 64)
    model = ResNet50(width=width, blocks=(1, 1, 1, 1) if quick else (3, 4, 6, 3))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(batch, size, size, 3)).astype(np.float32))
    variables = random_variables(model, x)
    name = "Flax ResNet-50-shaped (random init)" + (" (quick: width 16, one block per stage)" if quick else "")
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    explainer = anycam.Explainer((model, variables), "layer4", model_kwargs={"train": False})
    layer3 = anycam.Explainer((model, variables), "layer3", model_kwargs={"train": False})
    k10 = np.tile(np.arange(10), (batch, 1))
    cases = {
        "forward": lambda: jax.block_until_ready(forward(variables, x)),
        "layer4": lambda: explainer(x),
        "layer4 K=10": lambda: explainer(x, target=k10),
        "layer3": lambda: layer3(x),
    }
    times = interleaved(cases, repeats)
    base, label = times["forward"], "jitted forward"
    return [
        row("jax", name, "Grad-CAM last stage (layer4)", batch, times["layer4"], label, base),
        row("jax", name, "Grad-CAM layer3", batch, times["layer3"], label, base),
        row(
            "jax",
            name,
            "Grad-CAM layer4, K=10 maps per sample",
            batch,
            times["layer4 K=10"],
            "one map (layer4)",
            times["layer4"],
        ),
    ]


if __name__ == "__main__":
    for r in run():
        print(r)
