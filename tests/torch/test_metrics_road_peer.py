"""ROAD's imputation against pytorch-grad-cam's ``NoisyLinearImputer`` (the paper authors' code), noise off.

pytorch-grad-cam imports torchvision at package import for image helpers the imputer does not
use; as in ``test_peers_methods``, a stub module stands in for it where torchvision is missing.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cv2")


def _stub_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or not importable beside this torch build
        pass
    else:
        return
    package = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    for name in ("Compose", "Normalize", "ToTensor"):
        setattr(transforms, name, None)
    functional.resize = None  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    package.transforms = transforms  # type: ignore[attr-defined]
    sys.modules.update(
        {"torchvision": package, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}
    )


_stub_torchvision()
road_peer = pytest.importorskip("pytorch_grad_cam.metrics.road")

from anycam.metrics import noisy_linear_imputation  # noqa: E402


@pytest.mark.parametrize("share", [0.1, 0.5, 0.9])
def test_imputation_equals_pytorch_grad_cams_noisy_linear_imputer(share):
    rng = np.random.default_rng(7)
    image = rng.normal(size=(3, 20, 24)).astype(np.float32)
    removed = rng.random((20, 24)) < share
    removed[0, 0] = False  # at least one kept pixel
    peer = road_peer.NoisyLinearImputer(noise=0.0)
    # The peer's mask is 1 where a pixel is kept, 0 where it is imputed; it works in float32.
    expected = peer(torch.from_numpy(image), torch.from_numpy((~removed).astype(np.float32))).numpy()
    ours = noisy_linear_imputation(image, removed, noise=0.0)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
