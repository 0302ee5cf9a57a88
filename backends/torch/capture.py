"""Activations and gradients of a torch model: a cloning forward hook and ``torch.autograd.grad``.

The forward runs under ``no_grad``; the hook on the (first) explained layer switches grad mode on
and keeps the layer output as a leaf that requires grad, handing the rest of the network a *clone*
(in-place operations downstream then modify the clone, not the captured activations). Gradients of
K targets come from one batched ``autograd.grad`` where autograd can vmap the graph, else one call
per target. ``"name:input"`` captures a module's first positional argument with a *pre*-hook. Also
here: the model's predictions and the scores of its inputs (Score-CAM, the metrics), each layer's
layout as the modules that produced it decide it, and the refusal of layers TorchScript runs.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from anycam._errors import BackendError, LayerError, TargetError
from anycam.core import TargetSpec, check_scores_shape, resolve_indices, spatial_shape
from anycam.protocol.backend import Capture, select_output
from anycam.protocol.inputs import ModelInputs

from .inputs import batch_of, inference_error, structure, to_numpy

if TYPE_CHECKING:
    from .backend import TorchBackend


# The layouts the last forward() on this thread found per layer (the adapter is shared by threads,
# so nothing of a call lives on it).
_call_layouts = threading.local()


class _RunsTwice(LayerError):
    """Raised inside the forward pass when an explained module runs a second time."""

    def __init__(self, index: int) -> None:
        super().__init__(f"layer {index} runs more than once")
        self.index = index


def forward(
    backend: TorchBackend, structure: ModelInputs, differentiable: bool, keep_graph: bool = False
) -> tuple[Any, list[torch.Tensor]]:
    """Runs the model; returns its output and the captured layer outputs (or inputs).

    ``differentiable``: the captured outputs are leaves that require grad, the network after
    them is recorded. ``keep_graph`` (``Explainer(differentiable=True)``): the whole forward is
    recorded and the captured outputs stay attached to it, so that gradients reach the
    parameters before the layer and the input.
    """
    check_hookable(backend)
    owner = threading.get_ident()
    captured: dict[int, torch.Tensor] = {}
    layouts: dict[int, str | None] = {}
    _call_layouts.value = layouts

    def keep(index: int, value: Any) -> torch.Tensor | None:
        """Captures ``value`` for layer ``index``; returns what the network continues with."""
        what = "input" if backend.ports[index] == "input" else "output"
        if not isinstance(value, torch.Tensor):
            raise LayerError(
                f"layer {backend.layer_names[index]!r}: the module's {what} is a {type(value).__name__}, "
                "not a tensor; explain a layer whose output is a feature map"
            )
        if index in captured:
            raise _RunsTwice(index)
        if not differentiable:
            # A copy: the network may modify the layer output in place after the hook (a residual
            # block's ``out += identity`` after ``bn2``), and the capture must hold what the layer gave.
            captured[index] = value.detach().clone()
            return None
        torch.set_grad_enabled(True)
        if keep_graph:
            # The layer output itself, graph and all; the network goes on with a clone, so that
            # in-place operations downstream cannot change what the map is computed from. A value
            # that depends on nothing differentiable gets a leaf, as below.
            captured[index] = value if value.requires_grad else value.detach().requires_grad_()
            return captured[index].clone()
        leaf = value if value.requires_grad else value.detach().requires_grad_()
        captured[index] = leaf
        return leaf.clone()

    def make_hook(index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, out: Any) -> Any:
            if threading.get_ident() != owner:
                return None
            layouts.setdefault(index, tracker.at(module, out))
            return keep(index, out)

        return hook

    def make_pre_hook(index: int) -> Any:
        def pre_hook(module: torch.nn.Module, args: Any) -> Any:
            if threading.get_ident() != owner:
                return None
            layouts.setdefault(index, tracker.reading(args[0]) if args else None)
            if not args:
                raise LayerError(
                    f"layer {backend.layer_names[index]!r}: the module is called with no positional input "
                    "to capture; explain the output of the module before it"
                )
            replacement = keep(index, args[0])
            return None if replacement is None else (replacement, *args[1:])

        return pre_hook

    # The tracker's hooks go first, so a layer that decides its own layout (nn.Linear) is seen
    # by its own capture hook.
    tracker, handles = track(backend.model, owner)
    handles += [
        module.register_forward_pre_hook(make_pre_hook(i))
        if port == "input"
        else module.register_forward_hook(make_hook(i))
        for i, (module, port) in enumerate(zip(backend.modules, backend.ports, strict=True))
    ]
    try:
        # no_grad() keeps everything before the layer graph-free (unless the graph is wanted).
        with torch.set_grad_enabled(keep_graph):
            output = backend._call(structure)
    except _RunsTwice as exc:
        for handle in handles:  # before the diagnosing pass below (removing twice is harmless)
            handle.remove()
        index = exc.index
        hint = "a module that runs once"
        if backend.ports[index] == "output":
            after = _runs_after(backend.model, structure, backend.modules[index])
            if after:
                hint += f", or '{after}:input' (the input of the module that runs after its last call)"
            else:
                hint += ", or the input of the module after it ('<name>:input', e.g. 'avgpool:input')"
        raise LayerError(
            f"layer {backend.layer_names[index]!r} runs more than once per forward pass (a shared module, "
            f"e.g. one activation used by several blocks); explain {hint}"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    missing = [backend.layer_names[i] for i in range(len(backend.modules)) if i not in captured]
    if missing:
        raise LayerError(
            f"layer(s) {', '.join(map(repr, missing))} did not run during the forward pass; "
            "explain a layer on the path from the input to the output"
        )
    return output, [captured[i] for i in range(len(backend.modules))]


def _runs_after(model: torch.nn.Module, structure: ModelInputs, shared: torch.nn.Module) -> str | None:
    """Returns the name of the first module that starts after ``shared``'s last call, or None.

    Only for the error message: one more forward pass, with hooks that record the order.
    """
    owner = threading.get_ident()
    inside = {id(m) for m in shared.modules()}
    events: list[str | None] = []

    def ended(module: torch.nn.Module, args: Any, out: Any) -> None:
        if threading.get_ident() == owner:
            events.append(None)

    def started(name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if threading.get_ident() == owner:
                events.append(name)

        return hook

    handles = [shared.register_forward_hook(ended)]
    handles += [
        module.register_forward_pre_hook(started(name))
        for name, module in model.named_modules()
        if name and id(module) not in inside
    ]
    try:
        with torch.no_grad():
            structure.call(model)
    except Exception:  # a diagnosis must not hide the error it explains
        return None
    finally:
        for handle in handles:
            handle.remove()
    last = max((i for i, event in enumerate(events) if event is None), default=None)
    following = [event for event in events[last + 1 :] if event is not None] if last is not None else []
    return following[0] if following else None


def scores(output: Any, target: TargetSpec, batch: int, native: bool = False) -> tuple[torch.Tensor, np.ndarray | None]:
    """Returns (N, K) scores and the (N, K) class indices (None for callables).

    ``native``: argmax and top-k are taken on the model's device and only the (N, K) indices come
    to the host (the NumPy rule: first maximum, ties in class order).
    """
    if target.kind == "callable":
        assert target.fn is not None
        values = target.fn(output)
        if not isinstance(values, torch.Tensor):
            raise TargetError(
                f"a callable target must return a tensor of shape (N,) or (N, K) with N={batch}, "
                f"got {type(values).__name__}"
            )
        check_scores_shape(tuple(values.shape), batch)
        return values.reshape(batch, -1), None
    if not isinstance(output, torch.Tensor):
        raise TargetError(f"the selected model output is a {type(output).__name__}, not a tensor; use output=...")
    if output.ndim != 2 or output.shape[0] != batch:
        raise TargetError(
            f"class-index targets need a model output of shape (N, classes), got {tuple(output.shape)}; "
            "pass a callable target that maps the output to (N,) scores"
        )
    if native:
        indices = native_indices(target, output)
    else:
        indices = resolve_indices(target, to_numpy(output))
    values = output.gather(1, torch.as_tensor(indices, device=output.device))
    return values, indices


def native_indices(target: TargetSpec, output: torch.Tensor) -> np.ndarray:
    """``core.resolve_indices`` with the model output left on its device: (N, K) int64 indices."""
    batch, classes = output.shape
    if target.kind == "argmax":
        chosen = torch.argmax(output.detach(), dim=1, keepdim=True)
    elif target.kind == "topk":
        if target.k > classes:
            raise TargetError(f"top_k({target.k}) asks for more classes than the model has ({classes})")
        chosen = torch.argsort(-output.detach(), dim=1, stable=True)[:, : target.k]
    else:
        # Given indices: the core checks them against the output's shape only (a zero-stride stand-in).
        return resolve_indices(target, np.broadcast_to(np.float32(0), (batch, classes)))
    return chosen.to("cpu", torch.int64).numpy()


def gradients(
    layer_names: tuple[str, ...], scores: torch.Tensor, leaves: list[torch.Tensor], create_graph: bool = False
) -> list[torch.Tensor]:
    """Returns per layer ∂scores/∂leaf as (N, K, ...) tensors (graph-carrying with ``create_graph``)."""
    if not scores.requires_grad:
        raise LayerError(
            f"the explained output does not depend on layer(s) {', '.join(map(repr, layer_names))}; "
            "explain a layer on the path to the output"
        )
    count = scores.shape[1]
    grads: tuple[torch.Tensor | None, ...]
    per_layer: list[torch.Tensor | None]
    if count == 1:
        grads = torch.autograd.grad(scores.sum(), leaves, allow_unused=True, create_graph=create_graph)
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
                create_graph=create_graph,
            )
        except RuntimeError:
            # Some operators have no batching rule; fall back to one backward per target.
            columns = [
                torch.autograd.grad(
                    scores[:, k].sum(), leaves, retain_graph=True, allow_unused=True, create_graph=create_graph
                )
                for k in range(count)
            ]
            grads = tuple(
                None if column[0] is None else torch.stack(list(column), dim=0) for column in zip(*columns, strict=True)
            )
        per_layer = [None if g is None else g.transpose(0, 1) for g in grads]
    for name, grad in zip(layer_names, per_layer, strict=False):
        if grad is None:
            raise LayerError(f"layer {name!r} does not reach the explained output (its gradient is None)")
    return per_layer  # type: ignore[return-value]


def capture(
    backend: TorchBackend,
    inputs: Any,
    target: TargetSpec,
    gradients: bool,
    native: bool = False,
    differentiable: bool = False,
) -> Capture:
    """Runs the model once with the layers hooked: activations, gradients of K targets, scores.

    ``native``: the arrays stay tensors on the model's device (float32 unless float64), no host
    copy; ``differentiable``: besides, they stay on the graph (the whole forward is recorded and
    the gradients are taken with ``create_graph=True``), so a loss on the map reaches the
    parameters and the input. ``autograd.grad`` never writes ``.grad``.
    """
    # inference_mode(False) lets a call made inside the user's inference_mode() build the
    # small graph it needs.
    with torch.inference_mode(False):
        try:
            return _capture(backend, inputs, target, gradients, native or differentiable, differentiable)
        except RuntimeError as exc:
            if "Inference tensors" in str(exc):
                raise inference_error(exc) from exc
            raise


def _capture(
    backend: TorchBackend, inputs: Any, target: TargetSpec, with_gradients: bool, native: bool, keep_graph: bool
) -> Capture:
    given = structure(backend, inputs, keep_graph=keep_graph)
    backend._warn_training()
    # The batch size travels as an argument: one adapter serves every thread that shares the
    # Explainer, so nothing of a call may live on the adapter.
    batch = batch_of(given)
    if backend.auto_layer and not backend.layer_names:
        backend._choose(given, target)
    _call_layouts.value = None
    output, leaves = backend._forward(given, differentiable=with_gradients or keep_graph, keep_graph=keep_graph)
    found = _call_layouts.value or {}
    # Where no module decided a layout, None: torch's channels-first habit is no evidence for a
    # custom module's output, so the core takes a reading only where it is the one that fits
    # and otherwise asks for layout=.
    layouts = tuple(found.get(i) for i in range(len(leaves)))
    selected = select_output(output, backend.output)
    grads: list[torch.Tensor] | None = None
    if with_gradients:
        with torch.enable_grad():
            values, indices = scores(selected, target, batch, native)
            grads = gradients(backend.layer_names, values, leaves, create_graph=keep_graph)
    else:
        with torch.set_grad_enabled(keep_graph):
            values, indices = scores(selected, target, batch, native)
    if native:
        kept = on_device if keep_graph else detached
        activations: tuple[Any, ...] = tuple(kept(a) for a in leaves)
        grads_out: tuple[Any, ...] | None = None if grads is None else tuple(kept(g) for g in grads)
        values_out: Any = kept(values)
    else:
        activations = tuple(to_numpy(a) for a in leaves)
        grads_out = None if grads is None else tuple(to_numpy(g) for g in grads)
        values_out = to_numpy(values)
    return Capture(
        activations=activations,
        gradients=grads_out,
        scores=values_out,
        target=indices,
        input_spatial=spatial_shape(tuple(given.spatial_value.shape), backend.input_layout),
        layouts=layouts,
        input_shape=tuple(given.spatial_value.shape),
        input_layout=backend.input_layout,
    )


def on_device(tensor: torch.Tensor) -> torch.Tensor:
    """Returns ``tensor`` in the core's device precision, on its device, graph kept: float32 (float64 stays)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def detached(tensor: torch.Tensor) -> torch.Tensor:
    """Returns ``tensor`` off the graph, in the core's device precision, on its device."""
    return on_device(tensor.detach())


