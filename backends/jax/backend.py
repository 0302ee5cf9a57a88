"""JAX adapter: cut the model at the layer, ``jax.vjp`` the rest, compile the capture once.

This module is the manifest: the adapter's state and one short method per verb. The work is
done in the modules beside it: ``models`` (the four model families, each resolved to one
static *program*), ``inputs`` (the boundary checks, several inputs as one pytree), ``layers``
(taps and ``layer="auto"``), ``capture`` (the compiled capture, predict, input scores), ``head``
and ``pooled`` (Ablation-CAM's copies and its closed form), ``guided`` (guided backpropagation)
and ``randomize`` (the sanity check's copies).

Models run in inference mode: NNX and Equinox models on a private copy switched with
``.eval()`` / ``eqx.nn.inference_mode``; a Flax linen model gets its mode through
``model_kwargs`` (e.g. ``{"train": False}``), and one that tries to update ``batch_stats``
raises an error saying so (BatchNorm in training mode mixes the samples of a batch).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import numpy as np

from anycam.core import TargetSpec
from anycam.protocol.backend import AblationHead, AttentionCapture, Backend, Capture, check_options
from anycam.protocol.layers import is_auto

from . import capture, guided, head, pooled, randomize
from .inputs import structured
from .layers import choose
from .models import _all_layers, _resolve

_COMPILED_LIMIT = 32
"""How many jitted cores one adapter keeps (one per target count and layout reading in practice)."""


def _traced_or_eager(
    cache: dict[Hashable, Callable[..., Any]], key: Hashable, fn: Callable[..., Any]
) -> Callable[..., Any]:
    """Returns ``jax.jit(fn)`` that falls back to ``fn`` op by op, for good, if ``fn`` cannot be traced.

    A core step that reads a value on the host cannot run under ``jit``; it then runs as it
    always did (slower, never failing where the uncompiled path works).
    """
    jitted = jax.jit(fn)

    def call(*args: Any) -> Any:
        try:
            return jitted(*args)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                jax.errors.TracerIntegerConversionError):  # fmt: skip
            cache[key] = fn
            return fn(*args)

    return call


class JaxBackend(Backend):
    """Adapter for JAX models: Flax linen and NNX, Equinox, or a (features, head) split.

    Model forms and layers:

    * Flax linen ``(module, variables)`` or a bound module: a layer is a module path,
      ``"backbone/layer4"`` or ``("backbone", "layer4")`` (``"backbone.layer4"`` works too).
      Paths are read from the variables, so a module must own variables, directly or through
      its submodules, to be named.
    * Flax NNX module: an attribute path, ``"layer4"``, ``"blocks.3"``, or the module object.
    * Equinox module: a pytree path, ``"blocks.3.conv"``, or the module object; for an
      ``eqx.nn.Sequential`` also the index (``3``, ``"3"`` or ``"layers.3"``), in which case the
      model is sliced there. Equinox layers take unbatched samples, so the model runs under
      ``jax.vmap`` (``vmap=False`` for a model that takes batches).
    * ``(features, head)``: ``head(features(x))`` with ``layer=None``; the explained layer is the
      output of ``features``. Parameters are closed over, or given as a third element,
      ``(features, head, params)``, called as ``features(params, x)`` and
      ``head(params, activations)``: then they are arguments of the compiled capture rather
      than constants, and new parameter values of the same shapes do not recompile.

    Options:
        model_kwargs: keyword arguments for every model call (linen ``apply``, NNX or Equinox
            ``__call__``), e.g. ``{"train": False}`` for a linen model with BatchNorm.
        vmap: run the model one sample at a time under ``jax.vmap`` (default: True for
            Equinox, False otherwise).

    Layouts: inputs and layer outputs are channels-last for Flax and channels-first for
    Equinox and functions; ``input_layout=`` sets the input's, and the layers' guess follows
    it; ``layout=`` sets the layers'. Callable targets are JAX functions of the model output,
    compiled with the capture: pass the same function object to reuse the compiled code.
    """

    name = "jax"
    capabilities = frozenset(
        {"input_scores", "head_scores", "ablation_head", "guided_gradients", "randomize", "attention"}
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
        check_options(self.name, options, ("model_kwargs", "vmap", "spatial_input"))
        self._init_state(output, options)
        candidates = _all_layers(model) if len(layers) == 1 and is_auto(layers[0]) else None
        self.auto_layer = candidates is not None
        self._candidates = candidates or []
        # With layer="auto", a program tapping every module until the first batch chooses one.
        self._model = _resolve(model, candidates or list(layers), options, output)
        self.layer_names = () if self.auto_layer else self._model.names
        self.input_layout_given = input_layout is not None
        self.input_layout = input_layout or self._model.layout
        self.layer_layout = input_layout or self._model.layout

    def _init_state(self, output: Any, options: dict[str, Any]) -> None:
        """Sets the state every JAX adapter keeps (the Keras one too): options and the per-adapter caches."""
        self.output = output
        self._options = dict(options)
        self._choose_lock = threading.Lock()
        # (program, target mode, input shapes, indices shape) → (classes, layers with constant gradients).
        self._traced: dict[Any, tuple[int, tuple[int, ...]]] = {}
        # (program, callable, input shape) of the callable targets whose indexing was checked.
        self._checked: dict[Any, Callable[[Any], Any]] = {}
        # key → the jitted core of the native driver (see ``compiled``).
        self._compiled: dict[Hashable, Callable[..., Any]] = {}
        # (shape, dtype) of the last batch: a linen module's init needs an input to run on.
        self._example: tuple[tuple[int, ...], Any] | None = None

    def _as_input(self, inputs: Any) -> Any:
        """Returns one checked array, or several inputs (a tuple/list or dict) as one ``_Inputs`` pytree.

        With ``layer="auto"`` the first batch also chooses the layer.
        """
        x = structured(self, inputs)
        if self.auto_layer and not self.layer_names:
            self._choose(x)
        return x

    def _choose(self, x: Any) -> None:
        """Chooses the layer for ``layer="auto"`` from abstract passes (shapes only, no compute), once."""
        choose(self, x)

    # -- issue 21: native arrays (c21-jax) --
    # "differentiable" is not declared: a JAX array carries no graph, so differentiable maps are
    # a function to compose with jax.grad (anycam.backends.jax.explain_fn), not an Explainer mode.
    capabilities = capabilities | frozenset({"native_arrays"})
    instead: ClassVar[Mapping[str, str]] = {
        "differentiable": (
            "a JAX array carries no autodiff graph, so differentiable maps are a function to compose "
            "with jax.grad: f = anycam.backends.jax.explain_fn(model, layer, method, differentiable=True), "
            "then jax.grad(lambda w: loss(f(w, x)))(f.weights) (see docs/jax.md)"
        )
    }
    """What to use for a capability this adapter does not declare (the Explainer's refusal says it)."""

    def compiled(self, key: Hashable, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Returns ``jax.jit(fn)``, made once per ``key`` (the native driver's core, see ``Explainer``).

        ``key`` names everything ``fn`` closes over (method, target count, layer readings,
        settings); jit adds its arguments' shapes, dtypes and devices. Op by op, ``jax.numpy``
        pays a dispatch per operation, which made the native mode slower than NumPy's.
        Nothing concrete is cached inside the trace (the core caches only concrete arrays).
        """
        with self._choose_lock:
            jitted = self._compiled.get(key)
            if jitted is None:
                if len(self._compiled) >= _COMPILED_LIMIT:
                    self._compiled.pop(next(iter(self._compiled)))  # the oldest: bounded, like jit's own cache
                jitted = self._compiled[key] = _traced_or_eager(self._compiled, key, fn)
        return jitted

    def capture(self, inputs: Any, target: TargetSpec, *, gradients: bool = True, native: bool = False) -> Capture:
        return capture.capture(self, inputs, target, gradients=gradients, native=native)

    def to_native(self, array: np.ndarray) -> Any:
        """Returns a host array as a JAX array on the model's device (an explicit transfer)."""
        return capture.to_native(self, array)

    def predict(self, inputs: Any) -> np.ndarray:
        return capture.predict(self, inputs)

    def input_scores(
        self, inputs: Any, target: TargetSpec, indices: np.ndarray | None, *, probabilities: bool = False
    ) -> np.ndarray:
        """Returns ``(M, K)`` float32 scores of the targets on a batch of (modified) inputs (see ``capture``)."""
        return capture.input_scores(self, inputs, target, indices, probabilities=probabilities)

    def head_scores(
        self, inputs: Any, replacements: np.ndarray, target: TargetSpec, indices: np.ndarray | None
    ) -> np.ndarray:
        """Returns ``(B, N, K)`` float32 scores with the first layer's output replaced by each copy (see ``head``)."""
        return head.head_scores(self, inputs, replacements, target, indices)

    def ablation_scorer(
        self,
        inputs: Any,
        target: TargetSpec,
        indices: np.ndarray | None,
        activations: np.ndarray,
        channel_axis: int,
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Returns ``f(channels (B,)) -> (B, N, K)``: scores with channel ``channels[b]`` zeroed (see ``head``)."""
        return head.ablation_scorer(self, inputs, target, indices, activations, channel_axis)

    def ablation_head(
        self,
        inputs: Any,
        target: TargetSpec,
        indices: np.ndarray | None,
        activations: np.ndarray,
        channel_axis: int,
    ) -> AblationHead | None:
        """Returns the network after the layer as pooling → [dense] → tail when its jaxpr is one (see ``pooled``)."""
        return pooled.ablation_head(self, inputs, target, indices, activations, channel_axis)

    def guided_gradients(self, inputs: Any, target: TargetSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Returns Guided Backpropagation: (∂score/∂input ``(N, K, ...)``, scores, indices) (see ``guided``)."""
        return guided.guided_gradients(self, inputs, target)

    def parameter_layers(self, inputs: Any = None) -> tuple[str, ...]:
        """Returns the layers that own parameters directly, from the input to the output (see ``randomize``)."""
        return randomize.parameter_layers(self, inputs)

    def randomized(self, layers: Sequence[str], seed: int = 0) -> JaxBackend:
        """Returns a backend over a copy of the model whose ``layers`` have fresh parameters (see ``randomize``)."""
        return randomize.randomized(self, layers, seed)

    # -- Issue 22: the attention methods (capability "attention") --

    def attention_capture(self, inputs: Any, target: TargetSpec, *, gradients: bool) -> AttentionCapture:
        """Returns each attention call's probabilities and, if asked, ∂score/∂A, explicit form (see ``attention``)."""
        from . import attention

        return attention.attention_capture(self, inputs, target, gradients=gradients)
