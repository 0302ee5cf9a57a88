"""The store of ``explain_dataset``: Parquet parts committed whole, a JSON manifest, an index of ids.

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

What the store checks (format 2): the manifest lists every committed part with its size and
sha256, so a lost, truncated or replaced part is named instead of read as another image's row, and
``get`` checks that the row it returns carries the id asked for; the manifest's format version is
checked before anything else is read; one writer at a time holds ``.anycam-store.lock`` (see
``lock.py``); and the configuration, the model's weights and each batch's ids and input values are
fingerprinted, so a rerun with other data or another model is refused, not mixed in.

``pyarrow`` is imported only when a store is opened or written (``pip install "anycam[dataset]"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ConfigTypeError, InputError, require
from .errors import (
    StoreCorruptError,
    StoreFormatError,
    StoreKeyError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreWriteError,
)

#: What ``fields=`` may name (``attribution`` needs an Explainer whose Explanation has it).
FIELDS = ("heatmap", "cam", "scores", "target", "attribution")
HEATMAP_DTYPES = ("float32", "float16")
MANIFEST = "anycam-store.json"
INDEX = "index.parquet"
#: The store's layout version; a store of another version is refused, never half-read.
FORMAT_VERSION = 2
PART_NAME = "part-{:06d}.parquet"
_HOW_TO_REWRITE = "pass another out= folder, or overwrite=True to delete this store and write it anew"


def _config_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    lines = []
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            lines.append(f"{key}: store has {stored.get(key)!r}, this run has {wanted.get(key)!r}")
    return lines


@dataclass
class Part:
    """A committed part: where its batches start, their sizes, ids and input digests, its file's checksum."""

    number: int
    first_batch: int
    batch_sizes: list[int]
    ids: list[Any]
    shapes: dict[str, list[int]] = field(default_factory=dict)
    inputs: list[str | None] = field(default_factory=list)
    size: int = 0
    sha256: str = ""

    @property
    def name(self) -> str:
        return PART_NAME.format(self.number)

    def entry(self) -> dict[str, Any]:
        """The part's line in the manifest."""
        return {
            "name": self.name,
            "rows": len(self.ids),
            "batches": len(self.batch_sizes),
            "bytes": self.size,
            "sha256": self.sha256,
        }


def pyarrow_modules() -> tuple[Any, Any]:
    pa = require("pyarrow", "dataset", "an explain_dataset store (out=)")
    pq = require("pyarrow.parquet", "dataset", "an explain_dataset store (out=)")
    return pa, pq


def _part_table(columns: dict[str, np.ndarray], part: Part) -> Any:
    pa, _ = pyarrow_modules()
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
        "inputs": part.inputs,
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


def _table_bytes(table: Any) -> bytes:
    pa, pq = pyarrow_modules()
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


