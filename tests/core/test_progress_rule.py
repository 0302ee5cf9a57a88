"""The one progress rule (issue 20, item 3) at the metrics' entry points: True draws a real tqdm bar.

The Explainer's, TTA's and the sanity check's bars are checked through every backend in the
contract suite (tests/contract/test_contract.py).
"""

from __future__ import annotations

import numpy as np
import pytest

import anycam
from anycam.metrics import average_drop_increase, deletion, insertion


def sum_model(images: np.ndarray) -> np.ndarray:
    """Class 0's logit is the sum of all values; class 1's is 0."""
    total = images.reshape(len(images), -1).sum(axis=1)
    return np.stack([total, np.zeros_like(total)], axis=1)


INPUTS = np.random.default_rng(3).normal(size=(2, 1, 4, 4))
MAPS = np.random.default_rng(4).random((2, 4, 4))


@pytest.mark.parametrize(
    ("name", "run"),
    [
        ("deletion", lambda p: deletion(sum_model, INPUTS, MAPS, target=0, steps=4, progress=p)),
        ("insertion", lambda p: insertion(sum_model, INPUTS, MAPS, target=0, steps=4, progress=p)),
        ("average drop", lambda p: average_drop_increase(sum_model, INPUTS, MAPS, target=0, progress=p)),
        (
            "deletion",
            lambda p: anycam.StreamingMetrics(sum_model, steps=4, insertion_baseline="zeros", progress=p).update(
                INPUTS, MAPS, 0
            ),
        ),
    ],
    ids=["deletion", "insertion", "average_drop_increase", "StreamingMetrics"],
)
def test_progress_true_draws_a_bar_and_false_none(name: str, run, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tqdm")  # a dependency of anycam; the rule without it is in test_metrics
    run(True)
    drawn = capsys.readouterr().err
    assert f"{name}:" in drawn and "image" in drawn, drawn  # tqdm draws "deletion:   0%|  | 0/10 [...image/s]"
    run(False)
    assert capsys.readouterr().err == ""
