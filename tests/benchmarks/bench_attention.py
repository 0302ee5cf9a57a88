"""The attention methods against inference, in torch, Keras 3 (TensorFlow) and Flax NNX, in one run.

Each framework: a ViT-B/16-shaped model (12 blocks, 12 heads, width 768, MLP 3072, 224², a class
token, random weights: they do not change the cost), batch 8, its attention in the framework's
fused form — Hugging Face ``ViTForImageClassification`` with ``attn_implementation="sdpa"``, a
Keras ViT built from ``MultiHeadAttention`` (``bench_attention_keras``), a Flax NNX ViT on
``nnx.MultiHeadAttention`` (``bench_attention_jax``). Four cases, measured interleaved:

* ``inference``: one forward that keeps nothing (``inference_mode``, a compiled Keras call, a
  jitted NNX call) — the issue's baseline;
* ``forward+backward``: one forward and one backward of the top score to the input, attention
  fused — the least any gradient method pays (a backward needs the forward's activations), given
  as a second baseline for attention-grad;
* ``rollout``, ``attention-grad``: ``Explainer(...).explain(x)``, the whole call.

Peak memory per case: in a fresh interpreter each (CPU: resident memory above what the process
held before the call, ``timing.peak_of``; CUDA: ``max_memory_allocated``), ratios against both
baselines. For scale, the attention maps of all blocks with every head are N·L·H·T² floats.

``python -m tests.benchmarks attention [--quick] [--threads 1 --clock cpu]`` (one framework:
``attention_torch``, ``attention_keras``, ``attention_jax``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .timing import DeviceUnavailable, interleaved, memory_row, peak_in_subprocess, row

CASES = ("inference", "forward+backward", "rollout", "attention-grad")


def vit_shape(quick: bool) -> dict[str, int]:
    """The model and batch sizes: ViT-B/16 at 224², batch 8 (quick: a tiny ViT, to check the code runs)."""
    if quick:
        return {"side": 64, "patch": 16, "width": 64, "blocks": 2, "heads": 4, "mlp": 128, "classes": 10,
                "batch": 2, "repeats": 2}  # fmt: skip
    return {"side": 224, "patch": 16, "width": 768, "blocks": 12, "heads": 12, "mlp": 3072, "classes": 1000,
            "batch": 8, "repeats": 3}  # fmt: skip


def maps_mb(shape: dict[str, int]) -> float:
    """N·L·H·T² float32 attention maps, in MB."""
    tokens = 1 + (shape["side"] // shape["patch"]) ** 2
    return shape["batch"] * shape["blocks"] * shape["heads"] * tokens**2 * 4 / 2**20


def report(
    framework: str,
    name: str,
    batch: int,
    cases: dict[str, Callable[[], object]],
    repeats: int,
    memory: dict[str, int],
) -> list[dict]:
    """Time ratios of every case against inference (and attention-grad against forward+backward); memory likewise."""
    times = interleaved(cases, repeats)
    rows = [row(framework, name, case, batch, times[case], "inference", times["inference"]) for case in CASES]
    rows.append(
        row(framework, name, "attention-grad", batch, times["attention-grad"], "forward+backward",
            times["forward+backward"])
    )  # fmt: skip
    for case in CASES:
        if case in memory:
            rows.append(memory_row(framework, name, case, batch, memory[case], "inference", memory["inference"]))
    if "attention-grad" in memory:
        rows.append(
            memory_row(framework, name, "attention-grad", batch, memory["attention-grad"], "forward+backward",
                       memory["forward+backward"])
        )  # fmt: skip
    return rows


def memory_of(module: str, quick: bool) -> dict[str, int]:
    """Each case's peak in its own fresh interpreter (one run each: every run builds a ViT-B)."""
    return {case: peak_in_subprocess(module, case, (quick,), repeats=1) for case in CASES}


# -- torch ----------------------------------------------------------------------------------------


def _torch_setup(quick: bool, device: str) -> tuple[Any, Any]:
    import torch
    import transformers

    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("torch sees no CUDA device")
    s = vit_shape(quick)
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=s["side"], patch_size=s["patch"], hidden_size=s["width"], num_hidden_layers=s["blocks"],
        num_attention_heads=s["heads"], intermediate_size=s["mlp"], num_labels=s["classes"],
        attn_implementation="sdpa",
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config).eval().to(device)
    return model, torch.randn(s["batch"], 3, s["side"], s["side"], device=device)


def _torch_cases(model: Any, x: Any) -> dict[str, Callable[[], object]]:
    import torch

    import anycam

    rollout = anycam.Explainer(model, method="rollout", output="logits")
    grad = anycam.Explainer(model, method="attention-grad", output="logits")
    inputs = {"pixel_values": x}

    def sync(value: Any) -> Any:
        if x.is_cuda:
            torch.cuda.synchronize()
        return value

    def inference() -> object:
        with torch.inference_mode():
            return sync(model(pixel_values=x).logits)

    def forward_backward() -> object:
        leaf = x.detach().requires_grad_()
        logits = model(pixel_values=leaf).logits
        return sync(torch.autograd.grad(logits.max(dim=1).values.sum(), leaf)[0])

    return {
        "inference": inference,
        "forward+backward": forward_backward,
        "rollout": lambda: sync(rollout.explain(inputs).heatmap),
        "attention-grad": lambda: sync(grad.explain(inputs).heatmap),
    }


def memory_case(case: str, quick: bool) -> int:
    """The peak resident memory (bytes) one call of ``case`` adds, in this fresh interpreter (torch)."""
    import torch

    from .timing import peak_of

    if "ANYCAM_BENCH_THREADS" in __import__("os").environ:
        torch.set_num_threads(int(__import__("os").environ["ANYCAM_BENCH_THREADS"]))
    model, x = _torch_setup(quick, "cpu")
    return peak_of(_torch_cases(model, x)[case])


def run_torch(quick: bool = False, device: str = "cpu") -> list[dict]:
    import os

    import torch

    if "ANYCAM_BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["ANYCAM_BENCH_THREADS"]))
    memory = memory_of("bench_attention", quick) if device == "cpu" else {}
    model, x = _torch_setup(quick, device)
    s = vit_shape(quick)
    name = (
        ("ViT-B/16-shaped" if not quick else "tiny ViT")
        + f" {s['side']}², HF sdpa"
        + ("" if device == "cpu" else f", {device}")
    )
    cases = _torch_cases(model, x)
    if device == "cuda":
        for case, fn in cases.items():
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            memory[case] = torch.cuda.max_memory_allocated() - before
    return report("torch", name, s["batch"], cases, s["repeats"], memory)


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    """torch, then Keras (TensorFlow) and Flax NNX; a framework that cannot be imported is skipped."""
    rows = run_torch(quick, device)
    for module in ("bench_attention_keras", "bench_attention_jax"):
        try:
            other = importlib.import_module(f"tests.benchmarks.{module}")
            rows += other.run(quick, device)
        except (ImportError, DeviceUnavailable) as exc:
            print(f"skipped {module}: {type(exc).__name__}: {exc}", flush=True)
    size = vit_shape(quick)
    print(f"(all blocks' attention maps with every head, N·L·H·T² float32: {maps_mb(size):.0f} MB)", flush=True)
    return rows
