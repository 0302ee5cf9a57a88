"""explain_dataset: streaming, the Parquet store, resume after a kill, bad input, streaming metrics."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import anycam
from anycam.dataset import LOCK, MANIFEST, ExplanationStore
from tests.dataset.models import batches, images, tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def explainer():
    return anycam.Explainer(tiny_model(), "features")


@pytest.fixture(scope="module")
def data():
    return images(10)


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_stream_yields_each_batch_in_order_as_the_explainer_gives_it(explainer, data):
    results = list(anycam.explain_dataset(explainer, batches(data, 4), fields=("heatmap", "cam", "scores", "target")))
    expected = [[f"img-{i:04d}" for i in range(s, min(s + 4, 10))] for s in (0, 4, 8)]
    assert [r["id"].tolist() for r in results] == expected
    for start, result in zip((0, 4, 8), results, strict=True):
        ex = explainer.explain(data[start : start + 4])
        np.testing.assert_array_equal(result["heatmap"], ex.heatmap)
        np.testing.assert_array_equal(result["cam"], ex.cam)
        np.testing.assert_array_equal(result["scores"], ex.scores)
        with torch.no_grad():
            argmax = tiny_model()(torch.from_numpy(data[start : start + 4])).argmax(1).numpy()
        np.testing.assert_array_equal(result["target"], argmax)


def test_plain_arrays_get_running_ids_and_pairs_carry_their_target(explainer, data):
    plain = list(anycam.explain_dataset(explainer, batches(data, 4, ids=False)))
    assert np.concatenate([r["id"] for r in plain]).tolist() == list(range(10))
    pairs = [(data[:4], 3), (data[4:], [1] * 6)]
    results = list(anycam.explain_dataset(explainer, pairs, fields=("heatmap", "target")))
    assert results[0]["target"].tolist() == [3] * 4 and results[1]["target"].tolist() == [1] * 6
    np.testing.assert_array_equal(results[0]["heatmap"], explainer(data[:4], target=3))


def test_a_torch_data_loader_of_image_label_pairs_is_explained_with_its_labels(explainer, data):
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(data), torch.arange(10) % 5), batch_size=4
    )
    results = list(anycam.explain_dataset(explainer, loader, fields=("heatmap", "target"), progress=False))
    assert np.concatenate([r["target"] for r in results]).tolist() == [i % 5 for i in range(10)]
    np.testing.assert_array_equal(results[2]["heatmap"], explainer(data[8:], target=[3, 4]))


def test_store_holds_what_the_stream_yields_with_an_index_of_ids(explainer, data, tmp_path):
    fields = ("heatmap", "scores", "target")
    store = anycam.explain_dataset(explainer, batches(data, 4), out=tmp_path / "s", fields=fields, part_size=3)
    assert isinstance(store, ExplanationStore) and store.complete and len(store) == 10
    # part_size=3 with batches of 4, 4, 2: a batch is never split, so one part per batch
    assert sorted(p.name for p in (tmp_path / "s").glob("part-*")) == [f"part-00000{i}.parquet" for i in range(3)]
    streamed = list(anycam.explain_dataset(explainer, batches(data, 4), fields=fields))
    for name in fields:
        np.testing.assert_array_equal(store.read(name), np.concatenate([r[name] for r in streamed]))
    assert store.ids.tolist() == [f"img-{i:04d}" for i in range(10)]
    assert store.index["img-0005"] == (1, 1)
    row = store.get("img-0005")
    np.testing.assert_array_equal(row["heatmap"], explainer(data[5:6])[0])
    # what a reader without anycam sees: plain Parquet columns, shapes in the schema metadata
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "s" / "part-000001.parquet")
    meta = json.loads(table.schema.metadata[b"anycam"])
    assert meta["shapes"]["heatmap"] == [16, 16] and table.num_rows == 4


def test_float16_heatmaps_halve_the_column_and_stay_within_half_precision(explainer, data, tmp_path):
    store = anycam.explain_dataset(explainer, [data], out=tmp_path / "h", heatmap_dtype="float16")
    stored = store.read("heatmap")
    assert stored.dtype == np.float16
    exact = explainer(data)
    # float16 has an 11-bit significand: spacing 2^-11 on [0.5, 1], rounding error at most half of it
    assert np.abs(stored.astype(np.float32) - exact).max() <= 2.0**-12
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pq.read_schema(tmp_path / "h" / "part-000000.parquet").field("heatmap").type
    assert column.value_type == pa.float16() and column.list_size == 16 * 16


def test_attribution_is_stored_for_the_guided_methods(data, tmp_path):
    guided = anycam.Explainer(tiny_model(), "features", method="guided-gradcam")
    store = anycam.explain_dataset(guided, [data], out=tmp_path / "g", fields=("heatmap", "attribution"))
    np.testing.assert_array_equal(store.read("attribution"), guided.explain(data).attribution)
    assert store.read("attribution").shape == (10, 3, 16, 16)


def test_progress_bar_counts_images_per_second(explainer, data, capsys):
    list(anycam.explain_dataset(explainer, batches(data, 4), progress=True, total=10))
    err = capsys.readouterr().err
    assert "10/10" in err and "image/s" in err


_KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import anycam
    from tests.dataset.models import batches, images, tiny_model

    replaces = 0
    real_replace = os.replace

    def replace_then_die(source, target):
        # The third part is written whole under its temporary name; the process dies before
        # the rename that would make it visible: the worst moment to be killed.
        global replaces
        if os.path.basename(str(target)).startswith("part-"):
            replaces += 1
            if replaces == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        real_replace(source, target)

    os.replace = replace_then_die
    explainer = anycam.Explainer(tiny_model(), "features")
    anycam.explain_dataset(explainer, batches(images(10), 2), out=sys.argv[1], fields=("heatmap", "scores", "target"),
                           part_size=3, progress=False)
    """
)


