"""Layers of a torch model: module names, module objects and ``"name:input"`` → modules and ports.

A layer is a module name as in ``model.named_modules()`` (with or without the ``module.`` /
``_orig_mod.`` prefix of a DataParallel, DistributedDataParallel or ``torch.compile`` wrapper,
which :func:`unwrap` removes), a module object, or None / ``"auto"``: :func:`choose` then picks
one from a forward (and backward) pass in the modules' forward order.

On a token model (issue 22) — one whose last attention call attends over the batch's whole token
sequence — the choice is the last block's first normalisation: the last module that ends, with
``(N, T, C)`` tokens of that sequence, before the module making the last attention call starts
(``blocks[-1].norm1`` in timm, ``layernorm_before`` in Hugging Face ViT, ``layer_norm1`` in CLIP),
as the ViT recipes of pytorch-grad-cam and Chefer et al. do. The general rule would pick the patch
embedding (the last output with the input's spatial rank): a map of the input, not of the model;
the last block's output gives zero maps (only the class token is read after it).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, cast

import torch

from anycam._errors import LayerError
from anycam.core import TargetSpec, spatial_shape
from anycam.protocol.backend import select_output
from anycam.protocol.inputs import ModelInputs
from anycam.protocol.layers import (
    LayerRecord,
    choice_note,
    choose_layer,
    is_auto,
    layer_kind,
    layer_not_found,
    parse_layer,
)

from .attention import AttentionMode
from .capture import Tracker, script_error
from .capture import scores as target_scores
from .inputs import batch_of

if TYPE_CHECKING:
    from .backend import TorchBackend


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """Returns the module inside DataParallel/DDP/``torch.compile`` wrappers and their name prefixes."""
    prefixes: list[str] = []
    nn = torch.nn.Module
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            prefixes.append("module.")
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn):
            # torch.compile's wrapper; the original module computes the same function eagerly.
            prefixes.append("_orig_mod.")
            model = cast(torch.nn.Module, model._orig_mod)
        else:
            return model, tuple(prefixes)


def resolve(
    layer: Any, named: dict[str, torch.nn.Module], prefixes: tuple[str, ...]
) -> tuple[str, torch.nn.Module, str]:
    """Returns (reported name, module, port) for one layer spec."""
    if is_auto(layer):
        raise LayerError("layer='auto' (or None) chooses one layer; it cannot be part of a list")
    spec = parse_layer(layer)
    target = spec.layer
    if isinstance(target, str):
        name = target
        # Names copied from the wrapped model (state_dict keys) carry the wrappers' prefixes.
        while name not in named and any(name.startswith(p) for p in prefixes):
            name = next(name[len(p) :] for p in prefixes if name.startswith(p))
        if name in named and name:
            return spec.label(name), named[name], spec.port
        raise layer_not_found(target, list(named))
    if isinstance(target, torch.nn.Module):
        for name, module in named.items():
            if module is target:
                return spec.label(name or type(target).__name__), module, spec.port
        raise LayerError(f"the {type(target).__name__} module given as layer is not part of the model")
    raise LayerError(f"a torch layer is a module name or a module object, got {type(target).__name__}")


def choose(backend: TorchBackend, structure: ModelInputs, target: TargetSpec) -> None:
    """Chooses the layer for ``layer="auto"`` from one forward (and backward) pass, once."""
    with backend._choose_lock:
        if backend.layer_names:
            return
        owner = threading.get_ident()
        order: list[str] = []
        shapes: dict[str, tuple[int, ...] | None] = {}
        calls: dict[str, int] = {}
        kept: dict[str, torch.Tensor] = {}

        tracker = Tracker()
        layouts: dict[str, str] = {}
        # Token models: the attention calls, and how many modules had ended when each module started.
        mode = AttentionMode()
        started: dict[str, int] = {}

        def make_pre_hook(name: str) -> Any:
            def hook(module: torch.nn.Module, args: Any) -> None:
                if threading.get_ident() == owner:
                    mode.stack.append(name)
                    started.setdefault(name, len(order))

            return hook

        def make_hook(name: str) -> Any:
            def hook(module: torch.nn.Module, args: Any, out: Any) -> Any:
                if threading.get_ident() != owner:
                    return None
                if mode.stack:
                    mode.stack.pop()
                # Modules end in call order (a container after its children): the last module
                # that decided a layout before this one ended tells this one's.
                layout = tracker.at(module, out)
                calls[name] = calls.get(name, 0) + 1
                if calls[name] > 1:
                    return None
                order.append(name)
                layouts[name] = layout or "channels_first"
                if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                    shapes[name] = None
                    return None
                shapes[name] = tuple(out.shape)
                # Every module output joins one graph, so reachability of the output is
                # one autograd query; the clone keeps in-place ops off the kept tensor.
                kept[name] = out if out.requires_grad else out.detach().requires_grad_()
                return kept[name].clone()

            return hook

        if isinstance(backend.model, torch.jit.ScriptModule):
            raise script_error(backend.model, "", None)
        # Modules that TorchScript runs take no hooks (or ignore them): not candidates.
        scripted = [n for n, m in backend.model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
        named = [
            (name, module)
            for name, module in backend.model.named_modules()
            if name and not any(name == s or name.startswith(s + ".") for s in scripted)
        ]
        handles = [module.register_forward_pre_hook(make_pre_hook(name)) for name, module in named]
        handles += [module.register_forward_hook(make_hook(name)) for name, module in named]
        try:
            with torch.enable_grad(), mode:
                output = backend._call(structure)
                scores, _ = target_scores(select_output(output, backend.output), target, batch_of(structure))
        finally:
            for handle in handles:
                handle.remove()
        names = list(kept)
        reaches = dict.fromkeys(names, True)
        if scores.requires_grad and names:
            grads = torch.autograd.grad(scores.sum(), [kept[n] for n in names], allow_unused=True)
            reaches = {n: g is not None for n, g in zip(names, grads, strict=True)}
        modules = dict(named)
        records = [
            LayerRecord(
                name,
                shapes[name],
                layout=layouts[name],
                calls=calls[name],
                reaches_output=reaches.get(name, True),
                kind=layer_kind(type(modules[name]).__name__),
            )
            for name in order
        ]
        input_spatial = spatial_shape(tuple(structure.spatial_value.shape), backend.input_layout)
        token = _before_last_attention(mode, records, started, batch_of(structure))
        if token is not None:
            chosen = token
            backend.auto_note = (
                f"a token model: {chosen!r} is the last block's input normalisation (the tokens the last "
                "attention reads); the attention methods (rollout, attention-grad) need no layer"
            )
        else:
            chosen = choose_layer(records, input_spatial)
            backend.auto_note = choice_note(records, chosen)
        backend._set_layers([(chosen, dict(named)[chosen], "output")])


def _before_last_attention(
    mode: AttentionMode, records: list[LayerRecord], started: dict[str, int], batch: int
) -> str | None:
    """The token rule: the last module with ``(N, T, C)`` tokens that ended before the last attention started.

    None when the model made no attention call over one sequence of the batch (windowed attention
    (Swin), a CNN): the general rule applies then.
    """
    if not mode.attentions:
        return None
    last = mode.attentions[-1]
    shape = mode.shapes[-1] or tuple(last.shape)
    if len(shape) != 4 or shape[0] != batch:
        return None
    tokens = shape[-1]
    caller = mode.names[-1]
    if caller not in started:
        return None
    for record in reversed(records[: started[caller]]):
        fits = record.shape is not None and len(record.shape) == 3 and record.shape[:2] == (batch, tokens)
        if fits and record.calls == 1 and record.reaches_output:
            return record.name
    return None
