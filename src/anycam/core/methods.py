"""The CAM family: channel weights and raw maps from activations and gradients.

Every function takes arrays with an explicit channel axis and treats the axes after it as
spatial and the axes before it as batch-like, so ``(N, C, H, W)``, ``(N, K, C, D, H, W)`` and a
single ``(C, L)`` all work. On NumPy arrays arithmetic runs in float64 (a normalised heatmap must
not become NaN because ``A·G`` overflowed float32); callers cast results back to float32.

Every method also runs on torch, JAX, TensorFlow and other array-API arrays, with their own
namespace, on their device, in float32 (float64 for float64 inputs; see ``_namespace``): the Eigen
methods as one batched SVD or ``eigh``, RandomCAM with NumPy's seeded weights copied over.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from .._errors import ConfigError
from ._namespace import as_float, compute_dtype, constant, device_of, is_numpy, namespace, unit_scaled

_F = np.float64


def _spatial_axes(array: np.ndarray, channel_axis: int) -> tuple[int, ...]:
    channel_axis = channel_axis % array.ndim
    return tuple(range(channel_axis + 1, array.ndim))


def _weighted_sum(activations: np.ndarray, weights: np.ndarray, channel_axis: int) -> np.ndarray:
    """Returns Σ_k weights_k · A_k for weights ``(..., C)`` and activations ``(..., C, *S)``.

    A batched matmul over flattened space: broadcasting ``(N, 1, C, *S)`` activations against
    ``(N, K, C)`` weights never materialises an ``(N, K, C, *S)`` product.
    """
    xp = namespace(activations, weights)
    dtype = compute_dtype(xp, activations, weights)
    acts = as_float(xp, activations, dtype)
    channel_axis = channel_axis % acts.ndim
    spatial = tuple(acts.shape[channel_axis + 1 :])
    flat = xp.reshape(acts, (*acts.shape[: channel_axis + 1], -1))
    if xp is np:
        summed = np.matmul(np.asarray(weights, dtype)[..., None, :], flat)[..., 0, :]
        return summed.reshape(*summed.shape[:-1], *spatial)
    if is_numpy(weights):
        # Host weights (a user's class weights, RandomCAM's) go to the activations' device once.
        weights = xp.asarray(np.asarray(weights), dtype=dtype, device=device_of(acts))
    # Exact power-of-two scaling keeps float32 products from overflowing (see _namespace.unit_scaled).
    weights, weight_factor = unit_scaled(xp, as_float(xp, weights, dtype), (-1,))
    flat, act_factor = unit_scaled(xp, flat, (-2, -1))
    summed = xp.matmul(weights[..., None, :], flat)[..., 0, :] * weight_factor * act_factor[..., 0]
    return xp.reshape(summed, (*summed.shape[:-1], *spatial))


def relu(x: np.ndarray) -> np.ndarray:
    """Returns max(x, 0); NaN stays NaN."""
    if is_numpy(x):
        return np.maximum(x, 0)
    xp = namespace(x)
    return xp.maximum(x, constant(xp, 0.0, x))


def gradcam_weights(gradients: np.ndarray, channel_axis: int = 1) -> np.ndarray:
    """Returns α_k = (1/Z) Σ_s ∂y/∂A_k,s, the spatial mean of the gradients (Grad-CAM eq. 1).

    Args:
        gradients: ``(..., C, *S)``.
        channel_axis: position of C.

    Returns:
        ``(..., C)`` float64.

    >>> gradcam_weights(np.array([[[1.0, 3.0], [0.0, -2.0]]]))
    array([[ 2., -1.]])
    """
    # Accumulated in float64 without a float64 copy of the gradients (K maps: tens of MB).
    xp = namespace(gradients)
    if xp is np:
        grads = np.asarray(gradients)
        return np.asarray(np.mean(grads, axis=_spatial_axes(grads, channel_axis), dtype=_F))
    grads = as_float(xp, gradients, compute_dtype(xp, gradients))
    axes = _spatial_axes(grads, channel_axis)
    # A float32 sum of large gradients can overflow where their mean does not: scaled exactly.
    grads, factor = unit_scaled(xp, grads, axes)
    return xp.mean(grads, axis=axes) * xp.reshape(factor, tuple(factor.shape[: grads.ndim - len(axes)]))


def gradcampp_weights(activations: np.ndarray, gradients: np.ndarray, channel_axis: int = 1) -> np.ndarray:
    """Returns w_k = Σ_s α_k,s ReLU(g_k,s), α = g²/(2g² + Σ_s' A_k,s' g³) where g ≠ 0, else 0.

    Grad-CAM++ (Chattopadhay et al. 2018) eq. 19 with an exponential class score, so higher
    derivatives are powers of the first. The g ≠ 0 mask is the paper's: a location with no
    gradient gets no weight (rather than 0/0).

    Returns:
        ``(..., C)`` float64.
    """
    xp = namespace(activations, gradients)
    dtype = compute_dtype(xp, activations, gradients)
    axes = _spatial_axes(gradients, channel_axis)
    grads = as_float(xp, gradients, dtype)
    activation_sums = xp.sum(as_float(xp, activations, dtype), axis=axes, keepdims=True)
    if xp is not np:
        # In float32, g³ overflows from |g| ≈ 7e12 and silently shrinks α to 0; divided by g²
        # (the same mask: g ≠ 0 and 2 + Σ_s' A g ≠ 0) the form 1/(2 + Σ_s' A g) does not.
        # Where Σ_s' A g itself overflows, α·g = 1/(2/g + Σ_s' A) (divided by g once more) is
        # used: the float32 1/inf = 0 would drop a term NumPy's float64 keeps.
        product = activation_sums * grads
        denominator = 2.0 + product
        safe = xp.where(denominator != 0, denominator, constant(xp, 1.0, denominator))
        valid = (grads != 0) & (denominator != 0)
        alpha = xp.where(valid, 1.0 / safe, constant(xp, 0.0, denominator))
        term = alpha * relu(grads)
        huge = ~xp.isfinite(product) & (grads > 0) & xp.isfinite(activation_sums)
        reciprocal = 2.0 / xp.where(huge, grads, constant(xp, 1.0, grads)) + activation_sums
        term = xp.where(huge, 1.0 / reciprocal, term)
        return xp.sum(term, axis=axes)
    squared = grads * grads
    denominator = 2.0 * squared + activation_sums * squared * grads
    safe = xp.where(denominator != 0, denominator, constant(xp, 1.0, denominator))
    alpha = xp.where((grads != 0) & (denominator != 0), squared / safe, constant(xp, 0.0, denominator))
    return xp.sum(alpha * relu(grads), axis=axes)


def xgradcam_weights(
    activations: np.ndarray, gradients: np.ndarray, channel_axis: int = 1, eps: float = 1e-7
) -> np.ndarray:
    """Returns w_k = Σ_s G_k,s A_k,s / (Σ_s A_k,s + eps) (XGrad-CAM, Fu et al. 2020, eq. 15).

    ``eps`` is pytorch-grad-cam's, so the two agree on channels that are all zero.

    Returns:
        ``(..., C)`` float64.
    """
    xp = namespace(activations, gradients)
    dtype = compute_dtype(xp, activations, gradients)
    axes = _spatial_axes(gradients, channel_axis)
    acts = as_float(xp, activations, dtype)
    if xp is np:
        return xp.sum(as_float(xp, gradients, dtype) * acts, axis=axes) / (xp.sum(acts, axis=axes) + eps)
    # Scaled exactly per channel (see _namespace.unit_scaled) so that neither sum overflows float32.
    grads, grad_factor = unit_scaled(xp, as_float(xp, gradients, dtype), axes)
    acts, act_factor = unit_scaled(xp, acts, axes)
    lead = len(grads.shape) - len(axes)
    grad_factor = xp.reshape(grad_factor, tuple(grad_factor.shape[:lead]))
    act_factor = xp.reshape(act_factor, tuple(act_factor.shape[:lead]))
    return xp.sum(grads * acts, axis=axes) / (xp.sum(acts, axis=axes) + eps / act_factor) * grad_factor


def weighted_cam(
    activations: np.ndarray, weights: np.ndarray, channel_axis: int = 1, *, rectify: bool = True
) -> np.ndarray:
    """Returns ReLU(Σ_k w_k A_k) for weights ``(..., C)``: the map of Grad-CAM and its kin.

    >>> weighted_cam(np.array([[[1.0, 2.0], [3.0, 0.0]]]), np.array([[1.0, -1.0]]))
    array([[0., 2.]])
    """
    cam = _weighted_sum(activations, weights, channel_axis)
    return relu(cam) if rectify else cam


def _product(
    xp: Any, gradients: Any, activations: Any, channel_axis: int, dtype: Any, *, positive: bool = False
) -> tuple[Any, Any]:
    """Returns (G ⊙ A / (f_G f_A), (f_G, f_A)), f exact powers of two per sample and target (``unit_scaled``).

    Each ``f`` has the product's shape without the channel and spatial axes (as size-1 axes, the
    channel axis removed), ready to multiply a map summed over channels (:func:`_undo`). NumPy: no
    scaling, factors None. ``positive`` takes ReLU(G) (LayerCAM).
    """
    grads = as_float(xp, gradients, dtype)
    if positive:
        grads = relu(grads)
    acts = as_float(xp, activations, dtype)
    if xp is np:
        return grads * acts, None
    axes = tuple(range(channel_axis % grads.ndim, grads.ndim))
    grads, grad_factor = unit_scaled(xp, grads, axes)
    acts, act_factor = unit_scaled(xp, acts, axes)
    axis = channel_axis % grads.ndim
    return grads * acts, (xp.squeeze(grad_factor, axis=axis), xp.squeeze(act_factor, axis=axis))


def _undo(cam: Any, factors: Any) -> Any:
    """Returns ``cam`` times :func:`_product`'s factors, one at a time (2^126 · 2^126 overflows)."""
    if not isinstance(factors, tuple):
        return cam
    return cam * factors[0] * factors[1]