def test_a_killed_run_resumes_to_a_store_identical_to_an_uninterrupted_one(tmp_path):
    fields = ("heatmap", "scores", "target")
    killed = tmp_path / "killed"
    run = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, str(killed)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == -9, run.stderr
    # What the killed run left: two committed parts (batches 0–3), the third one's temporary file,
    # and its writer's lock, which names a process that no longer exists (taken over below).
    leftovers = sorted(p.name for p in killed.iterdir())
    assert leftovers[0] == LOCK and leftovers[1].startswith(".part-000002.parquet.tmp-"), leftovers
    assert json.loads((killed / LOCK).read_text())["pid"] not in (os.getpid(), None)
    half = ExplanationStore(killed)
    assert not half.complete and len(half) == 8
    assert half.ids.tolist() == [f"img-{i:04d}" for i in range(8)]

    explainer = anycam.Explainer(tiny_model(), "features")
    calls = []
    original = explainer.explain

    def counting(inputs, target=None):
        calls.append(len(inputs))
        return original(inputs, target)

    explainer.explain = counting  # type: ignore[method-assign]
    resumed = anycam.explain_dataset(
        explainer, batches(images(10), 2), out=killed, fields=fields, part_size=3, progress=False
    )
    assert calls == [2]  # only batch 4 was explained again; batches 0–3 were skipped
    assert resumed.complete and len(resumed) == 10
    whole = tmp_path / "whole"
    anycam.explain_dataset(
        anycam.Explainer(tiny_model(), "features"),
        batches(images(10), 2),
        out=whole,
        fields=fields,
        part_size=3,
        progress=False,
    )
    assert _files(killed) == _files(whole)  # byte for byte, manifest and index included


def test_resume_refuses_another_configuration_naming_each_difference(data, tmp_path):
    out = tmp_path / "s"
    anycam.explain_dataset(anycam.Explainer(tiny_model(), "features"), [data], out=out)
    other = anycam.Explainer(tiny_model(), "features", method="gradcam++")
    with pytest.raises(anycam.StoreMismatchError, match=r"method: store has 'gradcam', this run has 'gradcam\+\+'"):
        anycam.explain_dataset(other, [data], out=out)
    with pytest.raises(anycam.StoreMismatchError, match=r"heatmap_dtype: store has 'float32', this run has 'float16'"):
        anycam.explain_dataset(anycam.Explainer(tiny_model(), "features"), [data], out=out, heatmap_dtype="float16")
    with pytest.raises(ValueError, match=r"metadata: store has \{\}, this run has \{'weights': 'v2'\}"):
        anycam.explain_dataset(anycam.Explainer(tiny_model(), "features"), [data], out=out, metadata={"weights": "v2"})
    native = anycam.Explainer(tiny_model(), "features", arrays="native")
    with pytest.raises(anycam.StoreMismatchError, match=r"arrays: store has None, this run has 'native'"):
        anycam.explain_dataset(native, [data], out=out)