def predict(backend: TorchBackend, inputs: Any) -> np.ndarray:
    """Returns the selected model output as float32 NumPy, no graph."""
    given = structure(backend, inputs)
    with torch.inference_mode(False), torch.no_grad():
        return to_numpy(select_output(backend._call(given), backend.output))


def input_scores(
    backend: TorchBackend, inputs: Any, target: TargetSpec, indices: np.ndarray | None, probabilities: bool
) -> np.ndarray:
    """Returns the (N, K) scores of the model on ``inputs`` (softmax probabilities if asked), no graph."""
    if probabilities and target.kind == "callable":
        raise TargetError(
            "probabilities=True needs class scores; with a callable target Score-CAM weights by what "
            "the callable returns, so return the score to weight by (e.g. a softmax probability)"
        )
    with torch.inference_mode(False), torch.no_grad():
        given = structure(backend, inputs)
        batch = batch_of(given)
        output = select_output(backend._call(given), backend.output)
        if target.kind == "callable":
            values, _ = scores(output, target, batch)
        else:
            if not isinstance(output, torch.Tensor) or output.ndim != 2:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise TargetError(
                    f"class-index targets need a model output of shape (N, classes), got {shape}; "
                    "pass a callable target that maps the output to (N,) scores"
                )
            # The same checks as every other target path: count and class range, as TargetError.
            resolve_indices(TargetSpec("indices", squeeze=False, indices=np.asarray(indices)), to_numpy(output))
            if probabilities:
                output = torch.softmax(output.float(), dim=1)
            values = output.gather(1, torch.as_tensor(indices, device=output.device))
    return to_numpy(values)


