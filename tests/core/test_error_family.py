"""One family of errors (issue 19, items 4, 13, 14): what anycam raises is an AnycamError, named and helpful.

Framework-free: NumPy arrays stand in for a framework's; the contract suite checks the same
guarantees through every backend.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import numpy as np
import pytest

import anycam
from anycam import core
from anycam.protocol.backend import EXPLAINER_ARGUMENTS, check_options
from anycam.protocol.inputs import structure_inputs

BAD_ARGUMENTS = {
    "object": object(),
    "string": "nonsense",
    "negative": -1,
    "empty": np.zeros((0,), np.float32),
    "matrix": np.zeros((2, 3), np.float32),
    "nan_images": np.full((2, 3, 4, 4), np.nan, np.float32),
}
NOT_CALLED = {"Backend": "an abstract base class for adapters: subclassed, never called"}


def _public_callables() -> list[tuple[str, Any]]:
    found = []
    for module in (anycam, anycam.metrics):
        for name in module.__all__:
            value = getattr(module, name)
            if not (inspect.isroutine(value) or inspect.isclass(value)):
                continue  # modules, constants and type aliases (metrics.Predict)
            if isinstance(value, type) and issubclass(value, (BaseException, Warning)):
                continue
            found.append((f"{module.__name__}.{name}", value))
    return found


@pytest.mark.parametrize("bad", list(BAD_ARGUMENTS), ids=list(BAD_ARGUMENTS))
@pytest.mark.parametrize(("name", "function"), _public_callables(), ids=[n for n, _ in _public_callables()])
def test_every_public_callable_raises_only_anycam_errors_and_warnings(
    name: str, function: Any, bad: str, request: pytest.FixtureRequest
) -> None:
    """Each public callable, every required positional argument set to one bad value."""
    short = name.rsplit(".", 1)[-1]
    if short in NOT_CALLED:
        pytest.skip(NOT_CALLED[short])
    required = [
        p
        for p in inspect.signature(function).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            function(*[BAD_ARGUMENTS[bad]] * len(required))
        except anycam.AnycamError:
            pass
        except Warning as warning:
            assert isinstance(warning, anycam.AnycamWarning), f"{name} warned {type(warning).__name__}: {warning}"
        except Exception as exc:  # the point: any other type is the defect
            pytest.fail(f"{name}({bad}) raised {type(exc).__name__}: {exc}")


def test_the_near_miss_hint_knows_every_explainer_argument() -> None:
    own = [n for n in inspect.signature(anycam.Explainer.__init__).parameters if n not in ("self", "options")]
    assert list(EXPLAINER_ARGUMENTS) == own


def test_an_unknown_option_names_the_near_miss_explainer_argument() -> None:
    """Item 19.14: ``normalise=`` lands among the backend's options; the message names ``normalize``."""
    with pytest.raises(anycam.ConfigTypeError, match=r"accepted: model_kwargs.*closest: 'normalize'"):
        check_options("torch", {"normalise": "max"}, ("model_kwargs", "spatial_input"))


def _spatial(value: object) -> bool:
    return isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating) and value.ndim >= 3


IMAGES = np.zeros((2, 3, 8, 8), np.float32)


@pytest.mark.parametrize(
    ("inputs", "spatial_input", "listed"),
    [
        ((IMAGES, np.zeros((3, 4))), None, ("0: N=2", "1: N=3")),
        ((np.zeros((1, 5), np.int64), IMAGES), None, ("0: N=1", "1: N=2")),
        ({"pixels": IMAGES, "meta": np.zeros((1, 4))}, None, ("'pixels': N=2", "'meta': N=1")),
        ({"pixels": IMAGES, "mask": np.zeros((5, 1, 8, 8), np.float32)}, "pixels", ("'pixels': N=2", "'mask': N=5")),
    ],
)
def test_batched_inputs_must_share_the_spatial_inputs_n(
    inputs: Any, spatial_input: Any, listed: tuple[str, ...]
) -> None:
    """Item 19.4: the boundary every backend passes refuses a mismatch, naming each input's N."""
    with pytest.raises(anycam.InputError, match="different batch sizes") as info:
        structure_inputs(inputs, is_spatial=_spatial, spatial_input=spatial_input)
    assert all(part in str(info.value) for part in listed), str(info.value)
    assert "rank" not in str(info.value)  # item 19.14: not reported as a rank or channel problem


def test_unbatched_values_and_constants_are_not_batch_checked() -> None:
    # Scalars, flags, None and model_kwargs constants carry no batch axis.
    structure = structure_inputs(
        (IMAGES, np.float32(0.5), None, True),
        is_spatial=_spatial,
        model_kwargs={"table": np.zeros((7, 3))},
    )
    assert structure.spatial == 0
    assert structure_inputs((IMAGES, np.zeros((2, 4))), is_spatial=_spatial).spatial == 0


def test_no_spatial_axis_names_the_input_and_spatial_input() -> None:
    """Item 19.14: the message says which input and how to name the one with the grid."""
    expected = r"input 'input_ids' of shape \(2, 7\) has no spatial axis.*spatial_input="
    with pytest.raises(anycam.InputError, match=expected):
        core.spatial_shape((2, 7), "channels_first", "input 'input_ids'")


def test_integer_inputs_are_not_advised_to_become_pixels_alone() -> None:
    """Item 19.14: token ids must not be told to become ``x.float() / 255``; pixels may."""
    message = str(core.integer_input_error("input 'input_ids'", "torch.int64", "x.float() / 255"))
    assert "token ids" in message and "do not cast" in message and "spatial_input=" in message
    assert isinstance(core.integer_input_error("input", "int32", "x"), anycam.InputError)


def test_a_forward_failure_on_shapes_mentions_the_batch_size() -> None:
    error = core.forward_error(RuntimeError("size mismatch, got 3 and 2"), (2, 3, 8, 8), "channels_first")
    assert error is not None and "same N rows" in str(error)


class _Bfloat16Tensor:
    """Behaves as a CPU torch bfloat16 tensor does towards NumPy: __array__ raises TypeError."""

    def __init__(self, values: np.ndarray, convertible: bool = False) -> None:
        self.values, self.convertible = values, convertible

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if not self.convertible:
            raise TypeError("Got unsupported ScalarType BFloat16")
        return self.values

    def detach(self) -> _Bfloat16Tensor:
        return self

    def cpu(self) -> _Bfloat16Tensor:
        return self

    def float(self) -> _Bfloat16Tensor:
        return _Bfloat16Tensor(self.values.astype(np.float32), convertible=True)


def test_score_cams_inputs_take_a_bfloat16_tensor_as_float32() -> None:
    """Item 19.13: bf16 Score-CAM in torch raised NumPy's raw TypeError; bf16 is documented."""
    from anycam.explain.perturbation import numpy_input

    values = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2) / 8  # exact in bfloat16
    got = numpy_input(_Bfloat16Tensor(values))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values)
