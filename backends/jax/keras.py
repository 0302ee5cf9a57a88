"""Keras 3 on its JAX backend: ``stateless_call`` makes the model a pure function of its weights.

A Keras model on JAX is explained exactly like a Flax model (``backends/jax/``): one program
runs ``model.stateless_call(trainable, non_trainable, x, training=False)`` with the explained
layers' ``call`` intercepted while it traces (``backends/_keras/``), and a zero ``delta`` added
to each explained output, so ``jax.vjp`` with respect to the deltas gives ∂output/∂layer and
nothing before the layer is differentiated. The weights are arguments of the one jitted capture
(never constants), so a capture compiles once per (model, layers, target kind, shapes) and a
model trained further, or randomised by the sanity check, reuses it. The model's variables are
only read: ``stateless_call`` returns updated state and anycam drops it.

Layers are named as in TensorFlow (``"conv5_block3_out"``, ``"resnet50/conv5_block3_out"``,
attribute names of subclassed models, or layer objects), and layouts come from each layer's
``data_format``, so the same ``Explainer(model, "layer")`` call gives the same maps on either
backend. Several inputs are a list or dict, as Keras takes them (``spatial_input=`` names the one
with the grid). Option: ``model_kwargs``, keyword arguments for every model call.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anycam._errors import BackendError, ConfigTypeError
from anycam.core import TargetSpec, spatial_shape
from anycam.protocol.backend import AttentionCapture, Capture, check_options
from anycam.protocol.layers import is_auto

from .. import _keras
from .backend import JaxBackend
from .inputs import _Inputs
from .layers import _Taps
from .models import _Model, _Program


class _KerasAttention(_Program):
    """A Keras model on JAX for the attention capture: ``stateless_call`` with every MultiHeadAttention explicit."""

    def attention_call(self, params: Any, x: Any) -> Any:
        from .._keras.attention import explicit_attention
        from .attention import _record

        (model,) = self.structure
        with explicit_attention(model, lambda name, value: _record(value, name)):
            return _stateless(model, params, x, self.kwargs)


class _KerasProgram(_Program):
    """A Keras model on JAX: ``stateless_call`` with the layers' ``call`` tapped while tracing.

    ``structure`` is ``(model, layers)``; programs compare equal by the identity of both, and the
    weights ``(trainable, non_trainable)`` are the params argument.
    """

    def call(self, params: Any, x: jax.Array, deltas: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        model, layers, ports = self.structure
        taps = _Taps(self.names, deltas)
        output = _keras.run(lambda: _stateless(model, params, x, self.kwargs), layers, self.names, taps, ports)
        return output, taps.activations()


def _stateless(model: Any, params: Any, x: Any, kwargs: Mapping[str, Any]) -> Any:
    """Returns the model's output for weights ``params``, its state updates dropped."""
    trainable, non_trainable = params
    # Keras takes several inputs as one list or dict, not as separate arguments.
    inputs = x.container() if isinstance(x, _Inputs) else x
    return model.stateless_call(trainable, non_trainable, inputs, training=False, **kwargs)[0]


def _weights(model: Any) -> tuple[list[jax.Array], list[jax.Array]]:
    # Read per call: the model may have been trained (or its weights set) since.
    trainable = [variable.value for variable in model.trainable_variables]
    non_trainable = [variable.value for variable in model.non_trainable_variables]
    return trainable, non_trainable


def _keras_model(
    model: Any,
    layers: Sequence[Any],
    names: Sequence[str],
    ports: Sequence[str],
    kwargs: Mapping[str, Any],
    output: Any,
) -> _Model:
    """Returns the resolved model: a program over (model, layers, ports) and a snapshot of the weights."""
    names = tuple(names)
    key = ("keras", id(model), tuple(id(layer) for layer in layers), tuple(ports))
    program = _KerasProgram(
        (model, tuple(layers), tuple(ports)), names, names, output=output, vmap=False, kwargs=kwargs, key=key
    )
    return _Model(names, _keras.layouts(layers)[0], lambda: (program, _weights(model)), "keras", model)


