"""The torch model's inputs: one structure of tensors on the model's device and dtype, and the call.

Inputs are one structure (``anycam.protocol.inputs``): a tensor, a tuple/list (positional), a dict
(keywords) and constant ``model_kwargs``; every tensor is converted and checked on its own (rank,
dtype, non-finite values, layout). The model runs through :func:`call`, which names the inputs given
when its forward rejects them, and keeps the buffers of modules in training mode as they were.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from anycam._errors import (
    AnycamError,
    BackendError,
    InputError,
    TrainingModeWarning,
    closest,
    user_stacklevel,
)
from anycam.core import check_batch, forward_error, integer_input_error, non_finite_input, spatial_shape
from anycam.protocol.inputs import Key, ModelInputs, looks_spatial, structure_inputs

if TYPE_CHECKING:
    from .backend import TorchBackend


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


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


def check_finite(value: torch.Tensor, what: str) -> None:
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


def training_sensitive(model: torch.nn.Module) -> list[tuple[str, str]]:
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


def inference_error(exc: BaseException) -> BackendError:
    return BackendError(
        "the model's weights (or buffers) are inference tensors: they were created or loaded under "
        "torch.inference_mode(), and autograd cannot save them for the backward pass Grad-CAM needs. "
        "Create or load the model under torch.no_grad() instead, or explain a copy: "
        f"copy.deepcopy(model) holds ordinary tensors ({exc})"
    )


def device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Returns the device and dtype of the model's first floating parameter (or buffer); CPU float32 if none."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def float_parameter(model: torch.nn.Module) -> tuple[torch.device, torch.dtype] | None:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None


def structure(backend: TorchBackend, inputs: Any, keep_graph: bool = False) -> ModelInputs:
    """Returns the call's inputs as one structure, every tensor converted and checked.

    ``keep_graph`` (differentiable maps): the copies of the inputs stay on the autograd graph, so
    that a map's gradient reaches an input that requires grad.
    """
    given = structure_inputs(
        inputs, is_spatial=looks_spatial, spatial_input=backend.spatial_input, model_kwargs=backend.model_kwargs
    )
    return given.map(lambda key, value: _as_tensor(backend, key, value, key == given.spatial, given, keep_graph))


def _as_tensor(
    backend: TorchBackend, key: Key, value: Any, spatial: bool, structure: ModelInputs, keep_graph: bool = False
) -> Any:
    what = "input" if structure.kind == "single" else f"input {key!r}"
    value = _own(value, keep_graph)
    if isinstance(value, np.ndarray):
        device, dtype = device_dtype(backend.model)
        if np.issubdtype(value.dtype, np.floating):
            value = torch.as_tensor(value, dtype=dtype, device=device)
        elif spatial:
            raise InputError(f"{what} must be floating point, got dtype {value.dtype}; scale it to floats first")
        else:
            value = torch.as_tensor(value, device=device)
    if isinstance(value, torch.Tensor):
        value = _to_model(backend.model, value, what)
    if not spatial:
        return value
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor or a NumPy array, got {type(value).__name__}")
    if not value.is_floating_point():
        raise integer_input_error(what, value.dtype, "x.float() / 255")
    spatial_shape(tuple(value.shape), backend.input_layout, what)
    check_batch(tuple(value.shape), what)
    check_finite(value, what)
    return value


def _own(value: Any, keep_graph: bool = False) -> Any:
    """Returns a copy of a tensor or array the model could otherwise modify in place (``x.relu_()``
    on its input): the user's data stays as given, and every call of an explanation sees the same.
    Made outside any grad recording (the model's inputs are never differentiated as given), except
    for differentiable maps, whose gradient must reach an input that requires grad."""
    if isinstance(value, torch.Tensor):
        if keep_graph:
            with torch.enable_grad():
                return value.clone()
        with torch.no_grad():
            return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


def _to_model(model: torch.nn.Module, value: torch.Tensor, what: str) -> torch.Tensor:
    """Returns a tensor on the model's device, floating ones in its dtype (as NumPy inputs are)."""
    found = float_parameter(model)
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


def batch_of(structure: ModelInputs) -> int:
    return int(structure.spatial_value.shape[0])


def call(backend: TorchBackend, structure: ModelInputs) -> Any:
    """Runs the model on the structure; inputs its forward does not take name the inputs given."""
    model = backend.model
    try:
        return call_frozen(model, structure)
    except Exception as exc:
        if isinstance(exc, (AnycamError, torch.OutOfMemoryError)):
            raise
        unknown = _unknown_keys(model.forward, structure)
        if _binds(model.forward, structure) and not unknown:
            # The signature fits: the forward itself failed on these inputs (item 8).
            error = failed(backend, exc, structure)
            if error is None:  # the model's own exception: its type, with a note
                raise
            raise error from exc
        given = []
        if structure.args:
            given.append(f"{len(structure.args)} positional")
        if structure.kwargs:
            given.append("keys " + ", ".join(map(repr, structure.kwargs)))
        if structure.constants:
            given.append("model_kwargs " + ", ".join(map(repr, structure.constants)))
        hint = ""
        if unknown:
            names = _parameter_names(model.forward)
            hints = "".join(closest(key, names, n=1) for key in unknown)
            hint = f"; {', '.join(map(repr, unknown))} is not a parameter of forward{hints}"
        try:
            accepted = f" (it takes {inspect.signature(model.forward)})"
        except (TypeError, ValueError):
            accepted = ""
        raise InputError(
            f"{type(model).__name__}.forward{accepted} does not accept the inputs given "
            f"({'; '.join(given)}){hint}: {type(exc).__name__}: {exc}; pass a dict with the keywords it "
            "takes, a tuple in its order, or constants through model_kwargs="
        ) from exc


def failed(backend: TorchBackend, exc: BaseException, structure: ModelInputs) -> AnycamError | None:
    """The error for a forward pass that raised ``exc``: inference tensors, the input, or None (the model's own)."""
    if "Inference tensors" in str(exc):
        return inference_error(exc)
    what = "input" if structure.kind == "single" else f"input {structure.spatial!r}"
    return forward_error(exc, tuple(structure.spatial_value.shape), backend.input_layout, what)


def call_frozen(model: torch.nn.Module, structure: ModelInputs) -> Any:
    """Calls the model; buffers of modules in training mode (BatchNorm statistics) stay as they were."""
    with frozen_buffers(model):
        return structure.call(model)


@contextlib.contextmanager
def frozen_buffers(model: torch.nn.Module) -> Iterator[None]:
    """Runs the block with the buffers of modules in training mode swapped for copies.

    Explaining must not change the model, but BatchNorm in training mode updates its running
    statistics (and ``num_batches_tracked``) on every forward pass, also when anycam runs its
    modules one by one (Ablation-CAM's traced split). Such modules run on copies of their
    buffers, and get their own back afterwards. Swapped, not copied back in place: the backward
    pass may still need the copies autograd saved.
    """
    training = [module for module in model.modules() if module.training and module._buffers]
    if not training:
        yield
        return
    # Threads sharing the Explainer would otherwise swap each other's copies back in.
    with _BUFFER_LOCK:
        swapped = []
        for module in training:
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    swapped.append((module, name, buffer))
                    module._buffers[name] = buffer.clone()
        try:
            yield
        finally:
            for module, name, buffer in swapped:
                module._buffers[name] = buffer


def warn_training(backend: TorchBackend) -> None:
    """Warns once per adapter when modules that behave differently in training are in training mode."""
    if backend._warned_training:
        return
    training = training_sensitive(backend.model)
    if not training:
        return
    backend._warned_training = True
    shown = ", ".join(f"{name or 'the model'} ({kind})" for name, kind in training[:4])
    more = f" and {len(training) - 4} more" if len(training) > 4 else ""
    warnings.warn(
        f"modules that behave differently in training are in training mode: {shown}{more}. BatchNorm "
        "then mixes the samples of a batch and Dropout is random, so maps depend on the batch (running "
        "statistics are left unchanged); call model.eval() first",
        TrainingModeWarning,
        stacklevel=user_stacklevel(),
    )
