"""The network *after* a layer, for any torch model: Ablation-CAM's scores of replaced activations.

How it is done (in order of preference):

1. **A graph split** (``torch.fx``). The model is traced once with the explained module kept as
   one node; the nodes that do not depend on that module's output and that the rest reads (the
   tensors residual connections carry *over* the layer, and what they are computed from) run
   once per explanation, and only the nodes that depend on the layer (the suffix) run on the
   replacements. The suffix runs under
   ``torch.func.vmap`` over the B copies, so a prefix tensor of shape ``(N, ...)`` meets a
   replacement of shape ``(N, ...)`` exactly as in the original forward: a skip connection adds
   the *original* identity to every copy, with no hand-written broadcasting.
2. **vmap over the whole model** with a forward hook that substitutes the layer output, when the
   model cannot be traced (data-dependent Python control flow, dict inputs). Inside vmap the
   prefix does not depend on the vmapped replacements, so it runs unbatched, once per chunk.
3. **A loop** over the copies with the substituting hook, when an operator of the suffix has no
   vmap batching rule. Correct, and as slow as the peers.

Before all of these, Ablation-CAM asks for a **pooled head** (``pooled.py``): when the layer
is read by nothing but a global per-channel pooling, zeroing a channel zeroes one pooled entry,
the core folds a following ``nn.Linear`` in closed form, and only the nodes after it run
(``GraphSplit.tail_output``), on B·N feature rows instead of B·N layer outputs.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.fx

from anycam._errors import AnycamWarning, LayerError, user_stacklevel
from anycam.core import TargetSpec
from anycam.protocol.backend import select_output
from anycam.protocol.inputs import ModelInputs

from .inputs import batch_of, call_frozen, device_dtype, frozen_buffers, structure, to_numpy

if TYPE_CHECKING:
    from .backend import TorchBackend

Scores = Callable[[Any], torch.Tensor]


class _Tracer(torch.fx.Tracer):
    """The default tracer, with the explained module kept as a single node."""

    def __init__(self, leaf: torch.nn.Module) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return module is self.leaf or super().is_leaf_module(module, qualified_name)


class GraphSplit:
    """A traced model cut at one module: ``prefix(inputs) -> env``, ``suffix(env, replacement)``.

    Built once per (model, layer, port); holds only the graph, never a call's tensors.
    """

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module, port: str) -> None:
        tracer = _Tracer(module)
        # Tracing runs ``forward`` on proxies: whatever it assigns (``self.last = b``), and the
        # constants the tracer itself parks on the root (``_tensor_constant0``), must not stay on
        # the user's model. The constants are kept here instead.
        with _untouched(model) as added:
            self.graph = tracer.trace(model)
        self.constants: dict[str, Any] = added
        self.model = model
        names = [name for name, m in model.named_modules() if m is module]
        nodes = [n for n in self.graph.nodes if n.op == "call_module" and n.target in names]
        if len(nodes) != 1:
            raise RuntimeError(f"the layer appears {len(nodes)} times in the traced graph")
        self.layer = nodes[0]
        self.port = port
        self.placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.parameters = inspect.signature(model.forward).parameters
        # What depends on the replacement: the layer node itself for a replaced input, its users
        # (transitively) for a replaced output.
        dependent: set[torch.fx.Node] = {self.layer}
        for node in self.graph.nodes:
            if any(arg in dependent for arg in node.all_input_nodes):
                dependent.add(node)
        self.suffix = [n for n in self.graph.nodes if n in dependent and (n is not self.layer or port == "input")]
        self.prefix = [n for n in self.graph.nodes if n not in dependent or (n is self.layer and port == "input")]
        if port == "input":
            # The layer node runs in the suffix on the replaced input; its other arguments and
            # the original input come from the prefix.
            self.prefix = [n for n in self.prefix if n is not self.layer]
        self.needed = {arg for n in self.suffix for arg in n.all_input_nodes if arg not in dependent}
        if port == "input":
            self.needed |= set(self.layer.all_input_nodes)
        # Only what the suffix reads, and what that depends on, runs in the prefix: at the last
        # stage of a ResNet the suffix (pool, linear) reads nothing but the layer output, so the
        # prefix costs nothing beyond the capture's own forward.
        required = set(self.needed)
        for node in reversed(self.prefix):
            if node in required:
                required.update(node.all_input_nodes)
        self.prefix = [n for n in self.prefix if n in required]
        # The suffix reads nothing from before the layer: copies can be stacked along the batch.
        self.flattenable = port == "output" and not self.needed
        outputs = [n for n in self.graph.nodes if n.op == "output"]
        # A classifier ending in nn.Linear: with class targets only the target rows of its weight
        # are needed (K of, say, 1000 outputs per copy).
        self.head_linear: torch.fx.Node | None = None
        last = outputs[0].args[0] if outputs else None
        if (
            isinstance(last, torch.fx.Node)
            and last.op == "call_module"
            and isinstance(model.get_submodule(str(last.target)), torch.nn.Linear)
            and len(last.users) == 1
            and len(last.args) == 1
            and not last.kwargs
            and last is not self.layer
        ):
            self.head_linear = last
        if not outputs or outputs[0] not in dependent:
            raise RuntimeError("the model output does not depend on the layer")

    def _run(self, node: torch.fx.Node, env: dict[torch.fx.Node, Any]) -> Any:
        args = torch.fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "call_module":
            return self.model.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "get_attr":
            if node.target in self.constants:
                return self.constants[str(node.target)]
            value: Any = self.model
            for part in str(node.target).split("."):
                value = getattr(value, part)
            return value
        raise RuntimeError(f"unexpected node {node.op}")

    def prefix_values(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[torch.fx.Node, Any]:
        """Runs every node that does not depend on the layer; keeps what the suffix reads."""
        bound = inspect.signature(self.model.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        env: dict[torch.fx.Node, Any] = {}
        last_use: dict[torch.fx.Node, int] = {}
        for position, node in enumerate(self.prefix):
            for arg in node.all_input_nodes:
                last_use[arg] = position
        for position, node in enumerate(self.prefix):
            if node.op == "placeholder":
                env[node] = bound.arguments[str(node.target)]
            elif node.op != "output":
                env[node] = self._run(node, env)
            # Free prefix values nothing later needs (the prefix's own activations).
            for arg in node.all_input_nodes:
                if last_use.get(arg) == position and arg not in self.needed:
                    env.pop(arg, None)
        return {node: env[node] for node in self.needed}

    def suffix_output(
        self, prefix: dict[torch.fx.Node, Any], replacement: torch.Tensor, before: torch.fx.Node | None = None
    ) -> Any:
        """Runs the nodes that depend on the layer with the layer's output (or input) replaced.

        With ``before`` (a node of the suffix), stops there and returns that node's first input.
        """
        # Copies: the suffix may modify its inputs in place (``out += identity``, ``relu_``), and
        # the prefix values serve every copy while the replacement is the caller's buffer.
        env = {node: _fresh(value) for node, value in prefix.items()}
        replacement = replacement.clone()
        if self.port == "output":
            env[self.layer] = replacement
        for node in self.suffix:
            if before is not None and node is before:
                return torch.fx.node.map_arg(node.args[0], lambda n: env[n])
            if node.op == "output":
                return torch.fx.node.map_arg(node.args[0], lambda n: env[n])
            if node is self.layer and self.port == "input":
                args = list(torch.fx.node.map_arg(node.args, lambda n: env[n]))
                args[0] = replacement
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
                env[node] = self.model.get_submodule(str(node.target))(*args, **kwargs)
            else:
                env[node] = self._run(node, env)
        raise RuntimeError("the traced graph has no output")

    def tail_output(self, start: torch.fx.Node, value: Any) -> Any:
        """Runs the suffix nodes after ``start`` with ``start``'s output given as ``value``.

        ``start`` must be a node every later suffix node reaches the layer through (a pooled
        head's pooling or dense layer): nothing after it reads the layer output itself.
        """
        env: dict[torch.fx.Node, Any] = {start: _fresh(value)}
        for node in self.suffix[self.suffix.index(start) + 1 :]:
            if node.op == "output":
                return torch.fx.node.map_arg(node.args[0], lambda n: env[n])
            env[node] = self._run(node, env)
        raise RuntimeError("the traced graph has no output")

    def evaluate(self, nodes: Sequence[torch.fx.Node], value: torch.Tensor) -> torch.Tensor:
        """Returns the last of ``nodes`` (a chain from the layer output) run on ``value``."""
        env: dict[torch.fx.Node, Any] = {self.layer: value.clone()}
        for node in nodes:
            env[node] = self._run(node, env)
        return env[nodes[-1]]


@contextlib.contextmanager
def _untouched(model: torch.nn.Module) -> Iterator[dict[str, Any]]:
    """Restores every module's attributes after the block; yields what the block added to the root.

    Each module's ``__dict__`` (and its parameter, buffer and submodule tables) is copied before
    and put back after, so attributes set, replaced or deleted inside the block are as they were.
    """
    tables = ("_parameters", "_buffers", "_modules")
    saved = [
        (m, {key: dict(value) if key in tables else value for key, value in m.__dict__.items()})
        for m in model.modules()
    ]
    added: dict[str, Any] = {}
    try:
        yield added
    finally:
        root = {key: value for key, value in model.__dict__.items() if key not in saved[0][1]}
        added.update(root)
        for table in tables:
            added.update({k: v for k, v in model.__dict__[table].items() if k not in saved[0][1][table]})
        for m, attributes in saved:
            m.__dict__.clear()
            m.__dict__.update(attributes)


def fingerprint(model: torch.nn.Module) -> tuple[Any, ...]:
    """What a traced graph bakes in from the model besides its tensors: per module, the training
    flag and the other Python attributes (numbers, strings, flags by value; objects by identity).

    ``torch.fx`` records ``F.dropout(training=self.training)`` and ``x * self.gain`` as constants,
    so a split is reused only while this is unchanged (``model.eval()``, ``model.gain = -2``).
    """
    parts: list[Any] = []
    for name, module in model.named_modules():
        for key, value in module.__dict__.items():
            if key in ("_parameters", "_buffers", "_modules") or "hook" in key:
                continue
            parts.append((name, key, _frozen(value)))
    return tuple(parts)


def _frozen(value: Any, depth: int = 0) -> Any:
    """A hashable stand-in for an attribute: plain values themselves, containers element-wise."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        return value
    if depth < 3 and isinstance(value, (tuple, list, set, frozenset)):
        items = sorted(map(repr, value)) if isinstance(value, (set, frozenset)) else value
        return (type(value).__name__, tuple(_frozen(v, depth + 1) for v in items))
    if depth < 3 and isinstance(value, dict):
        return ("dict", tuple((repr(k), _frozen(v, depth + 1)) for k, v in value.items()))
    return (type(value).__name__, id(value))


def _fresh(value: Any) -> Any:
    """Returns a copy of a tensor (anything else as it is): what a suffix may modify in place."""
    return value.clone() if isinstance(value, torch.Tensor) else value


def graph_split(model: torch.nn.Module, module: torch.nn.Module, port: str) -> GraphSplit | None:
    """Returns the split of ``model`` at ``module``, or None if the model cannot be traced."""
    try:
        return GraphSplit(model, module, port)
    except Exception:  # any tracing failure means: use the hook fallback
        return None


def batched(function: Callable[[torch.Tensor], torch.Tensor], replacements: torch.Tensor) -> torch.Tensor:
    """Returns ``stack([function(r) for r in replacements])``, vectorised by vmap where possible."""
    try:
        return torch.func.vmap(function)(replacements)
    except torch.OutOfMemoryError:
        raise  # not a missing batching rule: the caller halves its chunk
    except (RuntimeError, NotImplementedError) as exc:
        warnings.warn(
            f"the network after the layer cannot be vectorised over the ablated copies ({exc}); "
            "falling back to one pass per copy, which is slower",
            AnycamWarning,
            stacklevel=user_stacklevel(),
        )
        return torch.stack([function(r) for r in replacements])


def copies_scorer(
    one: Callable[[torch.Tensor], torch.Tensor], flat: Callable[[torch.Tensor], torch.Tensor | None] | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Returns f(copies (B, N, ...)) -> (B, N, K): ``one`` per copy, or ``flat`` on all B·N rows at once.

    ``flat`` (None: never) runs the B copies as one batch of B·N rows, without vmap's overhead;
    rows stay independent unless the network mixes the samples of a batch (batch statistics,
    a softmax over the batch axis), so it is taken only once the first call with B ≥ 2 showed
    copy 0 scoring within it as it does alone. Otherwise ``one`` runs vmapped over the copies.
    """
    flat_ok: list[bool | None] = [None if flat is not None else False]

    def scores(copies: torch.Tensor) -> torch.Tensor:
        if flat is not None and flat_ok[0] is None and copies.shape[0] >= 2:
            candidate = flat(copies)
            alone = one(copies[0])
            scale = float(alone.abs().max()) if alone.numel() else 0.0
            flat_ok[0] = candidate is not None and bool(
                torch.allclose(candidate[0], alone, rtol=1e-4, atol=1e-5 * max(scale, 1e-12))
            )
            if flat_ok[0] and candidate is not None:
                return candidate
        elif flat is not None and flat_ok[0]:
            result = flat(copies)
            if result is not None:
                return result
        return batched(one, copies)

    return scores


def to_scores(output: Any, indices: np.ndarray | None, fn: Scores | None, batch: int) -> torch.Tensor:
    """Returns the (N, K) scores of one copy's model output (inside vmap: one copy at a time)."""
    if fn is not None:
        return fn(output).reshape(batch, -1)
    index = torch.as_tensor(indices, device=output.device)
    return output.gather(1, index)


def rows_scores(output: Any, count: int, batch: int, indices: np.ndarray | None, fn: Any) -> torch.Tensor | None:
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


def split(backend: TorchBackend) -> GraphSplit | None:
    """Returns the adapter's graph split at its first layer, traced again whenever the model's
    training flags or Python attributes (:func:`fingerprint`) changed since the last trace."""
    module, port = backend.modules[0], backend.ports[0]
    key = (id(module), port)
    current = fingerprint(backend.model)
    with backend._splits_lock:
        cached = backend._splits.get(key)
        if cached is None or cached[0] != current:
            backend._splits[key] = (current, graph_split(backend.model, module, port))
        return backend._splits[key][1]


def replaced_forward(backend: TorchBackend, structure: ModelInputs, replacement: torch.Tensor) -> Any:
    """Runs the whole model with the first layer's output (or input) replaced by a forward hook."""
    owner = threading.get_ident()
    module = backend.modules[0]

    # Copies: the network may modify what the hook hands it in place, and the replacement is the
    # caller's buffer.
    def hook(module: torch.nn.Module, args: Any, out: Any) -> Any:
        return replacement.clone() if threading.get_ident() == owner else None

    def pre_hook(module: torch.nn.Module, args: Any) -> Any:
        return (replacement.clone(), *args[1:]) if threading.get_ident() == owner else None

    if backend.ports[0] == "input":
        handle = module.register_forward_pre_hook(pre_hook)
    else:
        handle = module.register_forward_hook(hook)
    try:
        # Unwrapped: under vmap a RuntimeError sends ``batched`` to its per-copy fallback.
        return call_frozen(backend.model, structure)
    finally:
        handle.remove()


def head_scorer(
    backend: TorchBackend, inputs: Any, target: TargetSpec, indices: np.ndarray | None
) -> Callable[[Any], np.ndarray]:
    """Returns f(replacements (B, N, *layer)) -> (B, N, K), the prefix computed once here.

    The replacements are NumPy, or a tensor already on the device (``ablation_scorer``).

    A traced graph split runs the prefix once and only the suffix on each chunk (vmapped over
    the copies); an untraceable model falls back to vmap over the whole model with a
    substituting hook (prefix once per chunk).
    """
    if backend.auto_layer and not backend.layer_names:
        raise LayerError("the layer is chosen at the first capture; call capture() first")
    with torch.inference_mode(False):
        given = structure(backend, inputs)
    batch = batch_of(given)
    fn = target.fn if target.kind == "callable" else None
    device, dtype = device_dtype(backend.model)
    graph = backend._split()
    prefix: dict[Any, Any] | None = None
    if graph is not None:
        with torch.inference_mode(False), torch.no_grad(), frozen_buffers(backend.model):
            prefix = graph.prefix_values(given.args, {**given.kwargs, **given.constants})

    def one(replacement: torch.Tensor) -> torch.Tensor:
        if graph is not None and prefix is not None:
            output = graph.suffix_output(prefix, replacement)
        else:
            output = backend._replaced_forward(given, replacement)
        return to_scores(select_output(output, backend.output), indices, fn, batch)

    # When the rest of the network reads nothing but the layer output, the B copies can run as
    # one batch of B·N rows (``copies_scorer`` checks that the rows stay independent).
    def flat(copies: torch.Tensor) -> torch.Tensor | None:
        count = copies.shape[0]
        assert graph is not None
        linear = graph.head_linear
        if fn is None and backend.output is None and linear is not None:
            features = graph.suffix_output({}, copies.flatten(0, 1), before=linear)
            if isinstance(features, torch.Tensor) and features.ndim == 2 and features.shape[0] == count * batch:
                module = cast(torch.nn.Linear, backend.model.get_submodule(str(linear.target)))
                index = torch.as_tensor(indices, device=features.device)
                rows = module.weight[index]  # (N, K, F): only the target classes
                scores = torch.einsum("bnf,nkf->bnk", features.unflatten(0, (count, batch)), rows)
                return scores if module.bias is None else scores + module.bias[index]
        output = select_output(graph.suffix_output({}, copies.flatten(0, 1)), backend.output)
        return rows_scores(output, count, batch, indices, fn)

    run = copies_scorer(one, flat if graph is not None and graph.flattenable else None)

    def scores(replacements: Any) -> np.ndarray:
        if isinstance(replacements, torch.Tensor):  # built on the device (ablation_scorer below)
            copies = replacements.to(device=device, dtype=dtype)
        else:
            copies = torch.as_tensor(np.asarray(replacements), dtype=dtype, device=device)
        with torch.inference_mode(False), torch.no_grad(), frozen_buffers(backend.model):
            return to_numpy(run(copies))

    return scores


def ablation_scorer(
    backend: TorchBackend,
    inputs: Any,
    target: TargetSpec,
    indices: np.ndarray | None,
    activations: Any,
    channel_axis: int,
) -> Callable[[np.ndarray], np.ndarray]:
    """Returns f(channels (B,)) -> (B, N, K): Ablation-CAM's copies built on the model's device.

    The layer output comes to the device once per explanation; each chunk's B copies are filled
    there from it (one device buffer reused across chunks) and channel ``channels[b]`` of copy b
    zeroed, so no copies are made on the host and moved over per chunk. The values are those of
    ``core.ablated_copies``: the captured float32 activations, with exact zeros.
    """
    scorer = head_scorer(backend, inputs, target, indices)
    device, _ = device_dtype(backend.model)
    if isinstance(activations, torch.Tensor):
        acts = activations.detach().to(device=device, dtype=torch.float32)
    else:
        acts = torch.as_tensor(np.asarray(activations, dtype=np.float32), device=device)
    axis = channel_axis % acts.ndim
    buffers: list[torch.Tensor] = []

    def scores(channels: np.ndarray) -> np.ndarray:
        count = len(channels)
        if not buffers or buffers[0].shape[0] < count:
            buffers[:] = [torch.empty((count, *acts.shape), dtype=acts.dtype, device=device)]
        copies = buffers[0][:count]
        copies.copy_(acts.expand(count, *acts.shape))
        # Copy b's channel axis next to the copy axis: (B, C, N, ...) view, zero (b, channels[b]).
        view = copies.movedim(axis + 1, 1)
        view[torch.arange(count, device=device), torch.as_tensor(np.asarray(channels), device=device)] = 0.0
        return scorer(copies)

    return scores
