"""anycam.core.resize against torch.nn.functional.interpolate: the reference the math contract
names (DESIGN §4). Collected only in the torch session."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anycam import core

TORCH_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}

CASES = [
    # (input spatial shape, output spatial shape): up, down, mixed, non-square, size 1 both ways
    ((7,), (224,)),
    ((9,), (4,)),
    ((1,), (5,)),
    ((6,), (1,)),
    ((7, 7), (224, 224)),
    ((14, 14), (224, 224)),
    ((3, 5), (8, 4)),
    ((10, 6), (3, 17)),
    ((30, 30), (22, 22)),
    ((1, 4), (3, 1)),
    ((2, 3, 4), (5, 7, 2)),
    ((6, 5, 4), (3, 3, 9)),
    ((4, 4, 4), (16, 16, 16)),
]


def torch_resize(data: np.ndarray, size: tuple[int, ...], mode: str, dtype: torch.dtype) -> np.ndarray:
    tensor = torch.from_numpy(data).to(dtype)
    if mode == "linear":
        out = F.interpolate(tensor, size=size, mode=TORCH_LINEAR[len(size)], align_corners=False)
    else:
        out = F.interpolate(tensor, size=size, mode="nearest")
    return out.double().numpy()


@pytest.mark.parametrize(("shape_in", "shape_out"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_resize_equals_torch_interpolate(shape_in, shape_out, dtype, mode):
    data = np.random.default_rng(0).random((2, 3, *shape_in))
    if dtype == torch.float32:
        data = data.astype(np.float32).astype(np.float64)
    expected = torch_resize(data, shape_out, mode, dtype)
    got = core.resize(data, shape_out, mode)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_every_one_dimensional_size_pair_equals_torch(mode):
    # Sizes where i · in/out lands on (or a rounding away from) an integer are where a
    # floating-point index goes wrong (30 → 22 picked pixel 14 instead of 15 for i = 11).
    mismatched = []
    for size_in in range(1, 33):
        data = np.random.default_rng(size_in).random((1, 1, size_in))
        for size_out in range(1, 65):
            expected = torch_resize(data, (size_out,), mode, torch.float64)
            if not np.allclose(core.resize(data, (size_out,), mode), expected, rtol=0, atol=1e-6):
                mismatched.append((size_in, size_out))
    assert mismatched == []
