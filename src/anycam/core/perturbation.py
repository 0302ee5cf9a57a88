"""Gradient-free CAMs: Score-CAM's masks and weights, Ablation-CAM's copies and weights.

Both methods weight the channels of a layer by how the model's score reacts when the input (or
the layer) is perturbed channel by channel; the framework only runs the model on the perturbed
copies (``Backend.input_scores`` / ``Backend.head_scores``), everything else is here.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from .._errors import ConfigError, InputError
from .normalize import normalize
from .resize import resize

_F = np.float64

SCORECAM_VARIANTS = ("probability", "softmax", "pytorch-grad-cam")


@lru_cache(maxsize=64)
def _corner_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Returns the ``(size_out, size_in)`` linear resize matrix with aligned corners.

    Output pixel i samples the input at ``i · (in − 1)/(out − 1)`` (torch's
    ``UpsamplingBilinear2d``, i.e. ``align_corners=True``), so the first and last pixels of
    both grids coincide.
    """
    rows = np.arange(size_out)
    source = rows * ((size_in - 1) / (size_out - 1)) if size_out > 1 else np.zeros(1)
    lower = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    upper = np.minimum(lower + 1, size_in - 1)
    weight = source - lower
    matrix = np.zeros((size_out, size_in), dtype=_F)
    np.add.at(matrix, (rows, lower), 1.0 - weight)
    np.add.at(matrix, (rows, upper), weight)
    matrix.flags.writeable = False
    return matrix


