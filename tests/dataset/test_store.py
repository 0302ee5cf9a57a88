"""The store's guarantees: damaged or lost files named, one writer at a time, a fingerprint of what it holds.

Each test damages a store the way a user or a crash would (a lost part, a truncated file, a
hand-edited manifest, a second writer, other data or weights on a rerun) and checks that anycam
names the cause instead of returning another image's map, a raw pyarrow/JSON error, or the old
store without a word.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import anycam
from anycam.dataset import (
    LOCK,
    MANIFEST,
    ExplanationStore,
    StoreCorruptError,
    StoreFormatError,
    StoreKeyError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
)
from tests.dataset.models import batches, images, tiny_model

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("heatmap", "scores", "target")


@pytest.fixture(scope="module")
def explainer():
    return anycam.Explainer(tiny_model(), "features")


def _write(explainer, out, data=None, size=2, **options):
    """A store of 10 images in batches of 2, one part per batch (5 parts)."""
    data = images(10) if data is None else data
    options = {"fields": FIELDS, "part_size": 2, "progress": False, **options}
    return anycam.explain_dataset(explainer, batches(data, size), out=out, **options)


class _Counting:
    """Wraps an Explainer and records the size of every batch it explains."""

    def __init__(self, explainer):
        self.inner = explainer
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def explain(self, inputs, target=None):
        self.calls.append(len(inputs))
        return self.inner.explain(inputs, target)


# --------------------------------------------------------------------------------------------
# Lost, truncated, replaced or hand-edited files


def test_a_lost_part_is_named_and_get_never_returns_another_images_row(explainer, tmp_path):
    out = tmp_path / "s"
    _write(explainer, out)
    (out / "part-000001.parquet").unlink()
    with pytest.raises(StoreCorruptError, match=r"part-000001\.parquet .* is missing"):
        ExplanationStore(out)
    with pytest.raises(StoreCorruptError, match=r"part-000001\.parquet .* is missing"):
        _write(explainer, out)  # a rerun does not build on it either


def test_a_part_replaced_by_another_is_refused_by_get_and_verify(explainer, tmp_path):
    out = tmp_path / "s"
    _write(explainer, out)
    shutil.copyfile(out / "part-000002.parquet", out / "part-000001.parquet")
    with pytest.raises(StoreCorruptError, match=r"part-000001\.parquet .* has \d+ bytes where \d+ were written"):
        ExplanationStore(out)  # the cheap check on opening: the sizes differ
    # Where the sizes agree (here: the manifest edited to match), the bytes do not.
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["parts"][1]["bytes"] = (out / "part-000001.parquet").stat().st_size
    (out / MANIFEST).write_text(json.dumps(manifest))
    store = ExplanationStore(out)
    with pytest.raises(StoreCorruptError, match=r"part-000001\.parquet .* does not match the checksum"):
        store.get("img-0002")
    np.testing.assert_array_equal(store.get("img-0004")["heatmap"], explainer(images(10)[4:6])[0])
    with pytest.raises(StoreCorruptError, match=r"part-000001\.parquet .* does not match the checksum"):
        store.verify()
    with pytest.raises(StoreCorruptError, match=r"part-000001\.parquet .* does not match the checksum"):
        _write(explainer, out)


def test_an_index_out_of_step_with_its_parts_never_gives_another_images_row(explainer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "s"
    _write(explainer, out)
    index = pq.read_table(out / "index.parquet").to_pydict()
    index["id"][2], index["id"][4] = index["id"][4], index["id"][2]  # img-0002 now points at img-0004's row
    pq.write_table(pa.table(index), out / "index.parquet")
    store = ExplanationStore(out)
    with pytest.raises(StoreCorruptError, match=r"part-000002\.parquet .* does not hold id 'img-0002'"):
        store.get("img-0002")
    with pytest.raises(StoreCorruptError, match=r"index\.parquet .* does not place id 'img-0002' at row 0"):
        store.verify()


def test_a_truncated_part_is_named_not_a_raw_pyarrow_error(explainer, tmp_path):
    out = tmp_path / "s"
    _write(explainer, out)
    path = out / "part-000003.parquet"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StoreCorruptError, match=r"part-000003\.parquet .* has 100 bytes where \d+ were written"):
        ExplanationStore(out)
    with pytest.raises(StoreCorruptError, match=r"part-000003\.parquet"):
        _write(explainer, out)
    # A part damaged where no manifest lists its size still names the file, not pyarrow's words.
    from anycam.dataset.store import read_part

    with pytest.raises(StoreCorruptError, match=r"part-000003\.parquet .* cannot be read as Parquet"):
        read_part(path, None)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text[: len(text) // 2], r"anycam-store\.json' cannot be read"),
        (lambda text: "[1, 2]", "is not a JSON object"),
        (lambda text: text.replace('"parts"', '"chunks"'), "'parts' is not a list"),
        (lambda text: text.replace('"part-000001.parquet"', '"part-000007.parquet"'), "does not name part-000000"),
        (lambda text: text.replace('"rows": 10', '"rows": 12'), "'rows' is not the sum"),
        (lambda text: text.replace('"complete": true', '"complete": "yes"'), "'complete' is not true or false"),
    ],
)
def test_a_hand_edited_manifest_is_named_not_a_raw_json_error(explainer, tmp_path, edit, message):
    out = tmp_path / "s"
    _write(explainer, out)
    manifest = out / MANIFEST
    edited = edit(manifest.read_text())
    assert edited != manifest.read_text()
    manifest.write_text(edited)
    with pytest.raises(StoreCorruptError, match=message) as caught:
        ExplanationStore(out)
    assert "overwrite=True" in str(caught.value)
    with pytest.raises(StoreCorruptError, match=message):
        _write(explainer, out)


def test_an_unknown_format_version_is_refused_before_anything_is_read(explainer, tmp_path):
    out = tmp_path / "s"
    _write(explainer, out)
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "format": 3}))
    with pytest.raises(StoreFormatError, match="format version 3; this anycam reads format 2 only"):
        ExplanationStore(out)
    with pytest.raises(StoreFormatError, match="format version 3"):
        _write(explainer, out)
    # A store of the first format kept its version in the configuration and had no checksums.
    del manifest["format"]
    manifest["config"]["format"] = 1
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreFormatError, match="format version 1; .*written by an earlier anycam"):
        ExplanationStore(out)
    rewritten = _write(explainer, out, overwrite=True)
    assert rewritten.complete and len(rewritten) == 10
    ExplanationStore(out).verify()


def test_a_missing_store_or_id_or_column_is_an_anycam_error_and_the_builtin(explainer, tmp_path):
    with pytest.raises(StoreNotFoundError, match="no anycam store") as caught:
        ExplanationStore(tmp_path / "nothing")
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, anycam.AnycamError)
    store = _write(explainer, tmp_path / "s")
    with pytest.raises(StoreKeyError, match="id 'img-9' is not in the store") as missing:
        store.get("img-9")
    assert isinstance(missing.value, KeyError) and str(missing.value).startswith("id 'img-9'")
    with pytest.raises(StoreKeyError, match="'cam' is not stored"):
        store.read("cam")


# --------------------------------------------------------------------------------------------
# One writer at a time

_BLOCKED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import anycam
    from tests.dataset.models import batches, images, tiny_model

    started, release = Path(sys.argv[2]), Path(sys.argv[3])

    def waiting(stream):
        for index, batch in enumerate(stream):
            if index == 1:  # the lock is held and a part is committed: hold on until released
                started.touch()
                while not release.exists():
                    time.sleep(0.05)
            yield batch

    explainer = anycam.Explainer(tiny_model(), "features")
    store = anycam.explain_dataset(explainer, waiting(batches(images(10), 2)), out=sys.argv[1],
                                   fields=("heatmap", "scores", "target"), part_size=2, progress=False)
    print(len(store), store.complete)
    """
)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(explainer, tmp_path):
    out, started, release = tmp_path / "s", tmp_path / "started", tmp_path / "release"
    first = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_WRITER, str(out), str(started), str(release)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first writer never started"
            time.sleep(0.05)
        with pytest.raises(StoreLockedError) as caught:
            _write(explainer, out)
        message = str(caught.value)
        assert f"pid {first.pid} on host {socket.gethostname()!r} (that process is running)" in message
        assert str(out / LOCK) in message and "delete the lock file" in message
    finally:
        release.touch()
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert stdout.split() == ["10", "True"]
    assert not (out / LOCK).exists()
    # The first writer's store is whole: every map is the explainer's.
    store = ExplanationStore(out)
    store.verify()
    expected = np.concatenate([explainer(images(10)[s : s + 2]) for s in range(0, 10, 2)])
    np.testing.assert_array_equal(store.read("heatmap"), expected)


