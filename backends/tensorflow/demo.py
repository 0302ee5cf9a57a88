"""The demo CNN of ``anycam.demo.data.DEMO_ARCHITECTURE`` in Keras 3 (on TensorFlow), 1-D, 2-D or 3-D.

A Functional ``keras.Model``, so every layer has an ``.output`` to explain. Layer names are the
torch module paths with "." → "_" (``stage3_block_conv1``), except that each stage's final ReLU
carries the stage's name — ``stem``, ``stage1``, ``stage2``, ``stage3`` — as torch's stage modules
output exactly that tensor. Every conv is an explicit ``ZeroPadding{d}D(1)`` (``<conv>_pad``) then a
``"valid"`` conv: Keras' ``"same"`` pads stride-2 convs only on the far side and would shift the
pixel grid against torch's. The BatchNorms are frozen (``trainable=False``), which Keras 3 defines
as "always inference mode", so ``model(x)``, ``model(x, training=True)`` and ``fit`` all use the
running statistics, as torch's ``eval()`` does.

>>> from anycam.demo.data import load_demo
>>> demo = load_demo()
>>> model = build_demo_model(demo["weights"])
>>> model(demo["images"][:2].transpose(0, 2, 3, 1)).shape
TensorShape([2, 10])
>>> model.get_layer("stage3").output.shape
(None, None, None, 64)
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf  # noqa: F401  # Keras' TensorFlow backend; fails early where TF is missing

from anycam._errors import BackendError

from .._keras import demo as demo_keras

INPUT_LAYOUT = demo_keras.INPUT_LAYOUT
"""The port takes ``(N, 64, 64, 1)`` batches: ``load_demo()["images"].transpose(0, 2, 3, 1)`` (``(N, *S, C)``)."""


def build_demo_model(
    weights: Mapping[str, np.ndarray] | None = None, *, spatial_dims: int = 2, in_channels: int = 1
) -> keras.Model:
    """Returns the demo CNN as a Functional ``keras.Model`` on TensorFlow; see ``demo_keras.build_demo_model``.

    Raises:
        BackendError: if Keras runs on a backend other than TensorFlow.
        InputError: for a bad ``spatial_dims`` or ``in_channels``, if names are missing or unknown,
            or a shape does not fit.
    """
    active = keras.config.backend()
    if active != "tensorflow":
        raise BackendError(
            f"Keras is running on its {active!r} backend, but this is the demo's TensorFlow port: set "
            "KERAS_BACKEND=tensorflow before the first `import keras`, or build the same model on any "
            "Keras backend with anycam.backends._keras.demo.build_demo_model"
        )
    return demo_keras.build_demo_model(weights, spatial_dims=spatial_dims, in_channels=in_channels)
