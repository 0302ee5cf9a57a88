"""The runner of ``explain_dataset``: batches through an Explainer, in order, into a resumable store.

Each batch (an array, an ``(inputs, target)`` pair or a mapping) is parsed, explained and turned
into the kept columns; with ``out=`` the columns go, in order, to the store of ``store.py`` (see
there why Parquet), and a rerun resumes after the last complete part.

``pyarrow`` is imported only when a store is opened or written (``pip install "anycam[dataset]"``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ConfigError, InputError, TargetError
from .._progress import Bar, progress_bar
from ..core.targets import TopK
from ..metrics.scoring import to_numpy
from .errors import StoreMismatchError, StoreWriteError
from .fingerprint import inputs_digest, weights_digest
from .lock import StoreLock
from .store import (
    FIELDS,
    HEATMAP_DTYPES,
    ExplanationStore,
    Part,
    Writer,
    manifest_document,
    open_store,
    pyarrow_modules,
    read_part,
    write_index,
    write_manifest,
)


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
    overwrite: bool = False,
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
    the same ``out=`` after a crash and it checks the configuration and the model's weights,
    skips every batch a complete part holds (they are still drawn from ``batches``, not
    explained, and must come back with the same sizes, ids and input values) and writes the
    rest: the store ends byte-identical to an uninterrupted run's. Run on a complete store, it
    draws every batch the same way to check it, and returns the store. One run at a time writes
    a store: a second one is refused while the first holds the lock (``.anycam-store.lock``).

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
        progress: a tqdm bar counting images (with images/s): True always, False never, None
            (default) only once the run has taken over 2 s (the rule of every anycam progress
            bar; skipped batches of a resumed run count too).
        total: the number of images, for the bar's ETA.
        part_size: images per Parquet file (a batch is never split; a new shape starts a part).
        input_key, id_key, target_key, regions_key: the keys of mapping batches.
        metadata: JSON-serialisable facts the configuration cannot see (a model checkpoint's
            name, a data split); stored, and compared on resume.
        overwrite: delete the store at ``out`` (its manifest, index and parts; nothing else)
            and write it anew, instead of resuming or checking it.

    Returns:
        An iterator of ``{"id": (N,), field: (N, ...)}`` dicts, or, with ``out=``, the store.

    Raises:
        StoreMismatchError: ``out`` holds a store of another configuration or model (the
            message names each setting that differs) or of other data (batches of other sizes,
            ids or input values than the stored ones).
        StoreLockedError: another run is writing ``out``.
        StoreCorruptError: a part or the manifest of ``out`` is missing or damaged (named).
        StoreFormatError: ``out`` holds a store of another format version.
        StoreWriteError: a part could not be written; the message says what the store holds.
        anycam.InputError: a malformed batch, an unknown field, repeated ids, or ids on some
            batches but not on others (each batch is checked before it is explained).
        anycam.ConfigError: an invalid ``heatmap_dtype`` or ``part_size``.
    """
    fields = check_fields(fields)
    if isinstance(part_size, bool) or not isinstance(part_size, numbers.Integral) or part_size < 1:
        raise ConfigError(f"part_size must be a positive integer, got {part_size!r}")
    keys = Keys(input_key, id_key, target_key, regions_key)
    runner = Runner(explainer, target, fields, heatmap_dtype, metrics, keys)
    if out is None:
        return _stream(runner, batches, progress, total)
    config = {
        **explainer_config(explainer),
        "weights": weights_digest(explainer),
        "fields": list(fields),
        "heatmap_dtype": heatmap_dtype,
        "target": describe_target(target),
        "metrics": None if metrics is None else metrics.config(),
        "part_size": int(part_size),
        "metadata": _jsonable(dict(metadata or {}), "metadata"),
    }
    return _write(runner, batches, Path(out), config, int(part_size), progress, total, bool(overwrite))


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
        "input_layout": explainer.backend.input_layout,
    }
    tta = getattr(explainer, "tta_config", None)
    config["tta"] = tta() if callable(tta) else None
    # Native maps are float32 from the device, the NumPy mode's float64 from the host: they differ
    # by rounding, so one store holds one mode. Recorded only when not NumPy: older stores still match.
    arrays = getattr(getattr(explainer, "explainer", explainer), "arrays", "numpy")
    if arrays != "numpy":
        config["arrays"] = arrays
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


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be JSON-serialisable (str, numbers, lists, dicts): {exc}") from exc


# --------------------------------------------------------------------------------------------
# Batches in, columns out


@dataclass(frozen=True)
class Keys:
    inputs: str
    id: str
    target: str
    regions: str


@dataclass
class Batch:
    inputs: Any
    ids: np.ndarray | None
    target: Any
    regions: Any
    size: int


def check_fields(fields: Sequence[str]) -> tuple[str, ...]:
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


