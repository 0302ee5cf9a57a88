"""Is the explanation any good? Faithfulness and localisation metrics, in pure NumPy.

``faithfulness`` (deletion, insertion, Average Drop, the blur and ROAD baselines) runs the model
on modified images through ``scoring``'s runner; ``confidence`` holds Average Gain and ADCC;
``road`` is ROAD (noisy linear imputation, MoRF/LeRF); ``localisation`` holds the pointing games;
``streaming`` accumulates them over a dataset; ``sanity`` is the model-randomisation check
(``anycam.sanity_check``); ``quantus`` lends an Explainer to Quantus. Nothing here imports a framework.
"""

from __future__ import annotations

from .confidence import AdccResult, GainResult, UndefinedCoherencyWarning, adcc, average_gain
from .faithfulness import (
    BASELINES,
    BLUR_SIGMA,
    SCORES,
    ConfidenceResult,
    CurveResult,
    average_drop_increase,
    blur,
    deletion,
    insertion,
)
from .localisation import energy_pointing_game, pointing_game
from .road import NEIGHBOUR_WEIGHTS, ROAD_NOISE, ROAD_PERCENTAGES, RoadResult, noisy_linear_imputation, road
from .scoring import Predict

__all__ = [
    "BASELINES",
    "BLUR_SIGMA",
    "NEIGHBOUR_WEIGHTS",
    "ROAD_NOISE",
    "ROAD_PERCENTAGES",
    "SCORES",
    "AdccResult",
    "ConfidenceResult",
    "CurveResult",
    "GainResult",
    "Predict",
    "RoadResult",
    "UndefinedCoherencyWarning",
    "adcc",
    "average_drop_increase",
    "average_gain",
    "blur",
    "deletion",
    "energy_pointing_game",
    "insertion",
    "noisy_linear_imputation",
    "pointing_game",
    "road",
]
