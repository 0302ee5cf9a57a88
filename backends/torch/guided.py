"""Guided backpropagation for any torch model: the ReLU *function* is intercepted, not the module.

Peers (Captum, pytorch-grad-cam) replace or hook ``nn.ReLU`` modules and so miss ``F.relu``,
``torch.relu`` and ``x.relu_()`` in a ``forward``. Here a ``TorchFunctionMode`` is active only for
one forward pass: every ReLU call, whichever spelling, is routed through :class:`GuidedReLU`, an
``autograd.Function`` whose forward is the ReLU and whose backward is the guided rule. Leaving
the ``with`` block (also by an exception) removes it; the model itself is never modified.
:func:`guided_gradients` runs one such forward and warns when the model calls no ReLU at all.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from anycam._errors import AnycamWarning, TargetError, user_stacklevel
from anycam.core import TargetSpec
from anycam.protocol.backend import select_output

from .capture import scores as target_scores
from .inputs import batch_of, structure, to_numpy

if TYPE_CHECKING:
    from .backend import TorchBackend

_OUT_OF_PLACE = frozenset({F.relu, torch.relu, torch.Tensor.relu})
# F.relu_ dispatches as torch.relu_.
_IN_PLACE = frozenset({torch.relu_, torch.Tensor.relu_})
# ``clamp(min=0)`` and its spellings are a ReLU too (with no ``max``); (min's position, in place).
_CLAMPS: dict[Any, tuple[int, bool]] = {
    torch.clamp: (1, False),
    torch.Tensor.clamp: (1, False),
    torch.clip: (1, False),
    torch.Tensor.clip: (1, False),
    torch.clamp_min: (1, False),
    torch.Tensor.clamp_min: (1, False),
    torch.clamp_: (1, True),
    torch.Tensor.clamp_: (1, True),
    torch.clip_: (1, True),
    torch.Tensor.clip_: (1, True),
    torch.clamp_min_: (1, True),
    torch.Tensor.clamp_min_: (1, True),
}
# The TorchScript ops a ReLU compiles to (what a scripted submodule runs out of the mode's reach).
_SCRIPT_RELUS = ("aten::relu", "aten::relu_", "aten::clamp_min", "aten::clamp_min_")


def _clamp_is_relu(func: Any, args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a call of a clamp spelling is ``max(x, 0)``: a zero lower bound and no upper one."""
    position, _ = _CLAMPS[func]
    low = args[position] if len(args) > position else kwargs.get("min")
    high = args[position + 1] if len(args) > position + 1 else kwargs.get("max")
    if isinstance(low, torch.Tensor) and low.ndim == 0 and not low.requires_grad:
        low = float(low)
    return high is None and isinstance(low, (int, float)) and not isinstance(low, bool) and low == 0


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
        clamp = func in _CLAMPS and _clamp_is_relu(func, args, kwargs)
        if func in _OUT_OF_PLACE or func in _IN_PLACE or clamp:
            x = args[0] if args else kwargs.get("input", kwargs.get("self"))
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                self.calls += 1
                if clamp:
                    inplace = _CLAMPS[func][1]
                else:
                    inplace = func in _IN_PLACE or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
                # In place only where autograd allows it (not on a leaf that requires grad).
                if inplace and not (x.is_leaf and x.requires_grad):
                    return GuidedReLUInplace.apply(x)
                return GuidedReLU.apply(x)
        return func(*args, **kwargs)


def guided_gradients(
    backend: TorchBackend, inputs: Any, target: TargetSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Guided Backpropagation through every ReLU call: (N, K, *input) gradients, (N, K) scores, indices."""
    with torch.inference_mode(False):
        given = structure(backend, inputs)
        backend._warn_training()
        batch = batch_of(given)
        # A copy: the model may modify its input in place (``x.relu_()``), which must change
        # neither the user's tensor nor a later call; and a tensor made under the caller's
        # inference_mode() cannot require grad itself.
        leaf = given.spatial_value.detach().clone().requires_grad_()
        # The model gets a copy that is not a leaf, so that its in-place ops on its input happen
        # in place (a leaf that requires grad could only be replaced, and the model would then
        # go on with the unmodified tensor).
        replaced = given.map(lambda key, value: leaf.clone() if key == given.spatial else value)
        mode = GuidedMode()
        with torch.enable_grad():
            # Only the model's forward is guided; a callable target's own ReLUs are not.
            with mode:
                output = backend._call(replaced)
            scores, indices = target_scores(select_output(output, backend.output), target, batch)
            if not scores.requires_grad:
                raise TargetError("the explained output does not depend on the input")
            (grads,) = input_gradients(scores, leaf)
    unreached = scripted_relus(backend.model)
    if unreached:
        shown = ", ".join(f"{name or 'the model'} ({count})" for name, count in unreached[:4])
        more = f" and {len(unreached) - 4} more" if len(unreached) > 4 else ""
        warnings.warn(
            f"guided backpropagation cannot reach the ReLUs inside TorchScript modules, which run outside "
            f"Python: {shown}{more} ReLU calls keep the plain gradient rule"
            + (f" ({mode.calls} ReLU calls outside them were guided)" if mode.calls else "")
            + "; explain the Python (not scripted) model to guide every ReLU",
            AnycamWarning,
            stacklevel=user_stacklevel(),
        )
    elif mode.calls == 0:
        warnings.warn(
            f"{type(backend.model).__name__} calls no ReLU, so guided backpropagation equals the plain "
            "input gradient here",
            AnycamWarning,
            stacklevel=user_stacklevel(),
        )
    return to_numpy(grads), to_numpy(scores), indices


def scripted_relus(model: torch.nn.Module) -> list[tuple[str, int]]:
    """Returns (name, ReLU ops in its graph) for the outermost TorchScript modules of ``model`` that have any."""
    found: list[tuple[str, int]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") or not outer for outer in inside):
            continue
        if isinstance(module, torch.jit.ScriptModule):
            inside.append(name)
            try:
                graph = str(module.inlined_graph)
            except (RuntimeError, AttributeError):  # a module without forward
                continue
            count = sum(graph.count(f"{op}(") for op in _SCRIPT_RELUS)
            if count:
                found.append((name, count))
    return found


def input_gradients(scores: torch.Tensor, leaf: torch.Tensor) -> tuple[torch.Tensor]:
    """Returns ∂scores/∂leaf as (N, K, ...) for (N, K) scores, K targets in one batched pass."""
    count = scores.shape[1]
    if count == 1:
        return (torch.autograd.grad(scores.sum(), leaf)[0].unsqueeze(1),)
    eye = torch.eye(count, dtype=scores.dtype, device=scores.device)
    cotangents = eye[:, None, :].expand(count, scores.shape[0], count)
    try:
        grads = torch.autograd.grad(scores, leaf, grad_outputs=cotangents, is_grads_batched=True, retain_graph=True)
        return (grads[0].transpose(0, 1),)
    except RuntimeError:
        # An operator without a batching rule: one backward per target.
        columns = [torch.autograd.grad(scores[:, k].sum(), leaf, retain_graph=True)[0] for k in range(count)]
        return (torch.stack(columns, dim=1),)
