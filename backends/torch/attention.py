"""Attention capture for any torch model: every attention call runs in its explicit form.

Fused attention (``F.scaled_dot_product_attention``: FlashAttention, memory-efficient kernels)
never builds the probabilities A = softmax(q kᵀ·scale + mask), so rollout has nothing to read
and ∂y/∂A does not exist. Here a ``TorchFunctionMode``, active for one forward pass only (the
stack is per thread; leaving the ``with`` block, also by an exception, removes it), catches:

* ``F.scaled_dot_product_attention`` — recomputed as softmax(q kᵀ·scale + mask) @ v (boolean or
  additive masks, ``is_causal``, ``scale``, grouped-query heads, dropout in training mode);
* ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, ``nn.Transformer*`` layers; the
  mode also turns off their fused fast paths) — run through its explicit ``need_weights=True,
  average_attn_weights=False`` path; the softmax its output is computed from is recorded (the
  weights it returns are a view of it, which no gradient reaches); the caller still gets what it
  asked for;
* an explicit softmax whose result (through ``.to``/dropout) is the left operand of a matmul or
  an operand of an einsum — Hugging Face's ``eager`` attention, timm's non-fused path, Keras's
  ``MultiHeadAttention`` on the torch backend, hand-written ViTs.

The model, its attributes and its ``attn_implementation`` are never touched; forward hooks that
name the calling module are removed in ``finally``.
"""

from __future__ import annotations

import inspect
import math
import threading
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from anycam._errors import LayerError, TargetError
from anycam.core import TargetSpec
from anycam.core.attention import requested
from anycam.core.layout import spatial_shape
from anycam.protocol.backend import AttentionCapture, select_output

from .capture import detached
from .capture import scores as target_scores
from .inputs import batch_of, inference_error, structure, to_numpy

if TYPE_CHECKING:
    from .backend import TorchBackend