def manifest_document(config: dict[str, Any], parts: list[Part], complete: bool) -> dict[str, Any]:
    """The manifest: format version, configuration, every committed part with its checksum."""
    document: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "config": config,
        "complete": complete,
        "parts": [p.entry() for p in parts],
    }
    if complete:
        document["rows"] = sum(len(p.ids) for p in parts)
        document["batches"] = sum(len(p.batch_sizes) for p in parts)
    return document


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    _atomic_write_bytes(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


class Writer:
    """Buffers batches into parts and commits each part: file written whole, then listed in the manifest."""

    def __init__(self, root: Path, parts: list[Part], part_size: int, config: dict[str, Any]) -> None:
        self.root = root
        self.parts = parts
        self.part_size = part_size
        self.config = config
        self.buffer: list[dict[str, np.ndarray]] = []
        self.buffer_first = sum(len(p.batch_sizes) for p in parts)
        self.buffer_sizes: list[int] = []
        self.buffer_inputs: list[str | None] = []
        self.buffer_shapes: dict[str, list[int]] | None = None

    def add(self, index: int, columns: dict[str, np.ndarray], size: int, digest: str | None) -> None:
        shapes = {n: list(a.shape[1:]) for n, a in columns.items() if n != "id" and a.ndim > 1}
        if self.buffer and size and shapes != self.buffer_shapes:
            self.flush()
        if not self.buffer_sizes:
            self.buffer_first = index
        if size:
            self.buffer_shapes = shapes
            self.buffer.append(columns)
        self.buffer_sizes.append(size)
        self.buffer_inputs.append(digest)
        if sum(self.buffer_sizes) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer_sizes:
            return
        number = len(self.parts)
        ids = [v for c in self.buffer for v in c["id"].tolist()]
        part = Part(
            number, self.buffer_first, list(self.buffer_sizes), ids, dict(self.buffer_shapes or {}), self.buffer_inputs
        )
        path = self.root / part.name
        try:
            if self.buffer:
                columns = {n: np.concatenate([c[n] for c in self.buffer]) for n in self.buffer[0]}
            else:  # only empty batches: an empty part keeps the batch count right
                columns = {"id": np.zeros(0, dtype=np.int64)}
            data = _table_bytes(_part_table(columns, part))
            part.size, part.sha256 = len(data), hashlib.sha256(data).hexdigest()
            _atomic_write_bytes(path, data)
            # The commit: a part file the manifest does not list was never finished.
            try:
                write_manifest(self.root, manifest_document(self.config, [*self.parts, part], complete=False))
            except OSError:
                path.unlink(missing_ok=True)
                raise
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
        self.buffer, self.buffer_sizes, self.buffer_inputs, self.buffer_shapes = [], [], [], None


def load_manifest(root: Path) -> dict[str, Any]:
    """Reads and checks ``root``'s manifest: JSON, the format version, the fields and their types.

    Raises:
        StoreNotFoundError: no manifest.
        StoreFormatError: a format version this anycam does not read.
        StoreCorruptError: the manifest is not valid JSON or lacks what format 2 holds.
    """
    path = root / MANIFEST
    if not path.is_file():
        raise StoreNotFoundError(f"no anycam store at {str(root)!r} (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StoreCorruptError(
            f"the store's manifest {str(path)!r} cannot be read ({exc}); {_HOW_TO_REWRITE}"
        ) from exc
    if not isinstance(manifest, dict):
        raise StoreCorruptError(f"the store's manifest {str(path)!r} is not a JSON object; {_HOW_TO_REWRITE}")
    config = manifest.get("config")
    # Format 1 kept its version inside the configuration.
    version = manifest.get("format", config.get("format") if isinstance(config, dict) else None)
    if version != FORMAT_VERSION:
        earlier = isinstance(version, int) and version < FORMAT_VERSION
        raise StoreFormatError(
            f"the store at {str(root)!r} has format version {version!r}; this anycam reads format {FORMAT_VERSION} "
            + ("(it was written by an earlier anycam, whose stores were not checksummed)" if earlier else "only")
            + f": {_HOW_TO_REWRITE}, or read it with the anycam that wrote it"
        )
    problems = []
    if not isinstance(manifest.get("config"), dict) or not isinstance(manifest["config"].get("fields"), list):
        problems.append("'config' is not an object with 'fields'")
    if not isinstance(manifest.get("complete"), bool):
        problems.append("'complete' is not true or false")
    entries = manifest.get("parts")
    keys = {"name": str, "rows": int, "batches": int, "bytes": int, "sha256": str}
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in keys.items()) for e in entries
    ):
        problems.append(f"'parts' is not a list of {{{', '.join(keys)}}} objects")
    elif [e["name"] for e in entries] != [PART_NAME.format(i) for i in range(len(entries))]:
        problems.append(f"'parts' does not name {PART_NAME.format(0)}, {PART_NAME.format(1)}, … in order")
    if manifest.get("complete") is True and isinstance(entries, list) and not problems:
        if manifest.get("rows") != sum(e["rows"] for e in entries):
            problems.append("'rows' is not the sum of the parts' rows")
    if problems:
        raise StoreCorruptError(
            f"the store's manifest {str(path)!r} was changed by hand or damaged: {'; '.join(problems)}; "
            + _HOW_TO_REWRITE
        )
    return dict(manifest)


def _corrupt(path: Path, what: str) -> StoreCorruptError:
    return StoreCorruptError(
        f"{path.name} of the store at {str(path.parent)!r} {what}; the store cannot be trusted: {_HOW_TO_REWRITE}"
    )


