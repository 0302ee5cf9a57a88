"""JAX, the methods beyond one capture: Ablation-CAM, Guided Grad-CAM, Score-CAM.

On the Flax ResNet-50 of ``bench_jax`` (random weights), batch 8 at 224², CPU:

* Ablation-CAM at the last stage (``layer4``) against a jitted forward: ``layer4`` is read only
  by the global mean pooling, so ``ablation_head`` reads pooling → dense → tail from the
  suffix's jaxpr; the ablated copies' logits are the closed form z − p_k W_k, and only the
  tail (bias, target gather) runs vmapped over the copies. The call is one forward pass (the
  capture) plus that.
* Guided Grad-CAM at ``layer4`` against a jitted forward plus a full input-gradient backward.
* Score-CAM on a narrower net (width 16, 512 channels at ``layer4``, one 224² image) at
  ``batch_size=16``, against the floor: a jitted forward over the same 512 masked images in
  chunks of 16 written by hand. Its peak memory, measured in fresh interpreters, is compared with
  that of one jitted forward of a 16-image chunk.

``python -m tests.benchmarks jax_methods``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import anycam

from .bench_jax import ResNet50, random_variables
from .timing import interleaved, memory_row, peak_in_subprocess, peak_of, row

SCORECAM_BATCH = 16


def _setup(width: int, size: int, batch: int, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> tuple:
    model = ResNet50(width=width, blocks=blocks)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(batch, size, size, 3)).astype(np.float32))
    return model, random_variables(model, x), x


def _scorecam_config(quick: bool) -> tuple[int, int, int]:
    return (8, 64, 1) if quick else (16, 224, 1)


def memory_case(case: str, quick: bool) -> int:
    """Returns the peak resident memory (bytes) one Score-CAM call (or one chunk's forward) adds."""
    width, size, batch = _scorecam_config(quick)
    model, variables, x = _setup(width, size, batch, (1, 1, 1, 1) if quick else (3, 4, 6, 3))
    forward = jax.jit(lambda v, images: model.apply(v, images))

    def call(images: jax.Array) -> None:
        if case == "forward":  # one chunk's forward: what Score-CAM's peak should be bounded by
            jax.block_until_ready(forward(variables, jnp.repeat(images, SCORECAM_BATCH, axis=0)))
        else:
            explainer = anycam.Explainer(
                (model, variables), "layer4", method="scorecam", batch_size=SCORECAM_BATCH, progress=False
            )
            explainer(images)

    return peak_of(lambda: call(x))


def run(quick: bool = False) -> list[dict]:
    mem = {case: peak_in_subprocess("bench_jax_methods", case, (quick,)) for case in ("forward", "scorecam")}
    rows: list[dict] = []

    width, size, batch, repeats = (16, 64, 2, 2) if quick else (64, 224, 8, 3)
    model, variables, x = _setup(width, size, batch, (1, 1, 1, 1) if quick else (3, 4, 6, 3))
    name = "Flax ResNet-50-shaped (random init)" + (" (quick: width 16, one block per stage)" if quick else "")
    forward = jax.jit(lambda v, images: model.apply(v, images))

    @jax.jit
    def input_gradient(v: dict, images: jax.Array) -> jax.Array:
        def score(inputs: jax.Array) -> jax.Array:
            out = model.apply(v, inputs)
            return jnp.take_along_axis(out, jnp.argmax(out, 1)[:, None], 1).sum()

        return jax.grad(score)(images)

    ablation = anycam.Explainer((model, variables), "layer4", method="ablationcam", progress=False)
    guided = anycam.Explainer((model, variables), "layer4", method="guided-gradcam")
    times = interleaved(
        {
            "forward": lambda: jax.block_until_ready(forward(variables, x)),
            "ablationcam": lambda: ablation(x),
            "input gradient": lambda: jax.block_until_ready(input_gradient(variables, x)),
            "guided-gradcam": lambda: guided(x),
        },
        repeats,
    )
    rows.append(
        row("jax", name, "Ablation-CAM layer4", batch, times["ablationcam"], "jitted forward", times["forward"])
    )
    rows.append(
        row(
            "jax",
            name,
            "Guided Grad-CAM layer4",
            batch,
            times["guided-gradcam"],
            "jitted forward + full input-gradient backward",
            times["input gradient"],
        )
    )

    width, size, batch = _scorecam_config(quick)
    model, variables, x = _setup(width, size, batch, (1, 1, 1, 1) if quick else (3, 4, 6, 3))
    name = f"Flax ResNet-50-shaped, width {width}, {size}²"
    forward = jax.jit(lambda v, images: model.apply(v, images))
    explainer = anycam.Explainer(
        (model, variables), "layer4", method="scorecam", batch_size=SCORECAM_BATCH, progress=False
    )
    capture = explainer.backend.capture(x, anycam.core.parse_target(None), gradients=False)
    channels = capture.activations[0].shape[-1]
    masked = np.repeat(np.asarray(x), SCORECAM_BATCH, axis=0)  # the floor's inputs: same shapes

    def floor() -> None:
        for _ in range(0, channels, SCORECAM_BATCH):
            jax.block_until_ready(forward(variables, masked))

    times = interleaved({"scorecam": lambda: explainer(x), "floor": floor}, 1 if quick else 2)
    rows.append(
        row(
            "jax",
            name,
            f"Score-CAM layer4 ({channels} channels), batch_size={SCORECAM_BATCH}",
            batch,
            times["scorecam"],
            f"{channels} masked forwards in jitted chunks of {SCORECAM_BATCH} (the floor)",
            times["floor"],
        )
    )
    label = f"jitted forward of one chunk ({SCORECAM_BATCH} images)"
    rows.append(memory_row("jax", name, "Score-CAM", batch, mem["scorecam"], label, mem["forward"]))
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
