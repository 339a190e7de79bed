"""Inference capture: record answered requests and their predictions to Parquet, and read them back.

Layout (shared with the drift job, keep it stable)::

    {root}/date=YYYY-MM-DD/part-{utc time}-{pid}-{seq}.parquet

One row per input row. Meta columns first (``_request_id``, ``_timestamp``, ``_deployment``,
``_model_version``, ``_status``, ``_latency_ms``, ``_row``), then the input columns under their own
names, then the predictions (``_prediction`` or ``_prediction_<col>``).

The serving hot path only calls :meth:`CaptureWriter.record`, which appends to a bounded in-memory
buffer; all pandas/arrow work and I/O happen on one background thread per writer. Several worker
processes may write to the same root: file names carry the pid and a per-process sequence number.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import math
import os
import random
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mlflow_deploy_plugin.serving.frames import is_float64, stack_frames

_log = logging.getLogger(__name__)

META_COLUMNS: tuple[str, ...] = (
    "_request_id", "_timestamp", "_deployment", "_model_version", "_status", "_latency_ms", "_row",
)
META_SCHEMA = pa.schema([
    ("_request_id", pa.string()),
    ("_timestamp", pa.timestamp("us", tz="UTC")),
    ("_deployment", pa.string()),
    ("_model_version", pa.string()),
    ("_status", pa.int16()),
    ("_latency_ms", pa.float32()),
    ("_row", pa.int32()),
])
PREDICTION_PREFIX = "_prediction"

_PARTITION_PREFIX = "date="
_PARTITION_RE = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_PRUNE_EVERY_S = 600.0
# A failed file is written once more on the next flush, then dropped: enough to ride out a blip
# without letting an outage pile up memory.
_MAX_WRITE_ATTEMPTS = 2
_EPOCH = date(1970, 1, 1)
# Shared by every writer in the process so two writers on one root cannot pick the same file name.
_FILE_SEQ = itertools.count()
# Writers to restart in a forked child (e.g. uvicorn workers forked after the app was built).
_LIVE_WRITERS: weakref.WeakSet[CaptureWriter] = weakref.WeakSet()


def _restart_writers_after_fork() -> None:
    for writer in list(_LIVE_WRITERS):
        with contextlib.suppress(Exception):
            writer._after_fork_in_child()


os.register_at_fork(after_in_child=_restart_writers_after_fork)

DROP_BUFFER_FULL = "buffer_full"
DROP_WRITE_ERROR = "write_error"
DROP_CONVERT_ERROR = "convert_error"
DROP_CLOSED = "closed"
DROP_INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class CapturedRequest:
    """One answered ``/invocations`` request, as handed to :meth:`CaptureWriter.record`.

    ``inputs`` and ``predictions`` are kept by reference until the next flush: do not mutate them
    after recording.
    """

    request_id: str
    timestamp: float  # epoch seconds
    model_version: str
    status: int
    latency_ms: float
    inputs: pd.DataFrame | None
    predictions: Any | None


@dataclass(slots=True)
class _Part:
    """One Parquet file waiting to be written (kept across one retry when a write fails)."""

    day: date
    table: pa.Table
    n_requests: int
    attempts: int = 0


@dataclass(slots=True)
class _Group:
    """Requests of one day whose columns and dtypes match, so they concatenate cheaply."""

    frames: list[pd.DataFrame | None] = field(default_factory=list)
    predictions: list[dict[str, np.ndarray]] = field(default_factory=list)
    meta: list[tuple[str, float, str, int, float, int]] = field(default_factory=list)


def _resolve(root: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it for a local folder or a pyarrow filesystem URI."""
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


