"""A user's ``layout=`` alone decides an undecided JAX model's reading (issue 19, item 3).

The Equinox sequence model of ``test_layout_ambiguity`` reads both ways and is refused without a
layout; ``layout="channels_last"`` says its layer is 16 features over 77 positions, which fits
only the channels-last input reading, so the map is drawn over the positions, as plain
``jax.vjp`` Grad-CAM computes it. ``input_layout=`` is not needed as well.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import anycam
from tests.jax.test_layout_ambiguity import POSITIONS, Protein, gradcam_over_positions, sequences

pytestmark = pytest.mark.jax


@pytest.mark.parametrize("form", ["equinox", "functions"])
def test_layout_alone_decides_a_sequence_model_that_reads_both_ways(form: str) -> None:
    protein = Protein(jax.random.key(0))
    model = (
        protein
        if form == "equinox"
        else (jax.vmap(protein.embed), jax.vmap(lambda a: protein.out(protein.head_features(a))))
    )
    layer = "embed" if form == "equinox" else None
    x = sequences()
    with pytest.raises(anycam.InputError, match=r"cannot tell.*input_layout=.*layout="):
        anycam.Explainer(model, layer, backend="jax").explain(x)
    result = anycam.Explainer(model, layer, layout="channels_last", backend="jax").explain(x)
    expected = gradcam_over_positions(protein, x)
    assert result.cam.shape == (2, POSITIONS)
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(result.cam / scale, expected / scale, atol=1e-5)
