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

``pyarrow`` is imported only when a store is opened or written (``pip install "anycam[dataset]"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import AnycamError, InputError, require

#: What ``fields=`` may name (``attribution`` needs an Explainer whose Explanation has it).
FIELDS = ("heatmap", "cam", "scores", "target", "attribution")
HEATMAP_DTYPES = ("float32", "float16")
MANIFEST = "anycam-store.json"
INDEX = "index.parquet"
FORMAT_VERSION = 1
PART_NAME = "part-{:06d}.parquet"


class StoreMismatchError(AnycamError, ValueError):
    """An ``out=`` store was written by another configuration, or from other data."""


class StoreWriteError(AnycamError, OSError):
    """Writing a part failed (disk full, permissions); the store still holds every complete part."""


def _config_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    lines = []
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            lines.append(f"{key}: store has {stored.get(key)!r}, this run has {wanted.get(key)!r}")
    return lines



@dataclass
class Part:
    number: int
    first_batch: int
    batch_sizes: list[int]
    ids: list[Any]
    shapes: dict[str, list[int]] = field(default_factory=dict)


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
    pa, pq = pyarrow_modules()
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _read_meta(path: Path) -> dict[str, Any]:
    _, pq = pyarrow_modules()
    schema = pq.read_schema(path)
    return dict(json.loads(schema.metadata[b"anycam"]))


class Writer:
    """Buffers batches into parts and commits each part atomically."""

    def __init__(self, root: Path, parts: list[Part], part_size: int) -> None:
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
        part = Part(number, self.buffer_first, list(self.buffer_sizes), ids, dict(self.buffer_shapes or {}))
        path = self.root / PART_NAME.format(number)
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


def open_store(root: Path, config: dict[str, Any]) -> tuple[list[Part], bool]:
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
        write_manifest(root, {"config": config, "complete": False})
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
    parts: list[Part] = []
    expected_batch = 0
    for number, path in enumerate(sorted(root.glob("part-*.parquet"))):
        meta = _read_meta(path)
        if path.name != PART_NAME.format(number) or meta["first_batch"] != expected_batch:
            raise StoreMismatchError(f"{path} does not follow part {number - 1}: the store was modified by hand")
        _, pq = pyarrow_modules()
        ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
        parts.append(Part(number, meta["first_batch"], list(meta["batch_sizes"]), ids, dict(meta["shapes"])))
        expected_batch += len(meta["batch_sizes"])
    return parts, bool(manifest.get("complete"))


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    _atomic_write_bytes(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def write_index(root: Path, parts: list[Part]) -> None:
    pa, pq = pyarrow_modules()
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
            _, pq = pyarrow_modules()
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
            yield read_part(path, columns)

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
        part = read_part(self._files[number], None)
        return {name: values[row] for name, values in part.items()}


def read_part(path: Path, columns: Sequence[str] | None) -> dict[str, np.ndarray]:
    _, pq = pyarrow_modules()
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
