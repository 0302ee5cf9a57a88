"""TorchScript modules (``torch.jit.script`` / ``torch.jit.trace``): where anycam's hooks cannot reach.

A ScriptModule's compiled code calls its submodules without Python, so forward hooks on them are
refused (scripted) or never run (traced). An explained layer there is refused with a recipe that
works: Python modules around the scripted parts. Guided backpropagation's warning names the
ReLUs inside them (``guided.scripted_relus``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from anycam._errors import BackendError

if TYPE_CHECKING:
    from .backend import TorchBackend

_RECIPE = """Explain a Python module instead: build the model from its Python class and load the weights
(model.load_state_dict(scripted.state_dict())), or wrap the scripted parts before and after the layer
in Python modules, whose outputs anycam can read:
    class Part(torch.nn.Module):
        def __init__(self, inner): super().__init__(); self.inner = inner
        def forward(self, *args): return self.inner(*args)
    class Split(torch.nn.Module):
        def __init__(self, features, head): super().__init__(); self.features, self.head = Part(features), Part(head)
        def forward(self, x): return self.head(self.features(x))
    anycam.Explainer(Split(features, head), "features")"""


def scripted_at(model: torch.nn.Module, module: torch.nn.Module) -> str | None:
    """Returns the name of the outermost TorchScript module that is or contains ``module``, or None."""
    scripted = [name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    for name, m in model.named_modules():
        if m is module:
            for owner in scripted:
                if not owner or name == owner or name.startswith(owner + "."):
                    return owner
            return None
    return None


def script_error(model: torch.nn.Module, owner: str, layer: str | None) -> BackendError:
    """The refusal for a layer that TorchScript runs, with the wrapper recipe."""
    scripted = model if not owner else dict(model.named_modules())[owner]
    kind = "traced" if isinstance(scripted, torch.jit.TracedModule) else "scripted"
    where = "the model is" if not owner else f"{owner!r} is"
    what = f"layer {layer!r} runs" if layer is not None else "layer=None: every layer of this model runs"
    return BackendError(
        f"{what} inside TorchScript: {where} a {kind} module (torch.jit), whose compiled code calls its "
        f"submodules without Python, so no hook can read a layer there. {_RECIPE}"
    )


def check_hookable(backend: TorchBackend) -> None:
    """Raises BackendError when an explained layer runs inside TorchScript (hooks never reach it)."""
    for name, module in zip(backend.layer_names, backend.modules, strict=True):
        owner = scripted_at(backend.model, module)
        if owner is not None:
            raise script_error(backend.model, owner, name)
