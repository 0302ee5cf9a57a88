"""PyTorch: anycam against a plain inference forward and a pytorch-grad-cam-style capture.

The network is a ResNet-50-shaped model defined here (torchvision does not import beside the
CPU wheel used in this project); random weights do not change the cost.
"""

from __future__ import annotations

import gc
import resource
import statistics
import subprocess
import sys

import numpy as np
import torch
from torch import nn

import anycam

from .timing import interleaved, row, rss


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width, out = planes, planes * 4
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        y += identity
        return self.relu(y)


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, stages = width, []
        for index, (blocks, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2), strict=False)):
            planes = width * 2**index
            layers = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * 4
            layers += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def anchor_style_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> np.ndarray:
    """What pytorch-grad-cam does per call: hooks, a full ``.backward()``, NumPy math, cv2-like resize.

    Written here from its documented behaviour (activation + gradient hooks, ``model.zero_grad``,
    ``loss.backward`` through the whole network), so its cost can be measured beside anycam's.
    """
    store: dict[str, torch.Tensor] = {}

    def forward_hook(module: nn.Module, args: object, out: torch.Tensor) -> None:
        store["a"] = out.detach()
        out.register_hook(lambda grad: store.__setitem__("g", grad.detach()))

    handle = layer.register_forward_hook(forward_hook)
    try:
        x = x.clone().requires_grad_()
        output = model(x)
        target = output.argmax(1)
        model.zero_grad()
        output.gather(1, target[:, None]).sum().backward(retain_graph=True)
    finally:
        handle.remove()
    acts, grads = store["a"].numpy(), store["g"].numpy()
    cam = np.maximum(np.einsum("nc,nchw->nhw", grads.mean((2, 3)), acts), 0)
    return anycam.core.normalize(anycam.core.resize(cam, x.shape[2:]))


def _setup(quick: bool) -> tuple[nn.Module, torch.Tensor, int]:
    torch.manual_seed(0)
    size, batch, repeats = (64, 2, 2) if quick else (224, 8, 7)
    return ResNet50(width=16 if quick else 64).eval(), torch.randn(batch, 3, size, size), repeats


def _memory_case(case: str, quick: bool) -> None:
    """Prints the peak resident memory (bytes) one fresh call of ``case`` adds to the process."""
    model, x, _ = _setup(quick)

    def call(batch: torch.Tensor) -> None:
        if case == "forward":
            with torch.inference_mode():
                model(batch)
        elif case == "layer4":
            anycam.Explainer(model, "layer4")(batch)
        else:
            anchor_style_gradcam(model, model.layer4, batch)

    call(x[:1, :, :32, :32])  # one-time library initialisation is not the case's memory
    gc.collect()
    before = rss()
    call(x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def _peak_in_subprocess(case: str, quick: bool, repeats: int = 3) -> int:
    """Median over fresh interpreters of one case's peak, so other cases' allocator caches cannot hide it.

    A single run is occasionally far off (seen here: a plain forward once peaked ~8× its usual
    ~150 MB), hence the median.
    """
    code = f"from tests.benchmarks.bench_torch import _memory_case; _memory_case({case!r}, {quick})"
    peaks = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peaks.append(int(done.stdout.strip().splitlines()[-1]))
    return int(statistics.median(peaks))


def run(quick: bool = False) -> list[dict]:
    # Memory first, each case in fresh interpreters, before this process does any work.
    mem = {case: _peak_in_subprocess(case, quick) for case in ("forward", "layer4", "anchor")}
    model, x, repeats = _setup(quick)
    batch = x.shape[0]
    name = "ResNet-50-shaped (defined in the benchmark)" if not quick else "ResNet-50-shaped (quick, width 16)"
    explainers = {layer: anycam.Explainer(model, layer) for layer in ("layer2", "layer3", "layer4")}
    k10 = np.argsort(-np.arange(1000))[:10][None].repeat(batch, 0) % 1000

    def forward() -> object:
        with torch.inference_mode():
            return model(x)

    cases = {
        "forward": forward,
        "layer4": lambda: explainers["layer4"](x),
        "layer4 K=10": lambda: explainers["layer4"](x, target=k10),
        "layer3": lambda: explainers["layer3"](x),
        "layer2": lambda: explainers["layer2"](x),
        "anchor": lambda: anchor_style_gradcam(model, model.layer4, x),
    }
    times = interleaved(cases, repeats)
    spec = anycam.core.parse_target(None)
    capture = explainers["layer4"].backend.capture(x, spec)
    core_time = interleaved({"core": lambda: explainers["layer4"]._explanation(capture, spec)}, repeats)["core"]
    base = times["forward"]
    label = "plain inference_mode forward"
    rows = [
        row("torch", name, "Grad-CAM layer4", batch, times["layer4"], label, base),
        row("torch", name, "Grad-CAM layer3", batch, times["layer3"], label, base),
        row("torch", name, "Grad-CAM layer2", batch, times["layer2"], label, base),
        row(
            "torch",
            name,
            "Grad-CAM layer4, K=10 maps per sample",
            batch,
            times["layer4 K=10"],
            "one map (layer4)",
            times["layer4"],
        ),
        row(
            "torch",
            name,
            "core math (weights → 224² heatmap), layer4",
            batch,
            core_time,
            "whole Grad-CAM call",
            times["layer4"],
        ),
        row(
            "torch",
            name,
            "pytorch-grad-cam-style capture (full .backward())",
            batch,
            times["anchor"],
            "anycam Grad-CAM layer4",
            times["layer4"],
        ),
    ]
    for case, label in (("layer4", "Grad-CAM layer4"), ("anchor", "pytorch-grad-cam-style")):
        entry = row("torch", name, f"peak memory, {label}", batch, mem[case], "plain forward", mem["forward"])
        rows.append({**entry, "ms": None, "mb": mem[case] / 2**20})
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
