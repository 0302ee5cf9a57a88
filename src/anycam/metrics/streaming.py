"""Dataset-level metrics accumulated batch by batch, so a table needs no second pass over maps.

Every metric here is a per-sample value (a deletion AUC, a pointing-game hit), so the dataset
mean is exact when accumulated: each batch is scored by the functions of ``anycam.metrics``
(no metric math lives here) and only count, mean and the sum of squared deviations are kept,
merged with Chan et al.'s pairwise update (numerically stable, order-independent up to rounding).

>>> import numpy as np
>>> def predict(images):  # class 0 looks at the top-left pixel only
...     return np.stack([10 * images[:, 0, 0, 0], np.zeros(len(images))], axis=1)
>>> stream = StreamingMetrics(predict, names=("deletion",), steps=4, score="logit")
>>> images = np.ones((1, 1, 2, 2), dtype=np.float32)
>>> _ = stream.update(images, np.array([[[1.0, 0.0], [0.0, 0.0]]]), target=[0])
>>> stream.summary()["deletion_auc"]["mean"]
1.25
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import ConfigError, InputError
from . import confidence, faithfulness, localisation
from .road import ROAD_NOISE, ROAD_PERCENTAGES
from .road import road as road_curves
from .scoring import host_maps, to_numpy

#: The metrics :class:`StreamingMetrics` can accumulate, and the summary keys of each.
METRICS: dict[str, tuple[str, ...]] = {
    "deletion": ("deletion_auc",),
    "insertion": ("insertion_auc",),
    "pointing_game": ("pointing_game",),
    "energy_pointing_game": ("energy_pointing_game",),
    "average_drop": ("average_drop",),
    "average_gain": ("average_gain",),
    "adcc": ("adcc",),
    "road": ("road_morf", "road_lerf", "road_combined"),
}


class StreamingMetrics:
    """Deletion/insertion AUC, ROAD, Average Drop/Gain, ADCC and the pointing games, summed over batches.

    Args:
        predict: what ``anycam.metrics.deletion`` takes: an Explainer, a Backend or a callable
            from a NumPy batch to ``(B, classes)`` outputs.
        names: any of ``"deletion"``, ``"insertion"``, ``"pointing_game"``,
            ``"energy_pointing_game"`` (these two need regions with every batch),
            ``"average_drop"`` (percent, per sample), ``"average_gain"`` (percent),
            ``"adcc"`` (needs an Explainer as ``predict`` or ``explain``) and ``"road"``
            (keys ``road_morf``, ``road_lerf``: each sample's mean over the percentages, and
            ``road_combined``; see ``anycam.metrics.road``).
        steps, score, batch_size, input_layout: as in ``anycam.metrics.deletion``.
        deletion_baseline, insertion_baseline: the ``baseline`` of each curve (RISE's defaults).
        tolerance: the pointing game's tolerance in pixels (15 in Zhang et al.).
        road_percentages, road_noise, seed: ROAD's ``percentages``, ``noise`` and ``seed``.
        explain: what ADCC explains the masked images with (``anycam.metrics.adcc``); None
            takes ``predict`` when it is an Explainer.
        progress: a bar over each batch's deletion/insertion forwards: True always, False
            never, None (default) once a batch has taken over 2 s (the rule of every anycam
            progress bar). Not part of ``config()``: it decides no value.

    Raises:
        anycam.ConfigError: an unknown metric name, or a ``score`` that is not a string.
    """

    def __init__(
        self,
        predict: Any,
        names: Sequence[str] = ("deletion", "insertion"),
        *,
        steps: int = 100,
        score: str = "probability",
        batch_size: int = 64,
        deletion_baseline: Any = "zeros",
        insertion_baseline: Any = "blur",
        tolerance: int = 0,
        input_layout: str | None = None,
        progress: bool | None = None,
        road_percentages: Sequence[float] = ROAD_PERCENTAGES,
        road_noise: float = ROAD_NOISE,
        seed: int = 0,
        explain: Any = None,
    ) -> None:
        names = (names,) if isinstance(names, str) else tuple(names)
        unknown = [n for n in names if n not in METRICS]
        if unknown or not names:
            raise ConfigError(f"unknown metric(s) {unknown or names}; choose from {', '.join(METRICS)}")
        if not isinstance(score, str):
            raise ConfigError("score must be 'probability' or 'logit' here (a function cannot be stored in the config)")
        if "adcc" in names and explain is None:
            from ..explain.explainer import Explainer

            if not isinstance(predict, Explainer):
                raise ConfigError("the 'adcc' metric explains masked images: pass explain=, or an Explainer as predict")
        self.predict = predict
        self.names = names
        self.explain = explain
        self.road_options: dict[str, Any] = {
            "percentages": [float(p) for p in road_percentages],
            "noise": float(road_noise),
            "seed": int(seed),
        }
        self.options: dict[str, Any] = {
            "steps": steps,
            "score": score,
            "batch_size": batch_size,
            "input_layout": input_layout,
        }
        self.deletion_baseline = deletion_baseline
        self.insertion_baseline = insertion_baseline
        self.tolerance = tolerance
        self.progress = progress
        # count, mean, M2 per summary key (Chan et al. 1979: pairwise merge of partial moments)
        self._moments: dict[str, tuple[int, float, float]] = {k: (0, 0.0, 0.0) for n in names for k in METRICS[n]}

    def config(self) -> dict[str, Any]:
        """The settings that decide the values, as JSON (a resumed store must match them)."""
        return {
            "names": list(self.names),
            **self.options,
            "deletion_baseline": _describe(self.deletion_baseline),
            "insertion_baseline": _describe(self.insertion_baseline),
            "tolerance": self.tolerance,
            # Only where they decide a value, so stores written before ROAD still match.
            **({"road": self.road_options} if "road" in self.names else {}),
        }

    def update(self, inputs: Any, heatmaps: Any, target: Any = None, *, regions: Any = None) -> dict[str, np.ndarray]:
        """Scores one batch, adds it to the totals and returns its per-sample values.

        Args:
            inputs: ``(N, C, *S)`` (or ``(N, *S, C)`` with a channels-last layout), NumPy or a
                framework's array (copied to the host once).
            heatmaps: ``(N, *S)`` one map per sample, NumPy or a framework's array (native-mode
                maps, copied to the host once), or an ``Explanation`` (its ``heatmap``).
            target: the explained classes ``(N,)`` (``Explanation.target``), None (argmax) or a
                callable, as in ``anycam.metrics.deletion``.
            regions: masks or boxes for the pointing games (as in ``anycam.metrics.pointing_game``).

        Returns:
            ``{summary key: (N,) values}``.

        Raises:
            anycam.InputError: several maps per sample, or a pointing game without regions.
        """
        # Framework arrays (native-mode maps, device inputs) are copied to the host once, here.
        maps = np.asarray(host_maps(heatmaps))
        images = np.asarray(to_numpy(inputs, "inputs"))
        if maps.ndim != images.ndim - 1:
            raise InputError(
                f"streaming metrics take one map per sample, got heatmaps of shape {maps.shape} for inputs "
                f"of shape {images.shape}; explain one target per sample (not top_k or (N, K) targets)"
            )
        values: dict[str, np.ndarray] = {}
        for name in self.names:
            if name in ("deletion", "insertion"):
                function = faithfulness.deletion if name == "deletion" else faithfulness.insertion
                baseline = self.deletion_baseline if name == "deletion" else self.insertion_baseline
                result = function(
                    self.predict, images, maps, target, baseline=baseline, progress=self.progress, **self.options
                )
                values[METRICS[name][0]] = np.asarray(result.auc, dtype=np.float64)
            elif name in ("average_drop", "average_gain", "adcc", "road"):
                values.update(self._confidence(name, images, maps, target))
            else:
                if regions is None:
                    raise InputError(
                        f"{name} needs regions (masks or boxes) with every batch; give mapping batches a "
                        "'regions' column"
                    )
                if name == "pointing_game":
                    hits = localisation.pointing_game(maps, regions, tolerance=self.tolerance)
                    values[METRICS[name][0]] = np.asarray(hits, dtype=np.float64)
                else:
                    energy = localisation.energy_pointing_game(maps, regions)
                    values[METRICS[name][0]] = np.asarray(energy, dtype=np.float64)
        self.add(values)
        return values

    def _confidence(self, name: str, images: np.ndarray, maps: np.ndarray, target: Any) -> dict[str, np.ndarray]:
        common = {"progress": self.progress, **self.options}
        common.pop("steps")  # only the deletion/insertion curves take it
        if name == "road":
            road = road_curves(self.predict, images, maps, target, **self.road_options, **common)
            assert road.morf_mean is not None and road.lerf_mean is not None and road.combined is not None
            return {"road_morf": road.morf_mean, "road_lerf": road.lerf_mean, "road_combined": road.combined}
        if name == "average_drop":
            return {
                "average_drop": faithfulness.average_drop_increase(self.predict, images, maps, target, **common).drop
            }
        if name == "average_gain":
            return {"average_gain": confidence.average_gain(self.predict, images, maps, target, **common).gain}
        result = confidence.adcc(self.predict, images, maps, target, explain=self.explain, **common)
        return {"adcc": result.per_sample}

    def add(self, values: Mapping[str, Any]) -> None:
        """Adds stored per-sample values (``{summary key: (N,)}``) to the totals, as on resume."""
        for key in self._moments:
            if key not in values:
                raise InputError(f"stored metric values lack {key!r} (have {sorted(values)})")
            batch = np.asarray(values[key], dtype=np.float64).reshape(-1)
            if not batch.size:
                continue
            count, mean, m2 = self._moments[key]
            batch_mean = float(batch.mean())
            batch_m2 = float(((batch - batch_mean) ** 2).sum())
            total = count + batch.size
            delta = batch_mean - mean
            self._moments[key] = (
                total,
                mean + delta * batch.size / total,
                m2 + batch_m2 + delta * delta * count * batch.size / total,
            )

    def summary(self) -> dict[str, dict[str, float]]:
        """Returns ``{key: {"mean", "std", "sem", "count"}}`` over every sample so far.

        For the pointing game the mean is the accuracy (hits / samples). ``std`` is the sample
        standard deviation (ddof=1), ``sem`` = std/√count; both NaN below two samples.
        """
        table = {}
        for key, (count, mean, m2) in self._moments.items():
            std = math.sqrt(m2 / (count - 1)) if count > 1 else math.nan
            table[key] = {
                "mean": mean if count else math.nan,
                "std": std,
                "sem": std / math.sqrt(count) if count > 1 else math.nan,
                "count": float(count),
            }
        return table


def _describe(value: Any) -> Any:
    if isinstance(value, (str, int, float)) or value is None:
        return value
    array = np.asarray(value)
    return f"array {array.dtype}{list(array.shape)} sum={float(array.sum()):.9g}"