def hirescam(
    activations: np.ndarray, gradients: np.ndarray, channel_axis: int = 1, *, rectify: bool = True
) -> np.ndarray:
    """Returns ReLU(Σ_k G_k ⊙ A_k) (HiResCAM, Draelos & Carin 2020): no spatial averaging."""
    xp = namespace(activations, gradients)
    dtype = compute_dtype(xp, activations, gradients)
    product, factor = _product(xp, gradients, activations, channel_axis, dtype)
    cam = _undo(xp.sum(product, axis=channel_axis % product.ndim), factor)
    return relu(cam) if rectify else cam


def layercam(
    activations: np.ndarray, gradients: np.ndarray, channel_axis: int = 1, *, rectify: bool = True
) -> np.ndarray:
    """Returns ReLU(Σ_k ReLU(G_k) ⊙ A_k) (LayerCAM, Jiang et al. 2021, eq. 5-6)."""
    xp = namespace(activations, gradients)
    dtype = compute_dtype(xp, activations, gradients)
    product, factor = _product(xp, gradients, activations, channel_axis, dtype, positive=True)
    cam = _undo(xp.sum(product, axis=channel_axis % product.ndim), factor)
    return relu(cam) if rectify else cam


def eigencam(activations: np.ndarray, channel_axis: int = 1, *, rectify: bool = True) -> np.ndarray:
    """Returns ReLU of the projection of A on its first principal component (Eigen-CAM).

    Per sample the activations are read as Z points in C dimensions, centred, and projected on
    the top right-singular vector (as pytorch-grad-cam does). A singular vector's sign is
    arbitrary, so it is chosen to make the map correlate positively with the channel-mean
    activation; otherwise the map can come out inverted from one library or run to the next.

    Args:
        activations: ``(..., C, *S)``.

    Returns:
        ``(..., *S)`` float64.
    """
    xp = namespace(activations)
    if xp is not np:
        cam = _eigencam_xp(xp, activations, channel_axis)
        return relu(cam) if rectify else cam
    acts = np.asarray(activations, _F)
    channel_axis = channel_axis % acts.ndim
    lead, channels, spatial = acts.shape[:channel_axis], acts.shape[channel_axis], acts.shape[channel_axis + 1 :]
    points = acts.reshape(-1, channels, int(np.prod(spatial))).transpose(0, 2, 1)  # (B, Z, C)
    centred = points - points.mean(axis=1, keepdims=True)
    maps = np.zeros(points.shape[:2], dtype=_F)
    for index, sample in enumerate(centred):
        if not np.any(sample):
            continue
        _, _, vt = np.linalg.svd(sample, full_matrices=False)
        projection = sample @ vt[0]
        reference = points[index].mean(axis=1)
        if np.dot(projection, reference - reference.mean()) < 0:
            projection = -projection
        maps[index] = projection
    cam = maps.reshape(*lead, *spatial)
    return relu(cam) if rectify else cam


