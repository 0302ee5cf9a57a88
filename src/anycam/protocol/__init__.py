"""What a framework adapter implements and may import: the contract between core and backends.

``backend``: the :class:`Backend` base class (verbs, declared ``capabilities``, ``input_layout``),
:class:`Capture`, :class:`AblationHead`, output selection and option checks. ``inputs``: one
structure for what a model is called with. ``layers``: layer specs (``"name:input"``, the
automatic choice). An adapter in ``anycam.backends.<framework>`` imports from here and from
``anycam.core``, never from the Explainer or anything above it.
"""

from __future__ import annotations

from .backend import CAPABILITIES, AblationHead, Backend, Capture

__all__ = ["CAPABILITIES", "AblationHead", "Backend", "Capture"]
