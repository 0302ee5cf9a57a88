"""The demo CNN of ``anycam.demo.data.DEMO_ARCHITECTURE`` in Keras 3, on any Keras backend, 1-D, 2-D or 3-D.

Keras-only code (no framework import): the same definition is the TensorFlow port
(``tensorflow.demo``) and, under ``KERAS_BACKEND=jax`` or ``torch``, the model with which the
parity tests check that Keras on JAX and PyTorch gives TensorFlow's maps.

A Functional ``keras.Model``, so every layer has an ``.output`` to explain. Layer names are the
torch module paths with "." → "_" (``stage3_block_conv1``), except that each stage's final ReLU
carries the stage's name — ``stem``, ``stage1``, ``stage2``, ``stage3`` — as torch's stage modules
output exactly that tensor. Every conv is an explicit ``ZeroPadding{d}D(1)`` (``<conv>_pad``) then a
``"valid"`` conv: Keras' ``"same"`` pads stride-2 convs only on the far side and would shift the
pixel grid against torch's. The BatchNorms are frozen (``trainable=False``), which Keras 3 defines
as "always inference mode", so ``model(x)``, ``model(x, training=True)`` and ``fit`` all use the
running statistics, as torch's ``eval()`` does.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np

from anycam.demo.data import BN_EPS, NUM_CLASSES
from anycam.demo.weights import check_demo_weights, demo_weight_shapes

INPUT_LAYOUT = "channels_last"
"""The port takes ``(N, 64, 64, 1)`` batches: ``load_demo()["images"].transpose(0, 2, 3, 1)`` (``(N, *S, C)``)."""


def _conv_bn(x: keras.KerasTensor, path: str, filters: int, stride: int, spatial_dims: int) -> keras.KerasTensor:
    """Pads 1 on each side, convolves 3^d (no bias), normalises: layers ``<path>_pad``, ``<path>``, its ``bn``."""
    prefix, conv = path.rsplit("_", 1)
    norm = f"{prefix}_{conv.replace('conv', 'bn')}"
    x = getattr(keras.layers, f"ZeroPadding{spatial_dims}D")(1, data_format="channels_last", name=f"{path}_pad")(x)
    x = getattr(keras.layers, f"Conv{spatial_dims}D")(
        filters, 3, strides=stride, padding="valid", use_bias=False, data_format="channels_last", name=path
    )(x)
    return keras.layers.BatchNormalization(epsilon=BN_EPS, trainable=False, name=norm)(x)


def _residual(x: keras.KerasTensor, prefix: str, spatial_dims: int, output_name: str) -> keras.KerasTensor:
    """ReLU(x + BN(conv(ReLU(BN(conv(x)))))), torch's ``ResidualBlock`` at ``prefix``."""
    channels = x.shape[-1]
    branch = _conv_bn(x, f"{prefix}_conv1", channels, 1, spatial_dims)
    branch = keras.layers.ReLU(name=f"{prefix}_relu1")(branch)
    branch = _conv_bn(branch, f"{prefix}_conv2", channels, 1, spatial_dims)
    added = keras.layers.Add(name=f"{prefix}_add")([branch, x])
    return keras.layers.ReLU(name=output_name)(added)


def _architecture(spatial_dims: int, in_channels: int) -> keras.Model:
    inputs = keras.Input(shape=(*[None] * spatial_dims, in_channels), name="input")
    x = keras.layers.ReLU(name="stem")(_conv_bn(inputs, "stem_conv", 16, 1, spatial_dims))
    x = keras.layers.ReLU(name="stage1")(_conv_bn(x, "stage1_conv", 32, 2, spatial_dims))
    x = _residual(x, "stage2", spatial_dims, output_name="stage2")
    x = keras.layers.ReLU(name="stage3_down_relu")(_conv_bn(x, "stage3_down_conv", 64, 2, spatial_dims))
    x = _residual(x, "stage3_block", spatial_dims, output_name="stage3")
    x = getattr(keras.layers, f"GlobalAveragePooling{spatial_dims}D")(data_format="channels_last", name="pool")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, name="fc")(x)
    return keras.Model(inputs, outputs, name=f"demo_net_{spatial_dims}d")


def _load(model: keras.Model, weights: dict[str, np.ndarray], spatial_dims: int) -> None:
    # torch kernels are (O, I, *K), Keras' (*K, I, O); BatchNorm and fc fields map one to one.
    to_kernel = (*range(2, 2 + spatial_dims), 1, 0)
    for name in weights:
        path, field = name.rsplit(".", 1)
        if field != "weight":
            continue
        layer = model.get_layer(path.replace(".", "_"))
        if path == "fc":
            layer.set_weights([weights["fc.weight"].T, weights["fc.bias"]])
        elif isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([weights[f"{path}.{f}"] for f in ("weight", "bias", "running_mean", "running_var")])
        else:
            layer.set_weights([weights[name].transpose(to_kernel)])


def build_demo_model(
    weights: Mapping[str, np.ndarray] | None = None, *, spatial_dims: int = 2, in_channels: int = 1
) -> keras.Model:
    """Returns the demo CNN as a Functional ``keras.Model``, with torch-named ``weights`` loaded if given.

    Args:
        weights: name → array under the PyTorch model's ``state_dict`` names and layouts
            (``load_demo()["weights"]``, ``random_demo_weights``); conv kernels are transposed from
            ``(O, I, *K)`` to ``(*K, I, O)`` and ``fc.weight`` to ``(in, out)``.
        spatial_dims: 1 (input ``(N, L, C)``), 2 (``(N, H, W, C)``) or 3 (``(N, D, H, W, C)``).
        in_channels: ``C``, the input channels.

    Returns:
        A ``keras.Model`` taking channels-last float32 input of any spatial size (Keras' random
        initial weights if ``weights`` is None) and giving ``(N, 10)`` logits.

    Raises:
        InputError: for a bad ``spatial_dims`` or ``in_channels``, if names are missing or unknown,
            or a shape does not fit.
    """
    demo_weight_shapes(spatial_dims, in_channels)
    checked = None if weights is None else check_demo_weights(weights, spatial_dims, in_channels)
    model = _architecture(spatial_dims, in_channels)
    if checked is not None:
        _load(model, checked, spatial_dims)
    return model