def parse_batch(batch: Any, keys: Keys, index: int) -> Batch:
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
        return Batch(inputs, ids, batch.get(keys.target), batch.get(keys.regions), size)
    if isinstance(batch, (tuple, list)):  # a torch DataLoader collates (image, label) pairs into a list
        if len(batch) != 2:
            raise InputError(
                f"batch {index} is a {type(batch).__name__} of {len(batch)} items; a tuple or list batch is "
                "(inputs, target): pass models with several inputs as mapping batches"
            )
        return Batch(batch[0], None, batch[1], None, _batch_size(batch[0]))
    return Batch(batch, None, None, None, _batch_size(batch))


def _as_numpy(value: Any) -> np.ndarray:
    """Returns a framework tensor (torch, TF, JAX, on any device) or array as NumPy, without importing a framework."""
    return np.asarray(to_numpy(value, "the batch"))


class Runner:
    """Explains one parsed batch and turns the Explanation into the kept columns."""

    def __init__(
        self, explainer: Any, target: Any, fields: tuple[str, ...], heatmap_dtype: str, metrics: Any, keys: Keys
    ) -> None:
        self.explainer = explainer
        self.target = target
        self.fields = fields
        if heatmap_dtype not in HEATMAP_DTYPES:
            raise ConfigError(f"unknown heatmap_dtype {heatmap_dtype!r}; choose 'float32' or 'float16'")
        self.heatmap_dtype = np.dtype(heatmap_dtype)
        self.metrics = metrics
        self.keys = keys
        self.next_id = 0
        self.with_ids: bool | None = None  # whether the batches carry ids (decided by the first)
        self.id_kind: str | None = None  # "integer" or "string", decided by the first non-empty batch

    def ids(self, batch: Batch, index: int) -> np.ndarray:
        """Returns the batch's ids (its own, or running indices), consistent with the earlier batches'.

        Checked before the batch is explained, so a mix fails at its first batch, not after the work.
        """
        given = batch.ids is not None
        if self.with_ids is None:
            self.with_ids = given
        elif given != self.with_ids:
            raise InputError(
                f"batch {index} {'carries' if given else 'has no'} ids (key {self.keys.id!r}) but the batches "
                f"before it {'had none' if given else 'had them'}: give every batch ids, or none (running "
                "indices 0, 1, 2, … then stand in, and would collide with given ones)"
            )
        ids = batch.ids if batch.ids is not None else np.arange(self.next_id, self.next_id + batch.size, dtype=np.int64)
        if batch.size:
            kind = "string" if ids.dtype.kind in "US" else "integer"
            if self.id_kind is None:
                self.id_kind = kind
            elif kind != self.id_kind:
                raise InputError(
                    f"batch {index} has {kind} ids ({ids.tolist()[:3]}…) where the batches before it had "
                    f"{self.id_kind} ids; one column of ids holds one kind: convert them (e.g. str(id))"
                )
        return ids

    def explain(self, batch: Batch, index: int) -> dict[str, np.ndarray]:
        if batch.target is not None and self.target is not None:
            raise TargetError(f"batch {index} carries its own targets and target= was given too; pass one of them")
        target = batch.target if batch.target is not None else self.target
        explanation = self.explainer.explain(batch.inputs, _as_numpy(target) if _is_array(target) else target)
        # With a native-mode explainer the Explanation's arrays live on the model's device: only
        # the kept fields (and the heatmap the metrics score) are copied to the host, once each.
        host: dict[str, np.ndarray] = {}

        def read(name: str) -> np.ndarray:
            if name not in host:
                value = getattr(explanation, name, None)
                if value is None:
                    raise InputError(_missing_field(name, explanation, self.explainer))
                host[name] = np.asarray(to_numpy(value, name))
            return host[name]

        columns: dict[str, np.ndarray] = {}
        for name in self.fields:
            array = read(name)
            if name == "heatmap":
                array = array.astype(self.heatmap_dtype, copy=False)
            columns[name] = array
        if self.metrics is not None:
            # The class indices the maps explain; a callable target is handed on as it is.
            scored = explanation.target if explanation.target is not None else target
            values = self.metrics.update(_as_numpy(batch.inputs), read("heatmap"), scored, regions=batch.regions)
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


def _bar(progress: bool | None, total: int | None) -> contextlib.AbstractContextManager[Bar]:
    """The run's bar over images (with images/s), by the one rule of ``anycam._progress``."""
    return progress_bar(progress, total, "explain", "image", unit_scale=False, dynamic_ncols=True)


def _stream(runner: Runner, batches: Iterable[Any], progress: bool | None, total: int | None) -> Iterator[dict]:
    seen: set[Any] = set()
    with _bar(progress, total) as bar:
        for index, raw in enumerate(batches):
            batch = parse_batch(raw, runner.keys, index)
            ids = runner.ids(batch, index)
            _check_unique(ids, seen, index)
            runner.next_id += batch.size
            result = {"id": ids, **runner.explain(batch, index)} if batch.size else {"id": ids}
            bar.update(batch.size)
            yield result