def check_part_file(root: Path, entry: Mapping[str, Any], checksum: bool) -> Path:
    """Returns the path of a listed part after checking that it exists with its size (and sha256)."""
    path = root / entry["name"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _corrupt(path, f"is missing (the manifest lists it with {entry['rows']} images)") from None
    if size != entry["bytes"]:
        raise _corrupt(path, f"has {size} bytes where {entry['bytes']} were written (truncated or replaced)")
    if checksum:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != entry["sha256"]:
            raise _corrupt(path, "does not match the checksum it was written with (changed on disk)")
    return path


def _read_committed_part(root: Path, number: int, entry: Mapping[str, Any]) -> Part:
    path = check_part_file(root, entry, checksum=True)
    meta = read_meta(path)
    ids = read_part(path, ["id"])["id"].tolist()
    if len(ids) != entry["rows"] or len(meta["batch_sizes"]) != entry["batches"]:
        raise _corrupt(path, "holds other rows than the manifest lists")
    return Part(
        number, meta["first_batch"], list(meta["batch_sizes"]), ids, dict(meta["shapes"]),
        list(meta.get("inputs") or [None] * len(meta["batch_sizes"])), entry["bytes"], entry["sha256"],
    )  # fmt: skip


def _remove_store_files(root: Path) -> None:
    """Deletes what a store consists of (manifest, index, parts, temporaries), nothing else."""
    for path in [root / MANIFEST, root / INDEX, *root.glob("part-*.parquet"), *root.glob(".*.tmp-*")]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def open_store(root: Path, config: dict[str, Any], overwrite: bool = False) -> tuple[list[Part], bool]:
    """Creates ``root``'s store or checks the one there; returns its committed parts and completeness.

    The caller holds the store's lock. Every listed part is checked against its checksum, since a
    resume builds on them; part files the manifest does not list were never committed and go.
    """
    if (
        not (root / MANIFEST).exists()
        and root.exists()
        and any(p for p in root.iterdir() if not p.name.startswith("."))
    ):
        raise StoreMismatchError(
            f"out={str(root)!r} is a non-empty folder without an {MANIFEST}; pass a new or empty folder"
        )
    if overwrite:
        _remove_store_files(root)
    if not (root / MANIFEST).exists():
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".*.tmp-*"):
            leftover.unlink()
        write_manifest(root, manifest_document(config, [], complete=False))
        return [], False
    manifest = load_manifest(root)
    differences = _config_differences(manifest["config"], config)
    if differences:
        raise StoreMismatchError(
            f"out={str(root)!r} was written by another configuration or model, so it cannot be resumed or reused:\n  "
            + "\n  ".join(differences)
            + f"\nuse the same settings and model, {_HOW_TO_REWRITE}"
        )
    for leftover in root.glob(".*.tmp-*"):  # a file a killed run never finished
        leftover.unlink()
    listed = {e["name"] for e in manifest["parts"]}
    for path in root.glob("part-*.parquet"):  # written, but killed before the manifest listed it
        if path.name not in listed:
            path.unlink()
    parts: list[Part] = []
    expected_batch = 0
    for number, entry in enumerate(manifest["parts"]):
        part = _read_committed_part(root, number, entry)
        if part.first_batch != expected_batch:
            raise _corrupt(root / entry["name"], f"starts at batch {part.first_batch}, not {expected_batch}")
        parts.append(part)
        expected_batch += len(part.batch_sizes)
    return parts, bool(manifest["complete"])


def write_index(root: Path, parts: list[Part]) -> None:
    pa, _ = pyarrow_modules()
    ids = [v for p in parts for v in p.ids]
    part_numbers = np.concatenate([np.full(len(p.ids), p.number, np.int32) for p in parts] or [np.zeros(0, np.int32)])
    rows = np.concatenate([np.arange(len(p.ids), dtype=np.int32) for p in parts] or [np.zeros(0, np.int32)])
    table = pa.table({"id": pa.array(ids), "part": part_numbers, "row": rows})
    _atomic_write_bytes(root / INDEX, _table_bytes(table))


