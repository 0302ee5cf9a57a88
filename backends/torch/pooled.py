"""Ablation-CAM's pooled head for torch: layer → global pooling → [shape-only steps → nn.Linear] → tail.

When the traced graph (``head.GraphSplit``) shows the layer read by nothing but a global
per-channel pooling, zeroing a channel zeroes one pooled entry: :func:`ablation_head` hands the
core the pooled activations and the Linear's weight, and only the nodes after the Linear (or the
pooling) run in torch, on B·N feature rows instead of B·N copies of the layer output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from anycam.core import TargetSpec
from anycam.protocol.backend import AblationHead, select_output

from .head import GraphSplit, copies_scorer, rows_scores, to_scores
from .inputs import device_dtype, frozen_buffers, to_numpy

if TYPE_CHECKING:
    from .backend import TorchBackend

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
        return spatial == set(range(ndim - rank, ndim)) and _is_one(module.output_size)
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


def ablation_head(
    backend: TorchBackend,
    inputs: Any,
    target: TargetSpec,
    indices: np.ndarray | None,
    activations: np.ndarray,
    channel_axis: int,
) -> AblationHead | None:
    """Returns layer → global pooling → [nn.Linear] → tail as read from the traced graph, or None.

    See :func:`pooled_head` for the structures recognised. ``pooled`` is the model's own pooling
    on ``activations``; ``weight`` is the Linear's ``W.T`` when only reshapes, dropout or
    identity (at inference) lie between; ``tail`` runs the suffix after the Linear (or after the
    pooling) on the B·N feature rows, or vmapped over the B copies when the rows do not stay
    independent. float32 models only.
    """
    float32 = activations.dtype in (np.float32, torch.float32)  # NumPy, or a native capture's tensor
    if len(backend.modules) != 1 or backend.ports != ["output"] or not float32:
        return None
    device, dtype = device_dtype(backend.model)
    split = backend._split()
    if dtype != torch.float32 or split is None:
        return None
    plan = pooled_head(split, activations.ndim, channel_axis)
    if plan is None:
        return None
    batch, channels = activations.shape[0], activations.shape[channel_axis]
    with torch.inference_mode(False), torch.no_grad(), frozen_buffers(backend.model):
        layer = torch.as_tensor(activations, device=device)
        pool = split.evaluate([plan.pool], layer)
        if not isinstance(pool, torch.Tensor) or pool.numel() != batch * channels or pool.shape[0] != batch:
            return None
        pooled = pool.reshape(batch, channels)
        weight = bias = None
        start, shape = plan.pool, tuple(pool.shape[1:])
        if plan.linear is not None:
            linear = backend.model.get_submodule(str(plan.linear.target))
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
                weight = to_numpy(linear.weight).T
                bias = None if linear.bias is None else to_numpy(linear.bias)
                start, shape = plan.linear, (linear.out_features,)
    fn = target.fn if target.kind == "callable" else None

    def one(features: torch.Tensor) -> torch.Tensor:
        output = split.tail_output(start, features.reshape(batch, *shape))
        return to_scores(select_output(output, backend.output), indices, fn, batch)

    def rows(features: torch.Tensor) -> torch.Tensor | None:
        count = features.shape[0]
        output = select_output(split.tail_output(start, features.reshape(count * batch, *shape)), backend.output)
        return rows_scores(output, count, batch, indices, fn)

    run = copies_scorer(one, rows)

    def tail(features: np.ndarray) -> np.ndarray:
        values = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
        with torch.inference_mode(False), torch.no_grad(), frozen_buffers(backend.model):
            return to_numpy(run(values))

    return AblationHead(pooled=to_numpy(pooled), tail=tail, weight=weight, bias=bias)