# -- layouts: where a layer's channels are -----------------------------------------------------
#
# torch has no layout attribute: ``Conv2d`` writes ``(N, C, H, W)``, but a model may permute to
# ``(N, H, W, C)`` and go on with ``nn.Linear`` / ``nn.LayerNorm`` over the last axis (ConvNeXt's
# blocks, MLP-Mixer, Swin). A layer's layout is taken from the last module that *decides* one and
# ran up to the layer (itself, or the last such module inside or before it in call order), kept
# only while the output still has that module's channel count on that axis. With no such module
# the layout is undecided (None); the core checks every guess against the shapes. A Python module
# around a TorchScript part (the recipe below) counts as channels first: hooks cannot see inside.

# Modules whose output is channels-first by construction (their channel axis is 1).
_CHANNELS_FIRST: tuple[type[torch.nn.Module], ...] = (
    torch.nn.modules.conv._ConvNd,
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.GroupNorm,
    torch.nn.LocalResponseNorm,
    torch.nn.modules.pooling._MaxPoolNd,
    torch.nn.modules.pooling._AvgPoolNd,
    torch.nn.modules.pooling._AdaptiveAvgPoolNd,
    torch.nn.modules.pooling._AdaptiveMaxPoolNd,
    torch.nn.modules.pooling._LPPoolNd,
    torch.nn.Upsample,
    torch.nn.PixelShuffle,
    torch.nn.PixelUnshuffle,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
)


