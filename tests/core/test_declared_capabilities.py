"""The Explainer and the sanity check read a backend's declared capabilities before any work.

The adapters here are NumPy fakes (as in test_metrics.py and test_ablation_head.py) that count
their constructions and captures, so a refusal is shown to come before either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pytest

import anycam
from anycam import Backend, Capture, backends, core

ACTS = np.random.default_rng(0).random((2, 3, 4, 4)).astype(np.float32)


class Plain(Backend):
    """Declares nothing beyond capture and predict; records every construction and capture."""

    name = "fake"
    calls: ClassVar[list[str]] = []

    def __init__(self, model: Any, layers: Any, *, output: Any = None, input_layout: Any = None) -> None:
        Plain.calls.append("init")
        self.layer_names = ("features",)

    def capture(self, inputs: Any, target: core.TargetSpec, *, gradients: bool = True) -> Capture:
        Plain.calls.append("capture")
        scores = ACTS.mean(axis=(2, 3))
        indices = core.resolve_indices(target, scores)
        return Capture(
            activations=(ACTS,),
            gradients=(np.ones((2, indices.shape[1], 3, 4, 4), np.float32),) if gradients else None,
            scores=np.take_along_axis(scores, indices, axis=1),
            target=indices,
            input_spatial=(4, 4),
            layouts=("channels_first",),
        )

    def predict(self, inputs: Any) -> np.ndarray:
        return ACTS.mean(axis=(2, 3))


@pytest.fixture()
def plain(monkeypatch: pytest.MonkeyPatch) -> type[Plain]:
    monkeypatch.setattr(Plain, "calls", [])
    monkeypatch.setattr(backends, "load", lambda name, model=None: Plain)
    return Plain


@pytest.mark.parametrize(
    ("method", "capability"),
    [
        ("scorecam", "input_scores"),
        ("ablationcam", "head_scores"),
        ("guided-backprop", "guided_gradients"),
        ("guided-gradcam", "guided_gradients"),
        ("rollout", "attention"),
        ("attention-grad", "attention"),
    ],
)
def test_a_method_without_its_capability_is_refused_before_the_adapter_is_built(
    plain: type[Plain], method: str, capability: str
) -> None:
    with pytest.raises(anycam.BackendError) as caught:
        anycam.Explainer(object(), "features", method=method, backend="torch")
    assert str(caught.value) == (
        f"the fake backend cannot run {method}: it does not declare the {capability} capability"
    )
    assert plain.calls == []  # not even constructed


@pytest.mark.filterwarnings("ignore::anycam.ZeroMapWarning")  # randomcam on these activations
@pytest.mark.parametrize("method", core.CAPTURE_METHODS)
def test_capture_methods_need_no_capability(plain: type[Plain], method: str) -> None:
    result = anycam.Explainer(object(), "features", method=method, backend="torch").explain(np.zeros((2, 3, 4, 4)))
    assert result.heatmap.shape == (2, 4, 4)
    assert plain.calls == ["init", "capture"]


def test_sanity_check_refuses_a_backend_without_randomize_before_any_work(plain: type[Plain]) -> None:
    explainer = anycam.Explainer(object(), "features", backend="torch")
    with pytest.raises(anycam.BackendError, match="the fake backend cannot run the sanity check: it does not "
                       "declare the randomize capability"):
        anycam.sanity_check(explainer, np.zeros((2, 3, 4, 4)))
    assert plain.calls == ["init"]  # nothing explained


def test_every_needed_capability_is_a_declared_one() -> None:
    from anycam.protocol.backend import CAPABILITIES

    needed = {entry.needs for entry in core.METHODS.values()} - {None}
    assert needed <= set(CAPABILITIES)


def test_methods_is_one_table_and_the_tuples_are_views_of_it() -> None:
    assert isinstance(core.METHODS, Mapping)
    assert list(core.METHODS) == [
        "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam", "gradcam-elementwise",
        "eigencam", "kpcacam", "randomcam", "scorecam", "ablationcam", "guided-backprop", "guided-gradcam",
        "rollout", "attention-grad",
    ]  # fmt: skip
    assert "gradcam" in core.METHODS and "nope" not in core.METHODS
    assert ", ".join(core.METHODS).startswith("gradcam, gradcam++, ")
    assert core.GRADIENT_METHODS == (
        "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam", "gradcam-elementwise"
    )  # fmt: skip
    assert core.CAPTURE_METHODS == (*core.GRADIENT_METHODS, "eigencam", "kpcacam", "randomcam")
    assert core.SCORE_METHODS == ("scorecam", "ablationcam")
    assert core.GUIDED_METHODS == ("guided-backprop", "guided-gradcam")
    assert core.methods.ATTENTION_METHODS == ("rollout", "attention-grad")
    assert core.TARGET_FREE_METHODS == ("eigencam", "kpcacam", "randomcam")
    for name, entry in core.METHODS.items():
        assert (entry.function is not None) == (name in core.CAPTURE_METHODS)


def test_every_kind_has_a_driver() -> None:
    from anycam.explain import DRIVERS

    assert {entry.kind for entry in core.METHODS.values()} == set(DRIVERS)
