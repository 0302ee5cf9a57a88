"""PyTorch, the attention methods: rollout and gradient-weighted attention against inference.

A Hugging Face ViT-B/16-shaped model (12 blocks, 12 heads, width 768, 224², random weights:
they do not change the cost) with ``attn_implementation="sdpa"`` (the fused kernel), batch 8.
The baseline is a plain ``inference_mode`` forward of the same model; rollout runs one forward
with every attention spelt out (head means kept as the forward goes), attention-grad one forward
and one backward to the attention maps. Peak memory per case in fresh interpreters (CPU only):
rollout keeps N·L·T² floats, attention-grad the N·L·H·T² maps and as many gradients.

``python -m tests.benchmarks attention [--quick] [--device cuda]``.
"""

from __future__ import annotations

from typing import Any

import torch

import anycam

from .timing import DeviceUnavailable, interleaved, memory_row, peak_in_subprocess, row


def _config(quick: bool) -> dict[str, Any]:
    if quick:
        return {"image_size": 64, "patch_size": 16, "hidden_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": 128, "batch": 2, "repeats": 2}  # fmt: skip
    return {"image_size": 224, "patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072, "batch": 8, "repeats": 3}  # fmt: skip


def _setup(quick: bool, device: str) -> tuple[torch.nn.Module, torch.Tensor, int]:
    import transformers

    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("torch sees no CUDA device")
    options = _config(quick)
    batch, repeats = options.pop("batch"), options.pop("repeats")
    torch.manual_seed(0)
    config = transformers.ViTConfig(num_labels=1000, attn_implementation="sdpa", **options)
    model = transformers.ViTForImageClassification(config).eval().to(device)
    x = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
    return model, x, repeats


def _cases(model: torch.nn.Module, x: torch.Tensor, device: str) -> dict[str, Any]:
    rollout = anycam.Explainer(model, method="rollout", output="logits")
    grad = anycam.Explainer(model, method="attention-grad", output="logits")
    inputs = {"pixel_values": x}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def forward() -> object:
        with torch.inference_mode():
            out = model(pixel_values=x)
        sync()
        return out

    return {
        "forward": forward,
        "rollout": lambda: rollout.explain(inputs),
        "attention-grad": lambda: grad.explain(inputs),
    }


def memory_case(case: str, quick: bool) -> int:
    """The peak resident memory (bytes) one call of ``case`` adds, in this fresh interpreter."""
    from .timing import peak_of

    model, x, _ = _setup(quick, "cpu")
    return peak_of(_cases(model, x, "cpu")[case])


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    cases = ("forward", "rollout", "attention-grad")
    # One fresh interpreter per case (not the median of 3): each imports transformers and builds ViT-B.
    memory = (
        {case: peak_in_subprocess("bench_attention", case, (quick,), repeats=1) for case in cases}
        if device == "cpu"
        else {}
    )
    model, x, repeats = _setup(quick, device)
    batch = x.shape[0]
    name = (
        ("ViT-B/16-shaped" if not quick else "tiny ViT")
        + f" {x.shape[-1]}², sdpa"
        + ("" if device == "cpu" else f", {device}")
    )
    times = interleaved(_cases(model, x, device), repeats)
    label = "plain inference_mode forward"
    rows = [row("torch", name, case, batch, times[case], label, times["forward"]) for case in cases]
    if device == "cuda":
        for case, fn in _cases(model, x, device).items():
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            peak = torch.cuda.max_memory_allocated() - before
            memory[case] = peak
    for case in cases:
        if case in memory:
            rows.append(memory_row("torch", name, case, batch, memory[case], "forward", memory["forward"]))
    return rows
