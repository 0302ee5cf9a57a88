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
* ``"name:input"`` explains what flows *into* a module: a forward *pre*-hook captures its first
  positional argument the same way (the input of ``avgpool`` is the post-activation map even
  when the activation module is shared and runs several times).
* Inputs are one structure (``anycam.protocol.inputs``): a tensor, a tuple/list (positional), a dict
  (keywords) and constant ``model_kwargs``; every tensor is converted and checked on its own.
* ``nn.DataParallel``, ``DistributedDataParallel`` and ``torch.compile`` wrappers are unwrapped:
  the original module runs eagerly on its own device (hooks on a compiled graph would recompile
  it, and replicas in other threads would escape the hooks), and layer names work with or without
  the wrapper's ``module.`` / ``_orig_mod.`` prefix.
"""

from __future__ import annotations

import copy
import inspect
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from anycam.protocol.backend import AblationHead, Backend, Capture, check_options, select_output
from anycam._errors import (
    AnycamError,
    AnycamWarning,
    BackendError,
    ConfigTypeError,
    InputError,
    LayerError,
    TargetError,
    TrainingModeWarning,
    closest,
    user_stacklevel,
)
from anycam.protocol.inputs import Key, ModelInputs, looks_spatial, structure_inputs
from anycam.protocol.layers import LayerRecord, choose_layer, is_auto, parse_layer
from anycam.core import (
    TargetSpec,
    check_batch,
    check_scores_shape,
    forward_error,
    non_finite_input,
    resolve_indices,
    spatial_shape,
)

from .guided import GuidedMode
from .head import GraphSplit, batched, copies_scorer, graph_split, pooled_head, to_scores


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


def _unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """Returns the module inside DataParallel/DDP/``torch.compile`` wrappers and their name prefixes."""
    prefixes: list[str] = []
    nn = torch.nn.Module
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            prefixes.append("module.")
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn):
            # torch.compile's wrapper; the original module computes the same function eagerly.
            prefixes.append("_orig_mod.")
            model = model._orig_mod
        else:
            return model, tuple(prefixes)


class _RunsTwice(LayerError):
    """Raised inside the forward pass when an explained module runs a second time."""

    def __init__(self, index: int) -> None:
        super().__init__(f"layer {index} runs more than once")
        self.index = index


def _parameter_names(function: Any) -> list[str]:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _unknown_keys(function: Any, inputs: ModelInputs) -> list[str]:
    """The keywords given that ``function`` does not name (it may still take them through ``**kwargs``)."""
    names = _parameter_names(function)
    if not names:
        return []
    return [key for key in (*inputs.kwargs, *inputs.constants) if key not in names]


def _binds(function: Any, inputs: ModelInputs) -> bool:
    """Returns False only when ``function``'s signature surely rejects the inputs."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*inputs.args, **inputs.kwargs, **inputs.constants)
    except TypeError:
        return False
    return True


def _check_finite(value: torch.Tensor, what: str) -> None:
    """Raises NonFiniteError for NaN/inf in an input: one reduction, one sync per call.

    A NaN or inf anywhere makes the sum NaN or inf, so a finite sum (accumulated in at least
    float32, one pass, nothing allocated) proves every element finite; only a sum that is not
    finite (a bad element, or finite values that overflow when added) is looked at element-wise.
    """
    accumulate = torch.float64 if value.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(value.sum(dtype=accumulate))):
        return
    if not bool(torch.isfinite(value).all()):
        bad = ~torch.isfinite(value)
        raise non_finite_input(what, bool(torch.isnan(value).any()), int(bad.sum()))


_BUFFER_LOCK = threading.RLock()

# Modules whose forward differs between training and evaluation mode.
_NORMS = (torch.nn.modules.batchnorm._BatchNorm,)
_DROPOUTS = (torch.nn.modules.dropout._DropoutNd,)