_SOFTMAXES = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax})
# Steps between an attention softmax and its matmul with the values that keep A's values.
_PASS_THROUGH = frozenset({torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.float, F.dropout, torch.dropout})
_MATMULS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm})
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def explicit_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (softmax(q kᵀ·scale + mask) @ v, the probabilities): ``F.scaled_dot_product_attention`` spelt out.

    The softmax runs in float32 at least (as the fused kernels accumulate), then in the query's dtype.
    """
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    logits = torch.matmul(query, key.transpose(-2, -1)) * factor
    target_len, source_len = query.shape[-2], key.shape[-2]
    if is_causal:
        allowed = torch.ones(target_len, source_len, dtype=torch.bool, device=query.device).tril()
        logits = logits.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    compute = torch.promote_types(logits.dtype, torch.float32)
    probabilities = torch.softmax(logits.to(compute), dim=-1).to(query.dtype)
    weights = F.dropout(probabilities, dropout_p) if dropout_p > 0 else probabilities
    return torch.matmul(weights, value), probabilities


class AttentionMode(TorchFunctionMode):
    """Runs every attention call explicitly and keeps its probabilities (in the autograd graph).

    Attributes:
        attentions: per attention call, A ``(N, H, T, S)`` in call order (``(N·H, T, S)`` where
            ``shapes`` says how to split it).
        shapes: per call, the ``(N, H, T, S)`` shape of a flat record, or None.
        names: the module that made each call (innermost running module), or ``"attention"``.
        stack: the names of the modules running now, kept by the hooks of :func:`attention_capture`.
    """

    def __init__(self, *, average_heads: bool = False) -> None:
        super().__init__()
        # Rollout needs only the head mean: keeping (N, 1, T, S) per block as the forward goes
        # frees each block's (N, H, T, S) probabilities at once (an H-fold smaller peak).
        self.average_heads = average_heads
        self.attentions: list[torch.Tensor] = []
        self.shapes: list[tuple[int, ...] | None] = []
        self.names: list[str] = []
        self.stack: list[str] = []
        # Softmax outputs (and their .to/dropout views) not yet multiplied with values, by id; the
        # tensors are held so that an id is never reused while its entry is alive.
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _record(self, probabilities: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
        if self.average_heads:
            split = probabilities.reshape(shape) if shape is not None else probabilities
            probabilities, shape = split.detach().mean(dim=-3, keepdim=True), None
        self.attentions.append(probabilities)
        self.shapes.append(shape)
        self.names.append(self.stack[-1] if self.stack else "attention")

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            output, probabilities = explicit_sdpa(*args, **kwargs)
            self._record(probabilities)
            return output
        if func is F.multi_head_attention_forward:
            bound = _MHA_SIGNATURE.bind(*args, **kwargs)
            asked = bound.arguments.get("need_weights", True)
            average = bound.arguments.get("average_attn_weights", True)
            bound.arguments["need_weights"] = True
            bound.arguments["average_attn_weights"] = False
            output, weights = func(*bound.args, **bound.kwargs)
            assert weights is not None  # need_weights=True
            # The weights returned are a (N, H, T, S) *view* of the (N·H, T, S) softmax that the
            # output is computed from; only that base gets a gradient.
            base = weights._base
            heads = weights.reshape(-1, *weights.shape[-3:]).shape
            if base is not None and base.shape == (heads[0] * heads[1], heads[2], heads[3]):
                self._record(base, heads)
            else:
                self._record(weights)
            if not asked:
                return output, None
            return output, weights.mean(dim=-3) if average else weights
        result = func(*args, **kwargs)
        if func in _SOFTMAXES:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if isinstance(result, torch.Tensor) and result.ndim >= 3 and dim in (-1, result.ndim - 1):
                self._pending[id(result)] = (result, result)
        elif func in _PASS_THROUGH and args and id(args[0]) in self._pending:
            if isinstance(result, torch.Tensor) and result.shape == args[0].shape:
                self._pending[id(result)] = (result, self._pending[id(args[0])][1])
        elif (func in _MATMULS and args and id(args[0]) in self._pending) or (
            func is torch.einsum and any(id(operand) in self._pending for operand in _operands(args))
        ):
            first = args[0] if func in _MATMULS else next(o for o in _operands(args) if id(o) in self._pending)
            probabilities = self._pending[id(first)][1]
            # One record per softmax, however many views of it were multiplied.
            for key in [k for k, (_, source) in self._pending.items() if source is probabilities]:
                del self._pending[key]
            self._record(probabilities)
        return result


def _operands(args: Any) -> list[Any]:
    """The tensors of a ``torch.einsum(equation, *operands)`` or ``(equation, [operands])`` call."""
    rest = list(args[1:])
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest


def attention_capture(backend: TorchBackend, inputs: Any, target: TargetSpec, gradients: bool) -> AttentionCapture:
    """Every attention call's probabilities (and ∂score/∂A for K targets) from one forward pass.

    As the driver requests (``anycam.core.attention.requested()``): ``reduced``, the capture
    holds what the method reads, reduced on the device as the pass goes (the head means; per
    block Ē = mean_h ReLU(∂score/∂A ⊙ A), formed inside the backward as each block's gradient
    arrives); ``native``, the arrays stay tensors on the model's device.
    """
    request = requested()
    with torch.inference_mode(False):
        try:
            return _attention_capture(backend, inputs, target, gradients, request.reduced, request.native)
        except RuntimeError as exc:
            if "Inference tensors" in str(exc):
                raise inference_error(exc) from exc
            raise


def _attention_capture(
    backend: TorchBackend, inputs: Any, target: TargetSpec, with_gradients: bool, reduced: bool, native: bool
) -> AttentionCapture:
    given = structure(backend, inputs)
    backend._warn_training()
    batch = batch_of(given)
    model_input = given
    leaf: torch.Tensor | None = None
    if with_gradients and given.spatial_value.is_floating_point():
        # An input that requires grad puts every attention in the graph even when the model's
        # parameters are frozen; the model gets a non-leaf copy (its in-place ops stay possible).
        leaf = given.spatial_value.detach().clone().requires_grad_()
        model_input = given.map(lambda key, value: leaf.clone() if key == given.spatial else value)
    mode = AttentionMode(average_heads=not with_gradients)
    owner = threading.get_ident()
    handles = []

    def entering(name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if threading.get_ident() == owner:
                mode.stack.append(name)

        return hook

    def leaving(module: torch.nn.Module, args: Any, out: Any) -> None:
        if threading.get_ident() == owner and mode.stack:
            mode.stack.pop()

    try:
        for name, module in backend.model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(entering(name)))
                handles.append(module.register_forward_hook(leaving, always_call=True))
        # Rollout reads no gradient: no graph is recorded (not inference mode: a model that caches a
        # tensor made in its forward would keep an inference tensor that later backward passes refuse).
        with torch.set_grad_enabled(with_gradients):
            with mode:
                output = backend._call(model_input)
            values, indices = target_scores(select_output(output, backend.output), target, batch, native)
    finally:
        for handle in handles:
            handle.remove()
    attentions = mode.attentions
    grid = _config_grid(backend.model, tuple(given.spatial_value.shape), backend.input_layout, attentions[-1:])
    out: Any = detached if native else to_numpy  # the protocol types NumPy; native mode hands tensors
    grads_out: tuple[Any, ...] | None = None
    if with_gradients and reduced:
        weighted = weighted_gradients(values, attentions, mode.shapes, leaf)
        del attentions, mode.attentions  # the graph is spent; nothing of all heads is kept
        grads_out = tuple(out(w) for w in weighted)
        ones = torch.ones((), dtype=torch.float32, device=weighted[0].device)
        # A = 1 with G = Ē ≥ 0: the core's mean_h ReLU(G ⊙ A) gives Ē back (AttentionRequest).
        attentions_out = tuple(out(ones.expand(w.shape[0], 1, *w.shape[-2:])) for w in weighted)
    else:
        if with_gradients:
            grads = attention_gradients(values, attentions)
            grads_out = tuple(out(_heads(g, shape, 1)) for g, shape in zip(grads, mode.shapes, strict=True))
        attentions_out = tuple(
            out(_heads(a.detach(), shape, 0)) for a, shape in zip(attentions, mode.shapes, strict=True)
        )
    return AttentionCapture(
        attentions=attentions_out,
        gradients=grads_out,
        scores=out(values.detach()),
        target=indices,
        input_spatial=spatial_shape(tuple(given.spatial_value.shape), backend.input_layout),
        grid=grid,
        names=tuple(mode.names),
    )


def weighted_gradients(
    scores: torch.Tensor,
    attentions: list[torch.Tensor],
    shapes: list[tuple[int, ...] | None],
    leaf: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Returns per call Chefer's ``Ē = mean_h ReLU(∂score_k/∂A ⊙ A)`` as ``(N, K, 1, T, S)`` float32.

    Each block's Ē is formed by a hook on its A the moment its gradient exists, inside the one
    backward pass per target; the gradient then flows on unchanged and is freed with the graph,
    so neither the L blocks' (N, H, T, S) gradients nor a copy of them are ever held. The
    backward runs to the input leaf (no parameter gradients), which executes every attention on
    the input's path; attentions reached from the scores but not on that path (none in a ViT)
    are asked for directly.

    Raises:
        anycam.LayerError: an attention call that does not reach the explained output.
        anycam.TargetError: the explained output does not depend on the attention.
    """
    if not attentions:
        return []
    if not scores.requires_grad:
        raise TargetError("the explained output does not depend on the attention")
    reached, via_leaf = _reach(scores, attentions, leaf)
    unreached = [index for index, hit in enumerate(reached) if not hit]
    if unreached:
        raise LayerError(
            f"attention call(s) {unreached} do not reach the explained output (their gradient is None); "
            "the attention methods need every recorded attention on the path to the output"
        )
    count = scores.shape[1]
    columns: list[list[torch.Tensor | None]] = []
    for k in range(count):
        found: list[torch.Tensor | None] = [None] * len(attentions)

        def reduce(index: int, grad: torch.Tensor, found: list[torch.Tensor | None] = found) -> None:
            probabilities = _heads(attentions[index].detach(), shapes[index], 0).float()
            found[index] = torch.relu(_heads(grad, shapes[index], 0).float() * probabilities).mean(dim=-3, keepdim=True)

        handles = [a.register_hook(lambda grad, index=index: reduce(index, grad)) for index, a in enumerate(attentions)]
        direct = [a for a, hit in zip(attentions, via_leaf, strict=True) if not hit]
        try:
            torch.autograd.grad(
                scores[:, k].sum(),
                ([leaf] if leaf is not None and any(via_leaf) else []) + direct,
                retain_graph=k < count - 1,
                allow_unused=True,
            )
        finally:
            for handle in handles:
                handle.remove()
        columns.append(found)
    return [torch.stack([column[index] for column in columns], dim=1) for index in range(len(attentions))]  # type: ignore[misc]


