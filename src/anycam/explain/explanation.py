"""The result of one explanation: ``Explanation``, the maps, weights, scores and targets of a call."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Explanation:
    """Everything one call computed.

    With ``Explainer(arrays="native")`` (or ``differentiable=True``) ``heatmap``, ``cam``,
    ``cams``, ``weights``, ``scores`` and ``attribution`` are the model framework's arrays on the
    model's device (float32, float64 for a float64 input) instead of NumPy; ``target`` is NumPy
    in every mode.

    Attributes:
        heatmap: ``(N, *input_spatial)`` or ``(N, K, *input_spatial)`` float32 in [0, 1].
        cam: the raw map of the (first) layer, ReLU(Σ_k α_k A^k) at layer resolution, not
            normalised, float32; ``(N, *S)`` or ``(N, K, *S)``. For ``guided-backprop``, which
            has no layer map, Σ_c |attribution_c| at the input's resolution; for
            ``guided-gradcam`` the Grad-CAM factor.
        cams: ``cam`` for every layer, in the order given.
        weights: channel weights α ``(N, C)`` or ``(N, K, C)`` of the (first) layer, or None for
            methods without them (HiResCAM, LayerCAM, Eigen-CAM, Eigen-Grad-CAM, Grad-CAM element-wise,
            KPCA-CAM, Guided Backprop). Score-CAM's are its α, Ablation-CAM's (y − y_k)/y,
            Guided Grad-CAM's those of its Grad-CAM factor.
        scores: the explained model outputs, ``(N,)`` or ``(N, K)``.
        target: resolved class indices ``(N,)`` or ``(N, K)``, or None for callable targets.
        layer: the layer name, or a tuple of names for several layers; an empty tuple for
            ``guided-backprop`` with ``layer=None`` or ``"auto"`` (it reads no layer).
        method: the method used.
        attribution: for the input-resolution methods (``guided-backprop``, ``guided-gradcam``)
            the signed attribution ``(N, C_in, *input_spatial)`` or ``(N, K, C_in, *input_spatial)``,
            channels first in every framework (Captum's ``GuidedBackprop`` / ``GuidedGradCam``
            layout); their ``heatmap`` is Σ_c |attribution_c| normalised. None for the others.
    """

    heatmap: np.ndarray
    cam: np.ndarray
    cams: tuple[np.ndarray, ...]
    weights: np.ndarray | None
    scores: np.ndarray
    target: np.ndarray | None
    layer: str | tuple[str, ...]
    method: str
    attribution: np.ndarray | None = None

    def __repr__(self) -> str:
        """A summary: method, layer, shapes and targets; never the arrays themselves."""
        if self.target is None:
            targets = "callable"
        else:
            flat = np.asarray(self.target).reshape(-1)
            targets = ", ".join(str(int(t)) for t in flat[:8]) + (", …" if flat.size > 8 else "")
            targets = f"[{targets}]"
        return (
            f"Explanation(method={self.method!r}, layer={self.layer!r}, heatmap={tuple(self.heatmap.shape)}, "
            f"cam={tuple(self.cam.shape)}, target={targets})"
        )

    def _repr_png_(self) -> bytes | None:
        """Notebook display: the first eight 2-D heatmaps as a PNG (None without matplotlib)."""
        from .._errors import MissingExtraError
        from ..viz.figures import plot, to_png

        if self.heatmap.ndim not in (3, 4):
            return None
        from .assembly import host

        shown = {f"{self.method} @ {self.layer}": host(self.heatmap[:8])}
        try:
            return to_png(plot(None, shown, colorbar=True), dpi=72)
        except MissingExtraError:
            return None