class CaptureWriter:
    """Buffers captured requests in memory and writes them to Parquet from a background thread.

    Best created in each worker process; a writer inherited through ``fork`` restarts empty in the
    child. Call :meth:`close` on shutdown; an ``atexit`` hook also closes writers left open.
    """

    def __init__(
        self,
        root: str,
        deployment: str,
        *,
        sample_rate: float = 1.0,
        max_buffer_requests: int = 10_000,
        flush_rows: int = 5_000,
        flush_interval_s: float = 2.0,
        retention_days: int | None = None,
        on_drop: Callable[[int, str], None] | None = None,
        rng_seed: int | None = None,
    ) -> None:
        """Start the writer thread.

        Args:
            root: Local folder or pyarrow filesystem URI (``file://``, ``s3://bucket/prefix``...).
                The filesystem is resolved on the writer thread, so a slow or failing remote store
                never delays startup; its errors count as dropped writes.
            deployment: Stored in the ``_deployment`` column.
            sample_rate: Fraction of requests recorded, in (0, 1].
            max_buffer_requests: Requests buffered before new ones are dropped.
            flush_rows: Buffered input rows that trigger a write.
            flush_interval_s: Longest time a recorded request waits before being written.
            retention_days: If set, delete ``date=`` partitions older than this many days.
            on_drop: Called as ``on_drop(n_requests, reason)`` for requests accepted-then-lost or
                refused; reason is one of ``buffer_full``, ``write_error``, ``convert_error``,
                ``closed``, ``invalid`` (not a request object). It may run on the caller's thread
                (``buffer_full``, ``closed``, ``invalid``) or the writer thread, so it must be cheap
                and thread-safe (a Prometheus ``inc`` is).
            rng_seed: Seed of the sampling RNG, for reproducible tests.
        """
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}.")
        if max_buffer_requests < 1:
            raise ValueError(f"max_buffer_requests must be >= 1, got {max_buffer_requests!r}.")
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be >= 1, got {flush_rows!r}.")
        if not flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s!r}.")
        if retention_days is not None and retention_days < 1:
            raise ValueError(f"retention_days must be >= 1 or None, got {retention_days!r}.")
        self.root = root
        self.deployment = deployment
        self.sample_rate = float(sample_rate)
        self.max_buffer_requests = int(max_buffer_requests)
        self.flush_rows = int(flush_rows)
        self.flush_interval_s = float(flush_interval_s)
        self.retention_days = retention_days
        self.on_drop = on_drop

        self._rng_seed = rng_seed
        self._rng = random.Random(rng_seed)
        self._closed = False
        self._start()
        _LIVE_WRITERS.add(self)
        # Daemon threads are killed at interpreter exit; closing first keeps what was accepted.
        ref = weakref.ref(self)

        def _close_at_exit() -> None:
            writer = ref()
            if writer is not None:
                writer.close(timeout_s=5.0)

        self._atexit = _close_at_exit
        atexit.register(_close_at_exit)

    def _start(self) -> None:
        """Fresh state and writer thread (at creation, and in a forked child)."""
        self.accepted_requests = 0
        self.dropped_requests = 0
        self.written_requests = 0
        self.written_rows = 0
        self._lost_accepted = 0
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._buffer: list[CapturedRequest] = []
        self._buffered_rows = 0
        self._first_buffered_at: float | None = None
        self._warned: set[str] = set()
        # Serialises writes between the thread and explicit flush() calls.
        self._write_lock = threading.Lock()
        self._pending: list[_Part] = []
        self._retry_at = math.inf
        self._fs: tuple[pafs.FileSystem, str] | None = None
        self._made_dirs: set[date] = set()
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.deployment}", daemon=True)
        if not self._closed:
            self._thread.start()

    def _after_fork_in_child(self) -> None:
        # The thread does not survive a fork and a lock may have been copied while held. The
        # parent still owns (and writes) what it had buffered, so the child starts empty.
        if self._rng_seed is None:
            self._rng = random.Random()
        self._start()

    # ---- hot path -------------------------------------------------------------------------------

    def record(self, request: CapturedRequest) -> bool:
        """Queue one answered request for capture; never blocks on I/O and never raises.

        Returns True if the request was accepted, False if it was sampled out (not counted as a
        drop) or dropped (buffer full, writer closed; counted in ``dropped_requests``).
        """
        try:
            if self.sample_rate < 1.0 and self._rng.random() >= self.sample_rate:
                return False
            inputs = request.inputs
            rows = 1
            if inputs is not None:
                try:
                    rows = max(len(inputs), 1)
                except TypeError:
                    rows = 1
            reason = None
            with self._lock:
                if self._closed:
                    reason = DROP_CLOSED
                elif len(self._buffer) >= self.max_buffer_requests:
                    reason = DROP_BUFFER_FULL
                else:
                    self._buffer.append(request)
                    before = self._buffered_rows
                    self._buffered_rows = before + rows
                    self.accepted_requests += 1
                    if before == 0:
                        # Wake the thread only on the first row (to start the interval clock) and
                        # when a size flush is due, so most calls do no signalling at all.
                        self._first_buffered_at = time.monotonic()
                        self._wakeup.notify()
                    elif before < self.flush_rows <= self._buffered_rows:
                        self._wakeup.notify()
                    return True
                self.dropped_requests += 1
                first_of_burst = reason not in self._warned
                if first_of_burst:
                    self._warned.add(reason)
            if first_of_burst:
                _log.warning("Capture for deployment %r: dropping requests (%s); further drops are counted "
                             "in dropped_requests until it recovers.", self.deployment, reason)
            self._notify_drop(1, reason)
            return False
        except Exception:  # the service must answer whatever happens here
            with contextlib.suppress(Exception):
                self._drop(1, DROP_INVALID, accepted=False)
            return False

    # ---- control --------------------------------------------------------------------------------

    def flush(self) -> int:
        """Write everything buffered now, on the caller's thread; returns the requests written.

        Meant for tests and tools: the service relies on the background thread.
        """
        return self._flush_once(final=False)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, write everything buffered, and stop the thread. Idempotent.

        If writing takes longer than ``timeout_s`` the thread is left to finish on its own (it is a
        daemon, so it will not hold the process open).
        """
        with self._lock:
            self._closed = True
            self._wakeup.notify_all()
        started = self._thread.ident is not None  # a writer closed before a fork has no thread in the child
        if started and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                unwritten = self.accepted_requests - self.written_requests - self._lost_accepted
                _log.warning("Capture for deployment %r did not finish writing within %.1fs; "
                             "%d accepted requests may be lost.", self.deployment, timeout_s, unwritten)
        atexit.unregister(self._atexit)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def buffered_requests(self) -> int:
        """Requests waiting in memory to be written."""
        return len(self._buffer)

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        next_prune = time.monotonic() if self.retention_days else math.inf
        while True:
            try:
                with self._lock:
                    while True:
                        now = time.monotonic()
                        if self._closed or self._buffered_rows >= self.flush_rows or now >= next_prune:
                            break
                        due = math.inf
                        if self._first_buffered_at is not None:
                            due = self._first_buffered_at + self.flush_interval_s
                        if self._pending:
                            due = min(due, self._retry_at)
                        if now >= due:
                            break
                        wait = min(due, next_prune) - now
                        # Nothing to do until record() or close() signals: sleep without polling.
                        self._wakeup.wait(None if wait == math.inf else wait)
                    closing = self._closed
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + _PRUNE_EVERY_S
                    self._prune()
                self._flush_once(final=closing)
                if closing:
                    return
            except Exception:  # never let the thread die: capture would silently stop
                _log.exception("Capture for deployment %r: unexpected error in the writer thread.",
                               self.deployment)
                time.sleep(min(self.flush_interval_s, 1.0))

    def _prune(self) -> None:
        try:
            fs, base = self._filesystem()
            prune_capture(self.root, self.deployment, self.retention_days, _fs=(fs, base))
        except Exception as exc:
            _log.warning("Capture for deployment %r: pruning old partitions failed: %s",
                         self.deployment, exc)

    def _filesystem(self) -> tuple[pafs.FileSystem, str]:
        if self._fs is None:
            self._fs = _resolve(self.root)
        return self._fs

    def _flush_once(self, final: bool) -> int:
        """Write the buffer (and parts awaiting a retry); with ``final``, retry then drop failures."""
        with self._write_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
                self._buffered_rows = 0
                self._first_buffered_at = None
                self._warned.discard(DROP_BUFFER_FULL)
            parts = self._pending
            self._pending = []
            if batch:
                parts.extend(self._build_parts(batch))
            written = 0
            attempts_left = _MAX_WRITE_ATTEMPTS if final else 1
            while parts and attempts_left > 0:
                attempts_left -= 1
                failed: list[_Part] = []
                for part in parts:
                    if self._write_part(part):
                        written += part.n_requests
                    else:
                        failed.append(part)
                parts = failed
            retry = [] if final else [p for p in parts if p.attempts < _MAX_WRITE_ATTEMPTS]
            lost = sum(p.n_requests for p in parts) - sum(p.n_requests for p in retry)
            self._pending = retry
            self._retry_at = time.monotonic() + self.flush_interval_s
            if lost:
                self._drop(lost, DROP_WRITE_ERROR)
            return written

    def _write_part(self, part: _Part) -> bool:
        part.attempts += 1
        tmp = None
        try:
            fs, base = self._filesystem()
            folder = _join(base, f"{_PARTITION_PREFIX}{part.day.isoformat()}")
            if part.day not in self._made_dirs:
                fs.create_dir(folder, recursive=True)
                self._made_dirs.add(part.day)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            name = f"part-{stamp}-{os.getpid()}-{next(_FILE_SEQ):06d}.parquet"
            final_path = _join(folder, name)
            if isinstance(fs, pafs.LocalFileSystem):
                # Readers skip dot-files, so a half-written file is never seen; rename is atomic.
                tmp = _join(folder, f".{name}.tmp")
                pq.write_table(part.table, tmp, filesystem=fs, compression="zstd")
                fs.move(tmp, final_path)
                tmp = None
            else:
                # Object stores publish an object only once its upload completes; a rename there is a copy.
                pq.write_table(part.table, final_path, filesystem=fs, compression="zstd")
        except Exception as exc:
            self._made_dirs.discard(part.day)
            if tmp is not None:
                with contextlib.suppress(Exception):
                    fs.delete_file(tmp)
            with self._lock:
                first_of_burst = DROP_WRITE_ERROR not in self._warned
                self._warned.add(DROP_WRITE_ERROR)
            if first_of_burst:
                _log.warning("Capture for deployment %r: writing to %s failed (%s: %s); requests are "
                             "retried once, then dropped and counted.", self.deployment, self.root,
                             type(exc).__name__, exc)
            return False
        with self._lock:
            recovered = DROP_WRITE_ERROR in self._warned
            self._warned.discard(DROP_WRITE_ERROR)
            self.written_requests += part.n_requests
            self.written_rows += part.table.num_rows
        if recovered:
            _log.warning("Capture for deployment %r: writing works again.", self.deployment)
        return True

    def _drop(self, n: int, reason: str, accepted: bool = True) -> None:
        with self._lock:
            self.dropped_requests += n
            if accepted:
                self._lost_accepted += n
        self._notify_drop(n, reason)

    def _notify_drop(self, n: int, reason: str) -> None:
        if self.on_drop is None:
            return
        # A broken metrics hook must not break serving or capture.
        with contextlib.suppress(Exception):
            self.on_drop(n, reason)

    # ---- conversion (writer thread only) ---------------------------------------------------------

    def _build_parts(self, batch: list[CapturedRequest]) -> list[_Part]:
        """Turn requests into one Arrow table per day (or per column layout if they cannot unify)."""
        groups: dict[tuple[int, tuple, tuple], _Group] = {}
        unconverted = 0
        for req in batch:
            try:
                day = int(float(req.timestamp) // 86400)
                frame = _as_frame(req.inputs)
                n = len(frame) if frame is not None else 1
                # No inputs (e.g. a rejected request): one meta-only row, as the drift job expects.
                predictions = _prediction_columns(req.predictions, n) if frame is not None else {}
                key = (
                    day,
                    _frame_signature(frame),
                    tuple((name, _dtype_key(arr.dtype)) for name, arr in predictions.items()),
                )
                group = groups.get(key)
                if group is None:
                    group = groups[key] = _Group()
                group.frames.append(frame)
                group.predictions.append(predictions)
                group.meta.append((str(req.request_id), float(req.timestamp), str(req.model_version),
                                   int(req.status), float(req.latency_ms), n))
            except Exception:
                unconverted += 1
        by_day: dict[int, list[tuple[pa.Table, int]]] = {}
        for (day, _, _), group in groups.items():
            try:
                by_day.setdefault(day, []).append((self._group_table(group), len(group.meta)))
            except Exception:
                unconverted += len(group.meta)
        if unconverted:
            with self._lock:
                first_of_burst = DROP_CONVERT_ERROR not in self._warned
                self._warned.add(DROP_CONVERT_ERROR)
            if first_of_burst:
                _log.warning("Capture for deployment %r: %d requests could not be converted to Arrow and "
                             "were dropped.", self.deployment, unconverted)
            self._drop(unconverted, DROP_CONVERT_ERROR)
        else:
            with self._lock:
                self._warned.discard(DROP_CONVERT_ERROR)
        parts: list[_Part] = []
        for day_number, tables in by_day.items():
            day = _EPOCH + timedelta(days=day_number)
            if len(tables) == 1:
                parts.append(_Part(day, tables[0][0], tables[0][1]))
                continue
            try:
                merged = pa.concat_tables([t for t, _ in tables], promote_options="permissive")
                parts.append(_Part(day, merged, sum(n for _, n in tables)))
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                # Same column name, incompatible types (e.g. two model versions): one file each.
                parts.extend(_Part(day, t, n) for t, n in tables)
        return parts

    def _group_table(self, group: _Group) -> pa.Table:
        counts = np.fromiter((m[5] for m in group.meta), dtype=np.int64, count=len(group.meta))
        total = int(counts.sum())
        micros = np.fromiter((round(m[1] * 1e6) for m in group.meta), dtype=np.int64, count=len(group.meta))
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        arrays: list[pa.Array] = [
            pa.array(np.repeat(np.array([m[0] for m in group.meta], dtype=object), counts), pa.string()),
            pa.array(np.repeat(micros, counts), pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            pa.array([self.deployment] * total, pa.string()),
            pa.array(np.repeat(np.array([m[2] for m in group.meta], dtype=object), counts), pa.string()),
            pa.array(np.repeat(np.array([m[3] for m in group.meta], dtype=np.int16), counts), pa.int16()),
            pa.array(np.repeat(np.array([m[4] for m in group.meta], dtype=np.float32), counts), pa.float32()),
            pa.array((np.arange(total, dtype=np.int64) - starts).astype(np.int32), pa.int32()),
        ]
        names = list(META_COLUMNS)
        frames = [f for f in group.frames if f is not None]
        if frames:
            inputs = stack_frames(frames)
            for i, name in enumerate(inputs.columns):
                names.append(name)
                arrays.append(_to_arrow(inputs.iloc[:, i]))
        for name in group.predictions[0]:
            column = np.concatenate([p[name] for p in group.predictions])
            names.append(name)
            arrays.append(_to_arrow(column))
        return pa.Table.from_arrays(arrays, names=names)


# ---- conversion helpers --------------------------------------------------------------------------


def _as_frame(inputs: Any) -> pd.DataFrame | None:
    """Inputs as a DataFrame with unique string column names that cannot clash with ours."""
    if inputs is None:
        return None
    if isinstance(inputs, pd.DataFrame):
        frame = inputs
    elif isinstance(inputs, pd.Series):
        frame = inputs.to_frame()
    elif isinstance(inputs, np.ndarray):
        frame = pd.DataFrame(inputs.reshape(len(inputs), -1) if inputs.ndim != 1 else inputs)
    elif isinstance(inputs, dict):
        try:
            frame = pd.DataFrame(inputs)
        except ValueError:
            frame = pd.DataFrame({"_input": [str(inputs)]})
    else:
        frame = pd.DataFrame({"_input": [str(inputs)]})
    if len(frame) == 0:
        return None
    names = [str(c) for c in frame.columns]
    fixed: list[str] = []
    seen: set[str] = set()
    for name in names:
        if name in META_COLUMNS or name.startswith(PREDICTION_PREFIX):
            name = f"_input{name}"
        base, k = name, 1
        while name in seen:
            name = f"{base}.{k}"
            k += 1
        seen.add(name)
        fixed.append(name)
    if fixed != list(frame.columns):
        frame = frame.set_axis(fixed, axis=1)
    return frame


def _frame_signature(frame: pd.DataFrame | None) -> tuple:
    if frame is None:
        return ()
    if is_float64(frame):  # cheap for parser-built frames: no per-request dtypes Series
        return (tuple(frame.columns), "float64")
    return tuple(zip(frame.columns, map(str, frame.dtypes), strict=True))


def _dtype_key(dtype: np.dtype) -> str:
    # Strings of different widths concatenate fine; keep them in one group.
    return dtype.kind if dtype.kind in "USO" else dtype.str


def _object_array(values: Iterable[Any]) -> np.ndarray:
    items = list(values)
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _prediction_columns(predictions: Any, n_rows: int) -> dict[str, np.ndarray]:
    """Model output as 1-D column arrays of ``n_rows`` each, named ``_prediction[_<col>]``."""
    if predictions is None:
        return {}
    if isinstance(predictions, dict):
        try:
            predictions = pd.DataFrame(predictions)
        except ValueError:
            return _misaligned(predictions, n_rows)
    if isinstance(predictions, pd.DataFrame):
        if len(predictions) != n_rows:
            return _misaligned(predictions, n_rows)
        out: dict[str, np.ndarray] = {}
        for i, col in enumerate(predictions.columns):
            name = f"{PREDICTION_PREFIX}_{col}"
            if name in out:
                name = f"{name}.{i}"
            out[name] = predictions.iloc[:, i].to_numpy()
        return out
    if isinstance(predictions, pd.Series):
        arr = predictions.to_numpy()
    elif isinstance(predictions, np.ndarray):
        arr = predictions
    elif isinstance(predictions, list | tuple):
        try:
            arr = np.asarray(predictions)
        except ValueError:  # ragged nested lists
            arr = _object_array(predictions)
    else:
        arr = _object_array([predictions])
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if len(arr) != n_rows:
        return _misaligned(predictions, n_rows)
    if arr.ndim == 1:
        return {PREDICTION_PREFIX: arr}
    if arr.ndim == 2:
        return {f"{PREDICTION_PREFIX}_{i}": arr[:, i] for i in range(arr.shape[1])}
    return {PREDICTION_PREFIX: _object_array(row.tolist() for row in arr)}


def _misaligned(predictions: Any, n_rows: int) -> dict[str, np.ndarray]:
    # Output that does not map to input rows is kept whole, as text, on the request's first row.
    return {PREDICTION_PREFIX: _object_array([str(predictions)] + [None] * (n_rows - 1))}


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        result = pd.isna(value)
    except (TypeError, ValueError):
        return False
    return bool(result) if np.ndim(result) == 0 else False


def _to_arrow(values: pd.Series | np.ndarray) -> pa.Array:
    """One column as Arrow, falling back to text for objects Arrow cannot represent."""
    try:
        arr = pa.array(values, from_pandas=True)
        if pa.types.is_dictionary(arr.type):
            # Categories would make every file's schema differ; store plain values.
            arr = arr.cast(arr.type.value_type)
        if isinstance(arr.type, pa.ExtensionType) or pa.types.is_null(arr.type):
            raise pa.ArrowTypeError("stored as text")
        return arr
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return pa.array([None if _is_missing(v) else str(v) for v in values], pa.string())


# ---- retention -----------------------------------------------------------------------------------


def _partitions(fs: pafs.FileSystem, base: str) -> list[tuple[date, str]]:
    """The ``date=`` folders under ``base`` with their dates; none if ``base`` does not exist."""
    selector = pafs.FileSelector(base, allow_not_found=True, recursive=False)
    found = []
    for info in fs.get_file_info(selector):
        match = _PARTITION_RE.match(info.base_name)
        if info.type != pafs.FileType.Directory or match is None:
            continue
        try:
            found.append((date.fromisoformat(match.group(1)), info.path))
        except ValueError:
            continue
    found.sort()
    return found


def prune_capture(
    root: str,
    deployment: str | None,
    retention_days: int,
    now: datetime | None = None,
    *,
    _fs: tuple[pafs.FileSystem, str] | None = None,
) -> list[str]:
    """Delete ``date=`` partitions of ``root`` whose whole day is older than ``retention_days``.

    A partition for day D is removed when D + 1 day <= now - retention_days, i.e. today and the
    previous ``retention_days`` days are kept. ``deployment`` only labels the log line.
    Returns the removed partitions as ``{root}/date=YYYY-MM-DD``.
    """
    if retention_days < 1:
        raise ValueError(f"retention_days must be >= 1, got {retention_days!r}.")
    now = _as_utc(now) if now is not None else datetime.now(UTC)
    cutoff = (now - timedelta(days=retention_days)).date()
    fs, base = _fs if _fs is not None else _resolve(root)
    removed = []
    for day, path in _partitions(fs, base):
        if day >= cutoff:
            break
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            continue  # another worker pruned it first
        removed.append(_join(root, f"{_PARTITION_PREFIX}{day.isoformat()}"))
    if removed:
        _log.info("Capture%s: removed %d partitions older than %d days.",
                  f" for deployment {deployment!r}" if deployment else "", len(removed), retention_days)
    return removed


# ---- reading -------------------------------------------------------------------------------------


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _unified_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """All columns of all files; a column whose types cannot be promoted is read as text."""
    types: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for f in schema:
            seen = types.setdefault(f.name, [])
            if f.type not in seen:
                seen.append(f.type)
    fields = []
    for name, candidates in types.items():
        try:
            merged = pa.unify_schemas([pa.schema([(name, t)]) for t in candidates],
                                      promote_options="permissive").field(name).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError):
            merged = pa.string()
        fields.append(pa.field(name, merged))
    meta = [f for f in fields if f.name in META_COLUMNS]
    inputs = [f for f in fields if f.name not in META_COLUMNS and not f.name.startswith(PREDICTION_PREFIX)]
    outputs = [f for f in fields if f.name.startswith(PREDICTION_PREFIX)]
    return pa.schema(meta + inputs + outputs)


def _empty_frame(columns: list[str] | None) -> pd.DataFrame:
    names = list(META_COLUMNS) if columns is None else list(columns)
    schema = pa.schema([META_SCHEMA.field(n) if n in META_COLUMNS else pa.field(n, pa.null()) for n in names])
    return schema.empty_table().to_pandas()


def read_capture(
    root: str,
    since: datetime | None = None,
    until: datetime | None = None,
    columns: list[str] | None = None,
) -> pd.DataFrame:
    """Captured rows with ``since <= _timestamp < until``, oldest first.

    Only ``date=`` partitions that overlap the window are opened. Files may have different columns
    (e.g. several model versions): missing values are null. Naive datetimes are UTC. With
    ``columns``, only those are returned (unknown ones as all-null). Returns an empty frame with
    the meta columns (or ``columns``) if nothing matches.
    """
    fs, base = _resolve(root)
    since_utc = _as_utc(since) if since is not None else None
    until_utc = _as_utc(until) if until is not None else None
    files: list[str] = []
    for day, path in _partitions(fs, base):
        # A partition holds [day, day + 1) UTC.
        if since_utc is not None and day < since_utc.date():
            continue
        if until_utc is not None and datetime(day.year, day.month, day.day, tzinfo=UTC) >= until_utc:
            continue
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False)):
            if (info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
                    and not info.base_name.startswith((".", "_"))):
                files.append(info.path)
    if not files:
        return _empty_frame(columns)
    probe = ds.dataset(files, format="parquet", filesystem=fs)
    schema = _unified_schema([fragment.physical_schema for fragment in probe.get_fragments()])
    dataset = ds.dataset(files, schema=schema, format="parquet", filesystem=fs)
    stamp_type = pa.timestamp("us", tz="UTC")
    condition = None
    if since_utc is not None:
        condition = ds.field("_timestamp") >= pa.scalar(since_utc, stamp_type)
    if until_utc is not None:
        upper = ds.field("_timestamp") < pa.scalar(until_utc, stamp_type)
        condition = upper if condition is None else condition & upper
    wanted = None if columns is None else [c for c in columns if c in schema.names]
    table = dataset.to_table(columns=wanted, filter=condition)
    if table.num_rows == 0:
        return _empty_frame(columns)
    sort_keys = [(k, "ascending") for k in ("_timestamp", "_request_id", "_row") if k in table.column_names]
    if sort_keys:
        table = table.sort_by(sort_keys)
    frame = table.to_pandas()
    if columns is not None:
        frame = frame.reindex(columns=list(columns))
    return frame


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A UTC datetime from a look-back like ``90s``, ``30m``, ``1h``, ``24h``, ``7d`` or an ISO-8601 time.

    Durations count back from ``now`` (default: the current time). Naive timestamps are UTC.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"Invalid time {text!r}: expected a duration such as 90s, 30m, 1h, 24h or 7d, "
                         "or an ISO-8601 timestamp such as 2024-05-01T12:00:00Z.")
    match = _DURATION.match(text)
    if match:
        current = _as_utc(now) if now is not None else datetime.now(UTC)
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
        return current - timedelta(seconds=seconds)
    try:
        return _as_utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise ValueError(f"Invalid time {text!r}: expected a duration such as 90s, 30m, 1h, 24h or 7d, "
                         "or an ISO-8601 timestamp such as 2024-05-01T12:00:00Z.") from None
