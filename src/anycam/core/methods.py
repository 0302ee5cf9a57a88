"""The CAM family: channel weights and raw maps from activations and gradients.

Every function takes arrays with an explicit channel axis and treats the axes after it as
spatial and the axes before it as batch-like, so ``(N, C, H, W)``, ``(N, K, C, D, H, W)`` and a
single ``(C, L)`` all work. Arithmetic runs in float64 (a normalised heatmap must not become NaN
because ``A·G`` overflowed float32); callers cast results back to float32.
"""

from __future__ import annotations

import numpy as np

from .._errors import ConfigError

_F = np.float64


def _spatial_axes(array: np.ndarray, channel_axis: int) -> tuple[int, ...]:
    channel_axis = channel_axis % array.ndim
    return tuple(range(channel_axis + 1, array.ndim))


def _weighted_sum(activations: np.ndarray, weights: np.ndarray, channel_axis: int) -> np.ndarray:
    """Returns Σ_k weights_k · A_k for weights ``(..., C)`` and activations ``(..., C, *S)``.

    A batched matmul over flattened space: broadcasting ``(N, 1, C, *S)`` activations against
    ``(N, K, C)`` weights never materialises an ``(N, K, C, *S)`` product.
    """
    acts = np.asarray(activations, _F)
    channel_axis = channel_axis % acts.ndim
    spatial = acts.shape[channel_axis + 1 :]
    flat = acts.reshape(*acts.shape[: channel_axis + 1], -1)
    summed = np.matmul(np.asarray(weights, _F)[..., None, :], flat)[..., 0, :]
    return summed.reshape(*summed.shape[:-1], *spatial)


def relu(x: np.ndarray) -> np.ndarray:
    """Returns max(x, 0)."""
    return np.maximum(x, 0)


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
    grads = np.asarray(gradients)
    return np.asarray(np.mean(grads, axis=_spatial_axes(grads, channel_axis), dtype=_F))


def gradcampp_weights(activations: np.ndarray, gradients: np.ndarray, channel_axis: int = 1) -> np.ndarray:
    """Returns w_k = Σ_s α_k,s ReLU(g_k,s), α = g²/(2g² + Σ_s' A_k,s' g³) where g ≠ 0, else 0.

    Grad-CAM++ (Chattopadhay et al. 2018) eq. 19 with an exponential class score, so higher
    derivatives are powers of the first. The g ≠ 0 mask is the paper's: a location with no
    gradient gets no weight (rather than 0/0).

    Returns:
        ``(..., C)`` float64.
    """
    axes = _spatial_axes(gradients, channel_axis)
    grads = np.asarray(gradients, _F)
    squared = grads * grads
    activation_sums = np.sum(np.asarray(activations, _F), axis=axes, keepdims=True)
    denominator = 2.0 * squared + activation_sums * squared * grads
    safe = np.where(denominator != 0, denominator, 1.0)
    alpha = np.where((grads != 0) & (denominator != 0), squared / safe, 0.0)
    return np.sum(alpha * relu(grads), axis=axes)


def xgradcam_weights(
    activations: np.ndarray, gradients: np.ndarray, channel_axis: int = 1, eps: float = 1e-7
) -> np.ndarray:
    """Returns w_k = Σ_s G_k,s A_k,s / (Σ_s A_k,s + eps) (XGrad-CAM, Fu et al. 2020, eq. 15).

    ``eps`` is pytorch-grad-cam's, so the two agree on channels that are all zero.

    Returns:
        ``(..., C)`` float64.
    """
    axes = _spatial_axes(gradients, channel_axis)
    acts = np.asarray(activations, _F)
    return np.sum(np.asarray(gradients, _F) * acts, axis=axes) / (np.sum(acts, axis=axes) + eps)


def weighted_cam(
    activations: np.ndarray, weights: np.ndarray, channel_axis: int = 1, *, rectify: bool = True
) -> np.ndarray:
    """Returns ReLU(Σ_k w_k A_k) for weights ``(..., C)``: the map of Grad-CAM and its kin.

    >>> weighted_cam(np.array([[[1.0, 2.0], [3.0, 0.0]]]), np.array([[1.0, -1.0]]))
    array([[0., 2.]])
    """
    cam = _weighted_sum(activations, np.asarray(weights, _F), channel_axis)
    return relu(cam) if rectify else cam


