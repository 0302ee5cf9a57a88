"""The ``anycam`` command line: ``demo``, ``evaluate`` and ``explain`` (``main`` parses and runs them).

``models`` turns your factory into a model (``ModelSpec``, ``load_factory``) and reads images;
``explain``, ``demo`` and ``evaluate`` are the sub-commands; ``logs`` quiets TensorFlow's C++
start-up lines. Nothing here imports a framework: your factory or the demo backend does.
"""

from __future__ import annotations

from .explain import add_explain_parser, explain_command, parse_target
from .logs import quiet_native_logs
from .models import FactoryError, ModelSpec, default_preprocess, load_factory, model_spec, read_image

__all__ = [
    "FactoryError",
    "ModelSpec",
    "add_explain_parser",
    "default_preprocess",
    "explain_command",
    "load_factory",
    "model_spec",
    "parse_target",
    "quiet_native_logs",
    "read_image",
]