def _training_sensitive(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Returns (name, class) of the modules in training mode that behave differently in training.

    BatchNorm (batch statistics, running-statistics updates), InstanceNorm that tracks running
    statistics, Dropout of any kind, and modules with a ``dropout`` rate > 0 (attention, RNNs).
    A root module in training mode counts too: its own forward may read ``self.training``.
    """
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        instance_norm = isinstance(module, torch.nn.modules.instancenorm._InstanceNorm)
        rate = getattr(module, "dropout", 0.0)
        if (
            isinstance(module, _NORMS + _DROPOUTS)
            or (instance_norm and module.track_running_stats)
            or (isinstance(rate, float) and rate > 0)
            or not name
        ):
            found.append((name, type(module).__name__))
    return found


def _inference_error(exc: BaseException) -> BackendError:
    return BackendError(
        "the model's weights (or buffers) are inference tensors: they were created or loaded under "
        "torch.inference_mode(), and autograd cannot save them for the backward pass Grad-CAM needs. "
        "Create or load the model under torch.no_grad() instead, or explain a copy: "
        f"copy.deepcopy(model) holds ordinary tensors ({exc})"
    )


def _rows_scores(output: Any, count: int, batch: int, indices: np.ndarray | None, fn: Any) -> torch.Tensor | None:
    """Returns ``(count, batch, K)`` scores of an output computed on count·batch rows, or None
    when that output is not a tensor with those rows (the copies then run one at a time)."""
    if not isinstance(output, torch.Tensor) or output.ndim == 0 or output.shape[0] != count * batch:
        return None
    per_copy = output.unflatten(0, (count, batch))
    if fn is None:
        index = torch.as_tensor(indices, device=output.device).expand(count, -1, -1)
        return per_copy.gather(2, index)
    # A callable target sees each copy's (N, ...) output, as in an ordinary call.
    return batched(lambda out: fn(out).reshape(batch, -1), per_copy)


class TorchBackend(Backend):
    """Adapter for ``torch.nn.Module`` models (CPU or CUDA, any float dtype).

    Layers are module names as in ``model.named_modules()`` (``"layer4"``, ``"layer4.1.conv2"``),
    with ``":input"`` for a module's input (``"avgpool:input"``), module objects, or None /
    ``"auto"`` (chosen at the first call from the modules' forward order). The model runs in
    whatever mode the user left it in; a model in training mode gets a warning, since BatchNorm
    then mixes the samples of a batch.

    Options:
        spatial_input: the input that carries the spatial grid (index or key).
        model_kwargs: constant keyword arguments for every model call.
    """

    name = "torch"
    capabilities = frozenset({"input_scores", "head_scores", "ablation_head", "guided_gradients", "randomize"})

    def __init__(
        self,
        model: Any,
        layers: Sequence[Any],
        *,
        output: Any = None,
        input_layout: str | None = None,
        **options: Any,
    ) -> None:
        check_options(self.name, options, ("model_kwargs", "spatial_input"))
        if not isinstance(model, torch.nn.Module):
            raise ConfigTypeError(f"the torch backend needs a torch.nn.Module, got {type(model).__name__}")
        self.model, self._prefixes = _unwrap(model)
        self.output = output
        self.input_layout = input_layout or "channels_first"
        self.spatial_input: Key | None = options.get("spatial_input")
        self.model_kwargs: dict[str, Any] = dict(options.get("model_kwargs") or {})
        self.modules: list[torch.nn.Module] = []
        self.ports: list[str] = []
        self.layer_names = ()
        self._choose_lock = threading.Lock()
        self.auto_layer = len(layers) == 1 and is_auto(layers[0])
        if not self.auto_layer:
            named = dict(self.model.named_modules())
            resolved = [self._resolve(layer, named) for layer in layers]
            self._set_layers(resolved)
        self._warned_training = False
        # Traced graph splits per (layer module, port): derived from the model's structure, like a
        # compiled graph, never from a call's data.
        self._splits: dict[tuple[int, str], GraphSplit | None] = {}
        self._splits_lock = threading.Lock()

    def _set_layers(self, resolved: Sequence[tuple[str, torch.nn.Module, str]]) -> None:
        self.modules = [module for _, module, _ in resolved]
        self.ports = [port for _, _, port in resolved]
        self.layer_names = tuple(name for name, _, _ in resolved)

    def _resolve(self, layer: Any, named: dict[str, torch.nn.Module]) -> tuple[str, torch.nn.Module, str]:
        """Returns (reported name, module, port) for one layer spec."""
        if is_auto(layer):
            raise LayerError("layer='auto' (or None) chooses one layer; it cannot be part of a list")
        spec = parse_layer(layer)
        target = spec.layer
        if isinstance(target, str):
            name = target
            # Names copied from the wrapped model (state_dict keys) carry the wrappers' prefixes.
            while name not in named and any(name.startswith(p) for p in self._prefixes):
                name = next(name[len(p) :] for p in self._prefixes if name.startswith(p))
            if name in named and name:
                return spec.label(name), named[name], spec.port
            raise LayerError(f"layer {target!r} not found in the model{closest(target, [n for n in named if n])}")
        if isinstance(target, torch.nn.Module):
            for name, module in named.items():
                if module is target:
                    return spec.label(name or type(target).__name__), module, spec.port
            raise LayerError(f"the {type(target).__name__} module given as layer is not part of the model")
        raise LayerError(f"a torch layer is a module name or a module object, got {type(target).__name__}")

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        for tensor in (*self.model.parameters(), *self.model.buffers()):
            if tensor.is_floating_point():
                return tensor.device, tensor.dtype
        return torch.device("cpu"), torch.float32

    def _structure(self, inputs: Any) -> ModelInputs:
        """Returns the call's inputs as one structure, every tensor converted and checked."""
        structure = structure_inputs(
            inputs, is_spatial=looks_spatial, spatial_input=self.spatial_input, model_kwargs=self.model_kwargs
        )
        return structure.map(lambda key, value: self._as_tensor(key, value, key == structure.spatial, structure))

    def _as_tensor(self, key: Key, value: Any, spatial: bool, structure: ModelInputs) -> Any:
        what = "input" if structure.kind == "single" else f"input {key!r}"
        if isinstance(value, np.ndarray):
            device, dtype = self._device_dtype()
            if np.issubdtype(value.dtype, np.floating):
                value = torch.as_tensor(value, dtype=dtype, device=device)
            elif spatial:
                raise InputError(f"{what} must be floating point, got dtype {value.dtype}; scale it to floats first")
            else:
                value = torch.as_tensor(value, device=device)
        if isinstance(value, torch.Tensor):
            value = self._to_model(value, what)
        if not spatial:
            return value
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{what} must be a torch.Tensor or a NumPy array, got {type(value).__name__}")
        if not value.is_floating_point():
            raise InputError(f"{what} must be floating point, got {value.dtype}; e.g. x.float() / 255")
        spatial_shape(tuple(value.shape), self.input_layout)
        check_batch(tuple(value.shape), what)
        _check_finite(value, what)
        return value

    def _to_model(self, value: torch.Tensor, what: str) -> torch.Tensor:
        """Returns a tensor on the model's device, floating ones in its dtype (as NumPy inputs are)."""
        found = self._float_parameter()
        if found is None:
            return value
        device, dtype = found
        wanted = dtype if value.is_floating_point() else value.dtype
        if value.device == device and value.dtype == wanted:
            return value
        try:
            return value.to(device=device, dtype=wanted)
        except RuntimeError as exc:
            raise InputError(
                f"{what} is a {value.dtype} tensor on {value.device}, the model's weights are {dtype} on {device}, "
                f"and moving the input failed ({exc}); move it yourself, e.g. x.to({str(device)!r})"
            ) from exc

    def _float_parameter(self) -> tuple[torch.device, torch.dtype] | None:
        for tensor in (*self.model.parameters(), *self.model.buffers()):
            if tensor.is_floating_point():
                return tensor.device, tensor.dtype
        return None

    def _as_input(self, inputs: Any) -> torch.Tensor:
        """Returns the spatial input of ``inputs`` as a checked tensor."""
        return self._structure(inputs).spatial_value  # type: ignore[no-any-return]

    def _call(self, structure: ModelInputs) -> Any:
        """Runs the model on the structure; inputs its forward does not take name the inputs given."""
        try:
            return self._call_frozen(structure)
        except Exception as exc:
            if isinstance(exc, (AnycamError, torch.OutOfMemoryError)):
                raise
            unknown = _unknown_keys(self.model.forward, structure)
            if _binds(self.model.forward, structure) and not unknown:
                # The signature fits: the forward itself failed on these inputs (item 8).
                raise self._failed(exc, structure) from exc
            given = []
            if structure.args:
                given.append(f"{len(structure.args)} positional")
            if structure.kwargs:
                given.append("keys " + ", ".join(map(repr, structure.kwargs)))
            if structure.constants:
                given.append("model_kwargs " + ", ".join(map(repr, structure.constants)))
            hint = ""
            if unknown:
                names = _parameter_names(self.model.forward)
                hints = "".join(closest(key, names, n=1) for key in unknown)
                hint = f"; {', '.join(map(repr, unknown))} is not a parameter of forward{hints}"
            try:
                accepted = f" (it takes {inspect.signature(self.model.forward)})"
            except (TypeError, ValueError):
                accepted = ""
            raise InputError(
                f"{type(self.model).__name__}.forward{accepted} does not accept the inputs given "
                f"({'; '.join(given)}){hint}: {type(exc).__name__}: {exc}; pass a dict with the keywords it "
                "takes, a tuple in its order, or constants through model_kwargs="
            ) from exc

    def _failed(self, exc: BaseException, structure: ModelInputs) -> AnycamError:
        """The error for a forward pass that raised ``exc``: inference tensors, or the input."""
        if "Inference tensors" in str(exc):
            return _inference_error(exc)
        what = "input" if structure.kind == "single" else f"input {structure.spatial!r}"
        return forward_error(exc, tuple(structure.spatial_value.shape), self.input_layout, what)

    def _call_frozen(self, structure: ModelInputs) -> Any:
        """Calls the model; buffers of modules in training mode (BatchNorm statistics) stay as they were.

        Explaining must not change the model, but BatchNorm in training mode updates its
        running statistics on every forward pass. Such modules run on copies of their buffers
        for the call, and get their own back after it. Swapped, not copied back in place: the
        backward pass may still need the copies autograd saved.
        """
        training = [module for module in self.model.modules() if module.training and module._buffers]
        if not training:
            return structure.call(self.model)
        # Threads sharing the Explainer would otherwise swap each other's copies back in.
        with _BUFFER_LOCK:
            swapped = []
            for module in training:
                for name, buffer in module._buffers.items():
                    if buffer is not None:
                        swapped.append((module, name, buffer))
                        module._buffers[name] = buffer.clone()
            try:
                return structure.call(self.model)
            finally:
                for module, name, buffer in swapped:
                    module._buffers[name] = buffer

    def _warn_training(self) -> None:
        if self._warned_training:
            return
        training = _training_sensitive(self.model)
        if not training:
            return
        self._warned_training = True
        shown = ", ".join(f"{name or 'the model'} ({kind})" for name, kind in training[:4])
        more = f" and {len(training) - 4} more" if len(training) > 4 else ""
        warnings.warn(
            f"modules that behave differently in training are in training mode: {shown}{more}. BatchNorm "
            "then mixes the samples of a batch and Dropout is random, so maps depend on the batch (running "
            "statistics are left unchanged); call model.eval() first",
            TrainingModeWarning,
            stacklevel=user_stacklevel(),
        )

    def _choose(self, structure: ModelInputs, target: TargetSpec) -> None:
        """Chooses the layer for ``layer="auto"`` from one forward (and backward) pass, once."""
        with self._choose_lock:
            if self.layer_names:
                return
            owner = threading.get_ident()
            order: list[str] = []
            shapes: dict[str, tuple[int, ...] | None] = {}
            calls: dict[str, int] = {}
            kept: dict[str, torch.Tensor] = {}

            def make_hook(name: str) -> Any:
                def hook(module: torch.nn.Module, args: Any, out: Any) -> Any:
                    if threading.get_ident() != owner:
                        return None
                    calls[name] = calls.get(name, 0) + 1
                    if calls[name] > 1:
                        return None
                    order.append(name)
                    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                        shapes[name] = None
                        return None
                    shapes[name] = tuple(out.shape)
                    # Every module output joins one graph, so reachability of the output is
                    # one autograd query; the clone keeps in-place ops off the kept tensor.
                    kept[name] = out if out.requires_grad else out.detach().requires_grad_()
                    return kept[name].clone()

                return hook

            named = [(name, module) for name, module in self.model.named_modules() if name]
            handles = [module.register_forward_hook(make_hook(name)) for name, module in named]
            try:
                with torch.enable_grad():
                    output = self._call(structure)
                    scores, _ = self._scores(select_output(output, self.output), target, self._batch_of(structure))
            finally:
                for handle in handles:
                    handle.remove()
            names = list(kept)
            reaches = dict.fromkeys(names, True)
            if scores.requires_grad and names:
                grads = torch.autograd.grad(scores.sum(), [kept[n] for n in names], allow_unused=True)
                reaches = {n: g is not None for n, g in zip(names, grads, strict=True)}
            records = [
                LayerRecord(name, shapes[name], calls=calls[name], reaches_output=reaches.get(name, True))
                for name in order
            ]
            input_spatial = spatial_shape(tuple(structure.spatial_value.shape), self.input_layout)
            chosen = choose_layer(records, input_spatial)
            self._set_layers([(chosen, dict(named)[chosen], "output")])

    def _batch_of(self, structure: ModelInputs) -> int:
        return int(structure.spatial_value.shape[0])

    def _forward(self, structure: ModelInputs, differentiable: bool) -> tuple[Any, list[torch.Tensor]]:
        """Runs the model; returns its output and the captured layer outputs (or inputs)."""
        owner = threading.get_ident()
        captured: dict[int, torch.Tensor] = {}

        def keep(index: int, value: Any) -> torch.Tensor | None:
            """Captures ``value`` for layer ``index``; returns what the network continues with."""
            what = "input" if self.ports[index] == "input" else "output"
            if not isinstance(value, torch.Tensor):
                raise LayerError(
                    f"layer {self.layer_names[index]!r}: the module's {what} is a {type(value).__name__}, "
                    "not a tensor; explain a layer whose output is a feature map"
                )
            if index in captured:
                raise _RunsTwice(index)
            if not differentiable:
                captured[index] = value.detach()
                return None
            torch.set_grad_enabled(True)
            leaf = value if value.requires_grad else value.detach().requires_grad_()
            captured[index] = leaf
            return leaf.clone()

        def make_hook(index: int) -> Any:
            def hook(module: torch.nn.Module, args: Any, out: Any) -> Any:
                if threading.get_ident() != owner:
                    return None
                return keep(index, out)

            return hook

        def make_pre_hook(index: int) -> Any:
            def pre_hook(module: torch.nn.Module, args: Any) -> Any:
                if threading.get_ident() != owner:
                    return None
                if not args:
                    raise LayerError(
                        f"layer {self.layer_names[index]!r}: the module is called with no positional input "
                        "to capture; explain the output of the module before it"
                    )
                replacement = keep(index, args[0])
                return None if replacement is None else (replacement, *args[1:])

            return pre_hook

        handles = [
            module.register_forward_pre_hook(make_pre_hook(i))
            if port == "input"
            else module.register_forward_hook(make_hook(i))
            for i, (module, port) in enumerate(zip(self.modules, self.ports, strict=True))
        ]
        try:
            # no_grad() keeps everything before the layer graph-free.
            with torch.no_grad():
                output = self._call(structure)
        except _RunsTwice as exc:
            for handle in handles:  # before the diagnosing pass below (removing twice is harmless)
                handle.remove()
            index = exc.index
            hint = "a module that runs once"
            if self.ports[index] == "output":
                after = self._runs_after(structure, self.modules[index])
                if after:
                    hint += f", or '{after}:input' (the input of the module that runs after its last call)"
                else:
                    hint += ", or the input of the module after it ('<name>:input', e.g. 'avgpool:input')"
            raise LayerError(
                f"layer {self.layer_names[index]!r} runs more than once per forward pass (a shared module, "
                f"e.g. one activation used by several blocks); explain {hint}"
            ) from None
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

    def _runs_after(self, structure: ModelInputs, shared: torch.nn.Module) -> str | None:
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
            for name, module in self.model.named_modules()
            if name and id(module) not in inside
        ]
        try:
            with torch.no_grad():
                structure.call(self.model)
        except Exception:  # a diagnosis must not hide the error it explains
            return None
        finally:
            for handle in handles:
                handle.remove()
        last = max((i for i, event in enumerate(events) if event is None), default=None)
        following = [event for event in events[last + 1 :] if event is not None] if last is not None else []
        return following[0] if following else None

    @staticmethod
    def _scores(output: Any, target: TargetSpec, batch: int) -> tuple[torch.Tensor, np.ndarray | None]:
        """Returns (N, K) scores and the (N, K) class indices (None for callables)."""
        if target.kind == "callable":
            assert target.fn is not None
            scores = target.fn(output)
            if not isinstance(scores, torch.Tensor):
                raise TargetError(
                    f"a callable target must return a tensor of shape (N,) or (N, K) with N={batch}, "
                    f"got {type(scores).__name__}"
                )
            check_scores_shape(tuple(scores.shape), batch)
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
            try:
                return self._capture(inputs, target, gradients)
            except RuntimeError as exc:
                if "Inference tensors" in str(exc):
                    raise _inference_error(exc) from exc
                raise

    def _capture(self, inputs: Any, target: TargetSpec, gradients: bool) -> Capture:
        structure = self._structure(inputs)
        self._warn_training()
        # The batch size travels as an argument: one adapter serves every thread that shares the
        # Explainer, so nothing of a call may live on self.
        batch = self._batch_of(structure)
        if self.auto_layer and not self.layer_names:
            self._choose(structure, target)
        output, leaves = self._forward(structure, differentiable=gradients)
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
            input_spatial=spatial_shape(tuple(structure.spatial_value.shape), self.input_layout),
            layouts=("channels_first",) * len(leaves),
            input_shape=tuple(structure.spatial_value.shape),
            input_layout=self.input_layout,
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
        clone._splits = {}
        clone._splits_lock = threading.Lock()
        return clone

    # -- capabilities of the methods beyond one capture (Score-CAM, Ablation-CAM, guided) --

    def _split(self) -> GraphSplit | None:
        module, port = self.modules[0], self.ports[0]
        key = (id(module), port)
        with self._splits_lock:
            if key not in self._splits:
                self._splits[key] = graph_split(self.model, module, port)
            return self._splits[key]

    def _replaced_forward(self, structure: ModelInputs, replacement: torch.Tensor) -> Any:
        """Runs the whole model with the first layer's output (or input) replaced by a forward hook."""
        owner = threading.get_ident()
        module = self.modules[0]

        def hook(module: torch.nn.Module, args: Any, out: Any) -> Any:
            return replacement if threading.get_ident() == owner else None

        def pre_hook(module: torch.nn.Module, args: Any) -> Any:
            return (replacement, *args[1:]) if threading.get_ident() == owner else None

        if self.ports[0] == "input":
            handle = module.register_forward_pre_hook(pre_hook)
        else:
            handle = module.register_forward_hook(hook)
        try:
            # Unwrapped: under vmap a RuntimeError sends ``batched`` to its per-copy fallback.
            return self._call_frozen(structure)
        finally:
            handle.remove()

    def head_scorer(
        self, inputs: Any, target: TargetSpec, indices: np.ndarray | None
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Returns f(replacements (B, N, *layer)) -> (B, N, K), the prefix computed once here.

        See ``anycam.backends.torch_head``: a traced graph split runs the prefix once and only
        the suffix on each chunk (vmapped over the copies); an untraceable model falls back to
        vmap over the whole model with a substituting hook (prefix once per chunk).
        """
        if self.auto_layer and not self.layer_names:
            raise LayerError("the layer is chosen at the first capture; call capture() first")
        with torch.inference_mode(False):
            structure = self._structure(inputs)
        batch = self._batch_of(structure)
        fn = target.fn if target.kind == "callable" else None
        device, dtype = self._device_dtype()
        split = self._split()
        prefix: dict[Any, Any] | None = None
        if split is not None:
            with torch.inference_mode(False), torch.no_grad():
                prefix = split.prefix_values(structure.args, {**structure.kwargs, **structure.constants})

        def one(replacement: torch.Tensor) -> torch.Tensor:
            if split is not None and prefix is not None:
                output = split.suffix_output(prefix, replacement)
            else:
                output = self._replaced_forward(structure, replacement)
            return to_scores(select_output(output, self.output), indices, fn, batch)

        # When the rest of the network reads nothing but the layer output, the B copies can run as
        # one batch of B·N rows (``copies_scorer`` checks that the rows stay independent).
        def flat(copies: torch.Tensor) -> torch.Tensor | None:
            count = copies.shape[0]
            assert split is not None
            linear = split.head_linear
            if fn is None and self.output is None and linear is not None:
                features = split.suffix_output({}, copies.flatten(0, 1), before=linear)
                if isinstance(features, torch.Tensor) and features.ndim == 2 and features.shape[0] == count * batch:
                    module = self.model.get_submodule(str(linear.target))
                    index = torch.as_tensor(indices, device=features.device)
                    rows = module.weight[index]  # (N, K, F): only the target classes
                    scores = torch.einsum("bnf,nkf->bnk", features.unflatten(0, (count, batch)), rows)
                    return scores if module.bias is None else scores + module.bias[index]
            output = select_output(split.suffix_output({}, copies.flatten(0, 1)), self.output)
            return _rows_scores(output, count, batch, indices, fn)

        run = copies_scorer(one, flat if split is not None and split.flattenable else None)

        def scores(replacements: np.ndarray) -> np.ndarray:
            copies = torch.as_tensor(np.asarray(replacements), dtype=dtype, device=device)
            with torch.inference_mode(False), torch.no_grad():
                return _to_numpy(run(copies))

        return scores

    def ablation_head(
        self,
        inputs: Any,
        target: TargetSpec,
        indices: np.ndarray | None,
        activations: np.ndarray,
        channel_axis: int,
    ) -> AblationHead | None:
        """Returns layer → global pooling → [nn.Linear] → tail as read from the traced graph, or None.

        See ``torch_head.pooled_head`` for the structures recognised. ``pooled`` is the model's
        own pooling on ``activations``; ``weight`` is the Linear's ``W.T`` when only reshapes,
        dropout or identity (at inference) lie between; ``tail`` runs the suffix after the
        Linear (or after the pooling) on the B·N feature rows, or vmapped over the B copies
        when the rows do not stay independent. float32 models only.
        """
        if len(self.modules) != 1 or self.ports != ["output"] or activations.dtype != np.float32:
            return None
        device, dtype = self._device_dtype()
        split = self._split()
        if dtype != torch.float32 or split is None:
            return None
        plan = pooled_head(split, activations.ndim, channel_axis)
        if plan is None:
            return None
        batch, channels = activations.shape[0], activations.shape[channel_axis]
        with torch.inference_mode(False), torch.no_grad():
            layer = torch.as_tensor(activations, device=device)
            pool = split.evaluate([plan.pool], layer)
            if not isinstance(pool, torch.Tensor) or pool.numel() != batch * channels or pool.shape[0] != batch:
                return None
            pooled = pool.reshape(batch, channels)
            weight = bias = None
            start, shape = plan.pool, tuple(pool.shape[1:])
            if plan.linear is not None:
                linear = self.model.get_submodule(str(plan.linear.target))
                # The steps must hand the Linear the pooled vector itself, (N, C) in channel order.
                flat = split.evaluate([plan.pool, *plan.steps], layer)
                if (
                    isinstance(linear, torch.nn.Linear)
                    and linear.weight.dtype == torch.float32
                    and linear.in_features == channels
                    and isinstance(flat, torch.Tensor)
                    and flat.shape == pooled.shape
                    and torch.equal(flat, pooled)
                ):
                    weight = _to_numpy(linear.weight).T
                    bias = None if linear.bias is None else _to_numpy(linear.bias)
                    start, shape = plan.linear, (linear.out_features,)
        fn = target.fn if target.kind == "callable" else None

        def one(features: torch.Tensor) -> torch.Tensor:
            output = split.tail_output(start, features.reshape(batch, *shape))
            return to_scores(select_output(output, self.output), indices, fn, batch)

        def rows(features: torch.Tensor) -> torch.Tensor | None:
            count = features.shape[0]
            output = select_output(split.tail_output(start, features.reshape(count * batch, *shape)), self.output)
            return _rows_scores(output, count, batch, indices, fn)

        run = copies_scorer(one, rows)

        def tail(features: np.ndarray) -> np.ndarray:
            values = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
            with torch.inference_mode(False), torch.no_grad():
                return _to_numpy(run(values))

        return AblationHead(pooled=_to_numpy(pooled), tail=tail, weight=weight, bias=bias)

    def head_scores(
        self, inputs: Any, replacements: np.ndarray, target: TargetSpec, indices: np.ndarray | None
    ) -> np.ndarray:
        return self.head_scorer(inputs, target, indices)(replacements)

    def input_scores(
        self, inputs: Any, target: TargetSpec, indices: np.ndarray | None, *, probabilities: bool = False
    ) -> np.ndarray:
        if probabilities and target.kind == "callable":
            raise TargetError(
                "probabilities=True needs class scores; with a callable target Score-CAM weights by what "
                "the callable returns, so return the score to weight by (e.g. a softmax probability)"
            )
        with torch.inference_mode(False), torch.no_grad():
            structure = self._structure(inputs)
            batch = self._batch_of(structure)
            output = select_output(self._call(structure), self.output)
            if target.kind == "callable":
                scores, _ = self._scores(output, target, batch)
            else:
                if not isinstance(output, torch.Tensor) or output.ndim != 2:
                    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                    raise TargetError(
                        f"class-index targets need a model output of shape (N, classes), got {shape}; "
                        "pass a callable target that maps the output to (N,) scores"
                    )
                # The same checks as every other target path: count and class range, as TargetError.
                resolve_indices(TargetSpec("indices", squeeze=False, indices=np.asarray(indices)), _to_numpy(output))
                if probabilities:
                    output = torch.softmax(output.float(), dim=1)
                scores = output.gather(1, torch.as_tensor(indices, device=output.device))
        return _to_numpy(scores)

    def guided_gradients(self, inputs: Any, target: TargetSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Guided Backpropagation through every ReLU call (see ``anycam.backends.torch_guided``)."""
        with torch.inference_mode(False):
            structure = self._structure(inputs)
            self._warn_training()
            batch = self._batch_of(structure)
            leaf = structure.spatial_value.detach().requires_grad_()
            given = structure.map(lambda key, value: leaf if key == structure.spatial else value)
            mode = GuidedMode()
            with torch.enable_grad():
                # Only the model's forward is guided; a callable target's own ReLUs are not.
                with mode:
                    output = self._call(given)
                scores, indices = self._scores(select_output(output, self.output), target, batch)
                if not scores.requires_grad:
                    raise TargetError("the explained output does not depend on the input")
                (grads,) = self._input_gradients(scores, leaf)
        if mode.calls == 0:
            warnings.warn(
                f"{type(self.model).__name__} calls no ReLU, so guided backpropagation equals the plain "
                "input gradient here",
                AnycamWarning,
                stacklevel=user_stacklevel(),
            )
        return _to_numpy(grads), _to_numpy(scores), indices

    @staticmethod
    def _input_gradients(scores: torch.Tensor, leaf: torch.Tensor) -> tuple[torch.Tensor]:
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

    def predict(self, inputs: Any) -> np.ndarray:
        structure = self._structure(inputs)
        with torch.inference_mode(False), torch.no_grad():
            return _to_numpy(select_output(self._call(structure), self.output))
