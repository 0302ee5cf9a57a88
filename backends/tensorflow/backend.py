"""TensorFlow/Keras 3 adapter: the layer's ``call`` intercepted while a ``tf.function`` traces.

How a capture runs:

* One ``tf.function`` per (model, layers, output selector) × (target form, input shape with the
  batch left open, dtype). It is cached on the model, weakly, and shared by every Explainer of
  that model and layer: repeated calls do not retrace, and neither does a second Explainer with
  another method. ``TensorFlowBackend.trace_count`` counts the traces.
* While it traces, the explained layer's ``call`` is replaced (for the tracing thread only) by a
  wrapper that hands the layer output to a ``GradientTape(watch_accessed_variables=False)``. The
  tape watches that tensor and nothing else: nothing below the layer is differentiated and no
  variable is touched, so frozen models work and variables stay bit-identical. The original
  ``call`` is back in ``finally``; the compiled graph needs no patch when it runs. The one
  mechanism serves Sequential, Functional, nested and subclassed models alike: no sub-model is
  built, so no "Graph disconnected" — the complaint every TF Grad-CAM library hears most.
* Targets are resolved inside the graph (argmax and top-k by ``tf.math.top_k``, which breaks ties
  towards the lower class like the core; given indices by ``tf.gather``), so one forward pass
  gives the scores and the gradients of all K targets. Given indices are range-checked by
  ``anycam.core.resolve_indices`` on the returned outputs. Callable targets run inside the tape
  on the model output and must be written in TF ops; each callable object is traced once (the
  last 8 are kept), so pass the same function rather than a new lambda per call.
* Mixed-precision layers are upcast to float32 where the tape watches them; activations,
  gradients and scores leave the graph as float32 and become NumPy once per call.

Models:

* Any Keras 3 model or layer (Sequential, Functional, subclassed, nested), running on Keras's
  TensorFlow backend. Layers are names (``"conv5_block3_out"``), paths through nested models
  (``"resnet50/conv5_block3_out"``), attribute names of subclassed models (``"features"``), or
  layer objects. The model runs with ``training=False``.
* A plain TF function or ``tf.Module`` has no layers to intercept: give it as a pair,
  ``Explainer((features, head), None, backend="tensorflow")``; the map explains
  ``features(x)`` and the model output is ``head(features(x))`` (``layer`` may also be
  ``"features"``).

Randomised copies (``anycam.sanity_check``): ``parameter_layers()`` lists the layers that own
weights, depth first; ``randomized(layers, seed)`` copies the model (``keras.models.clone_model``
for Sequential and Functional models, ``from_config(get_config())`` for subclassed ones), copies
the weights over, and draws the chosen layers' weights anew from their own initializers.

Layouts: a layer's output layout is its ``data_format``, or that of the nearest layer upstream
that has one, else ``keras.config.image_data_format()``. The input layout likewise defaults to
the ``data_format`` of the model's first layer that has one.

Where each part lives (one module per idea, the same names in the torch and jax packages):
``inputs`` (structures → tensors, the boundary checks), ``layers`` (taps on a layer's ``call``,
the automatic choice), ``capture`` (compiled captures, predict, input scores), ``head``
(Ablation-CAM's copies), ``pooled`` (the pooled-head closed form), ``guided`` (the guided ReLU
rule), ``randomize`` (copies for the sanity check). This class holds the state and delegates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from anycam._errors import BackendError, ConfigError, ConfigTypeError, LayerError
from anycam.core import TargetSpec
from anycam.protocol.backend import AblationHead, AttentionCapture, Backend, Capture, check_options
from anycam.protocol.inputs import Key
from anycam.protocol.layers import is_auto

from .. import _keras
from . import capture, guided, head, pooled, randomize
from .capture import Program, keras_program
from .layers import PairForward
from .namespace import register as _register_namespace

# Issue 21 (c21-core-tf): the core computes on tf.Tensor arrays (native outputs) with the TF
# namespace, registered when the backend loads (the module registers on import; explicit here).
_register_namespace()


def _keras_backend_check() -> None:
    """Raises anycam.BackendError unless Keras runs on TensorFlow."""
    active = _keras.backend()
    if active != "tensorflow":
        raise BackendError(
            f"Keras is running on its {active!r} backend, but anycam's tensorflow backend needs "
            f"Keras on TensorFlow; a Keras model on {active!r} is explained with "
            f"backend={active!r} (or backend=None, which detects it), or set the environment "
            "variable KERAS_BACKEND=tensorflow before the first `import keras`"
        )


def _split_recipe(model: Any) -> str:
    """Returns why a tf.Module or loaded SavedModel cannot be explained as given, and the pair recipe."""
    loaded = not isinstance(model, tf.Module)
    what = "a loaded SavedModel (tf.saved_model.load)" if loaded else f"a {type(model).__name__} (a tf.Module)"
    # The callable parts it holds (sub-modules, tf.functions): the candidates for the split.
    parts = []
    for name, value in sorted(vars(model).items()):
        if not name.startswith("_") and name != "signatures" and callable(value):
            parts.append(repr(name))
    found = f"; its callable attributes are {', '.join(parts)}" if parts else ""
    keras_hint = (
        " If it was saved from a Keras model, load that model with keras.models.load_model "
        "instead (a .keras file): its layers can be named."
        if loaded
        else ""
    )
    return (
        f"{what} is not a Keras model: it has no layers anycam can intercept. Split it at the "
        "explained layer and pass the pair: Explainer((features, head), None, backend='tensorflow'), "
        "two TF callables with model(x) == head(features(x)); the map explains features(x)"
        f"{found}.{keras_hint}"
    )



_COMPILED_LIMIT = 32
_COMPILED_LOCK = threading.Lock()


def _traced_or_eager(
    cache: dict[Hashable, Callable[..., Any]], key: Hashable, fn: Callable[..., Any]
) -> Callable[..., Any]:
    """Returns ``tf.function(fn)`` that falls back to ``fn`` op by op, for good, if ``fn`` cannot be traced."""
    traced = tf.function(fn, reduce_retracing=True, autograph=False)  # plain Python on tensors: nothing to convert

    def call(*args: Any) -> Any:
        try:
            return traced(*args)
        except (tf.errors.OperatorNotAllowedInGraphError, NotImplementedError, AttributeError):
            # A Python bool of a tensor, .numpy() of a symbolic tensor: a step that needs the host.
            cache[key] = fn
            return fn(*args)

    return call

class TensorFlowBackend(Backend):
    """Adapter for Keras 3 models (on Keras's TensorFlow backend) and TF ``(features, head)`` pairs.

    See the module docstring for how layers are named and how a capture runs. No options.

    A model that is not Keras is given split at the explained layer, as a pair of TF callables
    (plain functions, ``tf.function`` objects, ``tf.Module`` objects or Keras layers)::

        explainer = anycam.Explainer((features, head), None, backend="tensorflow")
        heatmaps = explainer(x)  # explains features(x); the model output is head(features(x))

    Raises (constructor):
        anycam.BackendError: Keras runs on another backend than TensorFlow.
        anycam.LayerError: a layer cannot be found (the message lists the closest names).
        TypeError: the model is neither a Keras layer nor a (features, head) pair.
    """

    name = "tensorflow"
    capabilities = frozenset(
        {"input_scores", "head_scores", "ablation_head", "guided_gradients", "randomize", "attention"}
        | {"native_arrays", "differentiable"}  # issue 21: capture(native=, differentiable=), to_native
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
        check_options(self.name, options, ("model_kwargs", "spatial_input"))
        self.spatial_input: Key | None = options.get("spatial_input")
        self.model_kwargs: dict[str, Any] = dict(options.get("model_kwargs") or {})
        if "training" in self.model_kwargs:
            # Every forward pass runs the model with training=False: in training mode a Keras
            # model would update BatchNormalization's moving statistics and drop units at random.
            raise ConfigError(
                f"model_kwargs={{'training': {self.model_kwargs['training']!r}}}: anycam always runs a Keras "
                "model in inference mode (training=False), so that nothing it does changes the model "
                "(BatchNormalization's moving statistics) and Dropout is off; remove 'training'"
            )
        self.model = model
        self.output = output
        self._input_shape: tuple[Any, ...] | None = None
        self._input_dtype = keras.config.floatx()
        self._built = True
        self._compiled: dict[Hashable, Callable[..., Any]] = {}
        self.layers: list[Any]
        self.ports: list[str]
        self.layouts: tuple[str, ...]
        self.layer_names: tuple[str, ...] = ()
        self._program: Program
        if isinstance(model, keras.Layer):
            _keras_backend_check()
            self._input_shape, self._input_dtype = _keras.input_spec(model)
            self._built = bool(getattr(model, "built", True))
            default_layout = _keras.input_layout(model)
            self.auto_layer = len(layers) == 1 and is_auto(layers[0])
            if not self.auto_layer:
                self._set_layers([_keras.resolve_spec(model, layer) for layer in layers])
        elif isinstance(model, tuple) and len(model) == 2 and all(callable(p) for p in model):
            if any(isinstance(part, keras.Layer) for part in model):
                _keras_backend_check()
            wrong = [layer for layer in layers if layer not in (None, "features", "auto")]
            if wrong:
                raise LayerError(
                    "a (features, head) pair explains the output of features; pass layer=None "
                    f"or 'features', got {wrong[0]!r}"
                )
            features, head = model
            self.layers = [features]
            self.ports = ["output"]
            self.layer_names = ("features",)
            guessed = _keras.data_format(features) if isinstance(features, keras.Layer) else None
            self.layouts = (guessed or keras.config.image_data_format(),)
            default_layout = keras.config.image_data_format()
            self._program = Program(PairForward(features, head), output)
        elif isinstance(model, tf.__internal__.tracking.AutoTrackable):
            # A tf.Module, or what tf.saved_model.load returns (an AutoTrackable, not a tf.Module).
            raise ConfigTypeError(_split_recipe(model))
        else:
            raise ConfigTypeError(
                "the tensorflow backend needs a Keras 3 model or layer, or a (features, head) pair "
                f"of TF callables; got {type(model).__name__}"
            )
        self.input_layout = input_layout or default_layout

    def _set_layers(self, resolved: Sequence[tuple[str, Any, str]]) -> None:
        self.layers = [layer for _, layer, _ in resolved]
        self.ports = [port for _, _, port in resolved]
        self.layouts = _keras.layouts(self.layers)
        names = tuple(name for name, _, _ in resolved)
        self._program = keras_program(self, names)
        self.layer_names = names  # last: a non-empty layer_names means ready

    @property
    def trace_count(self) -> int:
        """How many times this backend's compiled captures were traced (shared per model)."""
        return self._program.trace_count

    # -- the verbs, each delegating to the module of its capability -------------------------

    # -- issue 21: native and differentiable captures (c21-core-tf) --

    def capture(
        self,
        inputs: Any,
        target: TargetSpec,
        *,
        gradients: bool = True,
        native: bool = False,
        differentiable: bool = False,
    ) -> Capture:
        """Runs the model once (``native``: tf.Tensor arrays on the model's device; ``differentiable``: taped)."""
        return capture.capture(self, inputs, target, gradients=gradients, native=native, differentiable=differentiable)

    def to_native(self, array: np.ndarray) -> tf.Tensor:
        """Returns a host array as a tensor on the device the model's variables live on."""
        variables = getattr(self.model, "variables", None) or []
        with tf.device(getattr(variables[0], "device", None) if variables else None):
            return tf.constant(np.ascontiguousarray(array))

    def compiled(self, key: Hashable, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Returns ``tf.function(fn)``, made once per ``key`` (the native driver's core, see ``Explainer``).

        ``key`` names everything ``fn`` closes over; tf.function adds its arguments' shapes and
        dtypes. Op by op, every TF operation pays an eager dispatch, which made the native mode
        slower than the NumPy mode's. A core step that cannot be traced (it reads a value on the
        host) runs op by op instead, for good, for that key.
        """
        with _COMPILED_LOCK:
            compiled = self._compiled.get(key)
            if compiled is None:
                if len(self._compiled) >= _COMPILED_LIMIT:
                    self._compiled.pop(next(iter(self._compiled)))  # the oldest: bounded
                compiled = self._compiled[key] = _traced_or_eager(self._compiled, key, fn)
        return compiled

    # -- end of issue 21 block --

    def predict(self, inputs: Any) -> np.ndarray:
        """Returns the (selected) model output as float32 NumPy (``capture``)."""
        return capture.predict(self, inputs)

    def input_scores(
        self, inputs: Any, target: TargetSpec, indices: np.ndarray | None, *, probabilities: bool = False
    ) -> np.ndarray:
        """Returns ``(M, K)`` scores of the targets on a batch of (modified) inputs (``capture``)."""
        return capture.input_scores(self, inputs, target, indices, probabilities=probabilities)

    def head_scores(
        self, inputs: Any, replacements: np.ndarray, target: TargetSpec, indices: np.ndarray | None
    ) -> np.ndarray:
        """Returns ``(B, N, K)`` scores with the first layer's output replaced by each copy (``head``)."""
        return head.head_scores(self, inputs, replacements, target, indices)

    def ablation_scorer(
        self,
        inputs: Any,
        target: TargetSpec,
        indices: np.ndarray | None,
        activations: np.ndarray,
        channel_axis: int,
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Returns ``f(channels (B,)) -> (B, N, K)``: scores with one channel zeroed per copy (``head``)."""
        return head.ablation_scorer(self, inputs, target, indices, activations, channel_axis)

    def ablation_head(
        self,
        inputs: Any,
        target: TargetSpec,
        indices: np.ndarray | None,
        activations: np.ndarray,
        channel_axis: int,
    ) -> AblationHead | None:
        """Returns the network after the layer as pooling → [dense] → tail, or None (``pooled``)."""
        return pooled.ablation_head(self, inputs, target, indices, activations, channel_axis)

    def guided_gradients(self, inputs: Any, target: TargetSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Returns Guided Backpropagation's input gradients, scores and class indices (``guided``)."""
        return guided.guided_gradients(self, inputs, target)

    def guided_capture(self, inputs: Any, target: TargetSpec) -> tuple[Capture, np.ndarray]:
        """Returns Guided Grad-CAM's capture and guided input gradients from one forward (``guided``)."""
        return guided.guided_capture(self, inputs, target)

    def parameter_layers(self, inputs: Any = None) -> tuple[str, ...]:
        """Returns the paths of the layers that own weights, input to output (``randomize``)."""
        return randomize.parameter_layers(self)

    def randomized(self, layers: Sequence[str], seed: int = 0) -> TensorFlowBackend:
        """Returns a backend over a copy of the model whose ``layers`` have fresh weights (``randomize``)."""
        return randomize.randomized(self, layers, seed)

    # -- Issue 22: the attention methods (capability "attention") --

    def attention_capture(self, inputs: Any, target: TargetSpec, *, gradients: bool) -> AttentionCapture:
        """Returns each MultiHeadAttention call's probabilities and, if asked, ∂score/∂A (``attention``)."""
        from . import attention

        return attention.attention_capture(self, inputs, target, gradients=gradients)