def _eigencam_xp(xp: Any, activations: Any, channel_axis: int) -> Any:
    """Returns :func:`eigencam`'s signed map on an array-API array: one batched SVD, no loop.

    The NumPy path's per-sample branches become array operations, so the function also runs
    under ``jax.jit``: an all-zero sample projects to zeros by itself, and the sign rule is a
    ``where`` on the correlation with the channel-mean activation.
    """
    dtype = compute_dtype(xp, activations)
    acts = as_float(xp, activations, dtype)
    channel_axis = channel_axis % acts.ndim
    lead, channels = tuple(acts.shape[:channel_axis]), acts.shape[channel_axis]
    spatial = tuple(acts.shape[channel_axis + 1 :])
    points = xp.permute_dims(xp.reshape(acts, (-1, channels, math.prod(spatial))), (0, 2, 1))  # (B, Z, C)
    centred = points - xp.mean(points, axis=1, keepdims=True)
    _, _, vt = xp.linalg.svd(centred, full_matrices=False)
    projection = xp.matmul(centred, vt[:, 0, :, None])[..., 0]  # (B, Z)
    return xp.reshape(_positive_correlation(xp, projection, points), (*lead, *spatial))


def _positive_correlation(xp: Any, projection: Any, points: Any) -> Any:
    """Returns each ``(B, Z)`` projection, negated where it anti-correlates with the channel mean.

    Eigen-CAM's sign rule for a batch of ``(B, Z, C)`` points, as one ``where`` (no host branch).
    """
    reference = xp.mean(points, axis=2)
    reference = reference - xp.mean(reference, axis=1, keepdims=True)
    flip = xp.sum(projection * reference, axis=1, keepdims=True) < 0
    return xp.where(flip, -projection, projection)


