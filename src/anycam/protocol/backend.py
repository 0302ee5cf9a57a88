"""The contract between the NumPy core and the framework adapters in ``anycam.backends``.

An adapter is built once per ``Explainer`` (it resolves layers and compiles what it can) and
then turns a batch into a :class:`Capture`: NumPy float32 activations and gradients of the
chosen layers, the scores of the targets, and the resolved class indices. Nothing in the core
knows which framework produced them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._errors import ConfigTypeError, UnsupportedError
from ..core.targets import TargetSpec


@dataclass(frozen=True)
class Capture:
    """What one forward (and backward) pass of a backend hands to the core.

    Arrays are float32 NumPy, unless the capture was asked for ``native=True``: then
    ``activations``, ``gradients`` and ``scores`` are the framework's arrays on the model's device
    (``target`` stays NumPy).

    Attributes:
        activations: per layer, ``(N, ...)`` float32 in the layer's own layout.
        gradients: per layer, ``(N, K, ...)`` float32 (∂ score_k / ∂ activations), or None when
            the method needs no gradients.
        scores: ``(N, K)`` float32, the explained outputs (pre-softmax unless the model ends in
            a softmax).
        target: ``(N, K)`` int64 class indices, or None for callable targets.
        input_spatial: the spatial shape of the input, the heatmaps' resolution.
        layouts: per layer, the layout the backend believes the output has
            (``"channels_first"``, ``"channels_last"`` or ``"tokens"``), or None where nothing
            in the model decides it. The Explainer checks it against the shapes
            (``anycam.core.read_layouts``): a guess that cannot fit is replaced by the one
            reading that does; None takes the only reading that fits and refuses when several
            do; a user's ``layout=`` is only checked.
        input_shape: the full shape of the (spatial) input, so the input's layout can be
            checked too; None: ``input_spatial`` is taken as it is.
        input_layout: the layout the backend read ``input_spatial`` in.
        layouts_follow_input: the ``layouts`` are the input's layout (JAX), so they change
            with it when the input turns out to be in the other layout.
    """

    activations: tuple[Any, ...]
    gradients: tuple[Any, ...] | None
    scores: Any
    target: np.ndarray | None
    input_spatial: tuple[int, ...]
    layouts: tuple[str | None, ...]
    input_shape: tuple[int, ...] | None = None
    input_layout: str | None = None
    layouts_follow_input: bool = False


@dataclass(frozen=True)
class AblationHead:
    """The network after the explained layer, when it starts with a global per-channel pooling.

    Returned by :meth:`Backend.ablation_head`. Ablation-CAM then never runs the B·N ablated
    copies of the layer output: zeroing channel k of the layer zeroes entry k of ``pooled``
    (a mean, max or sum over the spatial axes maps an all-zero channel to 0), a dense layer
    right after the pooling is linear (``anycam.core.ablated_head_features``), and only
    ``tail`` — the rest of the head — runs in the framework on ``(B, N, F)`` feature vectors.

    Attributes:
        pooled: ``(N, C)`` the pooling's output on the captured activations, in the layer's
            channel order, computed by the model's own pooling.
        tail: ``f(features (B, N, F) float32) -> (B, N, K)`` float32: the network from the
            dense layer's output (its activation included; from the pooling's output without
            a ``weight``) to the target scores, with the call's targets (class indices or the
            callable) applied per copy exactly as :meth:`Backend.ablation_scorer` would.
        weight: ``(C, F)`` the dense layer after the pooling (features = pooled · weight + bias),
            with only shape-keeping steps (flatten, dropout at inference) in between; None when
            the pooling is followed by anything else.
        bias: ``(F,)`` that layer's bias, or None.
    """

    pooled: np.ndarray
    tail: Callable[[np.ndarray], np.ndarray]
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None


# -- Issue 22: what the attention methods get from a backend --


@dataclass(frozen=True)
class AttentionCapture:
    """What one forward (and backward) pass hands the attention methods (``anycam.core.attention``).

    Attributes:
        attentions: per attention call in execution order, the probabilities
            A = softmax(q kᵀ / √d + mask) ``(N, H, T, T)`` float32 (rows sum to 1). Without
            gradients (rollout, which reads only the head mean) a backend may hand the head
            mean ``(N, 1, T, T)``, averaged as the forward goes, to keep the peak memory low.
        gradients: per call ``(N, K, H, T, T)`` float32, ∂ score_k / ∂ A, or None when not asked.
        scores: ``(N, K)`` float32, the explained outputs.
        target: ``(N, K)`` int64 class indices, or None for callable targets.
        input_spatial: the spatial shape of the input, the heatmaps' resolution.
        prefix_tokens: the leading non-patch tokens (class, distillation, register tokens) when
            the backend knows them (a Hugging Face config), else None: the core infers them
            (``anycam.core.attention.patch_tokens``).
        grid: the patch grid when the backend knows it, else None (inferred).
        names: a name per attention call (the module that made it), for messages.
    """

    attentions: tuple[np.ndarray, ...]
    gradients: tuple[np.ndarray, ...] | None
    scores: np.ndarray
    target: np.ndarray | None
    input_spatial: tuple[int, ...]
    prefix_tokens: int | None = None
    grid: tuple[int, ...] | None = None
    names: tuple[str, ...] = ()


CAPABILITIES: Mapping[str, tuple[str, ...]] = {
    "input_scores": ("input_scores",),
    "head_scores": ("head_scores", "head_scorer", "ablation_scorer"),
    "ablation_head": ("ablation_head",),
    "guided_gradients": ("guided_gradients",),
    "randomize": ("parameter_layers", "randomized"),
    # -- issue 21: maps where the model runs (native block) --
    "native_arrays": ("capture", "to_native"),
    "differentiable": ("capture",),
    # Issue 22: the attention methods (rollout, gradient-weighted attention).
    "attention": ("attention_capture",),
}
"""The optional capabilities an adapter may declare, each with the verbs that implement it.