def _is_feature(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    return dtype is not None and hasattr(value, "shape") and jnp.issubdtype(dtype, jnp.floating)


class KerasJaxBackend(JaxBackend):
    """Adapter for Keras 3 models running on Keras's JAX backend (``KERAS_BACKEND=jax``).

    Chosen by ``Explainer`` for a Keras model when Keras runs on JAX; ``name`` is ``"jax"``.
    See the module docstring.

    Raises (constructor):
        anycam.BackendError: Keras runs on another backend than JAX.
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
        check_options(self.name, options, ("model_kwargs", "spatial_input"))
        _keras.require_backend(model, "jax")
        if not getattr(model, "built", True):
            raise BackendError(
                f"the Keras {type(model).__name__} is not built, so its layers have no weights yet; "
                "call it once on a batch first"
            )
        kwargs = options.get("model_kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ConfigTypeError(f"model_kwargs must be a dict of keyword arguments, got {type(kwargs).__name__}")
        self.model = model
        self._init_state(output, options)
        self._kwargs = dict(kwargs)
        self.input_layout = input_layout or _keras.input_layout(model)
        self.auto_layer = len(layers) == 1 and is_auto(layers[0])
        self.layer_names = ()
        self.layers: list[Any] = []
        self.ports: list[str] = []
        if not self.auto_layer:
            self._set_layers([_keras.resolve_spec(model, layer) for layer in layers])

    def _set_layers(self, resolved: Sequence[tuple[str, Any, str]]) -> None:
        self.layers = [layer for _, layer, _ in resolved]
        self.ports = [port for _, _, port in resolved]
        names = [name for name, _, _ in resolved]
        self._model = _keras_model(self.model, self.layers, names, self.ports, self._kwargs, self.output)
        self.layer_layout = self._model.layout
        self.layer_names = self._model.names

    def _choose(self, x: jax.Array) -> None:
        """Chooses the layer for ``layer="auto"`` from one abstract pass (shapes only), once."""
        with self._choose_lock:
            if self.layer_names:
                return
            weights = _weights(self.model)

            def forward() -> Any:
                return jax.eval_shape(lambda p, xs: _stateless(self.model, p, xs, self._kwargs), weights, x)

            records, paths = _keras.layer_records(self.model, forward, _is_feature)
            input_spatial = spatial_shape(tuple(x.shape), self.input_layout)
            chosen, note = _keras.auto_choice(records, paths, int(x.shape[0]), input_spatial)
            self._set_layers([(chosen, paths[chosen], "output")])
            if note is not None:  # chosen for holding the attention's (N, T, C) tokens: that is its layout
                self.auto_note, self.layer_layout = note, "tokens"

    def capture(self, inputs: Any, target: TargetSpec, *, gradients: bool = True, native: bool = False) -> Capture:
        if self.auto_layer and not self.layer_names:
            self._choose(self._as_input(inputs))
        return super().capture(inputs, target, gradients=gradients, native=native)

    def predict(self, inputs: Any) -> np.ndarray:
        if self.auto_layer and not self.layer_names:
            self._choose(self._as_input(inputs))
        return super().predict(inputs)

    def parameter_layers(self, inputs: Any = None) -> tuple[str, ...]:
        """Returns the paths of the layers that own weights, input to output (as in TensorFlow)."""
        return _keras.parameter_layers(self.model)

    def randomized(self, layers: Sequence[str], seed: int = 0) -> KerasJaxBackend:
        """Returns a backend over a copy of the model whose ``layers`` have fresh weights.

        Drawn from each layer's own initializers, seeded from ``seed`` and the layer's path,
        exactly as the TensorFlow backend does; the model itself is only read.
        """
        duplicate, twins = _keras.randomized_copy(self.model, layers, operator.index(seed))
        clone = copy.copy(self)
        clone.model = duplicate
        clone.layers = [twins[id(layer)] for layer in self.layers]
        clone._model = _keras_model(duplicate, clone.layers, self.layer_names, self.ports, self._kwargs, self.output)
        clone._traced = {}
        return clone

    # -- Issue 22: the attention methods (capability "attention") --

    def attention_capture(self, inputs: Any, target: TargetSpec, *, gradients: bool) -> AttentionCapture:
        """Returns each MultiHeadAttention call's probabilities and, if asked, ∂score/∂A (see ``attention``).

        Every ``MultiHeadAttention`` runs explicitly (``backends/_keras/attention.py``) inside the
        stateless call, a zero delta added to its probabilities, as for a Flax model.
        """
        from . import attention

        key = ("keras-attention", id(self.model))
        program = _KerasAttention((self.model,), (), (), output=self.output, vmap=False, kwargs=self._kwargs, key=key)
        return attention.attention_capture(
            self, inputs, target, gradients=gradients, snapshot=lambda: (program, _weights(self.model))
        )