def _reach(
    scores: torch.Tensor, attentions: list[torch.Tensor], leaf: torch.Tensor | None
) -> tuple[list[bool], list[bool]]:
    """Per attention: whether the scores depend on it, and whether a backward to ``leaf`` passes through it.

    A walk of the autograd graph from the scores (a few thousand nodes for a ViT-B), no arithmetic.
    """
    targets = {a.grad_fn: index for index, a in enumerate(attentions) if a.grad_fn is not None}
    leaf_node = None
    if leaf is not None:
        view = leaf.view_as(leaf)  # the leaf's AccumulateGrad node, as the model's graph meets it
        leaf_node = view.grad_fn.next_functions[0][0] if view.grad_fn is not None else None
    reached = [False] * len(attentions)
    reaches_leaf: dict[Any, bool] = {}
    stack: list[tuple[Any, bool]] = [(scores.grad_fn, False)]
    while stack:
        node, expanded = stack.pop()
        if node is None or (not expanded and node in reaches_leaf):
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if not expanded:
            reaches_leaf[node] = False  # on the stack: a provisional value (the graph is acyclic)
            if node in targets:
                reached[targets[node]] = True
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in reaches_leaf)
        else:
            reaches_leaf[node] = node is leaf_node or any(reaches_leaf.get(child, False) for child in children)
    via_leaf = [bool(reached[i]) and reaches_leaf.get(a.grad_fn, False) for i, a in enumerate(attentions)]
    return reached, via_leaf