def decided(module: torch.nn.Module, out: Any) -> tuple[str, int] | None:
    """Returns (layout, channels) that ``module``'s output ``out`` has by construction, or None."""
    if not isinstance(out, torch.Tensor) or out.ndim < 3:
        return None
    if isinstance(module, _CHANNELS_FIRST):
        return "channels_first", int(out.shape[1])
    # A dense layer or a LayerNorm over the last axis of a map with spatial axes: channels last.
    if isinstance(module, torch.nn.Linear) and out.shape[-1] == module.out_features:
        return "channels_last", module.out_features
    if isinstance(module, torch.nn.LayerNorm) and len(module.normalized_shape) == 1:
        return "channels_last", int(module.normalized_shape[0])
    return None


class Tracker:
    """Follows, during one forward pass, the last module that decided a layout and its channel count."""

    def __init__(self) -> None:
        self.last: tuple[str, int] | None = None
        self.decisions = 0  # how many module outputs decided a layout so far

    def at(self, module: torch.nn.Module, out: Any) -> str | None:
        """The layout of ``module``'s output: its own if it decides one, else the last one seen,
        where the output still has that many channels on that axis (code between modules may
        have permuted it: ConvNeXt's blocks go back to channels first after their dense layers)."""
        own = decided(module, out)
        if own is not None:
            self.last = own
            self.decisions += 1
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