def test_a_native_store_is_resumed_only_in_native_mode_and_numpy_stores_keep_their_manifest(data, tmp_path):
    anycam.explain_dataset(anycam.Explainer(tiny_model(), "features"), [data], out=tmp_path / "numpy")
    assert "arrays" not in json.loads((tmp_path / "numpy" / MANIFEST).read_text())["config"]
    out = tmp_path / "native"
    anycam.explain_dataset(anycam.Explainer(tiny_model(), "features", arrays="native"), [data], out=out)
    with pytest.raises(anycam.StoreMismatchError, match=r"arrays: store has 'native', this run has None"):
        anycam.explain_dataset(anycam.Explainer(tiny_model(), "features"), [data], out=out)


def test_resume_refuses_batches_that_come_back_different(explainer, tmp_path):
    out = tmp_path / "s"
    data = images(8)
    with pytest.raises(RuntimeError, match="stop"):
        anycam.explain_dataset(explainer, _stopping(batches(data, 2), after=2), out=out, part_size=2, progress=False)
    shuffled = batches(data, 2)[::-1]
    with pytest.raises(
        anycam.StoreMismatchError, match="batch 0 has id 'img-0006' at position 0 where the store holds 'img-0000'"
    ):
        anycam.explain_dataset(explainer, shuffled, out=out, part_size=2, progress=False)
    with pytest.raises(anycam.StoreMismatchError, match="the batches ended after 1, but the store already holds 2"):
        anycam.explain_dataset(explainer, batches(data, 2)[:1], out=out, part_size=2, progress=False)


def _stopping(items, after):
    for index, item in enumerate(items):
        if index == after:
            raise RuntimeError("stop")
        yield item


def test_a_write_error_leaves_a_consistent_store_and_says_what_was_written(explainer, monkeypatch, tmp_path):
    out = tmp_path / "s"
    data = images(10)
    real_fsync = os.fsync
    calls = {"n": 0}

    def full_disk(fd):
        calls["n"] += 1
        if calls["n"] == 4:  # the manifest, part 0, its manifest, then part 1 fails after its bytes were written
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(anycam.StoreWriteError) as caught:
        anycam.explain_dataset(explainer, batches(data, 4), out=out, progress=False, part_size=4)
    message = str(caught.value)
    assert "part-000001.parquet (batches 1–1, 4 images) failed: No space left on device" in message
    assert "holds 1 complete part(s), 4 images (batches 0–0, last id 'img-0003')" in message
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "part-000000.parquet"]  # no temporary left
    assert len(ExplanationStore(out)) == 4
    monkeypatch.setattr(os, "fsync", real_fsync)
    resumed = anycam.explain_dataset(explainer, batches(data, 4), out=out, progress=False, part_size=4)
    whole = anycam.explain_dataset(explainer, batches(data, 4), out=tmp_path / "w", progress=False, part_size=4)
    assert _files(resumed.path) == _files(whole.path)


def test_a_new_input_shape_starts_a_new_part_and_is_never_mixed(explainer, tmp_path):
    small, large = images(3, size=16), images(2, size=24, seed=5)
    stream = [{"image": small, "id": [0, 1, 2]}, {"image": large, "id": [3, 4]}]
    store = anycam.explain_dataset(explainer, stream, out=tmp_path / "s", part_size=100, fields=("heatmap", "scores"))
    assert len(list(store.parts())) == 2
    np.testing.assert_array_equal(store.get(4)["heatmap"], explainer(large)[1])
    assert store.get(1)["heatmap"].shape == (16, 16)
    with pytest.raises(anycam.InputError, match=r"several shapes \[\(16, 16\), \(24, 24\)\]"):
        store.read("heatmap")
    np.testing.assert_array_equal(store.read("scores")[3:], explainer.explain(large).scores)
    with pytest.raises(KeyError, match="'cam' is not stored; the store has"):
        store.read("cam")