# KPCA-CAM's batched kernels are B × Z × Z: at most this many bytes of kernel are built at once
# (Z = 8192 in float32 is 256 MiB per sample); larger batches are computed in chunks of samples.
KPCA_KERNEL_BYTES = 2**28


def _kpcacam_xp(xp: Any, acts: Any, lead: tuple[int, ...], spatial: tuple[int, ...], scale: float, coef0: float) -> Any:
    """Returns :func:`kpcacam`'s signed map on an array-API array: batched kernels and ``eigh``.

    The NumPy path's skips (λ₁ ≤ 0, an all-zero sample) become a mask applied to the result.
    Samples are taken in chunks whose kernels fit :data:`KPCA_KERNEL_BYTES` (a static split, so
    it also runs under ``jax.jit``).
    """
    channels, positions = acts.shape[len(lead)], math.prod(spatial)
    points = xp.permute_dims(xp.reshape(acts, (-1, channels, positions)), (0, 2, 1))  # (B, Z, C)
    samples = int(points.shape[0])
    itemsize = 8 if acts.dtype == xp.float64 else 4
    chunk = max(1, KPCA_KERNEL_BYTES // (positions * positions * itemsize))
    if samples > chunk:
        parts = [
            _kpca_projection(xp, points[start : min(start + chunk, samples), ...], scale, coef0)
            for start in range(0, samples, chunk)
        ]
        return xp.reshape(xp.concat(parts, axis=0), (*lead, *spatial))
    return xp.reshape(_kpca_projection(xp, points, scale, coef0), (*lead, *spatial))


def _kpca_projection(xp: Any, points: Any, scale: float, coef0: float) -> Any:
    """Returns the signed KPCA-CAM projections ``(B, Z)`` of ``(B, Z, C)`` points."""
    centred = points - xp.mean(points, axis=1, keepdims=True)
    kernel = xp.tanh(scale * xp.matmul(centred, xp.permute_dims(centred, (0, 2, 1))) + coef0)
    kernel = (
        kernel
        - xp.mean(kernel, axis=1, keepdims=True)
        - xp.mean(kernel, axis=2, keepdims=True)
        + xp.mean(kernel, axis=(1, 2), keepdims=True)
    )
    values, vectors = xp.linalg.eigh(kernel)
    top = values[:, -1:]  # (B, 1), eigenvalues ascending
    keep = (top > 0) & xp.any(centred != 0, axis=(1, 2))[:, None]
    projection = vectors[:, :, -1] * xp.sqrt(xp.where(keep, top, constant(xp, 0.0, top)))
    return xp.where(keep, _positive_correlation(xp, projection, points), constant(xp, 0.0, projection))


def gradcam_elementwise(
    activations: np.ndarray, gradients: np.ndarray, channel_axis: int = 1, *, rectify: bool = True
) -> np.ndarray:
    """Returns Σ_k ReLU(G_k ⊙ A_k) (pytorch-grad-cam's ``GradCAMElementWise``).

    Like HiResCAM, but each channel's product is rectified before the sum, so a channel with
    negative evidence at a location cannot cancel another's positive evidence there. The map
    is ≥ 0 by construction; ``rectify`` is accepted for a uniform signature and has no effect.

    >>> gradcam_elementwise(np.array([[[1.0, 2.0], [3.0, 1.0]]]), np.array([[[1.0, -1.0], [-1.0, 2.0]]]))
    array([[1., 2.]])
    """
    xp = namespace(activations, gradients)
    dtype = compute_dtype(xp, activations, gradients)
    product, factor = _product(xp, gradients, activations, channel_axis, dtype)
    return _undo(xp.sum(relu(product), axis=channel_axis % product.ndim), factor)


def eigengradcam(
    activations: np.ndarray, gradients: np.ndarray, channel_axis: int = 1, *, rectify: bool = True
) -> np.ndarray:
    """Returns ReLU of the projection of A ⊙ G on its first principal component (Eigen-Grad-CAM).

    Eigen-CAM (Muhammad & Yeasin 2020) applied to the class-specific products A_k ⊙ G_k instead
    of the activations (pytorch-grad-cam's ``EigenGradCAM``), with Eigen-CAM's sign rule: the
    map correlates positively with the channel mean of the products (a HiResCAM-like map).

    Returns:
        ``(..., *S)`` float64.
    """
    xp = namespace(activations, gradients)
    dtype = compute_dtype(xp, activations, gradients)
    product, factor = _product(xp, gradients, activations, channel_axis, dtype)
    # Eigen-CAM's map is homogeneous of degree 1 in its input: the exact scale comes back out.
    return _undo(eigencam(product, channel_axis, rectify=rectify), factor)


# KPCA-CAM builds a Z × Z kernel per sample (Z = spatial positions); beyond this it is too slow.
KPCA_MAX_POSITIONS = 8192


def kpcacam(
    activations: np.ndarray,
    channel_axis: int = 1,
    *,
    gamma: float | None = None,
    coef0: float = 1.0,
    rectify: bool = True,
) -> np.ndarray:
    """Returns ReLU(√λ₁ v₁), the first kernel principal component of A (KPCA-CAM).

    Karmani et al. 2024 replace Eigen-CAM's PCA by kernel PCA: per sample the activations are
    Z points x_s in C dimensions, centred; with the sigmoid kernel
    K_st = tanh(γ ⟨x_s, x_t⟩ + coef0), γ = 1/C by default, the double-centred kernel
    K̃ = K − 1K − K1 + 1K1 (1 = the Z × Z matrix of 1/Z) has top eigenpair (λ₁, v₁) and the map
    is the projection √λ₁ v₁ (scikit-learn's ``KernelPCA(n_components=1).fit_transform``, which
    pytorch-grad-cam's ``KPCA_CAM`` calls). Eigen-CAM's sign rule fixes the eigenvector's sign;
    a map with λ₁ ≤ 0 is all zeros. Pure NumPy (``numpy.linalg.eigh``), no scikit-learn.

    Args:
        activations: ``(..., C, *S)``.
        gamma: the kernel's scale (default 1/C, scikit-learn's).
        coef0: the kernel's offset (scikit-learn's default 1).

    Returns:
        ``(..., *S)`` float64.

    Raises:
        anycam.ConfigError: if the layer has more than ``KPCA_MAX_POSITIONS`` spatial positions.
    """
    xp = namespace(activations)
    acts = as_float(xp, activations, compute_dtype(xp, activations))
    channel_axis = channel_axis % acts.ndim
    lead, channels = tuple(acts.shape[:channel_axis]), acts.shape[channel_axis]
    spatial = tuple(acts.shape[channel_axis + 1 :])
    positions = math.prod(spatial)
    if positions > KPCA_MAX_POSITIONS:
        raise ConfigError(
            f"kpcacam builds a {positions} x {positions} kernel per sample (layer of spatial shape {spatial}); "
            f"explain a layer with at most {KPCA_MAX_POSITIONS} positions, or use eigencam"
        )
    scale = 1.0 / channels if gamma is None else float(gamma)
    if xp is not np:
        cam = _kpcacam_xp(xp, acts, lead, spatial, scale, coef0)
        return relu(cam) if rectify else cam
    points = acts.reshape(-1, channels, positions).transpose(0, 2, 1)  # (B, Z, C)
    centred = points - points.mean(axis=1, keepdims=True)
    maps = np.zeros(points.shape[:2], dtype=_F)
    for index, sample in enumerate(centred):
        kernel = np.tanh(scale * (sample @ sample.T) + coef0)
        kernel = kernel - kernel.mean(axis=0, keepdims=True) - kernel.mean(axis=1, keepdims=True) + kernel.mean()
        values, vectors = np.linalg.eigh(kernel)
        if not values[-1] > 0 or not np.any(sample):
            continue
        projection = vectors[:, -1] * np.sqrt(values[-1])
        reference = points[index].mean(axis=1)
        if np.dot(projection, reference - reference.mean()) < 0:
            projection = -projection
        maps[index] = projection
    cam = maps.reshape(*lead, *spatial)
    return relu(cam) if rectify else cam


def random_weights(channels: int, seed: int = 0) -> np.ndarray:
    """Returns w ~ U(−1, 1)^C from ``numpy.random.default_rng(seed)``: RandomCAM's weights.

    The baseline of every metric table (pytorch-grad-cam's ``RandomCAM``): a map that uses the
    layer's activations but nothing about the target. The same seed gives the same weights,
    for every sample and target, so the baseline is reproducible and batch-independent.

    >>> random_weights(3, seed=0).shape
    (3,)
    """
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=channels)