``capture`` and ``predict`` are required of every adapter. ``input_scores`` serves Score-CAM
and the metrics, ``head_scores`` Ablation-CAM's copies (any one of its three verbs will do: the
others have defaults built on it), ``ablation_head`` Ablation-CAM's closed form (optional: the
copies are the fallback), ``guided_gradients`` the guided methods, ``randomize`` the sanity check
(both verbs), ``attention`` the attention methods (``rollout``, ``attention-grad``).

Native block (issue 21): ``native_arrays`` — :meth:`Backend.capture` takes ``native=True`` and
returns the framework's arrays on the model's device, and :meth:`Backend.to_native` turns a
host array into one (for the drivers that still compute on the host); ``differentiable`` —
``capture`` takes ``differentiable=True`` and keeps the autodiff graph. ``capture`` is required
of every adapter, so declaring these is the promise that its keywords work.
"""


class Backend(abc.ABC):
    """One framework's adapter: ``backends/<name>/backend.py``, found by ``<name>.backend_for(model)``.

    Args (of every subclass's constructor):
        model: the framework model.
        layers: a non-empty list of layer names or layer objects.
        output: selects the explained tensor from a model output that is a tuple, dict or
            dataclass (an index, key, attribute name or callable); None takes it as is.
        input_layout: the input's layout, or None for the framework's convention.
        **options: backend-specific options; unknown ones raise ``anycam.ConfigTypeError`` (a
            ``TypeError``). Backends that take several inputs accept ``spatial_input=`` and ``model_kwargs=`` (see
            ``anycam.protocol.inputs.structure_inputs``, which turns each call's inputs into one form).

    A layer is a name (``"name:input"`` for the layer's input, see ``anycam.protocol.layers``), a layer
    object, or None / ``"auto"`` for the automatic choice (``anycam.protocol.layers.choose_layer``).
    """

    name: ClassVar[str]

    capabilities: ClassVar[frozenset[str]] = frozenset()
    """The optional capabilities (keys of :data:`CAPABILITIES`) this adapter implements. The
    Explainer refuses a method whose capability is missing before any work; a subclass that
    declares one without overriding its verbs fails when the class is defined."""

    instead: ClassVar[Mapping[str, str]] = {}
    """For a capability this adapter does not declare, what to use instead; the Explainer appends
    it to its refusal (JAX: ``differentiable`` → ``explain_fn`` composed with ``jax.grad``)."""

    # An adapter may also offer ``compiled(key, fn) -> callable``: ``fn``, a pure function of the
    # backend's arrays (the core of one call), compiled once per ``key``, which must hold everything
    # ``fn`` closes over. With it, the native mode runs the core as one program
    # (``anycam.explain.explainer``'s compiled driver); without it, op by op. Not a capability:
    # nothing is refused for lacking it.

    input_layout: str = "channels_first"
    """The layout of the (spatial) input, ``"channels_first"`` or ``"channels_last"``."""

    layer_names: tuple[str, ...]
    """The resolved names; empty until the first call when the layer is chosen automatically
    during a forward pass."""

    auto_layer: bool = False
    """Whether the layer was chosen (or is to be chosen) by the automatic rule."""

    auto_note: str | None = None
    """Why the automatic rule's choice may not be the map wanted (``anycam.protocol.layers.choice_note``),
    shown in the Explainer's ``repr``; None when there is nothing to say."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(set(cls.capabilities) - set(CAPABILITIES))
        if unknown:
            known = sorted(CAPABILITIES)
            raise ConfigTypeError(f"{cls.__qualname__} declares unknown capabilities {unknown}; known: {known}")
        for capability in cls.capabilities:
            verbs = CAPABILITIES[capability]
            overridden = [verb for verb in verbs if getattr(cls, verb) is not getattr(Backend, verb)]
            complete = bool(overridden) if capability == "head_scores" else len(overridden) == len(verbs)
            if not complete:
                raise ConfigTypeError(
                    f"{cls.__qualname__} declares {capability!r} but does not implement {', '.join(verbs)}"
                )

    def can(self, capability: str) -> bool:
        """Whether this adapter declares ``capability`` (a key of :data:`CAPABILITIES`)."""
        return capability in self.capabilities

    @abc.abstractmethod
    def __init__(
        self,
        model: Any,
        layers: Sequence[Any],
        *,
        output: Any = None,
        input_layout: str | None = None,
        **options: Any,
    ) -> None:
        """Resolves the layers and prepares (compiles, caches) what every call reuses."""

    @abc.abstractmethod
    def capture(self, inputs: Any, target: TargetSpec, *, gradients: bool = True) -> Capture:
        """Runs the model once on ``inputs`` and returns what the core needs.

        An adapter that declares ``native_arrays`` / ``differentiable`` adds the keywords
        ``native: bool = False`` / ``differentiable: bool = False`` to its ``capture``; the
        Explainer passes them only when they are True, so adapters without the capabilities keep
        this signature.

        Args:
            inputs: the batch as the user gave it.
            target: the parsed target.
            gradients: compute the gradients of the scores with respect to the layers.
            native: (capability ``native_arrays``) activations, gradients and scores are the
                framework's arrays on the model's device, float32 (the model's float16/bfloat16
                cast to float32 on the device; float64 stays float64); ``target`` stays an int64
                NumPy array. False: float32 NumPy, as always. An adapter without the capability
                is never called with True and may omit the keyword.
            differentiable: (capability ``differentiable``; implies ``native``) activations and
                gradients stay attached to the autodiff graph, so that what the core computes
                from them is differentiable with respect to the model's parameters and input
                (torch: ``create_graph=True``, no detach; TensorFlow: recorded by the caller's
                outer tape; JAX: a traceable function of the parameters and inputs).
        """

    @abc.abstractmethod
    def predict(self, inputs: Any) -> np.ndarray:
        """Returns the selected model output for ``inputs`` as float32 NumPy, no gradients."""

    # Optional capabilities of the methods beyond gradients (Score-CAM, Ablation-CAM, guided
    # backpropagation). The method math stays in the core and the Explainer; a backend only runs
    # its framework. The defaults raise anycam.UnsupportedError (a NotImplementedError) naming the
    # backend and the method.

    def head_scores(
        self, inputs: Any, replacements: np.ndarray, target: TargetSpec, indices: np.ndarray | None
    ) -> np.ndarray:
        """Returns ``(B, N, K)`` scores of the targets with the (first) layer's output replaced.

        Runs only the network after the layer on each replacement; the prefix (input → layer)
        is computed once per call, not once per copy. Residual paths that skip over the layer
        keep the values of the original input. Used by Ablation-CAM.

        Args:
            inputs: the original batch ``(N, ...)`` exactly as given to ``capture()``.
            replacements: ``(B, N, *layer_shape)`` float32 in the layer's own layout (the
                per-sample shape of ``Capture.activations[0]``): B modified copies per sample.
            target: the parsed target of the call.
            indices: the ``(N, K)`` int64 class indices the capture resolved; None for a
                callable target, which is then applied to the model output.

        Returns:
            ``(B, N, K)`` float32.
        """
        raise UnsupportedError(f"the {self.name} backend has no head_scores(), which ablationcam needs")

    def head_scorer(
        self, inputs: Any, target: TargetSpec, indices: np.ndarray | None
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Returns ``f(replacements (B, N, *layer_shape)) -> (B, N, K)``, :meth:`head_scores` bound to one batch.

        The Explainer calls the returned function once per chunk of replacements. A backend
        that can keep the prefix (input → layer) between chunks overrides this so that the
        prefix runs once per *explanation* rather than once per chunk; the default simply
        calls :meth:`head_scores` (prefix once per chunk), so a backend only has to implement
        that. The function holds no state beyond the explanation it serves.
        """

        def scores(replacements: np.ndarray) -> np.ndarray:
            return self.head_scores(inputs, replacements, target, indices)

        return scores

    def ablation_scorer(
        self,
        inputs: Any,
        target: TargetSpec,
        indices: np.ndarray | None,
        activations: np.ndarray,
        channel_axis: int,
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Returns ``f(channels (B,)) -> (B, N, K)``: the head's scores with channel ``channels[b]``
        of ``activations`` zeroed in every sample (Ablation-CAM's copies).

        ``activations`` ``(N, ...)`` is the capture's output of the (first) layer and
        ``channel_axis`` its channel axis (1 or -1). The default builds the B copies with
        ``core.ablated_copies`` and scores them with :meth:`head_scorer`. A backend that zeroes
        the channel inside its compiled suffix overrides this, so that no B·N copies of the layer
        output are built in NumPy and moved into the framework (at a late layer that is most of
        the cost: the suffix itself is small).
        """
        from ..core.perturbation import ablated_copies

        scorer = self.head_scorer(inputs, target, indices)
        # One buffer for every chunk of this explanation: no fresh allocation (and page faults)
        # per chunk; the scorer returns before the next chunk overwrites it.
        buffers: list[np.ndarray] = []

        def scores(channels: np.ndarray) -> np.ndarray:
            if not buffers or len(buffers[0]) < len(channels):
                buffers[:] = [np.empty((len(channels), *activations.shape), dtype=np.float32)]
            return np.asarray(scorer(ablated_copies(activations, channels, channel_axis, out=buffers[0])))

        return scores

    def ablation_head(
        self,
        inputs: Any,
        target: TargetSpec,
        indices: np.ndarray | None,
        activations: np.ndarray,
        channel_axis: int,
    ) -> AblationHead | None:
        """Returns the network after the (first) layer as pooling → [dense] → tail, or None.

        Arguments as :meth:`ablation_scorer`. A backend returns an :class:`AblationHead` only
        when the layer's output is read by nothing but a global per-channel pooling over all
        its spatial axes (mean, max or sum) and the rest of the network reads nothing from
        before the layer; the Explainer checks the tail's unablated scores against the
        capture's and falls back to :meth:`ablation_scorer` (with a warning) if they differ.
        The default returns None: Ablation-CAM then runs the network after the layer on every
        ablated copy.
        """
        return None

    def to_native(self, array: np.ndarray) -> Any:
        """Returns a host array as the framework's array on the model's device (``native_arrays``)."""
        raise UnsupportedError(f"the {self.name} backend has no native arrays")

    def input_scores(
        self, inputs: Any, target: TargetSpec, indices: np.ndarray | None, *, probabilities: bool = False
    ) -> np.ndarray:
        """Returns ``(M, K)`` float32 scores of the targets for a batch of modified inputs.

        Used by Score-CAM; the caller chunks M (``batch_size=``).

        Args:
            inputs: ``(M, ...)`` NumPy float32 in the input's layout (e.g. masked copies).
            target: the parsed target of the call.
            indices: ``(M, K)`` int64 class indices, or None for a callable target.
            probabilities: take the softmax over the selected output's class axis first
                (class-index targets only).

        Raises:
            anycam.TargetError: ``probabilities=True`` with a callable target (Score-CAM then
                needs class scores, or a callable that returns what to weight by).
        """
        raise UnsupportedError(f"the {self.name} backend has no input_scores(), which scorecam needs")

    def guided_gradients(self, inputs: Any, target: TargetSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Returns ∂score/∂input with every ReLU's backward replaced by the guided rule.

        Guided Backpropagation (Springenberg et al. 2015): a ReLU passes a gradient only where
        both its forward input and the incoming gradient are positive. Applies to ReLU
        modules/layers *and* functional calls (torch: ``nn.ReLU``, ``F.relu``, ``torch.relu``,
        ``Tensor.relu(_)``; Keras: ``ReLU``, ``activation="relu"``, ``keras.activations.relu``,
        ``tf.nn.relu``; JAX: ``jax.nn.relu``), installed only for this call and removed in
        ``finally``: the model is unchanged afterwards, also after an exception. A model with no
        ReLU at all gets a UserWarning (the result then equals plain input gradients).

        Returns:
            (attributions ``(N, K, *input_shape_without_N)`` float32 in the input's layout,
            scores ``(N, K)`` float32, indices ``(N, K)`` int64 or None for a callable target).
        """
        raise UnsupportedError(
            f"the {self.name} backend has no guided_gradients(), which guided-backprop and guided-gradcam need"
        )

    def guided_capture(self, inputs: Any, target: TargetSpec) -> tuple[Capture, np.ndarray]:
        """Returns Guided Grad-CAM's two passes: the Grad-CAM :class:`Capture` (with gradients)
        and the guided input gradients ``(N, K, *input_shape_without_N)`` of the same targets.

        The default runs :meth:`capture`, then :meth:`guided_gradients` for exactly the classes
        the capture resolved (argmax, top-k). A backend that can take both gradients from one
        forward pass — the layer's by the ordinary rule, the input's by the guided one —
        overrides this.
        """
        capture = self.capture(inputs, target, gradients=True)
        spec = target
        if capture.target is not None:
            spec = TargetSpec("indices", squeeze=False, indices=capture.target)
        gradients, _, _ = self.guided_gradients(inputs, spec)
        return capture, gradients

    def parameter_layers(self, inputs: Any = None) -> tuple[str, ...]:
        """Returns the names of the layers that own parameters, from the input to the output.

        Used by ``anycam.sanity_check`` to randomise the model layer by layer. Backends whose
        models do not record their call order (Flax) use ``inputs``, a batch, to trace it.
        """
        raise UnsupportedError(f"the {self.name} backend cannot list its parameter layers")

    def randomized(self, layers: Sequence[str], seed: int = 0) -> Backend:
        """Returns a backend over a *copy* of the model whose ``layers`` are re-initialised.

        Each layer gets fresh weights from the framework's own initialiser; the user's model
        is never touched. The copy explains the same layers with the same options.
        """
        raise UnsupportedError(f"the {self.name} backend cannot randomise a model copy")

    # -- Issue 22: the attention methods (capability "attention") --

    def attention_capture(self, inputs: Any, target: TargetSpec, *, gradients: bool) -> AttentionCapture:
        """Returns every attention call's probabilities (and ∂score/∂A) for one forward pass.

        The attention runs in its explicit form, softmax(q kᵀ/√d + mask) @ v, while the backend
        explains (fused kernels never build A, so it would have no gradient); the model's outputs
        equal the fused path's within float tolerance. Targets as in :meth:`capture` (int,
        per-sample, ``(N, K)`` with K gradients from one forward, top-k, callable). Interception
        is undone in ``finally``: the model is unchanged afterwards, also after an exception.
        """
        raise UnsupportedError(
            f"the {self.name} backend has no attention_capture(), which rollout and attention-grad need"
        )


def select_output(output: Any, selector: Any) -> Any:
    """Returns the part of a model output that ``selector`` names (shared by all backends).

    ``selector`` is None (the output itself, which must then not be a tuple/list/dict), an int
    (index), a str (dict key, or attribute of a dataclass-like output) or a callable.

    Raises:
        anycam.TargetError: if the output is a container and no selector was given, or the
            selector does not fit it.
    """
    from .._errors import TargetError

    if selector is None:
        if isinstance(output, (tuple, list, dict)):
            kind = type(output).__name__
            hint = "output=0" if not isinstance(output, dict) else f"output={next(iter(output), 'key')!r}"
            raise TargetError(
                f"the model returned a {kind}; say which part to explain, e.g. {hint} "
                "(an index, key, attribute name or callable)"
            )
        return output
    if callable(selector):
        return selector(output)
    try:
        if isinstance(selector, str) and not isinstance(output, dict):
            return getattr(output, selector)
        return output[selector]
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        raise TargetError(
            f"output={selector!r} does not fit a model output of type {type(output).__name__}{_parts(output, selector)}"
        ) from exc


def _parts(output: Any, selector: Any) -> str:
    """Lists what a container output offers, and the closest name to ``selector``."""
    from .._errors import closest

    if isinstance(output, Mapping):
        names = [str(key) for key in output]
        kind = "keys"
    elif isinstance(output, (tuple, list)):
        return f"; it has {len(output)} items: use an index 0..{len(output) - 1}"
    else:
        fields = getattr(output, "__dataclass_fields__", None)
        if fields:
            names = list(fields)
        else:
            names = [n for n in getattr(output, "__dict__", {}) if not n.startswith("_")]
        kind = "attributes"
    if not names:
        return ""
    shown = ", ".join(map(repr, names[:20])) + (", …" if len(names) > 20 else "")
    return f"; its {kind} are {shown}{closest(str(selector), names)}"


def as_list(layer: Any) -> list[Any]:
    """Returns ``layer`` as a list of layers: only a ``list`` means several layers.

    A tuple stays one layer, because a tuple is how Flax spells a module path.

    Raises:
        anycam.LayerError: for an empty list.
    """
    from .._errors import LayerError

    if isinstance(layer, list):
        if not layer:
            raise LayerError("layer list is empty; name at least one layer")
        return list(layer)
    return [layer]


EXPLAINER_ARGUMENTS = (
    "model",
    "layer",
    "method",
    "backend",
    "output",
    "layout",
    "token_grid",
    "input_layout",
    "normalize",
    "upsample",
    "aggregate",
    "relu",
    "spatial_input",
    "model_kwargs",
    "batch_size",
    "progress",
    "scorecam",
    "scorecam_top_k",
    "seed",
    "arrays",
    "differentiable",
)
"""``anycam.Explainer``'s own arguments, for the near-miss hint of an unknown option (kept equal by a test)."""


def check_options(backend: str, options: dict[str, Any], known: Sequence[str]) -> None:
    """Raises ``anycam.ConfigTypeError`` (a TypeError) for unknown options, listing the known ones.

    A near miss of an option or of one of the Explainer's own arguments (``normalise=`` for
    ``normalize=``) is named first: the Explainer passes every keyword it does not take to the
    backend, so a misspelt Explainer argument lands here.
    """
    from .._errors import closest

    unknown = sorted(set(options) - set(known))
    if unknown:
        candidates = dict.fromkeys([*known, *EXPLAINER_ARGUMENTS])
        hints = "".join(closest(name, candidates, n=2) for name in unknown)
        accepted = ", ".join(sorted(known)) or "none"
        raise ConfigTypeError(
            f"unknown option(s) {', '.join(unknown)} for the {backend} backend; accepted: {accepted} "
            f"(besides the Explainer's own arguments){hints}"
        )
