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

Before all of these, Ablation-CAM asks for a **pooled head** (``pooled_head``): when the layer
is read by nothing but a global per-channel pooling, zeroing a channel zeroes one pooled entry,
the core folds a following ``nn.Linear`` in closed form, and only the nodes after it run
(``GraphSplit.tail_output``), on B·N feature rows instead of B·N layer outputs.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from anycam._errors import AnycamWarning, user_stacklevel

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
        self.graph = tracer.trace(model)
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
        env = dict(prefix)
        if self.port == "output":
            env[self.layer] = replacement
        for node in self.suffix:
            if node is before:
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
        env: dict[torch.fx.Node, Any] = {start: value}
        for node in self.suffix[self.suffix.index(start) + 1 :]:
            if node.op == "output":
                return torch.fx.node.map_arg(node.args[0], lambda n: env[n])
            env[node] = self._run(node, env)
        raise RuntimeError("the traced graph has no output")

    def evaluate(self, nodes: Sequence[torch.fx.Node], value: torch.Tensor) -> torch.Tensor:
        """Returns the last of ``nodes`` (a chain from the layer output) run on ``value``."""
        env: dict[torch.fx.Node, Any] = {self.layer: value}
        for node in nodes:
            env[node] = self._run(node, env)
        return env[nodes[-1]]  # type: ignore[no-any-return]


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


# -- Ablation-CAM's pooled head: layer → global pooling → [shape-only steps → nn.Linear] → tail --

_ADAPTIVE_MODULES: dict[type[torch.nn.Module], int] = {
    torch.nn.AdaptiveAvgPool1d: 1,
    torch.nn.AdaptiveAvgPool2d: 2,
    torch.nn.AdaptiveAvgPool3d: 3,
    torch.nn.AdaptiveMaxPool1d: 1,
    torch.nn.AdaptiveMaxPool2d: 2,
    torch.nn.AdaptiveMaxPool3d: 3,
}
_ADAPTIVE_FUNCTIONS: dict[Any, int] = {
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
# Reductions r with r(0) = 0 per channel: zeroing a channel zeroes its pooled entry.
_REDUCTION_FUNCTIONS = (torch.mean, torch.amax, torch.sum)
_REDUCTION_METHODS = ("mean", "amax", "sum")
_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze)
_RESHAPE_METHODS = ("flatten", "view", "reshape", "squeeze")


@dataclass(frozen=True)
class PooledHead:
    """Where a split's suffix starts with a global pooling: the pooling node, the ``nn.Linear``
    node reached from it through shape-only steps (or None), and the node the tail starts at."""

    pool: torch.fx.Node
    steps: tuple[torch.fx.Node, ...]
    linear: torch.fx.Node | None

    @property
    def start(self) -> torch.fx.Node:
        return self.pool if self.linear is None else self.linear


def _is_one(size: Any) -> bool:
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    return all(isinstance(s, int) and s == 1 for s in sizes)


def _global_pooling(split: GraphSplit, node: torch.fx.Node, ndim: int, channel_axis: int) -> bool:
    """Whether ``node`` reduces the layer output over every axis but the batch and channel axes."""
    if node.all_input_nodes != [split.layer] or not node.args or node.args[0] is not split.layer:
        return False
    spatial = set(range(ndim)) - {0, channel_axis % ndim}
    if node.op == "call_module":
        module = split.model.get_submodule(str(node.target))
        rank = _ADAPTIVE_MODULES.get(type(module))
        if rank is None or getattr(module, "return_indices", False):
            return False
        return spatial == set(range(ndim - rank, ndim)) and _is_one(module.output_size)  # type: ignore[arg-type]
    if node.op == "call_function" and node.target in _ADAPTIVE_FUNCTIONS:
        rank = _ADAPTIVE_FUNCTIONS[node.target]
        kwargs = dict(node.kwargs)
        if kwargs.pop("return_indices", False):
            return False
        size = node.args[1] if len(node.args) > 1 else kwargs.pop("output_size", None)
        return not kwargs and len(node.args) <= 2 and spatial == set(range(ndim - rank, ndim)) and _is_one(size)
    if (node.op == "call_function" and node.target in _REDUCTION_FUNCTIONS) or (
        node.op == "call_method" and node.target in _REDUCTION_METHODS
    ):
        kwargs = dict(node.kwargs)
        dim = node.args[1] if len(node.args) > 1 else kwargs.pop("dim", None)
        if len(node.args) > 2:
            kwargs.setdefault("keepdim", node.args[2])
        if len(node.args) > 3 or set(kwargs) - {"keepdim"} or not isinstance(kwargs.get("keepdim", False), bool):
            return False
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        if not all(isinstance(d, int) and -ndim <= d < ndim for d in dims):
            return False  # None (every axis, the batch included) or a dimension name
        return len(dims) == len(spatial) and {d % ndim for d in dims} == spatial
    return False


def _shape_only(split: GraphSplit, node: torch.fx.Node, previous: torch.fx.Node) -> bool:
    """Whether ``node`` only reshapes ``previous`` (or is dropout/identity at inference)."""
    if node.all_input_nodes != [previous] or not node.args or node.args[0] is not previous:
        return False
    if node.op == "call_module":
        module = split.model.get_submodule(str(node.target))
        if isinstance(module, torch.nn.Flatten | torch.nn.Identity):
            return True
        return isinstance(module, torch.nn.Dropout) and not module.training
    if node.op == "call_function":
        if node.target is F.dropout:
            return node.kwargs.get("training", True) is False and len(node.args) == 1
        return node.target in _RESHAPE_FUNCTIONS
    return node.op == "call_method" and node.target in _RESHAPE_METHODS


def pooled_head(split: GraphSplit, ndim: int, channel_axis: int) -> PooledHead | None:
    """Returns where the suffix is a global pooling of the layer output (then, optionally, a dense
    layer), or None when the network after the layer has any other structure.

    The layer (port "output") must be read by one node only, a global per-channel pooling, and
    the suffix must read nothing computed before the layer (no residual over it).
    """
    if split.port != "output" or split.needed or len(split.layer.users) != 1:
        return None
    (pool,) = split.layer.users
    if not _global_pooling(split, pool, ndim, channel_axis):
        return None
    steps: list[torch.fx.Node] = []
    node = pool
    while len(node.users) == 1:
        (user,) = node.users
        if user.op == "call_module" and isinstance(split.model.get_submodule(str(user.target)), torch.nn.Linear):
            if user.all_input_nodes == [node] and len(user.args) == 1 and not user.kwargs:
                return PooledHead(pool, tuple(steps), user)
            break
        if not _shape_only(split, user, node):
            break
        steps.append(user)
        node = user
    return PooledHead(pool, (), None)
