"""PyTorch adapter: a cloning forward hook and ``torch.autograd.grad`` on the captured outputs.

How a capture runs:

* The forward runs under ``no_grad``. The hook on the (first) explained layer switches grad
  mode on, so autograd records only the part of the network *after* that layer: nothing below
  it is ever differentiated, and no parameter gets a ``.grad``.
* The hook keeps the layer output as a leaf ``a`` that requires grad and hands the rest of the
  network a *clone*. In-place operations downstream (``relu_``, ``+=`` in residual blocks)
  then modify the clone, not the captured activations; torchcam and pytorch-grad-cam keep the
  original and report corrupted activations in that case.
* Gradients come from ``torch.autograd.grad(scores, captured)`` (K targets in one batched
  call where autograd can vmap the graph, else one call per target on a retained graph).
* Hooks are removed in ``finally`` and ignore calls from other threads, so a model shared by
  two threads, or one that raises, is left as it was found.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from anycam._backend import Backend, Capture, check_options, select_output
from anycam._errors import ConfigTypeError, InputError, LayerError, TargetError, closest
from anycam.core import TargetSpec, resolve_indices, spatial_shape


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


class TorchBackend(Backend):
    """Adapter for ``torch.nn.Module`` models (CPU or CUDA, any float dtype).

    Layers are module names as in ``model.named_modules()`` (``"layer4"``, ``"layer4.1.conv2"``)
    or module objects. The model runs in whatever mode the user left it in; a model in
    training mode gets a warning, since BatchNorm then mixes the samples of a batch.
    """

    name = "torch"

    def __init__(
        self,
        model: Any,
        layers: Sequence[Any],
        *,
        output: Any = None,
        input_layout: str | None = None,
        **options: Any,
    ) -> None:
        check_options(self.name, options, ())
        if not isinstance(model, torch.nn.Module):
            raise ConfigTypeError(f"the torch backend needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.output = output
        self.input_layout = input_layout or "channels_first"
        named = dict(model.named_modules())
        self.modules: list[torch.nn.Module] = []
        names = []
        for layer in layers:
            name, module = self._resolve(layer, named)
            names.append(name)
            self.modules.append(module)
        self.layer_names = tuple(names)
        self._warned_training = False

    @staticmethod
    def _resolve(layer: Any, named: dict[str, torch.nn.Module]) -> tuple[str, torch.nn.Module]:
        if isinstance(layer, str):
            if layer in named:
                return layer, named[layer]
            raise LayerError(f"layer {layer!r} not found in the model{closest(layer, [n for n in named if n])}")
        if isinstance(layer, torch.nn.Module):
            for name, module in named.items():
                if module is layer:
                    return name or type(layer).__name__, module
            raise LayerError(f"the {type(layer).__name__} module given as layer is not part of the model")
        raise LayerError(f"a torch layer is a module name or a module object, got {type(layer).__name__}")

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        for tensor in (*self.model.parameters(), *self.model.buffers()):
            if tensor.is_floating_point():
                return tensor.device, tensor.dtype
        return torch.device("cpu"), torch.float32

    def _as_input(self, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, np.ndarray):
            if not np.issubdtype(inputs.dtype, np.floating):
                raise InputError(f"input must be floating point, got dtype {inputs.dtype}; scale it to floats first")
            device, dtype = self._device_dtype()
            inputs = torch.as_tensor(inputs, dtype=dtype, device=device)
        if not isinstance(inputs, torch.Tensor):
            raise InputError(f"input must be a torch.Tensor or a NumPy array, got {type(inputs).__name__}")
        if not inputs.is_floating_point():
            raise InputError(f"input must be floating point, got {inputs.dtype}; e.g. x.float() / 255")
        spatial_shape(tuple(inputs.shape), self.input_layout)
        return inputs

    def _warn_training(self) -> None:
        if self.model.training and not self._warned_training:
            self._warned_training = True
            warnings.warn(
                "the model is in training mode: BatchNorm mixes the samples of a batch and Dropout "
                "is random, so maps depend on the batch; call model.eval() first",
                stacklevel=4,
            )

    def _forward(self, inputs: torch.Tensor, differentiable: bool) -> tuple[Any, list[torch.Tensor]]:
        """Runs the model; returns its output and the captured layer outputs."""
        owner = threading.get_ident()
        captured: dict[int, torch.Tensor] = {}

        def make_hook(index: int) -> Any:
            def hook(module: torch.nn.Module, args: Any, out: Any) -> Any:
                if threading.get_ident() != owner:
                    return None
                if not isinstance(out, torch.Tensor):
                    raise LayerError(
                        f"layer {self.layer_names[index]!r} returns a {type(out).__name__}, not a tensor; "
                        "explain a layer whose output is a feature map"
                    )
                if index in captured:
                    raise LayerError(
                        f"layer {self.layer_names[index]!r} runs more than once per forward pass "
                        "(a shared module); explain a module that runs once"
                    )
                if not differentiable:
                    captured[index] = out.detach()
                    return None
                torch.set_grad_enabled(True)
                leaf = out if out.requires_grad else out.detach().requires_grad_()
                captured[index] = leaf
                return leaf.clone()

            return hook

        handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(self.modules)]
        try:
            # no_grad() keeps everything before the layer graph-free.
            with torch.no_grad():
                output = self.model(inputs)
        finally:
            for handle in handles:
                handle.remove()
        missing = [self.layer_names[i] for i in range(len(self.modules)) if i not in captured]
        if missing:
            raise LayerError(
                f"layer(s) {', '.join(map(repr, missing))} did not run during the forward pass; "
                "explain a layer on the path from the input to the output"
            )
        return output, [captured[i] for i in range(len(self.modules))]

    @staticmethod
    def _scores(output: Any, target: TargetSpec, batch: int) -> tuple[torch.Tensor, np.ndarray | None]:
        """Returns (N, K) scores and the (N, K) class indices (None for callables)."""
        if target.kind == "callable":
            assert target.fn is not None
            scores = target.fn(output)
            if not isinstance(scores, torch.Tensor) or scores.ndim not in (1, 2) or scores.shape[0] != batch:
                shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise TargetError(
                    f"a callable target must return a tensor of shape (N,) or (N, K) with N={batch}, got {shape}"
                )
            return scores.reshape(batch, -1), None
        if not isinstance(output, torch.Tensor):
            raise TargetError(f"the selected model output is a {type(output).__name__}, not a tensor; use output=...")
        if output.ndim != 2 or output.shape[0] != batch:
            raise TargetError(
                f"class-index targets need a model output of shape (N, classes), got {tuple(output.shape)}; "
                "pass a callable target that maps the output to (N,) scores"
            )
        indices = resolve_indices(target, _to_numpy(output))
        scores = output.gather(1, torch.as_tensor(indices, device=output.device))
        return scores, indices

    def _gradients(self, scores: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Returns per layer ∂scores/∂leaf as (N, K, ...) tensors."""
        if not scores.requires_grad:
            raise LayerError(
                f"the explained output does not depend on layer(s) {', '.join(map(repr, self.layer_names))}; "
                "explain a layer on the path to the output"
            )
        count = scores.shape[1]
        if count == 1:
            grads = torch.autograd.grad(scores.sum(), leaves, allow_unused=True)
            per_layer = [None if g is None else g.unsqueeze(1) for g in grads]
        else:
            try:
                eye = torch.eye(count, dtype=scores.dtype, device=scores.device)
                cotangents = eye[:, None, :].expand(count, scores.shape[0], count)
                grads = torch.autograd.grad(
                    scores,
                    leaves,
                    grad_outputs=cotangents,
                    is_grads_batched=True,
                    retain_graph=True,
                    allow_unused=True,
                )
            except RuntimeError:
                # Some operators have no batching rule; fall back to one backward per target.
                columns = [
                    torch.autograd.grad(scores[:, k].sum(), leaves, retain_graph=True, allow_unused=True)
                    for k in range(count)
                ]
                grads = tuple(
                    None if column[0] is None else torch.stack(list(column), dim=0)
                    for column in zip(*columns, strict=True)
                )
            per_layer = [None if g is None else g.transpose(0, 1) for g in grads]
        for name, grad in zip(self.layer_names, per_layer, strict=False):
            if grad is None:
                raise LayerError(f"layer {name!r} does not reach the explained output (its gradient is None)")
        return per_layer  # type: ignore[return-value]

    def capture(self, inputs: Any, target: TargetSpec, *, gradients: bool = True) -> Capture:
        # inference_mode(False) lets a call made inside the user's inference_mode() build the
        # small graph it needs.
        with torch.inference_mode(False):
            return self._capture(inputs, target, gradients)

    def _capture(self, inputs: Any, target: TargetSpec, gradients: bool) -> Capture:
        x = self._as_input(inputs)
        self._warn_training()
        # The batch size travels as an argument: one adapter serves every thread that shares the
        # Explainer, so nothing of a call may live on self.
        batch = int(x.shape[0])
        output, leaves = self._forward(x, differentiable=gradients)
        selected = select_output(output, self.output)
        if gradients:
            with torch.enable_grad():
                scores, indices = self._scores(selected, target, batch)
                grads = self._gradients(scores, leaves)
            grads_np: tuple[np.ndarray, ...] | None = tuple(_to_numpy(g) for g in grads)
        else:
            with torch.no_grad():
                scores, indices = self._scores(selected, target, batch)
            grads_np = None
        return Capture(
            activations=tuple(_to_numpy(a) for a in leaves),
            gradients=grads_np,
            scores=_to_numpy(scores),
            target=indices,
            input_spatial=spatial_shape(tuple(x.shape), self.input_layout),
            layouts=("channels_first",) * len(leaves),
        )

    def parameter_layers(self, inputs: Any = None) -> tuple[str, ...]:
        order: list[str] = []
        for name, module in self.model.named_modules():
            if name and any(True for _ in module.parameters(recurse=False)):
                order.append(name)
        return tuple(order)

    def randomized(self, layers: Sequence[str], seed: int = 0) -> TorchBackend:
        named = dict(self.model.named_modules())
        unknown = [name for name in layers if name not in named]
        if unknown:
            raise LayerError(f"cannot randomise unknown layer(s) {', '.join(map(repr, unknown))}")
        model = copy.deepcopy(self.model)
        copies = dict(model.named_modules())
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            for name in layers:
                module = copies[name]
                reset = getattr(module, "reset_parameters", None)
                if reset is None:
                    raise LayerError(
                        f"layer {name!r} ({type(module).__name__}) has no reset_parameters(); "
                        "randomise the layers that have one"
                    )
                reset()
        finally:
            torch.random.set_rng_state(generator_state)
        clone = copy.copy(self)
        clone.model = model
        twins = {id(o): c for o, c in zip(self.model.modules(), model.modules(), strict=True)}
        clone.modules = [twins[id(module)] for module in self.modules]
        clone._warned_training = self._warned_training
        return clone

    def predict(self, inputs: Any) -> np.ndarray:
        x = self._as_input(inputs)
        with torch.inference_mode(False), torch.no_grad():
            return _to_numpy(select_output(self.model(x), self.output))


BACKEND = TorchBackend