def test_a_second_writer_in_the_same_process_is_refused(explainer, tmp_path):
    out = tmp_path / "s"
    inner: list[Exception] = []

    class Reentrant(_Counting):
        def explain(self, inputs, target=None):
            if not inner:
                try:
                    _write(explainer, out)
                except StoreLockedError as exc:
                    inner.append(exc)
            return super().explain(inputs, target)

    store = _write(Reentrant(explainer), out)
    assert len(inner) == 1 and "another explain_dataset call of this process" in str(inner[0])
    assert store.complete and len(store) == 10 and not (out / LOCK).exists()


def test_a_stale_lock_is_taken_over_on_its_host_and_a_foreign_one_is_not(explainer, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "start": None}))
    assert _write(explainer, out).complete  # its writer is gone: the lock is stale
    assert not (out / LOCK).exists()
    # Our own pid, left by an earlier process that had it (a container restarting with the same pid).
    (out / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": "0"}))
    assert _write(explainer, out).complete
    (out / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": None}))
    with pytest.raises(StoreLockedError, match="on host 'elsewhere' .*taken on another host.*delete the lock file"):
        _write(explainer, out)
    assert (out / LOCK).exists()  # never broken automatically


def test_of_two_runs_breaking_one_stale_lock_the_slower_is_refused(explainer, tmp_path, monkeypatch):
    out = tmp_path / "s"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    (out / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": host, "start": None}))
    fresh = {"pid": os.getppid(), "host": host, "start": None}  # a live process
    real_rename = os.rename

    def faster_run_first(source, target):
        # Between our reading the stale lock and moving it aside, another run broke it and took the store.
        if str(source).endswith(LOCK):
            Path(source).write_text(json.dumps(fresh))
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", faster_run_first)
    with pytest.raises(StoreLockedError, match=f"pid {fresh['pid']} on host .*it took the store just now"):
        _write(explainer, out)
    assert json.loads((out / LOCK).read_text()) == fresh  # the other run's lock is back in place
    assert sorted(p.name for p in out.iterdir()) == [LOCK]


def test_a_folder_the_run_cannot_write_is_a_store_write_error(explainer, tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(LOCK):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(anycam.StoreWriteError, match=r"cannot create the store's lock .*: Permission denied"):
        _write(explainer, tmp_path / "s")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(anycam.StoreWriteError, match="cannot create the store's folder"):
        _write(explainer, blocker / "s")


# --------------------------------------------------------------------------------------------
# The fingerprint: configuration, weights, ids and inputs


def test_a_rerun_on_a_complete_store_checks_the_data_and_refuses_other_data(explainer, tmp_path):
    out = tmp_path / "s"
    _write(explainer, out)
    counting = _Counting(explainer)
    again = _write(counting, out)  # the same data: returned, nothing explained again
    assert counting.calls == [] and again.complete and len(again) == 10
    other = images(10, seed=7)  # other pixels under the same ids
    with pytest.raises(StoreMismatchError, match="batch 0 has the stored ids but other input values"):
        _write(counting, out, data=other)
    changed = images(10)
    changed[7, 0, 3, 3] += 1e-3  # one pixel of one image
    with pytest.raises(StoreMismatchError, match="batch 3 has the stored ids but other input values"):
        _write(counting, out, data=changed)
    with pytest.raises(StoreMismatchError, match="go on past the 5 the complete store"):
        _write(counting, out, data=images(12))
    with pytest.raises(StoreMismatchError, match="the batches ended after 4, but the store already holds 5"):
        _write(counting, out, data=images(8))
    assert counting.calls == []
    rewritten = _write(counting, out, data=other, overwrite=True)
    expected = np.concatenate([explainer(other[s : s + 2]) for s in range(0, 10, 2)])
    np.testing.assert_array_equal(rewritten.read("heatmap"), expected)


def test_a_store_of_other_weights_is_refused_naming_the_weights(explainer, tmp_path):
    out = tmp_path / "s"
    data = images(10)
    first = anycam.Explainer(tiny_model(), "features")
    with pytest.raises(RuntimeError, match="stop"):
        anycam.explain_dataset(first, _stopping(batches(data, 2), 2), out=out, part_size=2, progress=False)
    model = tiny_model()
    with torch.no_grad():
        model.head.bias[0] += 1e-4  # one weight, slightly: fine-tuned, not the same model
    with pytest.raises(
        StoreMismatchError, match=r"weights: store has 'sha256:\w+', this run has 'sha256:\w+'"
    ) as caught:
        anycam.explain_dataset(anycam.Explainer(model, "features"), batches(data, 2), out=out, part_size=2)
    assert "overwrite=True" in str(caught.value) and "another out=" in str(caught.value)
    resumed = anycam.explain_dataset(anycam.Explainer(tiny_model(), "features"), batches(data, 2), out=out, part_size=2)
    assert resumed.complete and len(resumed) == 10


def test_the_weights_digest_sees_every_framework_and_every_change():
    from anycam.dataset.fingerprint import weights_digest

    torch_model = tiny_model()
    digest = weights_digest(anycam.Explainer(torch_model, "features"))
    assert digest == weights_digest(anycam.Explainer(tiny_model(), "features"))
    assert digest != weights_digest(anycam.Explainer(tiny_model(seed=1), "features"))
    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    before = weights_digest(anycam.Explainer(bn, "1"))
    bn[1].running_mean += 1.0  # a buffer, not a parameter
    assert weights_digest(anycam.Explainer(bn, "1")) != before


def test_ids_on_some_batches_only_fail_before_that_batch_is_explained(explainer, tmp_path):
    data = images(6)
    mixed = [{"image": data[:2], "id": ["a", "b"]}, data[2:4], data[4:]]
    counting = _Counting(explainer)
    with pytest.raises(anycam.InputError, match="batch 1 has no ids .* but the batches before it had them"):
        anycam.explain_dataset(counting, mixed, out=tmp_path / "s", progress=False)
    assert counting.calls == [2]  # batch 0 only
    counting.calls.clear()
    with pytest.raises(anycam.InputError, match="batch 1 carries ids .* but the batches before it had none"):
        list(anycam.explain_dataset(counting, [data[:2], {"image": data[2:4], "id": [5, 6]}]))
    assert counting.calls == [2]
    kinds = [{"image": data[:2], "id": [0, 1]}, {"image": data[2:4], "id": ["x", "y"]}]
    with pytest.raises(anycam.InputError, match="batch 1 has string ids .* the batches before it had integer ids"):
        anycam.explain_dataset(explainer, kinds, out=tmp_path / "k", progress=False)


def test_a_resume_with_another_batch_size_says_the_batch_size_changed(explainer, tmp_path):
    out = tmp_path / "s"
    data = images(8)
    plain = [data[s : s + 4] for s in (0, 4)]  # ids are the running indices 0, 1, 2, …
    with pytest.raises(RuntimeError, match="stop"):
        anycam.explain_dataset(explainer, _stopping(plain, 1), out=out, part_size=2, progress=False)
    smaller = [data[s : s + 2] for s in range(0, 8, 2)]
    with pytest.raises(StoreMismatchError, match="batch 0 has 2 samples but the store's batch 0 had 4: the batch size"):
        anycam.explain_dataset(explainer, smaller, out=out, part_size=2, progress=False)


def _stopping(items, after):
    for index, item in enumerate(items):
        if index == after:
            raise RuntimeError("stop")
        yield item


# --------------------------------------------------------------------------------------------
# One family of errors; the progress rule


def test_every_dataset_argument_error_is_an_anycam_error(explainer, monkeypatch):
    with pytest.raises(anycam.ConfigError, match="unknown heatmap_dtype"):
        anycam.explain_dataset(explainer, [images(2)], heatmap_dtype="float64")
    with pytest.raises(anycam.ConfigError, match="part_size must be a positive integer"):
        anycam.explain_dataset(explainer, [images(2)], out="unused", part_size=0)
    # BatchExplainer needs no Ray to run; a stand-in module lets it import where Ray is missing.
    monkeypatch.setitem(sys.modules, "ray", sys.modules.get("ray") or types.ModuleType("ray"))
    fresh = "anycam.dataset.ray" not in sys.modules
    try:
        batch_explainer = importlib.import_module("anycam.dataset.ray").BatchExplainer
        with pytest.raises(anycam.ConfigTypeError, match="not the model itself"):
            batch_explainer(tiny_model(), "features")
        with pytest.raises(anycam.ConfigError, match="unknown heatmap_dtype"):
            batch_explainer(tiny_model, "features", heatmap_dtype="int8")
        with pytest.raises(anycam.InputError, match="unknown field"):
            batch_explainer(tiny_model, "features", fields=("maps",))
    finally:
        if fresh:
            sys.modules.pop("anycam.dataset.ray", None)


def test_a_stored_run_draws_a_bar_with_progress_true_counting_skipped_images(explainer, tmp_path, capsys):
    out = tmp_path / "s"
    with pytest.raises(RuntimeError, match="stop"):
        stream = _stopping(batches(images(10), 2), 2)
        anycam.explain_dataset(explainer, stream, out=out, fields=FIELDS, part_size=2, progress=True)
    capsys.readouterr()
    _write(explainer, out, progress=True, total=10)  # 4 images skipped, 6 explained
    err = capsys.readouterr().err
    assert "10/10" in err and "image/s" in err
    _write(explainer, tmp_path / "quiet", progress=False, total=10)
    assert capsys.readouterr().err == ""
