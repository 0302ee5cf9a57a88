"""Whole datasets: ``explain_dataset`` streams batches through an Explainer into a resumable store.

The store is a folder of Parquet files, one per *part* (a run of consecutive batches), plus a
JSON manifest. Parquet rather than Zarr because resuming needs an atomic unit of completion and
Parquet gives it for free: a part is written to a temporary name, flushed and renamed, so a part
file either exists whole or not at all, and nothing partial is ever visible as complete. Zarr
writes one file per chunk and per array, so a run killed mid-batch leaves some arrays of a batch
written and others not, and completeness would need a second commit record kept in step with the
chunks. Parquet is also what Ray Data writes (``Dataset.write_parquet``), so the in-process store and
the ``anycam.ray`` recipe's output open with the same tools (pyarrow, pandas, DuckDB, Ray), and
per-part row shapes let one store hold images of different sizes. What Zarr would do better,
slicing one sample out of one big array without reading its part, matters little here: a part
is a few hundred maps, and :class:`ExplanationStore` keeps an index of ids to (part, row).

``pyarrow`` is imported only when a store is opened or written (``pip install "anycam[dataset]"``).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import AnycamError, InputError, MissingExtraError, TargetError, require
from .core.targets import TopK

#: What ``fields=`` may name (``attribution`` needs an Explainer whose Explanation has it).
FIELDS = ("heatmap", "cam", "scores", "target", "attribution")
HEATMAP_DTYPES = ("float32", "float16")
MANIFEST = "anycam-store.json"
INDEX = "index.parquet"
FORMAT_VERSION = 1
_PART = "part-{:06d}.parquet"


class StoreMismatchError(AnycamError, ValueError):
    """An ``out=`` store was written by another configuration, or from other data."""


class StoreWriteError(AnycamError, OSError):
    """Writing a part failed (disk full, permissions); the store still holds every complete part."""


# --------------------------------------------------------------------------------------------
# Public entry point


def explain_dataset(
    explainer: Any,
    batches: Iterable[Any],
    *,
    out: str | os.PathLike[str] | None = None,
    target: Any = None,
    fields: Sequence[str] = ("heatmap",),
    heatmap_dtype: str = "float32",
    metrics: Any = None,
    progress: bool | None = None,
    total: int | None = None,
    part_size: int = 256,
    input_key: str = "image",
    id_key: str = "id",
    target_key: str = "target",
    regions_key: str = "regions",
    metadata: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, np.ndarray]] | ExplanationStore:
    """Explains every batch of ``batches``; yields the results in order, or writes them to ``out``.

    Each batch is one of: an input batch ``(N, ...)`` (ids are then the running sample index
    0, 1, 2, …); an ``(inputs, target)`` pair, as a tuple or a list (what a torch ``DataLoader``
    gives for ``(image, label)`` samples: the labels are then the explained classes; pass
    ``(x for x, _ in loader)`` to explain the predicted ones); or a mapping with the inputs under
    ``input_key`` and, optionally, ids under ``id_key``, per-sample targets under ``target_key``
    and pointing-game regions under ``regions_key`` (the batches Ray Data and most loaders give).

    With ``out=``, results go to a Parquet store (see the module docstring for why Parquet),
    one file per ``part_size`` images, each written whole under a temporary name and renamed,
    then an index of ids; the function returns an :class:`ExplanationStore`. Run it again with
    the same ``out=`` after a crash and it checks the configuration, skips every batch a complete
    part holds (they are still drawn from ``batches``, not explained) and writes the rest: the
    store ends byte-identical to an uninterrupted run's.

    Args:
        explainer: an ``anycam.Explainer`` (or ``anycam.TTAExplainer``).
        batches: any iterable of batches, in a deterministic order when resuming.
        out: a folder for the store, or None to yield one dict per batch.
        target: the target for every batch (as for ``Explainer.explain``), unless batches
            carry their own.
        fields: what is kept besides ``id``: any of ``"heatmap"``, ``"cam"``, ``"scores"``,
            ``"target"``, ``"attribution"``.
        heatmap_dtype: ``"float32"`` or ``"float16"`` (half the disk; maps in [0, 1] keep
            ~3 significant digits, an absolute error below 2.5e-4).
        metrics: an ``anycam.StreamingMetrics``, updated with every batch's float32 heatmaps;
            its per-sample values are stored too, so a resumed run's ``summary()`` covers all.
        progress: a tqdm bar counting images (with images/s); None shows one when tqdm is
            installed.
        total: the number of images, for the bar's ETA.
        part_size: images per Parquet file (a batch is never split; a new shape starts a part).
        input_key, id_key, target_key, regions_key: the keys of mapping batches.
        metadata: JSON-serialisable facts the configuration cannot see (a model checkpoint's
            name, a data split); stored, and compared on resume.

    Returns:
        An iterator of ``{"id": (N,), field: (N, ...)}`` dicts, or, with ``out=``, the store.

    Raises:
        StoreMismatchError: ``out`` holds a store of another configuration (the message names
            each setting that differs) or of other data (ids that differ from the stored ones).
        StoreWriteError: a part could not be written; the message says what the store holds.
        anycam.InputError: a malformed batch, an unknown field, repeated ids.
    """
    fields = _check_fields(fields)
    if heatmap_dtype not in HEATMAP_DTYPES:
        raise ValueError(f"unknown heatmap_dtype {heatmap_dtype!r}; choose 'float32' or 'float16'")
    if isinstance(part_size, bool) or not isinstance(part_size, numbers.Integral) or part_size < 1:
        raise ValueError(f"part_size must be a positive integer, got {part_size!r}")
    keys = _Keys(input_key, id_key, target_key, regions_key)
    runner = _Runner(explainer, target, fields, heatmap_dtype, metrics, keys)
    if out is None:
        return _stream(runner, batches, progress, total)
    config = {
        "format": FORMAT_VERSION,
        **explainer_config(explainer),
        "fields": list(fields),
        "heatmap_dtype": heatmap_dtype,
        "target": describe_target(target),
        "metrics": None if metrics is None else metrics.config(),
        "part_size": int(part_size),
        "metadata": _jsonable(dict(metadata or {}), "metadata"),
    }
    return _write(runner, batches, Path(out), config, int(part_size), progress, total)


# --------------------------------------------------------------------------------------------
# Configuration: what must match for a store to be resumed


def explainer_config(explainer: Any) -> dict[str, Any]:
    """Returns the settings that decide an Explainer's (or TTAExplainer's) maps, as JSON values."""
    config = {
        "backend": explainer.backend.name,
        "method": explainer.method,
        "layers": list(explainer.layer_names),
        "normalize": explainer.normalize,
        "upsample": explainer.upsample,
        "aggregate": explainer.aggregate,
        "relu": explainer.relu,
        "layout": explainer.layout,
        "token_grid": None if explainer.token_grid is None else list(explainer.token_grid),
        "input_layout": getattr(explainer.backend, "input_layout", None),
    }
    tta = getattr(explainer, "tta_config", None)
    config["tta"] = tta() if callable(tta) else None
    return config


def describe_target(target: Any) -> Any:
    """Returns a JSON description of a target: equal descriptions mean the same targets."""
    if target is None or isinstance(target, (bool, numbers.Integral)):
        return None if target is None else int(target)
    if isinstance(target, TopK):
        return f"top_k({target.k})"
    if callable(target):
        name = getattr(target, "__qualname__", type(target).__qualname__)
        return f"callable {getattr(target, '__module__', '?')}.{name}"
    array = np.ascontiguousarray(np.asarray(target))
    digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
    return f"array {array.dtype}{list(array.shape)} sha256:{digest}"


def _config_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    lines = []
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            lines.append(f"{key}: store has {stored.get(key)!r}, this run has {wanted.get(key)!r}")
    return lines


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be JSON-serialisable (str, numbers, lists, dicts): {exc}") from exc


# --------------------------------------------------------------------------------------------
# Batches in, columns out


@dataclass(frozen=True)
class _Keys:
    inputs: str
    id: str
    target: str
    regions: str


@dataclass
class _Batch:
    inputs: Any
    ids: np.ndarray | None
    target: Any
    regions: Any
    size: int


def _check_fields(fields: Sequence[str]) -> tuple[str, ...]:
    if isinstance(fields, str):
        fields = (fields,)
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise InputError(f"unknown field(s) {unknown}; choose from {', '.join(FIELDS)}")
    if len(set(fields)) != len(fields):
        raise InputError(f"fields {list(fields)} name a field twice")
    return tuple(fields)


def _batch_size(inputs: Any) -> int:
    shape = getattr(inputs, "shape", None)
    if shape is None:
        try:
            return len(inputs)
        except TypeError as exc:
            kind = type(inputs).__name__
            raise InputError(f"a batch must be an array with a leading batch axis, got {kind}") from exc
    if len(shape) == 0:
        raise InputError("a batch must have a leading batch axis, got a scalar")
    return int(shape[0])


def _parse(batch: Any, keys: _Keys, index: int) -> _Batch:
    if isinstance(batch, Mapping):
        if keys.inputs not in batch:
            raise InputError(
                f"batch {index} is a mapping without the inputs key {keys.inputs!r} (keys: {sorted(batch)}); "
                "pass input_key= to name the column holding the images"
            )
        inputs = batch[keys.inputs]
        ids = batch.get(keys.id)
        size = _batch_size(inputs)
        if ids is not None:
            ids = np.asarray(ids)
            if ids.shape != (size,):
                raise InputError(f"batch {index}: ids of shape {ids.shape} for {size} inputs; give one id per sample")
            if ids.dtype.kind not in "iuUSO":
                raise InputError(f"batch {index}: ids must be integers or strings, got dtype {ids.dtype}")
            ids = ids.astype(str) if ids.dtype.kind in "SO" else ids
        return _Batch(inputs, ids, batch.get(keys.target), batch.get(keys.regions), size)
    if isinstance(batch, (tuple, list)):  # a torch DataLoader collates (image, label) pairs into a list
        if len(batch) != 2:
            raise InputError(
                f"batch {index} is a {type(batch).__name__} of {len(batch)} items; a tuple or list batch is "
                "(inputs, target): pass models with several inputs as mapping batches"
            )
        return _Batch(batch[0], None, batch[1], None, _batch_size(batch[0]))
    return _Batch(batch, None, None, None, _batch_size(batch))


def _as_numpy(value: Any) -> np.ndarray:
    """Returns a framework tensor (CPU or GPU) or array as NumPy, without importing a framework."""
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
    return np.asarray(value)


class _Runner:
    """Explains one parsed batch and turns the Explanation into the kept columns."""

    def __init__(
        self, explainer: Any, target: Any, fields: tuple[str, ...], heatmap_dtype: str, metrics: Any, keys: _Keys
    ) -> None:
        self.explainer = explainer
        self.target = target
        self.fields = fields
        self.heatmap_dtype = np.dtype(heatmap_dtype)
        self.metrics = metrics
        self.keys = keys
        self.next_id = 0

    def ids(self, batch: _Batch) -> np.ndarray:
        if batch.ids is not None:
            return batch.ids
        return np.arange(self.next_id, self.next_id + batch.size, dtype=np.int64)

    def explain(self, batch: _Batch, index: int) -> dict[str, np.ndarray]:
        if batch.target is not None and self.target is not None:
            raise TargetError(f"batch {index} carries its own targets and target= was given too; pass one of them")
        target = batch.target if batch.target is not None else self.target
        explanation = self.explainer.explain(batch.inputs, _as_numpy(target) if _is_array(target) else target)
        columns: dict[str, np.ndarray] = {}
        for name in self.fields:
            value = getattr(explanation, name, None)
            if value is None:
                raise InputError(_missing_field(name, explanation, self.explainer))
            array = np.asarray(value)
            if name == "heatmap":
                array = array.astype(self.heatmap_dtype, copy=False)
            columns[name] = array
        if self.metrics is not None:
            # The class indices the maps explain; a callable target is handed on as it is.
            scored = explanation.target if explanation.target is not None else target
            values = self.metrics.update(_as_numpy(batch.inputs), explanation.heatmap, scored, regions=batch.regions)
            columns.update({f"metric.{k}": v for k, v in values.items()})
        return columns


def _is_array(target: Any) -> bool:
    return target is not None and not callable(target) and not isinstance(target, (numbers.Integral, TopK))


def _missing_field(name: str, explanation: Any, explainer: Any) -> str:
    if name == "attribution" and not hasattr(explanation, "attribution"):
        return "fields=('attribution',) needs an anycam whose Explanation has an attribution; this one has none"
    if name == "target":
        return "the target is None for callable targets (there are no class indices); drop 'target' from fields"
    return f"field {name!r} is None for method {explainer.method!r}; drop it from fields"


def _progress(progress: bool | None, total: int | None) -> Any:
    if progress is False:
        return None
    try:
        tqdm = require("tqdm.auto", "dataset", "explain_dataset's progress bar").tqdm
    except MissingExtraError:
        if progress:
            raise
        return None
    return tqdm(total=total, unit="image", unit_scale=False, desc="explain", dynamic_ncols=True)


def _stream(runner: _Runner, batches: Iterable[Any], progress: bool | None, total: int | None) -> Iterator[dict]:
    bar = _progress(progress, total)
    seen: set[Any] = set()
    try:
        for index, raw in enumerate(batches):
            batch = _parse(raw, runner.keys, index)
            ids = runner.ids(batch)
            _check_unique(ids, seen, index)
            runner.next_id += batch.size
            result = {"id": ids, **runner.explain(batch, index)} if batch.size else {"id": ids}
            if bar is not None:
                bar.update(batch.size)
            yield result
    finally:
        if bar is not None:
            bar.close()


def _check_unique(ids: np.ndarray, seen: set[Any], index: int) -> None:
    values = ids.tolist()
    repeated = [v for v in values if v in seen]
    if repeated or len(set(values)) != len(values):
        again = repeated or [v for v in values if values.count(v) > 1]
        raise InputError(f"batch {index} repeats id(s) {again[:5]}; every sample needs its own id")
    seen.update(values)


# --------------------------------------------------------------------------------------------
# The store


@dataclass
class _Part:
    number: int
    first_batch: int
    batch_sizes: list[int]
    ids: list[Any]
    shapes: dict[str, list[int]] = field(default_factory=dict)


def _pyarrow() -> tuple[Any, Any]:
    pa = require("pyarrow", "dataset", "an explain_dataset store (out=)")
    pq = require("pyarrow.parquet", "dataset", "an explain_dataset store (out=)")
    return pa, pq


def _part_table(columns: dict[str, np.ndarray], part: _Part) -> Any:
    pa, _ = _pyarrow()
    arrays, names = [], []
    for name, array in columns.items():
        if name == "id":
            arrays.append(pa.array(array.tolist()))
        elif array.ndim == 1:
            arrays.append(pa.array(array))
        else:
            flat = pa.array(np.ascontiguousarray(array).reshape(-1))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, int(np.prod(array.shape[1:]))))
        names.append(name)
    meta = {
        "part": part.number,
        "first_batch": part.first_batch,
        "batch_sizes": part.batch_sizes,
        "shapes": part.shapes,
        "dtypes": {n: str(a.dtype) for n, a in columns.items() if n != "id"},
    }
    return pa.table(arrays, names=names, metadata={"anycam": json.dumps(meta, sort_keys=True)})


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _write_part_file(path: Path, table: Any) -> None:
    """Writes ``table`` to ``path`` whole or not at all (temporary file, fsync, rename)."""
    pa, pq = _pyarrow()
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _read_meta(path: Path) -> dict[str, Any]:
    _, pq = _pyarrow()
    schema = pq.read_schema(path)
    return dict(json.loads(schema.metadata[b"anycam"]))


class _Writer:
    """Buffers batches into parts and commits each part atomically."""

    def __init__(self, root: Path, parts: list[_Part], part_size: int) -> None:
        self.root = root
        self.parts = parts
        self.part_size = part_size
        self.buffer: list[dict[str, np.ndarray]] = []
        self.buffer_first = sum(len(p.batch_sizes) for p in parts)
        self.buffer_sizes: list[int] = []
        self.buffer_shapes: dict[str, list[int]] | None = None

    def add(self, index: int, columns: dict[str, np.ndarray], size: int) -> None:
        shapes = {n: list(a.shape[1:]) for n, a in columns.items() if n != "id" and a.ndim > 1}
        if self.buffer and size and shapes != self.buffer_shapes:
            self.flush()
        if not self.buffer_sizes:
            self.buffer_first = index
        if size:
            self.buffer_shapes = shapes
            self.buffer.append(columns)
        self.buffer_sizes.append(size)
        if sum(self.buffer_sizes) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer_sizes:
            return
        number = len(self.parts)
        ids = [v for c in self.buffer for v in c["id"].tolist()]
        part = _Part(number, self.buffer_first, list(self.buffer_sizes), ids, dict(self.buffer_shapes or {}))
        path = self.root / _PART.format(number)
        try:
            if self.buffer:
                columns = {n: np.concatenate([c[n] for c in self.buffer]) for n in self.buffer[0]}
            else:  # only empty batches: an empty part keeps the batch count right
                columns = {"id": np.zeros(0, dtype=np.int64)}
            _write_part_file(path, _part_table(columns, part))
        except OSError as exc:
            rows = sum(len(p.ids) for p in self.parts)
            last = self.parts[-1].ids[-1] if rows else None
            raise StoreWriteError(
                exc.errno,
                f"writing {path.name} (batches {part.first_batch}–{part.first_batch + len(part.batch_sizes) - 1}, "
                f"{len(ids)} images) failed: {exc.strerror or exc}. The store at {self.root} is consistent: it "
                f"holds {len(self.parts)} complete part(s), {rows} images (batches 0–"
                f"{part.first_batch - 1}, last id {last!r}); nothing of the failed part is visible. Fix the "
                "cause (free disk space) and run again with the same out= to resume.",
            ) from exc
        self.parts.append(part)
        self.buffer, self.buffer_sizes, self.buffer_shapes = [], [], None


def _open_store(root: Path, config: dict[str, Any]) -> tuple[list[_Part], bool]:
    """Creates ``root`` or checks its configuration; returns the complete parts and completeness."""
    manifest_path = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise StoreMismatchError(f"out={str(root)!r} is a file; pass a folder for the store")
    if not manifest_path.exists():
        if root.exists() and any(p for p in root.iterdir() if not p.name.startswith(".")):
            raise StoreMismatchError(
                f"out={str(root)!r} is a non-empty folder without an {MANIFEST}; pass a new or empty folder"
            )
        root.mkdir(parents=True, exist_ok=True)
        _write_manifest(root, {"config": config, "complete": False})
        return [], False
    manifest = json.loads(manifest_path.read_text())
    differences = _config_differences(manifest.get("config", {}), config)
    if differences:
        raise StoreMismatchError(
            f"out={str(root)!r} was written by another configuration, so it cannot be resumed:\n  "
            + "\n  ".join(differences)
            + "\nuse the same settings, or another out= folder"
        )
    for leftover in root.glob(".*.tmp-*"):  # a part a killed run never finished
        leftover.unlink()
    parts: list[_Part] = []
    expected_batch = 0
    for number, path in enumerate(sorted(root.glob("part-*.parquet"))):
        meta = _read_meta(path)
        if path.name != _PART.format(number) or meta["first_batch"] != expected_batch:
            raise StoreMismatchError(f"{path} does not follow part {number - 1}: the store was modified by hand")
        _, pq = _pyarrow()
        ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
        parts.append(_Part(number, meta["first_batch"], list(meta["batch_sizes"]), ids, dict(meta["shapes"])))
        expected_batch += len(meta["batch_sizes"])
    return parts, bool(manifest.get("complete"))


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    _atomic_write_bytes(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def _write(
    runner: _Runner,
    batches: Iterable[Any],
    root: Path,
    config: dict[str, Any],
    part_size: int,
    progress: bool | None,
    total: int | None,
) -> ExplanationStore:
    _pyarrow()  # before any work: a missing extra should not surface after the first part's batches
    parts, complete = _open_store(root, config)
    if runner.metrics is not None:  # the stored parts' per-sample values count towards summary()
        for part in parts:
            columns = _read_part(root / _PART.format(part.number), None)
            runner.metrics.add({n[len("metric.") :]: v for n, v in columns.items() if n.startswith("metric.")})
    if complete:
        return ExplanationStore(root)
    done_batches = sum(len(p.batch_sizes) for p in parts)
    # Stored ids of every skipped batch, to check the batches come back in the same order.
    stored_ids: list[list[Any]] = []
    for part in parts:
        start = 0
        for size in part.batch_sizes:
            stored_ids.append(part.ids[start : start + size])
            start += size
    seen: set[Any] = {v for p in parts for v in p.ids}
    writer = _Writer(root, parts, part_size)
    bar = _progress(progress, total)
    drawn = 0
    try:
        for index, raw in enumerate(batches):
            drawn = index + 1
            batch = _parse(raw, runner.keys, index)
            ids = runner.ids(batch)
            runner.next_id += batch.size
            if index < done_batches:
                if ids.tolist() != stored_ids[index]:
                    raise StoreMismatchError(
                        f"batch {index} has ids {ids.tolist()[:4]}… but the store holds {stored_ids[index][:4]}… "
                        "for it: the batches come in another order or from other data; resuming needs the "
                        "same batches in the same order"
                    )
                if bar is not None:
                    bar.update(batch.size)
                continue
            _check_unique(ids, seen, index)
            columns = {"id": ids, **runner.explain(batch, index)} if batch.size else {"id": ids}
            writer.add(index, columns, batch.size)
            if bar is not None:
                bar.update(batch.size)
        writer.flush()
        if drawn < done_batches:
            raise StoreMismatchError(
                f"the batches ended after {drawn}, but the store already holds {done_batches}: resuming needs "
                "the same batches as the run that wrote it"
            )
    finally:
        if bar is not None:
            bar.close()
    _write_index(root, writer.parts)
    rows = sum(len(p.ids) for p in writer.parts)
    _write_manifest(
        root,
        {
            "config": config,
            "complete": True,
            "rows": rows,
            "parts": len(writer.parts),
            "batches": sum(len(p.batch_sizes) for p in writer.parts),
        },
    )
    return ExplanationStore(root)


def _write_index(root: Path, parts: list[_Part]) -> None:
    pa, pq = _pyarrow()
    ids = [v for p in parts for v in p.ids]
    part_numbers = np.concatenate([np.full(len(p.ids), p.number, np.int32) for p in parts] or [np.zeros(0, np.int32)])
    rows = np.concatenate([np.arange(len(p.ids), dtype=np.int32) for p in parts] or [np.zeros(0, np.int32)])
    table = pa.table({"id": pa.array(ids), "part": part_numbers, "row": rows})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _atomic_write_bytes(root / INDEX, sink.getvalue().to_pybytes())


class ExplanationStore:
    """A store written by :func:`explain_dataset`: complete parts, an index of ids, the config.

    Only complete parts are ever read, so a store being written (or left by a killed run) shows
    exactly the batches that were committed; ``complete`` says whether the run finished.

    Args:
        path: the store's folder.

    Raises:
        FileNotFoundError: no store at ``path``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"no anycam store at {str(self.path)!r} (no {MANIFEST})")
        manifest = json.loads(manifest_path.read_text())
        self.config: dict[str, Any] = manifest["config"]
        self.complete: bool = bool(manifest.get("complete"))
        self.fields: tuple[str, ...] = tuple(self.config["fields"])
        self._files = sorted(self.path.glob("part-*.parquet"))
        self._index: dict[Any, tuple[int, int]] | None = None

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"ExplanationStore({str(self.path)!r}, {len(self)} images in {len(self._files)} parts, {state})"

    def __len__(self) -> int:
        return len(self.index)

    @property
    def index(self) -> dict[Any, tuple[int, int]]:
        """id → (part, row) for every stored image (from ``index.parquet`` once complete)."""
        if self._index is None:
            _, pq = _pyarrow()
            index: dict[Any, tuple[int, int]] = {}
            if self.complete and (self.path / INDEX).exists():
                table = pq.read_table(self.path / INDEX)
                for key, part, row in zip(*(table.column(n).to_pylist() for n in ("id", "part", "row")), strict=True):
                    index[key] = (part, row)
            else:
                for number, path in enumerate(self._files):
                    for row, key in enumerate(pq.read_table(path, columns=["id"]).column("id").to_pylist()):
                        index[key] = (number, row)
            self._index = index
        return self._index

    @property
    def ids(self) -> np.ndarray:
        """``(N,)`` the stored ids in order."""
        return np.asarray(list(self.index))

    def parts(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yields each part as ``{"id": (n,), field: (n, ...)}`` NumPy columns, in order."""
        for path in self._files:
            yield _read_part(path, columns)

    def read(self, name: str) -> np.ndarray:
        """Returns one column of every stored image, ``(N, ...)``.

        Raises:
            KeyError: an unknown column.
            anycam.InputError: the parts hold maps of different shapes (images of different
                sizes); read them part by part with :meth:`parts` or one by one with :meth:`get`.
        """
        stored = ("id", *self.fields, *(f"metric.{k}" for k in (self.config.get("metrics") or {}).get("names", [])))
        if name not in stored and not name.startswith("metric."):
            raise KeyError(f"{name!r} is not stored; the store has {', '.join(stored)}")
        chunks = [part[name] for part in self.parts(["id", name]) if len(part["id"])]
        if not chunks:
            return np.zeros(0)
        shapes = sorted({c.shape[1:] for c in chunks})
        if len(shapes) > 1:
            raise InputError(
                f"column {name!r} holds maps of several shapes {shapes}; read them with store.parts() or store.get(id)"
            )
        return np.concatenate(chunks)

    def get(self, key: Any) -> dict[str, np.ndarray]:
        """Returns the stored columns of the image with id ``key``."""
        if key not in self.index:
            raise KeyError(f"id {key!r} is not in the store ({len(self)} images)")
        number, row = self.index[key]
        part = _read_part(self._files[number], None)
        return {name: values[row] for name, values in part.items()}


def _read_part(path: Path, columns: Sequence[str] | None) -> dict[str, np.ndarray]:
    _, pq = _pyarrow()
    table = pq.read_table(path, columns=list(columns) if columns else None)
    meta = json.loads(table.schema.metadata[b"anycam"])
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if name == "id":
            out[name] = np.asarray(column.to_pylist())
            continue
        dtype = np.dtype(meta["dtypes"][name])
        if name in meta["shapes"]:
            flat = column.flatten().to_numpy(zero_copy_only=False)
            out[name] = flat.astype(dtype, copy=False).reshape(len(column), *meta["shapes"][name])
        else:
            out[name] = column.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return out
