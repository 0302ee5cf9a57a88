"""PyTorch adapter: a cloning forward hook and ``torch.autograd.grad`` on the captured outputs.

This module is the manifest: the adapter's state and one short method per verb, each handing the
work to the module of its capability (``inputs``, ``layers``, ``capture``, ``head``, ``pooled``,
``guided``, ``randomize``). How a capture runs:

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

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from anycam._errors import ConfigTypeError
from anycam.core import TargetSpec
from anycam.protocol.backend import AblationHead, Backend, Capture, check_options
from anycam.protocol.inputs import Key, ModelInputs
from anycam.protocol.layers import is_auto

# Imported under other names: ``inputs``, ``layers`` and ``capture`` are also the verbs' arguments.
from . import capture as _capture
from . import guided as _guided
from . import head as _head
from . import inputs as _inputs
from . import layers as _layers
from . import pooled as _pooled
from . import randomize as _randomize
from .head import GraphSplit

OPTIONS = ("model_kwargs", "spatial_input")
"""The options every torch adapter takes (the Keras-on-torch one too)."""


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
    capabilities = frozenset(
        {
            "input_scores",
            "head_scores",
            "ablation_head",
            "guided_gradients",
            "randomize",
            "native_arrays",
            "differentiable",
        }
    )

    def __init__(
        self,
        model: Any,
        layers: Sequence[Any],
        *,
        output: Any = None,
        input_layout: str | None = None,
        **options: Any,
    ) -> None:
        check_options(self.name, options, OPTIONS)
        if not isinstance(model, torch.nn.Module):
            raise ConfigTypeError(f"the torch backend needs a torch.nn.Module, got {type(model).__name__}")
        unwrapped, prefixes = _layers.unwrap(model)
        layout = input_layout or "channels_first"
        self._init_state(unwrapped, layers, output=output, input_layout=layout, options=options, prefixes=prefixes)

    def _init_state(
        self,
        model: Any,
        layers: Sequence[Any],
        *,
        output: Any,
        input_layout: str,
        options: dict[str, Any],
        prefixes: tuple[str, ...] = (),
    ) -> None:
        """Sets the state every torch adapter holds (the Keras-on-torch one too) and resolves the layers."""
        self.model = model
        self._prefixes = prefixes
        self.output = output
        self.input_layout = input_layout
        self.spatial_input: Key | None = options.get("spatial_input")
        self.model_kwargs: dict[str, Any] = dict(options.get("model_kwargs") or {})
        self.modules: list[torch.nn.Module] = []
        self.ports: list[str] = []
        self.layer_names = ()
        self._choose_lock = threading.Lock()
        self.auto_layer = len(layers) == 1 and is_auto(layers[0])
        if not self.auto_layer:
            self._set_layers(self._resolve_layers(layers))
        self._warned_training = False
        # Traced graph splits per (layer module, port), with the model's fingerprint they were
        # traced at (``head.fingerprint``): derived from the model, never from a call's data.
        self._splits: dict[tuple[int, str], tuple[Any, GraphSplit | None]] = {}
        self._splits_lock = threading.Lock()

    # -- the steps a subclass (keras.py) replaces: layers, the model call, the forward with taps --

    def _resolve_layers(self, layers: Sequence[Any]) -> list[tuple[str, Any, str]]:
        """Returns (reported name, module, port) per layer spec."""
        named = dict(self.model.named_modules())
        return [_layers.resolve(layer, named, self._prefixes) for layer in layers]

    def _set_layers(self, resolved: Sequence[tuple[str, Any, str]]) -> None:
        self.modules = [module for _, module, _ in resolved]
        self.ports = [port for _, _, port in resolved]
        self.layer_names = tuple(name for name, _, _ in resolved)

    def _choose(self, structure: ModelInputs, target: TargetSpec) -> None:
        _layers.choose(self, structure, target)

    def _call(self, structure: ModelInputs) -> Any:
        return _inputs.call(self, structure)

    def _warn_training(self) -> None:
        _inputs.warn_training(self)

    def _forward(
        self, structure: ModelInputs, differentiable: bool, keep_graph: bool = False
    ) -> tuple[Any, list[torch.Tensor]]:
        return _capture.forward(self, structure, differentiable, keep_graph)

    def _split(self) -> GraphSplit | None:
        return _head.split(self)

    def _replaced_forward(self, structure: ModelInputs, replacement: torch.Tensor) -> Any:
        return _head.replaced_forward(self, structure, replacement)

    # -- the verbs --

    def capture(
        self,
        inputs: Any,
        target: TargetSpec,
        *,
        gradients: bool = True,
        native: bool = False,
        differentiable: bool = False,
    ) -> Capture:
        return _capture.capture(self, inputs, target, gradients, native, differentiable)

    def to_native(self, array: np.ndarray) -> torch.Tensor:
        """Returns a host array as a tensor on the model's device."""
        device, _ = _inputs.device_dtype(self.model)
        return torch.as_tensor(np.ascontiguousarray(array), device=device)

    def predict(self, inputs: Any) -> np.ndarray:
        return _capture.predict(self, inputs)

    def input_scores(
        self, inputs: Any, target: TargetSpec, indices: np.ndarray | None, *, probabilities: bool = False
    ) -> np.ndarray:
        return _capture.input_scores(self, inputs, target, indices, probabilities)

    def head_scorer(
        self, inputs: Any, target: TargetSpec, indices: np.ndarray | None
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Returns f(replacements (B, N, *layer)) -> (B, N, K), the prefix computed once (see ``head.py``)."""
        return _head.head_scorer(self, inputs, target, indices)

    def head_scores(
        self, inputs: Any, replacements: np.ndarray, target: TargetSpec, indices: np.ndarray | None
    ) -> np.ndarray:
        return self.head_scorer(inputs, target, indices)(replacements)

    def ablation_head(
        self,
        inputs: Any,
        target: TargetSpec,
        indices: np.ndarray | None,
        activations: np.ndarray,
        channel_axis: int,
    ) -> AblationHead | None:
        """Returns layer → global pooling → [nn.Linear] → tail from the traced graph, or None (see ``pooled.py``)."""
        return _pooled.ablation_head(self, inputs, target, indices, activations, channel_axis)

    def guided_gradients(self, inputs: Any, target: TargetSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Guided Backpropagation through every ReLU call (see ``guided.py``)."""
        return _guided.guided_gradients(self, inputs, target)

    def parameter_layers(self, inputs: Any = None) -> tuple[str, ...]:
        return _randomize.parameter_layers(self.model)

    def randomized(self, layers: Sequence[str], seed: int = 0) -> TorchBackend:
        return _randomize.randomized(self, layers, seed)