class ExplanationStore:
    """A store written by :func:`explain_dataset`: complete parts, an index of ids, the config.

    Only committed parts (those the manifest lists) are ever read, so a store being written (or
    left by a killed run) shows exactly the batches that were committed; ``complete`` says whether
    the run finished. Opening checks the manifest and that every listed part is there with its
    size; each part's bytes are checked against its sha256 when it is first read, and
    :meth:`verify` checks them all at once; :meth:`get` checks that the row it returns carries
    the id asked for.

    Args:
        path: the store's folder.

    Raises:
        StoreNotFoundError: no store at ``path``.
        StoreFormatError: a store of another format version.
        StoreCorruptError: a damaged or hand-edited manifest, a missing or truncated part (named).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigTypeError(f"an ExplanationStore opens a folder: pass its path, got {type(path).__name__}")
        self.path = Path(path)
        manifest = load_manifest(self.path)
        self.config: dict[str, Any] = manifest["config"]
        self.complete: bool = manifest["complete"]
        self.fields: tuple[str, ...] = tuple(self.config["fields"])
        self._entries: list[dict[str, Any]] = manifest["parts"]
        self._files = [check_part_file(self.path, e, checksum=False) for e in self._entries]
        self._checked: set[int] = set()  # parts whose bytes matched their sha256 once
        self._index: dict[Any, tuple[int, int]] | None = None

    def _read(self, number: int, columns: Sequence[str] | None) -> dict[str, np.ndarray]:
        """Reads a part; its bytes are checked against the manifest's sha256 on its first read."""
        if number not in self._checked:
            check_part_file(self.path, self._entries[number], checksum=True)
            self._checked.add(number)
        return read_part(self._files[number], columns)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"ExplanationStore({str(self.path)!r}, {len(self)} images in {len(self._files)} parts, {state})"

    def __len__(self) -> int:
        return len(self.index)

    @property
    def index(self) -> dict[Any, tuple[int, int]]:
        """id → (part, row) for every stored image (from ``index.parquet`` once complete)."""
        if self._index is None:
            index: dict[Any, tuple[int, int]] = {}
            rows = sum(e["rows"] for e in self._entries)
            if self.complete and (self.path / INDEX).exists():
                table = _read_table(self.path / INDEX, None)
                try:
                    columns = [table.column(n).to_pylist() for n in ("id", "part", "row")]
                except KeyError as exc:
                    raise _corrupt(self.path / INDEX, f"lacks a column ({exc})") from exc
                for key, part, row in zip(*columns, strict=True):
                    index[key] = (part, row)
                if len(index) != rows or any(
                    not (0 <= p < len(self._entries) and 0 <= r < self._entries[p]["rows"]) for p, r in index.values()
                ):
                    raise _corrupt(self.path / INDEX, f"does not index the {rows} images the manifest lists")
            else:
                for number in range(len(self._files)):
                    for row, key in enumerate(self._read(number, ["id"])["id"].tolist()):
                        index[key] = (number, row)
            self._index = index
        return self._index

    @property
    def ids(self) -> np.ndarray:
        """``(N,)`` the stored ids in order."""
        return np.asarray(list(self.index))

    def verify(self) -> None:
        """Checks every part against the sha256 it was written with, and the index against the parts.

        Raises:
            StoreCorruptError: naming the first file that differs.
        """
        for number, entry in enumerate(self._entries):
            path = check_part_file(self.path, entry, checksum=True)
            ids = read_part(path, ["id"])["id"].tolist()
            if len(ids) != entry["rows"]:
                raise _corrupt(path, "holds other rows than the manifest lists")
            for row, key in enumerate(ids):
                if self.index.get(key) != (number, row):
                    raise _corrupt(self.path / INDEX, f"does not place id {key!r} at row {row} of {path.name}")

    def parts(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yields each part as ``{"id": (n,), field: (n, ...)}`` NumPy columns, in order."""
        for number in range(len(self._files)):
            yield self._read(number, columns)

    def read(self, name: str) -> np.ndarray:
        """Returns one column of every stored image, ``(N, ...)``.

        Raises:
            StoreKeyError: an unknown column (a ``KeyError`` too).
            anycam.InputError: the parts hold maps of different shapes (images of different
                sizes); read them part by part with :meth:`parts` or one by one with :meth:`get`.
        """
        stored = ("id", *self.fields, *(f"metric.{k}" for k in (self.config.get("metrics") or {}).get("names", [])))
        if name not in stored and not name.startswith("metric."):
            raise StoreKeyError(f"{name!r} is not stored; the store has {', '.join(stored)}")
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
        """Returns the stored columns of the image with id ``key``.

        Raises:
            StoreKeyError: no image has that id (a ``KeyError`` too).
            StoreCorruptError: the row the index gives holds another id (a part replaced by hand).
        """
        if key not in self.index:
            raise StoreKeyError(f"id {key!r} is not in the store ({len(self)} images)")
        number, row = self.index[key]
        part = self._read(number, None)
        if row >= len(part["id"]) or part["id"][row].tolist() != key:
            raise _corrupt(self._files[number], f"does not hold id {key!r} where the index places it (row {row})")
        return {name: values[row] for name, values in part.items()}


def _read_table(path: Path, columns: Sequence[str] | None) -> Any:
    """Reads a Parquet file of the store; a damaged one raises StoreCorruptError naming it."""
    pa, pq = pyarrow_modules()
    try:
        return pq.read_table(path, columns=list(columns) if columns else None)
    except FileNotFoundError:
        raise _corrupt(path, "is missing") from None
    except (OSError, pa.ArrowException) as exc:
        raise _corrupt(path, f"cannot be read as Parquet ({exc})") from exc


def read_meta(path: Path) -> dict[str, Any]:
    """Returns the ``anycam`` metadata of a part file (batches, shapes, dtypes)."""
    pa, pq = pyarrow_modules()
    try:
        meta = json.loads(pq.read_schema(path).metadata[b"anycam"])
        if not isinstance(meta, dict) or not {"first_batch", "batch_sizes", "shapes", "dtypes"} <= set(meta):
            raise ValueError("incomplete anycam metadata")
    except (OSError, pa.ArrowException, ValueError, KeyError, TypeError) as exc:
        raise _corrupt(path, f"is not a part anycam wrote ({exc})") from exc
    return dict(meta)


def read_part(path: Path, columns: Sequence[str] | None) -> dict[str, np.ndarray]:
    table = _read_table(path, columns)
    meta = read_meta(path)
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