def track(model: torch.nn.Module, owner: int) -> tuple[Tracker, list[Any]]:
    """Returns a Tracker fed by forward hooks on the modules that decide a layout (those TorchScript
    runs excluded), and the hooks' handles, for the caller to remove."""
    tracker = Tracker()

    def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
        if threading.get_ident() == owner:
            tracker.at(module, out)

    started: dict[int, int] = {}

    def entering(module: torch.nn.Module, args: Any) -> None:
        if threading.get_ident() == owner:
            started[id(module)] = tracker.decisions

    def scripted(module: torch.nn.Module, args: Any, out: Any) -> None:
        # A TorchScript part hides its modules from hooks, so nothing can decide its output's
        # layout; it is taken in torch's own convention, channels first, as before round 2 —
        # unless a module anycam sees decided one after the part, within the same module.
        if threading.get_ident() != owner or started.get(id(module)) != tracker.decisions:
            return
        if isinstance(out, torch.Tensor) and out.ndim >= 3:
            tracker.last = ("channels_first", int(out.shape[1]))

    handles = [
        module.register_forward_hook(hook)
        for module in model.modules()
        if isinstance(module, (*_CHANNELS_FIRST, torch.nn.Linear, torch.nn.LayerNorm))
        and not isinstance(module, torch.jit.ScriptModule)
    ]
    wrappers = [
        module
        for module in model.modules()
        if not isinstance(module, torch.jit.ScriptModule)
        and any(isinstance(child, torch.jit.ScriptModule) for child in module.children())
    ]
    handles += [module.register_forward_pre_hook(entering) for module in wrappers]
    handles += [module.register_forward_hook(scripted) for module in wrappers]
    return tracker, handles


# -- TorchScript: where hooks cannot reach -------------------------------------------------------
#
# A ScriptModule's compiled code calls its submodules without Python, so forward hooks on them are
# refused (scripted) or never run (traced). An explained layer there is refused with a recipe that
# works: Python modules around the scripted parts.

_RECIPE = """Explain a Python module instead: build the model from its Python class and load the weights
(model.load_state_dict(scripted.state_dict())), or wrap the scripted parts before and after the layer
in Python modules, whose outputs anycam can read:
    class Part(torch.nn.Module):
        def __init__(self, inner): super().__init__(); self.inner = inner
        def forward(self, *args): return self.inner(*args)
    class Split(torch.nn.Module):
        def __init__(self, features, head): super().__init__(); self.features, self.head = Part(features), Part(head)
        def forward(self, x): return self.head(self.features(x))
    anycam.Explainer(Split(features, head), "features")"""


def scripted_at(model: torch.nn.Module, module: torch.nn.Module) -> str | None:
    """Returns the name of the outermost TorchScript module that is or contains ``module``, or None."""
    scripted = [name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    for name, m in model.named_modules():
        if m is module:
            for owner in scripted:
                if not owner or name == owner or name.startswith(owner + "."):
                    return owner
            return None
    return None


def script_error(model: torch.nn.Module, owner: str, layer: str | None) -> BackendError:
    """The refusal for a layer that TorchScript runs, with the wrapper recipe."""
    scripted = model if not owner else dict(model.named_modules())[owner]
    kind = "traced" if isinstance(scripted, torch.jit.TracedModule) else "scripted"
    where = "the model is" if not owner else f"{owner!r} is"
    what = f"layer {layer!r} runs" if layer is not None else "layer=None: every layer of this model runs"
    return BackendError(
        f"{what} inside TorchScript: {where} a {kind} module (torch.jit), whose compiled code calls its "
        f"submodules without Python, so no hook can read a layer there. {_RECIPE}"
    )


def check_hookable(backend: TorchBackend) -> None:
    """Raises BackendError when an explained layer runs inside TorchScript (hooks never reach it)."""
    for name, module in zip(backend.layer_names, backend.modules, strict=True):
        owner = scripted_at(backend.model, module)
        if owner is not None:
            raise script_error(backend.model, owner, name)
