"""The capture writer: a bounded in-memory buffer drained to Parquet by one background thread.

The serving hot path only calls :meth:`CaptureWriter.record`, which appends to an in-memory buffer
bounded both in requests and in bytes (what the requests' inputs and predictions hold); all pandas/arrow work and I/O happen on one background thread per writer. Kept apart from
the conversion (:mod:`.arrow`) and the file layout (:mod:`.layout`) so that what matters here is
easy to check on its own: the request path never blocks or raises, memory stays bounded, and every
request accepted is either written or counted as dropped (with a reason).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mlflow_deploy_plugin.capture.arrow import AnsweredRequest, merge_tables, tables_by_day
from mlflow_deploy_plugin.capture.layout import join_path, new_part_name, partition_path, resolve_root
from mlflow_deploy_plugin.capture.retention import prune_capture
from mlflow_deploy_plugin.serving.frames import is_float64

_log = logging.getLogger(__name__)

_PRUNE_EVERY_S = 600.0
# A failed file is written once more on the next flush, then dropped: enough to ride out a blip
# without letting an outage pile up memory.
_MAX_WRITE_ATTEMPTS = 2
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
DEFAULT_MAX_BUFFER_BYTES = 64 * 1024 * 1024


def approx_nbytes(value: Any) -> int:
    """About how much memory ``value`` (a request's inputs or predictions) holds; cheap on the hot path.

    Float frames built by the parser cost O(1); other frames count their strings (pandas does it in C).
    """
    if value is None:
        return 0
    if isinstance(value, pd.DataFrame):
        if is_float64(value):
            return value.shape[0] * value.shape[1] * 8
        return int(value.memory_usage(index=False, deep=True).sum())
    if isinstance(value, pd.Series):
        return int(value.memory_usage(index=False, deep=True))
    if isinstance(value, np.ndarray):
        return value.nbytes if value.dtype != object else value.size * 64
    if isinstance(value, dict):
        return sum(approx_nbytes(v) for v in value.values()) + 64 * len(value)
    if isinstance(value, list | tuple):
        return 64 * len(value)
    return sys.getsizeof(value)


@dataclass(slots=True)
class _Part:
    """One Parquet file waiting to be written (kept across one retry when a write fails)."""

    day: date
    table: pa.Table
    n_requests: int
    attempts: int = 0


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
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        flush_rows: int = 5_000,
        flush_interval_s: float = 2.0,
        retention_days: int | None = None,
        on_drop: Callable[[int, str], None] | None = None,
        rng_seed: int | None = None,
        redact: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
    ) -> None:
        """Start the writer thread.

        Args:
            root: Local folder or pyarrow filesystem URI (``file://``, ``s3://bucket/prefix``...).
                The filesystem is resolved on the writer thread, so a slow or failing remote store
                never delays startup; its errors count as dropped writes.
            deployment: Stored in the ``_deployment`` column.
            sample_rate: Fraction of requests recorded, in (0, 1].
            max_buffer_requests: Requests buffered before new ones are dropped.
            max_buffer_bytes: Bytes (inputs and predictions, estimated) buffered before new requests
                are dropped; a single request larger than this is dropped too.
            flush_rows: Buffered input rows that trigger a write.
            flush_interval_s: Longest time a recorded request waits before being written.
            retention_days: If set, delete ``date=`` partitions older than this many days.
            on_drop: Called as ``on_drop(n_requests, reason)`` for requests accepted-then-lost or
                refused; reason is one of ``buffer_full``, ``write_error``, ``convert_error``,
                ``closed``, ``invalid`` (not a request object). It may run on the caller's thread
                (``buffer_full``, ``closed``, ``invalid``) or the writer thread, so it must be cheap
                and thread-safe (a Prometheus ``inc`` is).
            rng_seed: Seed of the sampling RNG, for reproducible tests.
            redact: Applied to the input columns before they are written (see :mod:`.redaction`):
                ``-C capture_exclude`` / ``-C capture_hash``. Runs on the writer thread.
        """
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}.")
        if max_buffer_requests < 1:
            raise ValueError(f"max_buffer_requests must be >= 1, got {max_buffer_requests!r}.")
        if max_buffer_bytes < 1:
            raise ValueError(f"max_buffer_bytes must be >= 1, got {max_buffer_bytes!r}.")
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
        self.max_buffer_bytes = int(max_buffer_bytes)
        self.redact = redact
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
        self._buffer: list[AnsweredRequest] = []
        self._buffered_rows = 0
        self._buffered_bytes = 0
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

    def record(self, request: AnsweredRequest) -> bool:
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
            size = approx_nbytes(inputs) + approx_nbytes(request.predictions)
            reason = None
            with self._lock:
                if self._closed:
                    reason = DROP_CLOSED
                elif (len(self._buffer) >= self.max_buffer_requests
                      or self._buffered_bytes + size > self.max_buffer_bytes):
                    reason = DROP_BUFFER_FULL
                else:
                    self._buffer.append(request)
                    self._buffered_bytes += size
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

    @property
    def buffered_bytes(self) -> int:
        """Estimated bytes of the requests waiting in memory to be written."""
        return self._buffered_bytes

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
        if self.retention_days is None:  # no retention: _run never schedules a prune
            return
        try:
            fs, base = self._filesystem()
            prune_capture(self.root, self.deployment, self.retention_days, _fs=(fs, base))
        except Exception as exc:
            _log.warning("Capture for deployment %r: pruning old partitions failed: %s",
                         self.deployment, exc)

    def _filesystem(self) -> tuple[pafs.FileSystem, str]:
        if self._fs is None:
            self._fs = resolve_root(self.root)
        return self._fs

    def _flush_once(self, final: bool) -> int:
        """Write the buffer (and parts awaiting a retry); with ``final``, retry then drop failures."""
        with self._write_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
                self._buffered_rows = 0
                self._buffered_bytes = 0
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
            folder = partition_path(base, part.day)
            if part.day not in self._made_dirs:
                fs.create_dir(folder, recursive=True)
                self._made_dirs.add(part.day)
            name = new_part_name()
            final_path = join_path(folder, name)
            if isinstance(fs, pafs.LocalFileSystem):
                # Readers skip dot-files, so a half-written file is never seen; rename is atomic.
                tmp = join_path(folder, f".{name}.tmp")
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

    def _build_parts(self, batch: list[AnsweredRequest]) -> list[_Part]:
        """Turn requests into one Arrow table per day (or per column layout if they cannot unify)."""
        by_day, unconverted = tables_by_day(batch, self.deployment, self.redact)
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
        return [_Part(day, table, n) for day, tables in by_day.items() for table, n in merge_tables(tables)]
