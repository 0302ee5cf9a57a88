"""PyTorch, the methods beyond one capture: Ablation-CAM, Score-CAM, Guided Grad-CAM.

* Ablation-CAM at the last stage against a plain forward: layer4 is read only by the global
  pooling, so anycam takes the pooled head's closed form (zeroing channel k zeroes pooled entry
  k; the fc layer's output is z − p_k W_k) and runs no ablated copy through the network: the
  cost is the capture's forward plus B·N·1000 multiply-adds. pytorch-grad-cam's ``AblationCAM``
  re-runs the whole network once per batch of channels (measured at N = 1: it loops over
  images, so its cost is linear in N; one run, it takes minutes).
* Score-CAM at equal ``batch_size`` against pytorch-grad-cam's ``ScoreCAM``, with the peak memory
  of each in a fresh interpreter (the peer builds all N·C masked inputs at once). A narrower
  ResNet-50-shaped net (width 16, 512 channels at layer4) keeps the C masked forwards short.
* Guided Grad-CAM against one forward plus a full input-gradient backward.

pytorch-grad-cam imports torchvision, which does not import beside this torch build; a stub
module stands in for the image helpers it never uses here.
"""

from __future__ import annotations

import gc
import resource
import statistics
import subprocess
import sys
import types
from typing import Any

import torch

import anycam

from .bench_torch import ResNet50
from .timing import clock, interleaved, row, rss

SCORECAM_BATCH = 16


def _peer() -> Any:
    """Returns the pytorch_grad_cam module (with a torchvision stub), or None if not installed."""
    if "torchvision" not in sys.modules:
        package = types.ModuleType("torchvision")
        transforms = types.ModuleType("torchvision.transforms")
        functional = types.ModuleType("torchvision.transforms.functional")
        for name in ("Compose", "Normalize", "ToTensor"):
            setattr(transforms, name, None)
        functional.resize = None  # type: ignore[attr-defined]
        transforms.functional = functional  # type: ignore[attr-defined]
        package.transforms = transforms  # type: ignore[attr-defined]
        sys.modules.update(
            {
                "torchvision": package,
                "torchvision.transforms": transforms,
                "torchvision.transforms.functional": functional,
            }
        )
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        pytorch_grad_cam.ClassifierOutputTarget = ClassifierOutputTarget  # type: ignore[attr-defined]
        return pytorch_grad_cam
    except ImportError:
        return None