def attention_gradients(scores: torch.Tensor, attentions: list[torch.Tensor]) -> list[torch.Tensor]:
    """Returns per call ∂scores/∂A as ``(N, K, H, T, S)``: K targets in one batched backward where autograd can."""
    if not attentions:
        return []
    if not scores.requires_grad:
        raise TargetError("the explained output does not depend on the attention")
    count = scores.shape[1]
    grads: tuple[torch.Tensor | None, ...]
    per_call: list[torch.Tensor | None]
    if count == 1:
        grads = torch.autograd.grad(scores.sum(), attentions, allow_unused=True)
        per_call = [None if g is None else g.unsqueeze(1) for g in grads]
    else:
        try:
            eye = torch.eye(count, dtype=scores.dtype, device=scores.device)
            cotangents = eye[:, None, :].expand(count, scores.shape[0], count)
            grads = torch.autograd.grad(
                scores, attentions, grad_outputs=cotangents, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
            per_call = [None if g is None else g.transpose(0, 1) for g in grads]
        except RuntimeError:
            # An operator without a batching rule: one backward per target.
            columns = [
                torch.autograd.grad(scores[:, k].sum(), attentions, retain_graph=True, allow_unused=True)
                for k in range(count)
            ]
            per_call = [
                None if column[0] is None else torch.stack(list(column), dim=1) for column in zip(*columns, strict=True)
            ]
    unreached = [index for index, g in enumerate(per_call) if g is None]
    if unreached:
        raise LayerError(
            f"attention call(s) {unreached} do not reach the explained output (their gradient is None); "
            "the attention methods need every recorded attention on the path to the output"
        )
    return per_call  # type: ignore[return-value]


def _heads(tensor: torch.Tensor, shape: tuple[int, ...] | None, targets: int) -> torch.Tensor:
    """``(N·H, [K,] T, S)`` → ``(N, [K,] H, T, S)`` for a flat record; others as they are."""
    if shape is None:
        return tensor
    if not targets:
        return tensor.reshape(shape)
    count = tensor.shape[1]
    return tensor.reshape(shape[0], shape[1], count, *shape[2:]).transpose(1, 2)


def _config_grid(
    model: torch.nn.Module, input_shape: tuple[int, ...], layout: str, attentions: list[torch.Tensor]
) -> tuple[int, ...] | None:
    """The patch grid a Hugging Face config's ``patch_size`` gives this input, when it fits the tokens."""
    config = getattr(model, "config", None)
    patch = getattr(config, "patch_size", None) or getattr(getattr(config, "vision_config", None), "patch_size", None)
    if patch is None or not attentions:
        return None
    sizes = spatial_shape(input_shape, layout)
    patches = tuple(patch) if isinstance(patch, (tuple, list)) else (patch,) * len(sizes)
    if len(patches) != len(sizes) or not all(isinstance(p, int) and p > 0 for p in patches):
        return None
    grid = tuple(size // p for size, p in zip(sizes, patches, strict=True))
    prefix = attentions[0].shape[-1] - math.prod(grid)
    return grid if 0 <= prefix <= 16 else None