def hirescam(
    activations: np.ndarray, gradients: np.ndarray, channel_axis: int = 1, *, rectify: bool = True
) -> np.ndarray:
    """Returns ReLU(Σ_k G_k ⊙ A_k) (HiResCAM, Draelos & Carin 2020): no spatial averaging."""
    product = np.asarray(gradients, _F) * np.asarray(activations, _F)
    cam = np.sum(product, axis=channel_axis % product.ndim)
    return relu(cam) if rectify else cam


def layercam(
    activations: np.ndarray, gradients: np.ndarray, channel_axis: int = 1, *, rectify: bool = True
) -> np.ndarray:
    """Returns ReLU(Σ_k ReLU(G_k) ⊙ A_k) (LayerCAM, Jiang et al. 2021, eq. 5-6)."""
    product = relu(np.asarray(gradients, _F)) * np.asarray(activations, _F)
    cam = np.sum(product, axis=channel_axis % product.ndim)
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
    product = relu(np.asarray(gradients, _F) * np.asarray(activations, _F))
    return np.sum(product, axis=channel_axis % product.ndim)


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
    return eigencam(np.asarray(gradients, _F) * np.asarray(activations, _F), channel_axis, rectify=rectify)


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
    acts = np.asarray(activations, _F)
    channel_axis = channel_axis % acts.ndim
    lead, channels, spatial = acts.shape[:channel_axis], acts.shape[channel_axis], acts.shape[channel_axis + 1 :]
    positions = int(np.prod(spatial))
    if positions > KPCA_MAX_POSITIONS:
        raise ConfigError(
            f"kpcacam builds a {positions} x {positions} kernel per sample (layer of spatial shape {spatial}); "
            f"explain a layer with at most {KPCA_MAX_POSITIONS} positions, or use eigencam"
        )
    scale = 1.0 / channels if gamma is None else float(gamma)
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

    Not rectified, as in the paper. On such a head Grad-CAM's α_k equals w_k^c / Z, so
    Grad-CAM = ReLU(CAM) / Z: the oracle the tests use.

    Args:
        activations: ``(..., C, *S)``.
        class_weights: ``(..., C)``, the linear head's row for the class of each sample.
    """
    return _weighted_sum(activations, np.asarray(class_weights, _F), channel_axis)


GRADIENT_METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam", "gradcam-elementwise")
"""Methods computed from one capture's activations and gradients."""
CAPTURE_METHODS = (*GRADIENT_METHODS, "eigencam", "kpcacam", "randomcam")
"""Methods computed from one capture (``compute_cam``); the others need more model runs."""
SCORE_METHODS = ("scorecam", "ablationcam")
"""Gradient-free methods that score perturbed copies (``Backend.input_scores`` / ``head_scores``)."""
GUIDED_METHODS = ("guided-backprop", "guided-gradcam")
"""Input-resolution methods built on guided backpropagation (``Backend.guided_gradients``)."""
METHODS = (*CAPTURE_METHODS, *SCORE_METHODS, *GUIDED_METHODS)
"""Every ``method=`` string the Explainer accepts."""
TARGET_FREE_METHODS = ("eigencam", "kpcacam", "randomcam")
"""Capture methods whose map does not depend on the target (one map repeated for K targets)."""


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
    if method == "eigencam":
        return eigencam(activations, channel_axis, rectify=rectify), None
    if method == "kpcacam":
        return kpcacam(activations, channel_axis, rectify=rectify), None
    if method == "randomcam":
        acts = np.asarray(activations)
        lead = acts.shape[: channel_axis % acts.ndim + 1]
        weights = np.broadcast_to(random_weights(acts.shape[channel_axis], seed), lead)
        return weighted_cam(acts, weights, channel_axis, rectify=rectify), np.array(weights, _F)
    if method not in GRADIENT_METHODS:
        if method in METHODS:
            raise ConfigError(f"method {method!r} needs more than one capture; run it through anycam.Explainer")
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if gradients is None:
        raise ConfigError(f"method {method!r} needs gradients")
    if method == "hirescam":
        return hirescam(activations, gradients, channel_axis, rectify=rectify), None
    if method == "layercam":
        return layercam(activations, gradients, channel_axis, rectify=rectify), None
    if method == "gradcam-elementwise":
        return gradcam_elementwise(activations, gradients, channel_axis, rectify=rectify), None
    if method == "eigengradcam":
        return eigengradcam(activations, gradients, channel_axis, rectify=rectify), None
    if method == "gradcam":
        weights = gradcam_weights(gradients, channel_axis)
    elif method == "gradcam++":
        weights = gradcampp_weights(activations, gradients, channel_axis)
    else:
        weights = xgradcam_weights(activations, gradients, channel_axis)
    return weighted_cam(activations, weights, channel_axis, rectify=rectify), weights
