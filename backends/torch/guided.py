"""Guided backpropagation for any torch model: the ReLU *function* is intercepted, not the module.

Peers (Captum, pytorch-grad-cam) replace or hook ``nn.ReLU`` modules and so miss ``F.relu``,
``torch.relu`` and ``x.relu_()`` in a ``forward``. Here a ``TorchFunctionMode`` is active only for
one forward pass: every ReLU call, whichever spelling, is routed through :class:`GuidedReLU`, an
``autograd.Function`` whose forward is the ReLU and whose backward is the guided rule. Leaving
the ``with`` block (also by an exception) removes it; the model itself is never modified.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_OUT_OF_PLACE = frozenset({F.relu, torch.relu, torch.Tensor.relu})
# F.relu_ dispatches as torch.relu_.
_IN_PLACE = frozenset({torch.relu_, torch.Tensor.relu_})


def _guided_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # threshold_backward is the fused kernel of ReLU's own backward: grad where out > 0, else 0.
    return torch.ops.aten.threshold_backward(grad.clamp_min(0), out, 0.0)


class GuidedReLU(torch.autograd.Function):
    """y = max(x, 0); ∂L/∂x = ReLU(∂L/∂y) · [x > 0] (Springenberg et al. 2015, guided backpropagation)."""

    # K targets backpropagate under vmap (autograd.grad(..., is_grads_batched=True)).
    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: torch.Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return _guided_backward(grad, out)


class GuidedReLUInplace(torch.autograd.Function):
    """The in-place form (``relu_``, ``inplace=True``): x ← max(x, 0), same guided backward.

    Modifying x in place, as the model asked, costs no extra copy; the output (x itself after
    the update) is what the backward needs.
    """

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min_(0)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: torch.Tensor) -> None:
        ctx.mark_dirty(inputs[0])
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return _guided_backward(grad, out)


class GuidedMode(TorchFunctionMode):
    """Routes every ReLU call (module, functional, method, in-place) through :class:`GuidedReLU`.

    Attributes:
        calls: how many ReLU calls were rerouted (0 means the model has no ReLU).
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _OUT_OF_PLACE or func in _IN_PLACE:
            x = args[0] if args else kwargs["input"]
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                self.calls += 1
                inplace = func in _IN_PLACE or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
                # In place only where autograd allows it (not on a leaf that requires grad).
                if inplace and not (x.is_leaf and x.requires_grad):
                    return GuidedReLUInplace.apply(x)
                return GuidedReLU.apply(x)
        return func(*args, **kwargs)