def _check_unique(ids: np.ndarray, seen: set[Any], index: int) -> None:
    values = ids.tolist()
    repeated = [v for v in values if v in seen]
    if repeated or len(set(values)) != len(values):
        again = repeated or [v for v in values if values.count(v) > 1]
        raise InputError(f"batch {index} repeats id(s) {again[:5]}; every sample needs its own id")
    seen.update(values)


def _write(
    runner: Runner,
    batches: Iterable[Any],
    root: Path,
    config: dict[str, Any],
    part_size: int,
    progress: bool | None,
    total: int | None,
    overwrite: bool,
) -> ExplanationStore:
    pyarrow_modules()  # before any work: a missing extra should not surface after the first part's batches
    if root.exists() and not root.is_dir():
        raise StoreMismatchError(f"out={str(root)!r} is a file; pass a folder for the store")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreWriteError(
            exc.errno, f"cannot create the store's folder {str(root)!r}: {exc.strerror or exc}"
        ) from exc
    with StoreLock(root):
        parts, complete = open_store(root, config, overwrite)
        if runner.metrics is not None:  # the stored parts' per-sample values count towards summary()
            for part in parts:
                columns = read_part(root / part.name, None)
                runner.metrics.add({n[len("metric.") :]: v for n, v in columns.items() if n.startswith("metric.")})
        writer = Writer(root, parts, part_size, config)
        _run(runner, batches, writer, list(parts), complete, progress, total)
        if not complete:
            write_index(root, writer.parts)
            write_manifest(root, manifest_document(config, writer.parts, complete=True))
    return ExplanationStore(root)


def _run(
    runner: Runner,
    batches: Iterable[Any],
    writer: Writer,
    stored: list[Part],
    complete: bool,
    progress: bool | None,
    total: int | None,
) -> None:
    """Draws every batch: checks those the store holds, explains and writes the others."""
    # (size, ids, input digest) of every stored batch, to check the batches come back the same.
    done: list[tuple[int, list[Any], str | None]] = []
    for part in stored:
        start = 0
        for size, digest in zip(part.batch_sizes, part.inputs, strict=True):
            done.append((size, part.ids[start : start + size], digest))
            start += size
    seen: set[Any] = {v for p in stored for v in p.ids}
    drawn = 0
    with _bar(progress, total) as bar:
        for index, raw in enumerate(batches):
            drawn = index + 1
            batch = parse_batch(raw, runner.keys, index)
            ids = runner.ids(batch, index)
            runner.next_id += batch.size
            digest = inputs_digest(batch.inputs)
            if index < len(done):
                _check_stored_batch(index, batch.size, ids.tolist(), digest, done[index])
                bar.update(batch.size)
                continue
            if complete:
                raise StoreMismatchError(
                    f"the batches go on past the {len(done)} the complete store at {str(writer.root)!r} holds: it was "
                    "written from other data; pass another out=, or overwrite=True to write it anew"
                )
            _check_unique(ids, seen, index)
            columns = {"id": ids, **runner.explain(batch, index)} if batch.size else {"id": ids}
            writer.add(index, columns, batch.size, digest)
            bar.update(batch.size)
        writer.flush()
    if drawn < len(done):
        raise StoreMismatchError(
            f"the batches ended after {drawn}, but the store already holds {len(done)}: resuming or reusing it "
            "needs the same batches as the run that wrote it"
        )


def _check_stored_batch(
    index: int, size: int, ids: list[Any], digest: str | None, stored: tuple[int, list[Any], str | None]
) -> None:
    """Refuses a drawn batch that differs from the stored one, naming the first difference."""
    stored_size, stored_ids, stored_digest = stored
    advice = "resuming or reusing a store needs the same batches, in the same order, as the run that wrote it"
    if size != stored_size:
        raise StoreMismatchError(
            f"batch {index} has {size} samples but the store's batch {index} had {stored_size}: the batch size "
            f"changed (or the batches come from other data); {advice} — batch size {stored_size} here"
        )
    if ids != stored_ids:
        at = next(i for i, (a, b) in enumerate(zip(ids, stored_ids, strict=True)) if a != b)
        raise StoreMismatchError(
            f"batch {index} has id {ids[at]!r} at position {at} where the store holds {stored_ids[at]!r}: the "
            f"batches come in another order or from other data; {advice}"
        )
    if digest != stored_digest:
        raise StoreMismatchError(
            f"batch {index} has the stored ids but other input values than the store was written from (the "
            f"data or its preprocessing changed); {advice}, or pass overwrite=True to write it anew"
        )