def test_bad_fields_ids_and_targets_raise_clear_errors(explainer, data, tmp_path):
    with pytest.raises(anycam.InputError, match="unknown field"):
        anycam.explain_dataset(explainer, [data], fields=("heatmaps",))
    with pytest.raises(anycam.InputError, match="'attribution' is None for method 'gradcam'"):
        list(anycam.explain_dataset(explainer, [data], fields=("attribution",)))
    with pytest.raises(anycam.InputError, match="drop 'target'"):
        list(anycam.explain_dataset(explainer, [data], target=lambda out: out[:, 0], fields=("target",)))
    repeated = [{"image": data[:2], "id": ["a", "b"]}, {"image": data[2:4], "id": ["c", "a"]}]
    with pytest.raises(anycam.InputError, match=r"batch 1 repeats id\(s\) \['a'\]"):
        anycam.explain_dataset(explainer, repeated, out=tmp_path / "r", progress=False)
    with pytest.raises(anycam.TargetError, match="given too"):
        list(anycam.explain_dataset(explainer, [(data, 1)], target=2))
    with pytest.raises(anycam.InputError, match="input_key="):
        list(anycam.explain_dataset(explainer, [{"pixels": data}]))


def test_a_store_without_pyarrow_names_the_extra_before_any_work(explainer, data, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what an uninstalled package looks like to import
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(anycam.MissingExtraError, match=r'pip install "anycam\[dataset\]"'):
        anycam.explain_dataset(explainer, [data], out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_streaming_metrics_equal_one_pass_over_all_maps_and_survive_a_resume(explainer, tmp_path):
    data = images(6)
    regions = np.zeros((6, 16, 16), dtype=bool)
    regions[:, :8, :8] = True
    stream = [{"image": data[s : s + 2], "regions": regions[s : s + 2]} for s in (0, 2, 4)]
    names = ("deletion", "insertion", "pointing_game", "energy_pointing_game")
    metrics = anycam.StreamingMetrics(explainer, names, steps=8)
    for _ in anycam.explain_dataset(explainer, stream, metrics=metrics):
        pass
    summary = metrics.summary()
    heat = explainer(data)
    target = explainer.explain(data).target
    deletion = anycam.metrics.deletion(explainer, data, heat, target, steps=8).auc
    insertion = anycam.metrics.insertion(explainer, data, heat, target, steps=8).auc
    hits = anycam.metrics.pointing_game(heat, regions)
    for key, values in (("deletion_auc", deletion), ("insertion_auc", insertion), ("pointing_game", hits)):
        assert summary[key]["count"] == 6
        np.testing.assert_allclose(summary[key]["mean"], np.mean(values), rtol=1e-12)
        np.testing.assert_allclose(summary[key]["std"], np.std(values, ddof=1), rtol=1e-9)
    # resumed: the stored per-sample values count, so the summary is the uninterrupted one
    out = tmp_path / "m"
    first = anycam.StreamingMetrics(explainer, names, steps=8)
    with pytest.raises(RuntimeError):
        anycam.explain_dataset(explainer, _stopping(stream, after=2), out=out, metrics=first, part_size=2)
    again = anycam.StreamingMetrics(explainer, names, steps=8)
    anycam.explain_dataset(explainer, stream, out=out, metrics=again, part_size=2)
    for key, row in again.summary().items():
        assert row == pytest.approx(summary[key], rel=1e-12), key
    with pytest.raises(anycam.StoreMismatchError, match="metrics"):
        anycam.explain_dataset(explainer, stream, out=out, metrics=anycam.StreamingMetrics(explainer, steps=4))
    with pytest.raises(anycam.InputError, match="needs regions"):
        list(anycam.explain_dataset(explainer, [data], metrics=anycam.StreamingMetrics(explainer, ("pointing_game",))))
