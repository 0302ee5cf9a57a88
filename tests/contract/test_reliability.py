"""Never a silently wrong map: the checks every backend makes, and sharing one Explainer.

Each test here failed before the check it covers existed (issue 10).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import anycam


def _jobs(case):  # type: ignore[no-untyped-def]
    """(batch size, target) pairs: different batch sizes and target forms."""
    return [
        (1, None),
        (3, 2),
        (2, [4, 0]),
        (3, anycam.top_k(2)),
        (2, None),
        (1, [3]),
    ]


def test_threads_sharing_an_explainer_get_the_single_threaded_answers(kit) -> None:
    """4 threads × 50 calls, different batch sizes and targets (issue 10, item 7)."""
    case = kit.case("conv2d")
    explainer = anycam.Explainer(case.model, case.layer, layout=case.layout, **case.options)
    jobs = _jobs(case)
    expected = [explainer(case.inputs[:size], target=target) for size, target in jobs]
    failures: list[BaseException] = []
    mismatches: list[int] = []

    def work(offset: int) -> None:
        try:
            for call in range(50):
                index = (call + offset) % len(jobs)
                size, target = jobs[index]
                heat = explainer(case.inputs[:size], target=target)
                if heat.shape != expected[index].shape or not np.allclose(heat, expected[index], atol=1e-5):
                    mismatches.append(index)
        except BaseException as exc:  # collected: an exception in a thread would be lost
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
    assert not mismatches


@pytest.mark.parametrize(
    "options",
    [{"no_such_option": 1}, {"model_kwargs": [("train", False)]}],
    ids=["unknown-option", "model-kwargs-not-a-dict"],
)
def test_configuration_type_errors_are_anycam_errors(kit, options) -> None:
    """Item 10: ``except anycam.AnycamError`` catches them, ``except TypeError`` still does."""
    case = kit.case("conv2d")
    with pytest.raises(anycam.ConfigTypeError) as info:
        anycam.Explainer(case.model, case.layer, **case.options, **options)
    assert isinstance(info.value, TypeError) and isinstance(info.value, anycam.AnycamError)