def _resize_corners(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    out = np.asarray(array, _F)
    first = out.ndim - len(size)
    for axis, target in enumerate(size, start=first):
        if out.shape[axis] != target:
            out = np.moveaxis(np.moveaxis(out, axis, -1) @ _corner_matrix(out.shape[axis], target).T, -1, axis)
    return out


def scorecam_masks(maps: np.ndarray, size: Sequence[int], *, align_corners: bool = False) -> np.ndarray:
    """Returns M_k = s(Up(A_k)), s(x) = (x − min x)/(max x − min x): Score-CAM's masks.

    Wang et al. 2020, Algorithm 1: each activation channel is upsampled to the input's size and
    min-max normalised on its own, then multiplied into the input. Normalising *after*
    upsampling is the paper's order and pytorch-grad-cam's; torchcam normalises at the layer's
    resolution and upsamples afterwards. A flat channel gives an all-zero mask (pytorch-grad-cam's
    ``+ 1e-8`` in the denominator gives the same zeros; the rest differs by ≤ 1e-8/span).

    Args:
        maps: ``(..., *S_layer)`` channel maps, one per leading index.
        size: the input's spatial shape.
        align_corners: upsample like torch's ``UpsamplingBilinear2d`` (pytorch-grad-cam) rather
            than with half-pixel centres (the core's ``resize``, torchcam, the authors' code).

    Returns:
        ``(..., *size)`` float64 in [0, 1].
    """
    size = tuple(int(s) for s in size)
    upsampled = _resize_corners(maps, size) if align_corners else resize(maps, size, "linear")
    return normalize(upsampled, "minmax", spatial_ndim=len(size))


def scorecam_weights(scores: np.ndarray, variant: str = "probability", *, mask: np.ndarray | None = None) -> np.ndarray:
    """Returns Score-CAM's α_k from the scores ``(..., C)`` of the C masked inputs.

    * ``"probability"``: α_k = softmax(f(X ∘ M_k))_c, the class's probability on the masked
      input, used as is. This is what the authors' reference code does (the scores passed in are
      already probabilities). The paper's text subtracts a baseline f(X_b) (X_b = a black image)
      from the score; their code, like every peer, drops it.
    * ``"softmax"`` / ``"pytorch-grad-cam"``: α_k = exp(S_k)/Σ_j exp(S_j) over channels,
      S_k = f^c(X ∘ M_k) the raw (pre-softmax) score: the paper's Algorithm 1 (its baseline term
      f^c(X_b) is one constant per sample and cancels in the channel softmax), pytorch-grad-cam's
      ``ScoreCAM`` and torchcam's (torchcam subtracts the unmasked input's score, which cancels
      too).

    Args:
        scores: ``(..., C)`` scores of the masked inputs, channels last.
        variant: one of ``SCORECAM_VARIANTS``.
        mask: ``(..., C)`` bool, the channels that were scored (Faster Score-CAM); the others get
            weight 0 and are left out of the channel softmax.

    Returns:
        ``(..., C)`` float64.

    >>> scorecam_weights(np.array([[0.0, np.log(3.0)]]), "softmax")
    array([[0.25, 0.75]])
    """
    if variant not in SCORECAM_VARIANTS:
        raise ConfigError(f"unknown Score-CAM variant {variant!r}; choose one of {', '.join(SCORECAM_VARIANTS)}")
    values = np.asarray(scores, _F)
    keep = np.ones(values.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), values.shape)
    if variant == "probability":
        return np.where(keep, values, 0.0)
    shifted = np.where(keep, values, -np.inf)
    peak = np.max(shifted, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    exp = np.where(keep, np.exp(np.where(keep, values, 0.0) - peak), 0.0)
    total = np.sum(exp, axis=-1, keepdims=True)
    return exp / np.where(total > 0, total, 1.0)


def sigmoid(scores: np.ndarray) -> np.ndarray:
    """Returns 1 / (1 + exp(−s)) in float64, computed as exp(−log(1 + exp(−s))) (no overflow).

    Score-CAM's ``"probability"`` for a model with one output: a binary classifier's logit s
    means the probability σ(s); the softmax over one class would be 1 for every masked input.

    >>> sigmoid(np.array([0.0, np.log(3.0), -1000.0]))
    array([0.5 , 0.75, 0.  ])
    """
    return np.exp(-np.logaddexp(0.0, -np.asarray(scores, _F)))


def top_variance_channels(activations: np.ndarray, k: int, channel_axis: int = 1) -> np.ndarray:
    """Returns the indices ``(..., k)`` of the k channels with the largest spatial variance.

    Faster Score-CAM (tabayashi0117's variant, listed in the Score-CAM authors' repository):
    only the most varied channels are worth a forward pass; a flat channel gives an all-zero
    mask anyway.
    Ties keep channel order; ``k`` larger than C takes every channel.

    Args:
        activations: ``(..., C, *S)``.
        k: how many channels to keep (≥ 1).

    >>> top_variance_channels(np.array([[[1.0, 1.0], [0.0, 4.0], [0.0, 2.0]]]), 2)
    array([[1, 2]])
    """
    if k < 1:
        raise ConfigError(f"top-k needs k >= 1, got {k}")
    acts = np.asarray(activations, _F)
    channel_axis = channel_axis % acts.ndim
    variance = np.var(acts, axis=tuple(range(channel_axis + 1, acts.ndim)))
    order = np.argsort(-variance, axis=-1, kind="stable")
    return order[..., : min(k, order.shape[-1])].astype(np.int64)


def ablation_weights(score: np.ndarray, ablated: np.ndarray) -> np.ndarray:
    """Returns w_k = (y − y_k)/y, Ablation-CAM's weights (Desai & Ramaswamy 2020, eq. 3).

    y is the target's score, y_k the score with channel k of the layer set to zero. Where y = 0
    the ratio is undefined; the rule here is to divide by 1 instead (w_k = −y_k): every weight
    of that map is scaled by the same factor, so the normalised heatmap is the limit of the
    paper's map as y → 0⁺, and the raw weights stay finite (no NaN, no warning).

    Args:
        score: ``(...)`` the unablated scores y.
        ablated: ``(..., C)`` the scores y_k.

    Returns:
        ``(..., C)`` float64.

    >>> ablation_weights(np.array([2.0, 0.0]), np.array([[1.0, 3.0], [1.0, -1.0]]))
    array([[ 0.5, -0.5],
           [-1. ,  1. ]])
    """
    y = np.asarray(score, _F)[..., None]
    return (y - np.asarray(ablated, _F)) / np.where(y != 0, y, 1.0)


def ablated_copies(
    activations: np.ndarray,
    channels: Sequence[int] | np.ndarray,
    channel_axis: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Returns ``(B, N, ...)`` copies of ``activations`` ``(N, ...)``, copy b with channel ``channels[b]`` zeroed.

    ``channel_axis`` indexes the per-batch array ``(N, ...)`` (1 for channels-first, -1 for
    channels-last and tokens, where every token's channel k is zeroed). ``out``, a float32 buffer
    of at least B copies, is filled and its first B copies returned: reusing one buffer across
    chunks saves a fresh allocation (and its page faults) per chunk.
    """
    acts = np.asarray(activations, np.float32)
    axis = channel_axis % acts.ndim
    if out is None:
        copies = np.repeat(acts[None], len(channels), axis=0)
    else:
        copies = out[: len(channels)]
        copies[...] = acts
    for b, channel in enumerate(channels):
        index: list[Any] = [slice(None)] * copies.ndim
        index[0], index[axis + 1] = b, int(channel)
        copies[tuple(index)] = 0.0
    return copies


def head_features(pooled: np.ndarray, weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> np.ndarray:
    """Returns ``pooled @ weight + bias`` ``(N, F)`` (``pooled`` itself without a weight), float64.

    The unablated counterpart of :func:`ablated_head_features`: what the network after a pooled
    layer computes before the rest of its head.
    """
    p = np.asarray(pooled, _F)
    if weight is None:
        return p
    z = p @ np.asarray(weight, _F)
    return z if bias is None else z + np.asarray(bias, _F)


def ablated_head_features(
    pooled: np.ndarray,
    channels: Sequence[int] | np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """Returns ``(B, N, F)``: the head's features with channel ``channels[b]`` of the layer zeroed.

    Ablation-CAM without running B·N copies of the layer output through the network, exact
    where the network after the layer starts with a global per-channel reduction r over the
    spatial axes with r(0) = 0 (mean, max, sum pooling): zeroing channel k of the layer output
    then zeroes entry k of the pooled vector p ``(N, C)`` and leaves the others unchanged. A dense
    layer after the pooling is linear, so its output for that copy is

        z⁽ᵏ⁾ = (p − p_k e_k) W + b = z − p_k W_k        (z = p W + b),

    B·N·F multiply-adds instead of B·N·C·F (at ResNet-50's last stage with 1000 classes that is a
    whole forward pass saved). The rest of the network (the dense layer's activation, softmax, …)
    runs on these features in the framework.

    Args:
        pooled: ``(N, C)`` the pooling's output p on the unablated layer output.
        channels: ``(B,)`` the channel zeroed in each copy.
        weight: ``(C, F)`` the dense layer W after the pooling, or None: the features are then
            the pooled vectors with entry k zeroed.
        bias: ``(F,)`` its bias b, or None.

    Returns:
        ``(B, N, F)`` float64 (F = C without a weight).

    >>> p = np.array([[1.0, 2.0]]); w = np.array([[1.0, 0.0], [1.0, 3.0]])
    >>> ablated_head_features(p, [0, 1], w)[:, 0]
    array([[2., 6.],
           [1., 0.]])
    """
    p = np.asarray(pooled, _F)
    if p.ndim != 2:
        raise InputError(f"pooled features must be (N, C), got shape {p.shape}")
    index = np.asarray(channels, dtype=np.int64).reshape(-1)
    if index.size and (index.min() < 0 or index.max() >= p.shape[1]):
        raise InputError(f"channels must lie in [0, {p.shape[1]}), got {index.min()}..{index.max()}")
    if weight is None:
        copies = np.repeat(p[None], index.size, axis=0)
        copies[np.arange(index.size), :, index] = 0.0
        return copies
    w = np.asarray(weight, _F)
    if w.ndim != 2 or w.shape[0] != p.shape[1]:
        raise InputError(f"weight must be (C, F) with C={p.shape[1]}, got shape {w.shape}")
    z = head_features(p, w, bias)
    # (B, N, 1) · (B, 1, F): each copy loses its channel's contribution p_k W_k.
    return z[None] - p[:, index].T[:, :, None] * w[index][:, None, :]