def class_activation_map(activations: np.ndarray, class_weights: np.ndarray, channel_axis: int = 1) -> np.ndarray:
    """Returns M^c = Σ_k w_k^c A_k, CAM (Zhou et al. 2016) from a GAP → linear head.

    Not rectified, as in the paper. On such a head Grad-CAM's α_k = w_k^c / Z: Grad-CAM = ReLU(CAM) / Z.

    Args:
        activations: ``(..., C, *S)``.
        class_weights: ``(..., C)``, the linear head's row for the class of each sample.
    """
    return _weighted_sum(activations, class_weights, channel_axis)


def _with_weights(
    weigh: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
) -> Callable[..., tuple[np.ndarray, np.ndarray | None]]:
    """Returns a method function Σ_k α_k A_k from a function of the weights α (Grad-CAM's form)."""

    def cam(
        activations: np.ndarray, gradients: np.ndarray, channel_axis: int, rectify: bool, seed: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        weights = weigh(activations, gradients, channel_axis)
        return weighted_cam(activations, weights, channel_axis, rectify=rectify), weights

    return cam


def _no_weights(map_of: Callable[..., np.ndarray], gradients: bool) -> Callable[..., tuple[np.ndarray, None]]:
    """Returns a method function for a map without channel weights (HiResCAM, Eigen-CAM …)."""

    def cam(
        activations: np.ndarray, grads: np.ndarray | None, channel_axis: int, rectify: bool, seed: int
    ) -> tuple[np.ndarray, None]:
        if gradients:
            return map_of(activations, grads, channel_axis, rectify=rectify), None
        return map_of(activations, channel_axis, rectify=rectify), None

    return cam


def _randomcam(
    activations: np.ndarray, gradients: np.ndarray | None, channel_axis: int, rectify: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    xp = namespace(activations)
    if xp is not np:
        # The same seeded NumPy weights as on the host, copied to the activations' device once.
        lead = tuple(activations.shape[: channel_axis % activations.ndim + 1])
        host = random_weights(activations.shape[channel_axis], seed)
        native = xp.asarray(host, dtype=compute_dtype(xp, activations), device=device_of(activations))
        weights = xp.broadcast_to(native, lead)
        return weighted_cam(activations, weights, channel_axis, rectify=rectify), weights
    acts = np.asarray(activations)
    lead = acts.shape[: channel_axis % acts.ndim + 1]
    weights = np.broadcast_to(random_weights(acts.shape[channel_axis], seed), lead)
    return weighted_cam(acts, weights, channel_axis, rectify=rectify), np.array(weights, _F)


def _gradcam(activations: np.ndarray, gradients: np.ndarray, channel_axis: int) -> np.ndarray:
    return gradcam_weights(gradients, channel_axis)


@dataclass(frozen=True)
class Method:
    """One entry of :data:`METHODS`: how a method runs and what it needs of a backend.

    Attributes:
        kind: how the Explainer drives it: ``"gradient"`` (one capture with gradients),
            ``"activation"`` (one capture, activations only), ``"masking"`` (Score-CAM: scores of
            masked inputs), ``"ablation"`` (Ablation-CAM: scores with channels zeroed),
            ``"guided"`` (guided backpropagation to the input) or ``"attention"`` (the attention
            probabilities of every block, ``anycam.core.attention``).
        needs: the backend capability it needs (a key of ``anycam.protocol.backend.CAPABILITIES``),
            or None when ``capture`` is enough.
        function: ``f(activations, gradients, channel_axis, rectify, seed) -> (cam, weights)``
            for the one-capture kinds (see :func:`compute_cam`); None for the others, whose
            drivers live in ``anycam.explain``.
    """

    kind: str
    needs: str | None
    function: Callable[..., tuple[np.ndarray, np.ndarray | None]] | None


METHODS: Mapping[str, Method] = MappingProxyType(
    {
        # Gradient methods first: the order is the CLI's and the docs' order.
        "gradcam": Method("gradient", None, _with_weights(_gradcam)),
        "gradcam++": Method("gradient", None, _with_weights(gradcampp_weights)),
        "xgradcam": Method("gradient", None, _with_weights(xgradcam_weights)),
        "hirescam": Method("gradient", None, _no_weights(hirescam, gradients=True)),
        "layercam": Method("gradient", None, _no_weights(layercam, gradients=True)),
        "eigengradcam": Method("gradient", None, _no_weights(eigengradcam, gradients=True)),
        "gradcam-elementwise": Method("gradient", None, _no_weights(gradcam_elementwise, gradients=True)),
        "eigencam": Method("activation", None, _no_weights(eigencam, gradients=False)),
        "kpcacam": Method("activation", None, _no_weights(kpcacam, gradients=False)),
        "randomcam": Method("activation", None, _randomcam),
        "scorecam": Method("masking", "input_scores", None),
        "ablationcam": Method("ablation", "head_scores", None),
        "guided-backprop": Method("guided", "guided_gradients", None),
        "guided-gradcam": Method("guided", "guided_gradients", None),
        # Issue 22: transformer-native maps from the attention (anycam.core.attention).
        "rollout": Method("attention", "attention", None),
        "attention-grad": Method("attention", "attention", None),
    }
)
"""Every ``method=`` string the Explainer accepts, in order, with its :class:`Method` (kind,
needed capability, function). ``name in METHODS`` and ``list(METHODS)`` read it as the list of
names; the tuples below are views of it by kind."""


def _of_kind(*kinds: str) -> tuple[str, ...]:
    return tuple(name for name, method in METHODS.items() if method.kind in kinds)


GRADIENT_METHODS = _of_kind("gradient")
"""Methods computed from one capture's activations and gradients."""
CAPTURE_METHODS = _of_kind("gradient", "activation")
"""Methods computed from one capture (``compute_cam``); the others need more model runs."""
SCORE_METHODS = _of_kind("masking", "ablation")
"""Gradient-free methods that score perturbed copies (``Backend.input_scores`` / ``head_scores``)."""
GUIDED_METHODS = _of_kind("guided")
"""Input-resolution methods built on guided backpropagation (``Backend.guided_gradients``)."""
ATTENTION_METHODS = _of_kind("attention")
"""Transformer-native methods from every block's attention (``Backend.attention_capture``)."""
TARGET_FREE_METHODS = _of_kind("activation")
"""Capture methods without gradients, whose map does not depend on the target (repeated for K)."""
DIFFERENTIABLE_METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "gradcam-elementwise")
"""Maps that can carry gradients (``differentiable=True``, JAX ``explain_fn``); no SVD sign rule, no perturbation."""


def compute_cam(
    method: str,
    activations: np.ndarray,
    gradients: np.ndarray | None,
    channel_axis: int = 1,
    *,
    rectify: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns ``(cam, weights)`` for a method of ``CAPTURE_METHODS``; weights is None for methods without them.

    ``activations`` and ``gradients`` broadcast against each other, so ``(N, 1, C, *S)``
    activations with ``(N, K, C, *S)`` gradients give K maps without copying A.
    ``rectify=False`` skips the final ReLU (signed maps, as Captum's default), which the
    sanity check uses to compare maps with and without absolute values. ``seed`` seeds
    ``randomcam``'s weights.

    Raises:
        ValueError: for an unknown method (or one that needs more than a capture), or a
            gradient method without gradients.
    """
    entry = METHODS.get(method)
    if entry is None:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if entry.function is None:
        raise ConfigError(f"method {method!r} needs more than one capture; run it through anycam.Explainer")
    if entry.kind == "gradient" and gradients is None:
        raise ConfigError(f"method {method!r} needs gradients")
    return entry.function(activations, gradients, channel_axis, rectify, seed)
