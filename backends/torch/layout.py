"""Where a torch layer's channels are: read from the modules that produced its output.

torch has no layout attribute: ``Conv2d`` writes ``(N, C, H, W)``, but a model may permute to
``(N, H, W, C)`` and go on with ``nn.Linear`` / ``nn.LayerNorm`` over the last axis (ConvNeXt's
blocks, MLP-Mixer, Swin). The layout of a layer's output is taken from the last module that
*decides* one and ran up to the layer (itself, or the last such module inside it or before it in
call order; activations, dropout and containers pass it on). With no such module the guess
stays channels-first, and the core checks every guess against the shapes.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

# Modules whose output is channels-first by construction (their channel axis is 1).
_CHANNELS_FIRST: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)


def decided(module: nn.Module, out: Any) -> tuple[str, int] | None:
    """Returns (layout, channels) that ``module``'s output ``out`` has by construction, or None."""
    if not isinstance(out, torch.Tensor) or out.ndim < 3:
        return None
    if isinstance(module, _CHANNELS_FIRST):
        return "channels_first", int(out.shape[1])
    # A dense layer or a LayerNorm over the last axis of a map with spatial axes: channels last.
    if isinstance(module, nn.Linear) and out.shape[-1] == module.out_features:
        return "channels_last", module.out_features
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return "channels_last", int(module.normalized_shape[0])
    return None


class Tracker:
    """Follows, during one forward pass, the last module that decided a layout and its channel count."""

    def __init__(self) -> None:
        self.last: tuple[str, int] | None = None

    def at(self, module: nn.Module, out: Any) -> str | None:
        """The layout of ``module``'s output: its own if it decides one, else the last one seen,
        where the output still has that many channels on that axis (code between modules may
        have permuted it: ConvNeXt's blocks go back to channels first after their dense layers)."""
        own = decided(module, out)
        if own is not None:
            self.last = own
            return own[0]
        return self.reading(out)

    def reading(self, out: Any) -> str | None:
        """The layout of a tensor computed after the last module that decided one, or None."""
        if self.last is None or not isinstance(out, torch.Tensor) or out.ndim < 3:
            return None
        layout, channels = self.last
        first, last = out.shape[1] == channels, out.shape[-1] == channels
        if first and last:
            return layout
        if first:
            return "channels_first"
        return "channels_last" if last else None


def track(model: nn.Module, owner: int) -> tuple[Tracker, list[Any]]:
    """Returns a Tracker fed by forward hooks on the modules that decide a layout (those TorchScript
    runs excluded), and the hooks' handles, for the caller to remove."""
    tracker = Tracker()

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        if threading.get_ident() == owner:
            tracker.at(module, out)

    handles = [
        module.register_forward_hook(hook)
        for module in model.modules()
        if isinstance(module, (*_CHANNELS_FIRST, nn.Linear, nn.LayerNorm))
        and not isinstance(module, torch.jit.ScriptModule)
    ]
    return tracker, handles
