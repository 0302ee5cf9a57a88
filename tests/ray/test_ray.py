"""anycam.ray.BatchExplainer on a local Ray (num_cpus=2): the in-process maps, and no row lost when an actor dies."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import ray

import anycam
from anycam.ray import BatchExplainer
from tests.dataset.models import crashing_tiny_model, images, tiny_model

# Ray Data's own configuration warns about its deprecated settings at start-up; not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
COUNT = 24


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # One Ray instance for the module: starting Ray takes seconds. Workers import the factories
    # from tests/, so they get the repository on their path.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data():
    return images(COUNT)


def _dataset(data):
    # six blocks: Ray Data hands whole blocks to actors, so one block would keep one actor busy
    rows = [{"id": f"img-{i:04d}", "image": data[i]} for i in range(len(data))]
    return ray.data.from_items(rows, override_num_blocks=6)


def _in_process(data):
    """The reference: the in-process runner over the same images."""
    explainer = anycam.Explainer(tiny_model(), "features")
    stream = [{"image": data[s : s + 4], "id": [f"img-{i:04d}" for i in range(s, s + 4)]} for s in range(0, COUNT, 4)]
    results = list(anycam.explain_dataset(explainer, stream, fields=("heatmap", "target", "scores"), progress=False))
    return {name: np.concatenate([r[name] for r in results]) for name in ("id", "heatmap", "target", "scores")}


def _collect(ds):
    rows = ds.take_all()
    order = np.argsort([row["id"] for row in rows])
    return {name: np.stack([np.asarray(rows[i][name]) for i in order]) for name in rows[0]}


def test_two_actors_give_the_in_process_maps(data):
    out = _dataset(data).map_batches(
        BatchExplainer,
        fn_constructor_kwargs={"model_factory": tiny_model, "layer": "features"},
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=1,
        batch_size=5,  # other batches than the reference's: maps are per sample
        batch_format="numpy",
    )
    got, expected = _collect(out), _in_process(data)
    assert sorted(got) == ["heatmap", "id", "scores", "target"]
    np.testing.assert_array_equal(got["id"], expected["id"])
    np.testing.assert_array_equal(got["target"], expected["target"])
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["heatmap"], expected["heatmap"], atol=1e-5)
    assert got["heatmap"].dtype == np.float32 and got["heatmap"].shape == (COUNT, 16, 16)


def test_a_crashed_actor_is_restarted_and_no_row_is_lost_or_duplicated(data, tmp_path):
    marker = tmp_path / "crashed"
    out = _dataset(data).map_batches(
        BatchExplainer,
        fn_constructor_kwargs={
            "model_factory": functools.partial(crashing_tiny_model, str(marker)),
            "layer": "net.features",
        },
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=1,
        batch_size=4,
        batch_format="numpy",
    )
    got, expected = _collect(out), _in_process(data)
    assert marker.exists()  # an actor really died mid-run
    assert got["id"].tolist() == expected["id"].tolist()  # every row exactly once
    np.testing.assert_allclose(got["heatmap"], expected["heatmap"], atol=1e-5)


def test_batch_explainer_errors_are_clear():
    explain = BatchExplainer(tiny_model, "features", fields=("heatmap",), heatmap_dtype="float16")
    batch = {"image": images(2), "name": np.array(["a", "b"])}
    with pytest.raises(anycam.InputError, match="no id column 'id'"):
        explain(batch)
    result = BatchExplainer(tiny_model, "features", id_key="name", heatmap_dtype="float16")(batch)
    assert result["heatmap"].dtype == np.float16 and result["id"].tolist() == ["a", "b"]
    with pytest.raises(anycam.ConfigTypeError, match="not the model itself") as caught:
        BatchExplainer(tiny_model(), "features")
    assert isinstance(caught.value, TypeError)  # an AnycamError, and still the builtin it refines
    with pytest.raises(anycam.ConfigError, match="unknown heatmap_dtype"):
        BatchExplainer(tiny_model, "features", heatmap_dtype="int8")


def test_batch_explainer_options_reach_the_explainer():
    x = images(3)
    batch = {"image": x, "id": np.arange(3), "target": np.array([0, 1, 2])}
    tta = BatchExplainer(tiny_model, "features", method="layercam", scales=(1.0, 0.5), flip=True)(batch)
    explainer = anycam.Explainer(tiny_model(), "features", method="layercam")
    expected = anycam.TTAExplainer(explainer, scales=(1.0, 0.5), flip=True).explain(x, target=[0, 1, 2])
    np.testing.assert_array_equal(tta["heatmap"], expected.heatmap)
    np.testing.assert_array_equal(tta["target"], [0, 1, 2])  # the batch's own target column
    np.testing.assert_array_equal(tta["scores"], expected.scores)
