"""PyTorch: anycam against a plain inference forward, a pytorch-grad-cam-style capture and peers.

The network is a ResNet-50-shaped model defined here (torchvision does not import beside the
CPU wheel used in this project); random weights do not change the cost. Peers (Captum's
``LayerGradCam``, torchcam's ``GradCAM``, pytorch-grad-cam's ``GradCAM``) are measured in the
same run where they import; ``nox -s bench`` installs them. Each peer's maps are upsampled to the
input size with ``F.interpolate`` (bilinear), as anycam's heatmaps are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import anycam
from anycam.explain.assembly import explanation

from .timing import DeviceUnavailable, interleaved, memory_row, peak_in_subprocess, peak_of, phase_rows, row

if "ANYCAM_BENCH_THREADS" in os.environ:  # python -m tests.benchmarks --threads N
    torch.set_num_threads(int(os.environ["ANYCAM_BENCH_THREADS"]))
    torch.set_num_interop_threads(int(os.environ["ANYCAM_BENCH_THREADS"]))


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
    acts, grads = store["a"].cpu().numpy(), store["g"].cpu().numpy()
    cam = np.maximum(np.einsum("nc,nchw->nhw", grads.mean((2, 3)), acts), 0)
    return anycam.core.normalize(anycam.core.resize(cam, x.shape[2:]))


def _setup(quick: bool, device: str = "cpu", batch: int | None = None) -> tuple[nn.Module, torch.Tensor, int]:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(f"torch {torch.__version__} sees no CUDA device")
    torch.manual_seed(0)
    size, default_batch, repeats = (64, 2, 2) if quick else (224, 8, 7)
    model = ResNet50(width=16 if quick else 64).eval().to(device)
    x = torch.randn(batch or default_batch, 3, size, size).to(device)
    return model, x, repeats


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peers(model: nn.Module, x: torch.Tensor, host: bool = True) -> tuple[dict[str, Callable[[], object]], list[str]]:
    """Returns each importable peer's Grad-CAM at layer4 as a case, and why the others are absent.

    ``host=True`` ends each map as a float32 NumPy array (as anycam's default mode does);
    ``host=False`` leaves it upsampled on the model's device (as ``arrays="native"`` does).
    """
    cases: dict[str, Callable[[], object]] = {}
    skipped: list[str] = []
    size = tuple(x.shape[2:])

    def upsampled(maps: torch.Tensor) -> object:
        resized = F.interpolate(maps.detach().float(), size=size, mode="bilinear")
        return resized.cpu().numpy() if host else resized

    try:
        from captum.attr import LayerGradCam
    except Exception as exc:  # any import failure: the peer is skipped with its reason
        skipped.append(f"Captum: {type(exc).__name__}: {exc}")
    else:
        captum = LayerGradCam(model, model.layer4)

        def captum_case() -> object:
            with torch.no_grad():
                target = model(x).argmax(1)
            return upsampled(captum.attribute(x, target=target, relu_attributions=True))

        cases["Captum LayerGradCam"] = captum_case
    try:
        from torchcam.methods import GradCAM as TorchcamGradCAM
    except Exception as exc:
        skipped.append(f"torchcam: {type(exc).__name__}: {exc}")
    else:

        def torchcam_case() -> object:
            # Its hooks stay on the model while the extractor lives: scoped to the call.
            with TorchcamGradCAM(model, "layer4") as extractor:
                output = model(x)
                (maps,) = extractor(output.argmax(1).tolist(), output)
            return upsampled(maps[:, None])

        cases["torchcam GradCAM"] = torchcam_case
    # Its package imports torchvision (image helpers its Grad-CAM never calls), which does not
    # import beside this torch: bench_torch_methods stands a stub in for it.
    from .bench_torch_methods import _peer as grad_cam_package

    pgc = grad_cam_package()
    if pgc is None:
        try:
            import pytorch_grad_cam  # noqa: F401  (only for the reason it fails)
        except Exception as exc:
            skipped.append(f"pytorch-grad-cam: {type(exc).__name__}: {exc}")
    else:

        def pgc_case() -> object:
            # Its hooks stay on the model while the extractor lives: scoped to the call. Its own
            # output: maps at input resolution, min-max normalised (cv2 resize), NumPy.
            with pgc.GradCAM(model=model, target_layers=[model.layer4]) as extractor:
                return extractor(input_tensor=x, targets=None)

        cases["pytorch-grad-cam GradCAM"] = pgc_case
    return cases, skipped


def _call(case: str, model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    if case == "forward":

        def forward() -> object:
            with torch.inference_mode():
                return model(x)

        return forward
    if case == "layer4":
        explainer = anycam.Explainer(model, "layer4")
        return lambda: explainer(x)
    return lambda: anchor_style_gradcam(model, model.layer4, x)


def memory_case(case: str, quick: bool) -> int:
    """The peak resident memory (bytes) one call of ``case`` adds, after a warm-up call."""
    model, x, _ = _setup(quick)
    return peak_of(_call(case, model, x))


def _copier(device: str) -> Callable[[Sequence[tuple[int, ...]]], Callable[[], object]]:
    def copier(shapes: Sequence[tuple[int, ...]]) -> Callable[[], object]:
        tensors = [torch.randn(shape, device=device) for shape in shapes]
        # What the adapter does to every captured tensor (on a CPU: hands the memory to NumPy).
        return lambda: [t.detach().to("cpu", torch.float32).numpy() for t in tensors]

    return copier


def phases(
    quick: bool = False, device: str = "cpu", batch: int | None = None, repeats: int | None = None
) -> list[dict]:
    """Where a Grad-CAM call's time goes (forward, tapping, autograd, copy, core) at layer4."""
    model, x, default_repeats = _setup(quick, device, batch)
    repeats = repeats or default_repeats
    name = _name(quick) + ("" if device == "cpu" else f", {device}")

    def forward() -> object:
        with torch.inference_mode():
            out = model(x)
        _sync(device)
        return out

    explainer = anycam.Explainer(model, "layer4")
    return phase_rows(
        "torch",
        name,
        x.shape[0],
        forward=forward,
        explainer=explainer,
        inputs=x,
        copier=_copier(device),
        repeats=repeats,
    )


def _name(quick: bool) -> str:
    return "ResNet-50-shaped (defined in the benchmark)" if not quick else "ResNet-50-shaped (quick, width 16)"


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    # Memory first, each case in fresh interpreters, before this process does any work (CPU only:
    # resident memory says nothing about a GPU's).
    memory = device == "cpu"
    mem = (
        {case: peak_in_subprocess("bench_torch", case, (quick,)) for case in ("forward", "layer4", "anchor")}
        if memory
        else {}
    )
    model, x, repeats = _setup(quick, device)
    batch = x.shape[0]
    name = _name(quick) + ("" if device == "cpu" else f", {device}")
    explainers = {layer: anycam.Explainer(model, layer) for layer in ("layer2", "layer3", "layer4")}
    k10 = np.tile(np.arange(10), (batch, 1))

    def forward() -> object:
        with torch.inference_mode():
            out = model(x)
        _sync(device)
        return out

    peers, skipped = _peers(model, x)
    for reason in skipped:
        print(f"skipped peer {reason}", flush=True)
    cases = {
        "forward": forward,
        "layer4": lambda: explainers["layer4"](x),
        "layer4 K=10": lambda: explainers["layer4"](x, target=k10),
        "layer3": lambda: explainers["layer3"](x),
        "layer3 K=10": lambda: explainers["layer3"](x, target=k10),
        "layer2": lambda: explainers["layer2"](x),
        "anchor": lambda: anchor_style_gradcam(model, model.layer4, x),
        **peers,
    }
    times = interleaved(cases, repeats)
    spec = anycam.core.parse_target(None)
    capture = explainers["layer4"].backend.capture(x, spec)
    core_time = interleaved({"core": lambda: explanation(explainers["layer4"], capture, spec)}, repeats)["core"]
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
            "Grad-CAM layer3, K=10 maps per sample",
            batch,
            times["layer3 K=10"],
            "one map (layer3)",
            times["layer3"],
        ),
        row(
            "torch",
            name,
            f"core math (weights → {x.shape[-1]}² heatmap), layer4",
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
    for peer in peers:
        rows.append(
            row(
                "torch",
                name,
                f"peer: {peer} (layer4, upsampled)",
                batch,
                times[peer],
                "anycam Grad-CAM layer4",
                times["layer4"],
            )
        )
    for case, what in (("layer4", "Grad-CAM layer4"), ("anchor", "pytorch-grad-cam-style")):
        if memory:
            rows.append(memory_row("torch", name, what, batch, mem[case], "plain inference forward", mem["forward"]))
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