def _setup(width: int, size: int, batch: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return ResNet50(width=width).eval(), torch.randn(batch, 3, size, size)


def _scorecam_config(quick: bool) -> tuple[int, int, int]:
    return (8, 64, 1) if quick else (16, 224, 1)


def _memory_case(case: str, quick: bool) -> None:
    """Prints the peak resident memory (bytes) one fresh Score-CAM call adds to the process."""
    width, size, batch = _scorecam_config(quick)
    model, x = _setup(width, size, batch)
    peer = _peer()

    def call(images: torch.Tensor) -> None:
        if case == "forward":
            with torch.inference_mode():
                model(images)
        elif case == "anycam":
            anycam.Explainer(model, "layer4", method="scorecam", batch_size=SCORECAM_BATCH, progress=False)(images)
        else:
            cam = peer.ScoreCAM(model, target_layers=[model.layer4])
            cam.batch_size = SCORECAM_BATCH
            cam(images, targets=None)

    call(x[:1, :, :32, :32])  # one-time library initialisation is not the case's memory
    gc.collect()
    before = rss()
    call(x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def _peak(case: str, quick: bool, repeats: int = 3) -> int:
    code = f"from tests.benchmarks.bench_torch_methods import _memory_case; _memory_case({case!r}, {quick})"
    peaks = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peaks.append(int(done.stdout.strip().splitlines()[-1]))
    return int(statistics.median(peaks))


def _seconds(fn: Any) -> float:
    now = clock()
    start = now()
    fn()
    return now() - start


def run(quick: bool = False) -> list[dict]:
    peer = _peer()
    cases_memory = ("forward", "anycam", "peer") if peer is not None else ("forward", "anycam")
    # One fresh interpreter per Score-CAM case (each runs C masked forwards); three for the forward.
    mem = {case: _peak(case, quick, repeats=3 if case == "forward" else 1) for case in cases_memory}
    rows: list[dict] = []

    # Ablation-CAM and Guided Grad-CAM on the full ResNet-50 shape, batch 8 at 224².
    width, size, batch, repeats = (16, 64, 2, 2) if quick else (64, 224, 8, 3)
    model, x = _setup(width, size, batch)
    name = "ResNet-50-shaped" + (" (quick, width 16)" if quick else "")
    ablation = anycam.Explainer(model, "layer4", method="ablationcam", progress=False)
    guided = anycam.Explainer(model, "layer4", method="guided-gradcam")

    def forward() -> object:
        with torch.inference_mode():
            return model(x)

    def input_gradient() -> object:
        leaf = x.clone().requires_grad_()
        out = model(leaf)
        return torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), leaf)

    times = interleaved(
        {
            "forward": forward,
            "ablationcam": lambda: ablation(x),
            "input gradient": input_gradient,
            "guided-gradcam": lambda: guided(x),
        },
        repeats,
    )
    rows.append(
        row(
            "torch",
            name,
            "Ablation-CAM layer4",
            batch,
            times["ablationcam"],
            "plain inference_mode forward",
            times["forward"],
        )
    )
    rows.append(
        row(
            "torch",
            name,
            "Guided Grad-CAM layer4",
            batch,
            times["guided-gradcam"],
            "forward + full input-gradient backward",
            times["input gradient"],
        )
    )
    if peer is not None:
        # One image: the peer loops over images, re-running the whole network per channel batch.
        one = x[:1]
        # Its cost is linear in the channels it ablates; on a shared CPU all 2048 take too long,
        # so it ablates an eighth of them (its own ratio_channels_to_ablate), as the label says.
        share = 1.0 if quick else 0.125
        cam = peer.AblationCAM(model, target_layers=[model.layer4], ratio_channels_to_ablate=share)
        targets = [peer.ClassifierOutputTarget(int(forward()[0].argmax()))]
        with torch.inference_mode():
            forward_one = statistics.median(_seconds(lambda: model(one)) for _ in range(3))
        peer_seconds = _seconds(lambda: cam(one, targets=targets))
        label = "pytorch-grad-cam AblationCAM layer4, one run" + ("" if quick else ", 1/8 of the channels")
        rows.append(row("torch", name, label, 1, peer_seconds, "plain inference_mode forward, N=1", forward_one))

    # Score-CAM at equal batch_size on the narrow net (C masked forwards per image).
    width, size, batch = _scorecam_config(quick)
    model, x = _setup(width, size, batch)
    name = f"ResNet-50-shaped, width {width}, {size}²"
    ours = anycam.Explainer(model, "layer4", method="scorecam", batch_size=SCORECAM_BATCH, progress=False)
    cases = {"anycam": lambda: ours(x)}
    if peer is not None:
        theirs = peer.ScoreCAM(model, target_layers=[model.layer4])
        theirs.batch_size = SCORECAM_BATCH
        cases["peer"] = lambda: theirs(x, targets=None)
    times = interleaved(cases, 1 if quick else 2, warmup=0 if quick else 1)
    if peer is not None:
        rows.append(
            row(
                "torch",
                name,
                f"Score-CAM layer4, batch_size={SCORECAM_BATCH}",
                batch,
                times["anycam"],
                f"pytorch-grad-cam ScoreCAM, batch_size={SCORECAM_BATCH}",
                times["peer"],
            )
        )
    for case, label in (("anycam", "anycam Score-CAM"), ("peer", "pytorch-grad-cam ScoreCAM")):
        if case in mem:
            entry = row("torch", name, f"peak memory, {label}", batch, mem[case], "plain forward", mem["forward"])
            rows.append({**entry, "ms": None, "mb": mem[case] / 2**20})
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
