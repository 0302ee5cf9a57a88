"""JAX: anycam's jitted Grad-CAM against a jitted forward of the same Flax network and batch.

The network is a Flax linen ResNet-50 (bottleneck blocks [3, 4, 6, 3], BatchNorm in inference
mode) defined here; random weights do not change the cost. Weights are drawn with NumPy from
the shapes of ``model.init``: compiling Flax's initialisers would take longer than the
benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import anycam
from anycam.explain.assembly import explanation

from .timing import DeviceUnavailable, interleaved, memory_row, peak_in_subprocess, peak_of, phase_rows, row


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


def _setup(quick: bool, device: str = "cpu", batch: int | None = None) -> tuple[nn.Module, dict, jax.Array, int, str]:
    size, default_batch, repeats, width = (64, 2, 2, 16) if quick else (224, 8, 5, 64)
    platform = "gpu" if device.startswith("cuda") else device
    try:
        target = jax.devices(platform)[0]
    except RuntimeError as exc:
        raise DeviceUnavailable(f"JAX {jax.__version__} has no {platform} device ({exc})") from exc
    model = ResNet50(width=width, blocks=(1, 1, 1, 1) if quick else (3, 4, 6, 3))
    shape = (batch or default_batch, size, size, 3)
    x = jax.device_put(jnp.asarray(np.random.default_rng(1).normal(size=shape).astype(np.float32)), target)
    variables = jax.device_put(random_variables(model, x), target)
    name = "Flax ResNet-50-shaped (random init)" + (" (quick: width 16, one block per stage)" if quick else "")
    return model, variables, x, repeats, name + ("" if device == "cpu" else f", {device}")


def _forward(model: nn.Module, variables: dict, x: jax.Array) -> Callable[[], object]:
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return lambda: jax.block_until_ready(forward(variables, x))


def memory_case(case: str, quick: bool) -> int:
    """The peak resident memory (bytes) one call of ``case`` adds, after a warm-up call."""
    model, variables, x, _, _ = _setup(quick)
    if case == "forward":
        return peak_of(_forward(model, variables, x))
    explainer = anycam.Explainer((model, variables), "layer4", model_kwargs={"train": False})
    return peak_of(lambda: explainer(x))


def _copier(shapes: Sequence[tuple[int, ...]]) -> Callable[[], object]:
    arrays = [jnp.ones(shape, jnp.float32) for shape in shapes]
    # What the adapter does with the captured arrays: one jax.device_get.
    return lambda: jax.device_get(arrays)


def phases(
    quick: bool = False, device: str = "cpu", batch: int | None = None, repeats: int | None = None
) -> list[dict]:
    """Where a Grad-CAM call's time goes (forward, tapping, gradients, copy, core) at layer4."""
    model, variables, x, default_repeats, name = _setup(quick, device, batch)
    repeats = repeats or default_repeats
    explainer = anycam.Explainer((model, variables), "layer4", model_kwargs={"train": False})
    with jax.default_device(x.devices().pop()):
        return phase_rows(
            "jax",
            name,
            x.shape[0],
            forward=_forward(model, variables, x),
            explainer=explainer,
            inputs=x,
            copier=_copier,
            repeats=repeats,
        )


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    memory = device == "cpu"
    mem = {case: peak_in_subprocess("bench_jax", case, (quick,)) for case in ("forward", "layer4")} if memory else {}
    model, variables, x, repeats, name = _setup(quick, device)
    batch = x.shape[0]
    explainer = anycam.Explainer((model, variables), "layer4", model_kwargs={"train": False})
    layer3 = anycam.Explainer((model, variables), "layer3", model_kwargs={"train": False})
    k10 = np.tile(np.arange(10), (batch, 1))
    cases = {
        "forward": _forward(model, variables, x),
        "layer4": lambda: explainer(x),
        "layer4 K=10": lambda: explainer(x, target=k10),
        "layer3": lambda: layer3(x),
        "layer3 K=10": lambda: layer3(x, target=k10),
    }
    times = interleaved(cases, repeats)
    spec = anycam.core.parse_target(None)
    capture = explainer.backend.capture(x, spec)
    core_time = interleaved({"core": lambda: explanation(explainer, capture, spec)}, repeats)["core"]
    base, label = times["forward"], "jitted forward"
    rows = [
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
        row(
            "jax",
            name,
            "Grad-CAM layer3, K=10 maps per sample",
            batch,
            times["layer3 K=10"],
            "one map (layer3)",
            times["layer3"],
        ),
        row(
            "jax",
            name,
            f"core math (weights → {x.shape[1]}² heatmap), layer4",
            batch,
            core_time,
            "whole Grad-CAM call",
            times["layer4"],
        ),
    ]
    if memory:
        rows.append(memory_row("jax", name, "Grad-CAM layer4", batch, mem["layer4"], "jitted forward", mem["forward"]))
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
