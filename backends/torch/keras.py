"""Keras 3 on its PyTorch backend: the layer's ``call`` intercepted, ``torch.autograd.grad`` on it.

A Keras layer on the torch backend is a ``torch.nn.Module``, but Keras runs it through its own
``__call__``, so torch's forward hooks never fire. The explained layers' ``call`` is intercepted
instead (``backends/_keras/``, the mechanism of the TensorFlow adapter), and the tap does
what the torch adapter's hook does: the forward runs under ``no_grad``, the tap switches grad
mode on and keeps the layer's output as a leaf that requires grad, and hands the rest of the
model a clone. Autograd then records only the part of the model after the layer; no parameter
gets a ``.grad``. Everything after the forward (targets, scores, K gradients in one batched
``autograd.grad``) is the torch adapter's.

Layers are named as in TensorFlow (``"conv5_block3_out"``, ``"resnet50/conv5_block3_out"``,
attribute names of subclassed models, or layer objects), layouts come from each layer's
``data_format`` (Keras models are channels-last by default, unlike torch modules), and the model
runs with ``training=False``, Keras's inference mode, whatever torch's ``.training`` flag says.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import torch

from anycam._errors import AnycamError, InputError, LayerError
from anycam.core import TargetSpec, spatial_shape
from anycam.protocol.backend import AttentionCapture, Capture, check_options, select_output
from anycam.protocol.inputs import ModelInputs

from .. import _keras
from .backend import OPTIONS, TorchBackend
from .randomize import over_copy


def _is_feature(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


class KerasTorchBackend(TorchBackend):
    """Adapter for Keras 3 models running on Keras's PyTorch backend (``KERAS_BACKEND=torch``).

    Chosen by ``Explainer`` for a Keras model when Keras runs on torch; ``name`` is ``"torch"``.
    See the module docstring. Inputs: one array, or a list / dict for a multi-input model (as
    Keras takes them); ``spatial_input=`` names the one with the spatial grid, ``model_kwargs=``
    are passed to every call.

    Raises (constructor):
        anycam.BackendError: Keras runs on another backend than PyTorch.
        anycam.LayerError: a layer cannot be found (the message lists the closest names).
    """

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
        _keras.require_backend(model, "torch")
        self.layouts: tuple[str, ...] = ()
        layout = input_layout or _keras.input_layout(model)
        self._init_state(model, layers, output=output, input_layout=layout, options=options)

    def _resolve_layers(self, layers: Sequence[Any]) -> list[tuple[str, Any, str]]:
        return [_keras.resolve_spec(self.model, layer) for layer in layers]

    def _set_layers(self, resolved: Sequence[tuple[str, Any, str]]) -> None:
        super()._set_layers(resolved)
        self.layouts = _keras.layouts(self.modules)

    def _warn_training(self) -> None:
        # torch's .training flag is not Keras's mode: the model always runs with training=False.
        pass

    def _call(self, structure: ModelInputs) -> Any:
        # Keras takes several inputs as one list or dict, not as separate arguments.
        try:
            return self.model(structure.container(), training=False, **structure.constants)
        except (ValueError, TypeError, KeyError) as exc:
            if structure.kind == "single" or isinstance(exc, AnycamError):
                raise
            raise InputError(
                f"the model does not accept the inputs given ({structure.describe()}): {type(exc).__name__}: "
                f"{exc}; pass a dict with the model's input names, or a list in the order of model.inputs"
            ) from exc

    def _choose(self, structure: ModelInputs, target: TargetSpec) -> None:
        """Chooses the layer for ``layer="auto"`` from one forward pass of every layer, once."""
        with self._choose_lock:
            if self.layer_names:
                return
            with torch.no_grad():
                records, paths = _keras.layer_records(self.model, lambda: self._call(structure), _is_feature)
            input_spatial = spatial_shape(tuple(structure.spatial_value.shape), self.input_layout)
            batch = int(structure.spatial_value.shape[0])
            chosen, note = _keras.auto_choice(records, paths, batch, input_spatial)
            self._set_layers([(chosen, paths[chosen], "output")])
            if note is not None:  # chosen for holding the attention's (N, T, C) tokens: that is its layout
                self.auto_note, self.layouts = note, ("tokens",)

    def _forward(
        self, structure: ModelInputs, differentiable: bool, keep_graph: bool = False
    ) -> tuple[Any, list[torch.Tensor]]:
        """Runs the model with the layers tapped; returns its output and the layers' tensors.

        ``keep_graph`` (differentiable maps): the whole forward is recorded and the tapped
        tensors stay on the graph, as in the torch adapter's hook.
        """
        captured: dict[int, torch.Tensor] = {}

        def tap(index: int, value: Any) -> Any:
            if not _is_feature(value):
                kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
                raise LayerError(
                    f"layer {self.layer_names[index]!r}: its {self.ports[index]} is {kind}, not a "
                    "floating-point tensor; explain a layer whose output is a feature map"
                )
            if not differentiable:
                captured[index] = value.detach()
                return value
            torch.set_grad_enabled(True)  # no_grad() below ends it when the forward returns
            if keep_graph:
                captured[index] = value if value.requires_grad else value.detach().requires_grad_()
                return captured[index].clone()
            leaf = value if value.requires_grad else value.detach().requires_grad_()
            captured[index] = leaf
            # A clone downstream: in-place ops after the layer must not change the captured tensor.
            return leaf.clone()

        # no_grad() keeps everything before the layer graph-free (unless the graph is wanted).
        with torch.set_grad_enabled(keep_graph):
            output = _keras.run(lambda: self._call(structure), self.modules, self.layer_names, tap, self.ports)
        return output, [captured[index] for index in range(len(self.modules))]

    def _split(self) -> None:
        # No fx graph of a Keras model: head scores run the whole model with the layer replaced.
        return None

    def _replaced_forward(self, structure: ModelInputs, replacement: torch.Tensor) -> Any:
        """Runs the model with the first layer's output (or input) replaced by ``replacement``."""
        layers, names, ports = self.modules[:1], self.layer_names[:1], self.ports[:1]
        return _keras.run(lambda: self._call(structure), layers, names, lambda index, value: replacement, ports)

    def capture(
        self,
        inputs: Any,
        target: TargetSpec,
        *,
        gradients: bool = True,
        native: bool = False,
        differentiable: bool = False,
    ) -> Capture:
        found = super().capture(inputs, target, gradients=gradients, native=native, differentiable=differentiable)
        return dataclasses.replace(found, layouts=self.layouts)

    def parameter_layers(self, inputs: Any = None) -> tuple[str, ...]:
        """Returns the paths of the layers that own weights, input to output (as in TensorFlow)."""
        return _keras.parameter_layers(self.model)

    # -- Issue 22: the attention methods (capability "attention") --

    def attention_capture(self, inputs: Any, target: TargetSpec, *, gradients: bool) -> AttentionCapture:
        """Returns each MultiHeadAttention call's probabilities and, if asked, ∂score/∂A.

        Every ``MultiHeadAttention`` runs explicitly (``backends/_keras/attention.py``; Keras's
        own path would call the fused ``F.scaled_dot_product_attention``), and a zero tensor that
        requires grad is added to its probabilities: ∂score/∂zero is ∂score/∂A, while the
        probabilities keep their dependence on the earlier blocks (a detached leaf would cut it).
        """
        from .._keras.attention import explicit_attention
        from .attention import attention_gradients
        from .capture import scores as target_scores
        from .inputs import batch_of, inference_error, structure, to_numpy

        given = structure(self, inputs)
        batch = batch_of(given)
        probabilities: list[torch.Tensor] = []
        deltas: list[torch.Tensor] = []

        def hook(name: str, value: torch.Tensor) -> torch.Tensor:
            probabilities.append(value.detach())
            if not gradients:
                return value
            delta = torch.zeros_like(value, requires_grad=True)
            deltas.append(delta)
            return value + delta

        try:
            with torch.inference_mode(False), torch.set_grad_enabled(gradients):
                with explicit_attention(self.model, hook) as calls:
                    output = self._call(given)
                values, indices = target_scores(select_output(output, self.output), target, batch)
                grads = attention_gradients(values, deltas) if gradients else None
        except RuntimeError as exc:
            if "Inference tensors" in str(exc):
                raise inference_error(exc) from exc
            raise
        return AttentionCapture(
            attentions=tuple(to_numpy(p) for p in probabilities),
            gradients=None if grads is None else tuple(to_numpy(g) for g in grads),
            scores=to_numpy(values.detach()),
            target=indices,
            input_spatial=spatial_shape(tuple(given.spatial_value.shape), self.input_layout),
            names=tuple(calls),
        )

    def randomized(self, layers: Sequence[str], seed: int = 0) -> KerasTorchBackend:
        """Returns a backend over a copy of the model whose ``layers`` have fresh weights.

        Drawn from each layer's own initializers, seeded from ``seed`` and the layer's path,
        exactly as the TensorFlow backend does; the model itself is only read.
        """
        duplicate, twins = _keras.randomized_copy(self.model, layers, operator.index(seed))
        return over_copy(self, duplicate, twins)


BACKEND = KerasTorchBackend
