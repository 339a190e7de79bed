"""The capture writer: the request path appends encoded records to a spool; another process writes Parquet.

:meth:`CaptureWriter.record` checks that an answered request fits the spool's batch record
(:mod:`.batch`: the parser's float rows and numeric predictions, nearly all traffic) and copies
it into its column layout's growing buffer (:class:`.batch.LayoutBuffer`: nothing of the request
outlives it), a few microseconds; anything else it encodes at once as a record of its own
(:mod:`.spool`). A background thread of the serving process, every ``_WRITE_EVERY_S``, encodes
the requests waiting as one batch record per column layout (the fixed cost of a record is paid
once per write, not once per request; the rows are a few contiguous arrays), appends the bytes to
a segment file (``os.writev`` releases the GIL) and, every ``flush_interval_s`` or ``flush_rows`` rows, hands the segment to the converter
process (:mod:`.converter`), which does all the Arrow/Parquet work. So writing Parquet never holds
the GIL of the process that serves.

Writer and converter talk through files only: the writer renames a complete segment ``.seg``; the
converter writes its Parquet and answers in ``.done``, which the writer reads to count. One
converter serves every writer of a spool folder: the local engine's supervisor keeps one per
deployment (``converter="external"``: the workers' writers start none), elsewhere the writers of a
process share one they start themselves (``converter="own"``), which exits when idle and is
started again when a segment waits.

What stays true, and is easy to check here: the request path never blocks on I/O or raises;
what waits (in memory or in the spool, not yet in Parquet) is bounded in requests and bytes (a
request waiting in memory counts the bytes its share of a batch record will take);
every request accepted is either written or counted as dropped (with a reason); nothing accepted
is lost on a graceful :meth:`~CaptureWriter.close`; after a crash, the converter of the next
start converts what the spool kept (a torn last record is skipped).

What a crash loses is what was still in memory: about ``_WRITE_EVERY_S`` of requests. A process
killed outright cannot count that itself, so :meth:`~CaptureWriter.tally_into` keeps two counts
in a buffer that outlives it (the local engine's worker passes a shared memory map of its
liveness file, ``engines/local/liveness.py``): requests accepted into memory, and requests that
left it (appended to the spool file, or counted as dropped). Plain stores to memory, no syscall on
the request path; whoever sees the process die adds the difference to the drop count.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

import pandas as pd

from mlflow_deploy_plugin.capture.arrow import AnsweredRequest
from mlflow_deploy_plugin.capture.batch import LayoutBuffer, batch_item
from mlflow_deploy_plugin.capture.retention import prune_capture
from mlflow_deploy_plugin.capture.spool import (
    CONFIG_NAME,
    DONE_SUFFIX,
    LOCK_NAME,
    OPEN_SUFFIX,
    SEGMENT_SUFFIX,
    encode_layouts,
    encode_record,
    rows_of_raw,
    write_config,
)

_log = logging.getLogger(__name__)

_PRUNE_EVERY_S = 600.0
# Encoded records reach the segment file at least this often (and at once past _WRITE_BYTES).
_WRITE_EVERY_S = 0.25
_WRITE_BYTES = 1 << 20
# Column layouts whose buffers are kept for reuse between writes, at most (.batch.LayoutBuffer),
# and their bytes at most: the memory of a burst, or of many layouts, is given back.
_KEEP_LAYOUTS = 8
_KEEP_BYTES = 32 * 1024 * 1024


def _iov_max(sysconf: Callable[[str], int] | None) -> int:
    """Buffers one ``os.writev`` takes at most: the system's IOV_MAX (1024 on Linux), capped at
    1024 and at least 16 (POSIX's minimum). ``sysconf`` may be missing, may not know the name
    (ValueError, OSError) or may answer -1 ("indeterminate"): a slice of -1 buffers is empty, so
    every append would fail with "no progress" and capture would drop everything; those get 16."""
    if sysconf is None:
        return 16
    try:
        value = int(sysconf("SC_IOV_MAX"))
    except (ValueError, OSError, TypeError):
        return 16
    return max(min(value, 1024), 16)


_IOV_MAX = _iov_max(getattr(os, "sysconf", None))
# A converter that exits with segments still to convert is started again, at most this often.
_RESTART_PAUSE_S = 1.0
# How often the writer looks for the converter's answers while segments wait for one.
_ANSWER_POLL_S = 0.1
# A converter of our own (converter="own") exits after this long with nothing to convert.
OWN_CONVERTER_IDLE_EXIT_S = 60.0
# Writers to restart in a forked child (e.g. uvicorn workers forked after the app was built).
_LIVE_WRITERS: weakref.WeakSet[CaptureWriter] = weakref.WeakSet()


def _restart_writers_after_fork() -> None:
    _OwnConverter.forget_after_fork()  # first: the writers restart with converters of the child's
    for writer in list(_LIVE_WRITERS):
        with contextlib.suppress(Exception):
            writer._after_fork_in_child()


os.register_at_fork(after_in_child=_restart_writers_after_fork)


class _OwnConverter:
    """The converter process the writers of this process share for one spool folder (converter="own")."""

    _by_spool: dict[str, _OwnConverter] = {}
    _lock = threading.Lock()

    def __init__(self, spool_dir: str) -> None:
        self.spool_dir = spool_dir
        self.popen: subprocess.Popen[bytes] | None = None
        self.users: set[int] = set()

    @classmethod
    def of(cls, spool_dir: str) -> _OwnConverter:
        with cls._lock:
            own = cls._by_spool.get(spool_dir)
            if own is None:
                own = cls._by_spool[spool_dir] = cls(spool_dir)
            return own

    @classmethod
    def forget_after_fork(cls) -> None:
        cls._by_spool = {}  # the parent's processes: not ours to drive
        cls._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        popen = self.popen
        return popen.pid if popen is not None and popen.poll() is None else None

    def ensure(self, user: int) -> bool:
        """Running (started if not); False if it cannot be started."""
        with self._lock:
            self.users.add(user)
            if self.popen is not None and self.popen.poll() is None:
                return True
            # Started with SIGTERM blocked (inherited through exec; it unblocks once its handler is
            # in place): stopped while still importing, it still makes its last pass.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            try:
                self.popen = subprocess.Popen(
                    [sys.executable, "-m", "mlflow_deploy_plugin.capture.converter", self.spool_dir,
                     "--parent", str(os.getpid()), "--idle-exit", str(OWN_CONVERTER_IDLE_EXIT_S)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None)
            except OSError as exc:
                _log.warning("Capture: cannot start the converter process (%s); spooled requests wait, new "
                             "ones are dropped once the buffer is full.", exc)
                return False
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            return True

    def release(self, user: int, timeout_s: float) -> None:
        """``user`` is done with it: the last one stops it (after its last pass)."""
        with self._lock:
            self.users.discard(user)
            popen = self.popen if not self.users else None
        if popen is None or popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(max(timeout_s, 0.5))
        except subprocess.TimeoutExpired:
            _log.warning("Capture: the converter process %d goes on with its last pass on its own.", popen.pid)


DROP_BUFFER_FULL = "buffer_full"
DROP_WRITE_ERROR = "write_error"
DROP_CONVERT_ERROR = "convert_error"
DROP_CLOSED = "closed"
DROP_INVALID = "invalid"
DEFAULT_MAX_BUFFER_BYTES = 64 * 1024 * 1024
_seq = iter(range(1, 1 << 62))
# Keys the layout buffer of requests whose column labels cannot be hashed (with a number of its own).
_UNHASHABLE = object()


def default_spool_dir(root: str, deployment: str) -> str:
    """Where a writer spools when not told: ``{root}/.spool`` for a local root (readers list only
    ``date=`` folders), else a folder of the temp dir (the spool must be on a local disk)."""
    if "://" not in root:
        return os.path.join(os.path.abspath(os.path.expanduser(root)), ".spool")
    if root.startswith("file://"):
        return os.path.join(root.removeprefix("file://"), ".spool")
    return os.path.join(tempfile.gettempdir(), "mlflow-deploy-capture-spool", deployment)


def _rows_of(inputs: Any) -> int:
    if inputs is None:
        return 1
    try:
        return max(len(inputs), 1)
    except TypeError:
        return 1


def _write_all(fd: int, buffers: list[Any]) -> None:
    """Write ``buffers`` (each ``len`` bytes long) one after the other: ``os.writev``, so the
    kernel copies them from where they are (no joined copy in this process)."""
    views = [memoryview(buffer) for buffer in buffers if len(buffer)]
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first:first + _IOV_MAX])
        if not written:
            raise OSError(f"writing to the spool file made no progress ({sum(map(len, views[first:]))} bytes left)")
        while written and first < len(views):  # skip what was written; a partial one goes on from there
            if written >= len(views[first]):
                written -= len(views[first])
                first += 1
            else:
                views[first] = views[first][written:]
                written = 0


class CaptureDropHook(Protocol):
    """Counts requests capture refused or lost: ``on_drop(n=..., reason=...)``.

    Always called with keywords, and its parameters must be named so (mypy checks it): the shadow's
    drop hook (:class:`..serving.shadow.CopyDropHook`) takes a reason and a count, in the other
    order, and a hook passed to the wrong one failed silently (the call is inside a suppress)."""

    def __call__(self, *, n: int, reason: str) -> None:
        """Count ``n`` requests dropped for ``reason`` (cheap, thread-safe)."""


class _Segment:
    """The segment file being appended to, and what it holds."""

    __slots__ = ("bytes", "name", "requests", "rows")

    def __init__(self) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self.name = f"seg-{stamp}-{os.getpid()}-{next(_seq):06d}"
        self.requests = 0
        self.rows = 0
        self.bytes = 0


class CaptureWriter:
    """Spools captured requests from the request path; a converter process writes them to Parquet.

    Best created in each worker process; a writer inherited through ``fork`` restarts empty in the
    child. Call :meth:`close` on shutdown; an ``atexit`` hook also closes writers left open.
    """

    def __init__(
        self,
        root: str,
        deployment: str,
        *,
        sample_rate: float = 1.0,
        max_buffer_requests: int = 50_000,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        flush_rows: int = 50_000,
        flush_interval_s: float = 2.0,
        retention_days: int | None = None,
        on_drop: CaptureDropHook | None = None,
        rng_seed: int | None = None,
        redact: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
        spool_dir: str | None = None,
        converter: str = "own",
    ) -> None:
        """Start the writer thread (the converter process starts with the first segment).

        Args:
            root: Local folder or pyarrow filesystem URI (``file://``, ``s3://bucket/prefix``...).
                The filesystem is resolved by the converter, so a slow or failing remote store
                never delays startup; its errors count as dropped writes.
            deployment: Stored in the ``_deployment`` column.
            sample_rate: Fraction of requests recorded, in (0, 1].
            max_buffer_requests: Requests waiting to be written (in memory or in the spool) before
                new ones are dropped. Waiting requests cost a few hundred bytes of spool each, no
                Python objects: the bound is there for a converter that cannot keep up.
            max_buffer_bytes: Bytes (encoded records) waiting to be written before new requests are
                dropped; a single request larger than this is dropped too. A request waiting in
                memory for its batch record counts its share of it (the heads of a write's records,
                a few hundred bytes, come on top once it is encoded).
            flush_rows: Spooled input rows that start a conversion. Each conversion writes a Parquet
                file and costs ~3 ms of converter CPU besides its rows: with 100-row requests, 5,000
                rows per segment cost 115 us of CPU per request against 65 us at 40,000
                (``benchmarks/capture_cost.py``), on a machine where serving gets what the converter
                does not take. Under 1-row traffic ``flush_interval_s`` completes a segment first.
            flush_interval_s: Longest time a recorded request waits before its conversion starts.
            retention_days: If set, delete ``date=`` partitions older than this many days.
            on_drop: Called as ``on_drop(n=requests, reason=reason)`` (:class:`CaptureDropHook`) for requests accepted-then-lost or
                refused; reason is one of ``buffer_full``, ``write_error``, ``convert_error``,
                ``closed``, ``invalid`` (not a request object). It may run on the caller's thread
                or a writer thread, so it must be cheap and thread-safe (a Prometheus ``inc`` is).
            rng_seed: Seed of the sampling RNG, for reproducible tests.
            redact: Applied to the input columns before they are written (see :mod:`.redaction`):
                ``-C capture_exclude`` / ``-C capture_hash``. Runs in the converter process, so it
                must pickle (a bound method of a :class:`.redaction.CaptureRedaction` does).
            spool_dir: Local folder for the spool (each writer uses a folder of its own inside);
                default :func:`default_spool_dir`.
            converter: ``"own"``: this process runs the spool's converter (started with the first
                records, again whenever a segment waits and it is not running); ``"external"``:
                someone else does (the local engine's supervisor, one per deployment).
        """
        if converter not in ("own", "external"):
            raise ValueError(f"converter must be 'own' or 'external', got {converter!r}.")
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
        try:
            pickle.dumps(redact)
        except Exception as exc:
            raise ValueError(f"redact must pickle (it runs in the converter process): {exc}") from None
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
        self.spool_dir = spool_dir or default_spool_dir(root, deployment)
        self.converter = converter

        self._rng_seed = rng_seed
        self._rng = random.Random(rng_seed)
        self._closed = False
        self._lock_fd: int | None = None
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
        # Accepted requests that left memory: in the segment file, or counted as dropped.
        self.settled_requests = 0
        # Where those two counts are mirrored for after a crash (tally_into); a forked child has
        # none: the parent's tally describes the parent.
        self._tally: Any = None
        self.written_requests = 0
        self.written_rows = 0
        self._lost_accepted = 0
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        # Encoded records not yet in the segment file, and what waits anywhere (memory + spool).
        # Encoded records of their own (requests the batch form does not take).
        self._chunks: list[bytes] = []
        # Requests of the batch form, copied into a buffer per column layout (.batch.LayoutBuffer),
        # the last one used (consecutive requests nearly always share it), and the buffers the writer
        # thread wrote last time, kept for reuse (their memory stays faulted in).
        self._layouts: dict[tuple, LayoutBuffer] = {}
        self._last_layout: LayoutBuffer | None = None
        self._spare_layouts: dict[tuple, LayoutBuffer] = {}
        # Requests in memory (in _chunks or _layouts), and the bytes the buffer bound counts for them.
        self._in_memory = 0
        self._chunk_bytes = 0
        self._waiting_requests = 0
        self._waiting_bytes = 0
        self._segment = _Segment()
        self._segment_started_at: float | None = None
        self._segment_fd: int | None = None
        # Segments handed to the converter, not yet answered: name -> (requests, bytes).
        self._sent: dict[str, tuple[int, int]] = {}
        self._flush_asked = 0
        self._flush_done = 0
        self._warned: set[str] = set()
        self._folder: Path | None = None
        self._own = _OwnConverter.of(self.spool_dir) if self.converter == "own" else None
        self._converter_started_at = -math.inf
        self._close_deadline = math.inf
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.deployment}", daemon=True)
        if not self._closed:
            self._thread.start()

    def _after_fork_in_child(self) -> None:
        # Threads do not survive a fork and a lock may have been copied while held. The parent
        # still owns (and converts) what it had spooled, so the child starts empty, with a spool
        # folder and a converter of its own.
        if self._rng_seed is None:
            self._rng = random.Random()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None
        if self._segment_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._segment_fd)
        self._start()

    # ---- hot path -------------------------------------------------------------------------------

    def record(self, request: AnsweredRequest) -> bool:
        """Queue one answered request for capture; never blocks on I/O and never raises.

        Returns True if the request was accepted, False if it was sampled out (not counted as a
        drop) or dropped (buffer full, writer closed, not encodable; counted in ``dropped_requests``).
        """
        try:
            if self.sample_rate < 1.0 and self._rng.random() >= self.sample_rate:
                return False
            try:
                batched = batch_item(request)
                if batched is None:  # encoded now, alone (errors are the caller's: not accepted)
                    blob = encode_record(request)
                    item: bytes | tuple = blob
                    size = len(blob)
                    # The parser's raw rows when the request has them: len() of a DataFrame is a pandas call.
                    rows = rows_of_raw(getattr(request, "raw_inputs", None)) or _rows_of(request.inputs)
                else:  # copied into its layout's buffer; the writer thread encodes them together (.batch)
                    item, size, rows = batched
            except Exception:
                self._drop(1, DROP_CONVERT_ERROR, accepted=False)
                return False
            reason = None
            with self._lock:
                if self._closed:
                    reason = DROP_CLOSED
                elif (self._waiting_requests >= self.max_buffer_requests
                      or self._waiting_bytes + size > self.max_buffer_bytes):
                    reason = DROP_BUFFER_FULL
                else:
                    if type(item) is bytes:
                        self._chunks.append(item)
                    else:
                        fields = cast(tuple, item)
                        layout = self._last_layout
                        if layout is None or not layout.takes(fields[7], fields[9]):
                            layout = self._layout_for(fields)
                        layout.add(fields)
                    self._in_memory += 1
                    self._chunk_bytes += size
                    self._waiting_requests += 1
                    self._waiting_bytes += size
                    self.accepted_requests += 1
                    if self._tally is not None:  # a store into shared memory, no syscall
                        self._tally[0] = self.accepted_requests
                    segment = self._segment
                    before = segment.rows
                    segment.requests += 1
                    segment.rows = before + rows
                    segment.bytes += size
                    if before == 0:
                        # Wake the thread only on the first row (to start the interval clock), on the
                        # first record since its last append (it may be asleep until the segment's end:
                        # it then sleeps until its next append, _WRITE_EVERY_S after the last) and
                        # when a write or a conversion is due: a few signals a second, not one a call.
                        self._segment_started_at = time.monotonic()
                        self._wakeup.notify()
                    elif self._in_memory == 1 or before < self.flush_rows <= segment.rows or (
                            self._chunk_bytes >= _WRITE_BYTES > self._chunk_bytes - size):
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

    def flush(self, timeout_s: float = 60.0) -> int:
        """Convert everything recorded so far and wait for it; returns the requests written since.

        Meant for tests and tools: the service relies on the background thread.
        """
        with self._lock:
            written = self.written_requests
            self._flush_asked += 1
            target = self._flush_asked
            self._wakeup.notify_all()
            deadline = time.monotonic() + timeout_s
            while (self._flush_done < target or self._sent) and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.wait(min(left, 0.5))
            return self.written_requests - written

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, convert everything spooled, and stop the thread and converter. Idempotent.

        If that takes longer than ``timeout_s`` the converter is left to finish on its own (it
        converts what the spool holds, then exits), and what it writes is no longer counted here.
        """
        with self._lock:
            self._closed = True
            self._close_deadline = min(self._close_deadline, time.monotonic() + timeout_s)
            self._wakeup.notify_all()
        started = self._thread.ident is not None  # a writer closed before a fork has no thread in the child
        if started and self._thread is not threading.current_thread():
            self._thread.join(timeout_s + 1.0)
            if self._thread.is_alive() or self._sent:
                unwritten = self.accepted_requests - self.written_requests - self._lost_accepted
                _log.warning("Capture for deployment %r: %d accepted requests were not converted within "
                             "%.1fs; the converter goes on with them on its own.", self.deployment, unwritten,
                             timeout_s)
        atexit.unregister(self._atexit)

    def tally_into(self, tally: Any) -> None:
        """Keep ``tally[0]`` = requests accepted and ``tally[1]`` = requests settled (appended to
        the spool file or counted as dropped) up to date from now on.

        ``tally`` is a writable sequence of two ints, meant to be a ``memoryview`` of shared memory
        that survives this process (see the module docstring): if the process is killed, ``tally[0]
        - tally[1]`` is how many accepted requests its death lost, at most (a kill in the middle of
        an append to the spool counts the whole append, though the records it completed are kept).
        """
        with self._lock:
            tally[0], tally[1] = self.accepted_requests, self.settled_requests
            self._tally = tally

    def _settle(self, requests: int) -> None:
        """``requests`` taken from memory are in the segment file or counted as dropped."""
        with self._lock:
            self.settled_requests += requests
            if self._tally is not None:
                self._tally[1] = self.settled_requests

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def buffered_requests(self) -> int:
        """Requests accepted and not yet written to Parquet (in memory or in the spool)."""
        return self._waiting_requests

    @property
    def buffered_bytes(self) -> int:
        """Bytes (encoded records) of the requests accepted and not yet written to Parquet."""
        return self._waiting_bytes

    @property
    def converter_pid(self) -> int | None:
        """The pid of the converter this writer started while it runs (for tools and tests)."""
        return self._own.pid if self._own is not None else None

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writer thread: appends to the segment file, hands segments to the converter -------------

    def _run(self) -> None:
        next_prune = time.monotonic() if self.retention_days else math.inf
        next_write = 0.0  # the first records are written at once, then every _WRITE_EVERY_S
        next_answers = 0.0
        while True:
            try:
                with self._lock:
                    while True:
                        now = time.monotonic()
                        if self._closed or self._flush_asked > self._flush_done or now >= next_prune:
                            break
                        if self._segment.rows >= self.flush_rows or self._chunk_bytes >= _WRITE_BYTES:
                            break
                        due = next_write if self._in_memory else math.inf
                        if self._segment_started_at is not None:
                            due = min(due, self._segment_started_at + self.flush_interval_s)
                        if self._sent:  # answers to pick up
                            due = min(due, next_answers)
                        if now >= due:
                            break
                        # Nothing to do until record(), flush() or close() signals: sleep without polling.
                        wait = min(due, next_prune) - now
                        self._wakeup.wait(None if wait == math.inf else wait)
                    closing = self._closed
                    flush_target = self._flush_asked
                    chunks, chunk_bytes, in_memory = self._chunks, self._chunk_bytes, self._in_memory
                    layouts = self._layouts
                    self._chunks, self._chunk_bytes, self._in_memory = [], 0, 0
                    self._layouts, self._last_layout = {}, None
                    roll = (closing or flush_target > self._flush_done or self._segment.rows >= self.flush_rows
                            or (self._segment_started_at is not None
                                and time.monotonic() >= self._segment_started_at + self.flush_interval_s))
                    segment = self._segment
                    if roll:
                        self._segment, self._segment_started_at = _Segment(), None
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + _PRUNE_EVERY_S
                    self._prune()
                if in_memory:
                    try:
                        self._append(segment, chunks, list(layouts.values()), in_memory, chunk_bytes)
                    finally:  # after the write: a kill during it counts these as lost
                        self._settle(in_memory)
                        self._keep_layouts(layouts)
                    # Started with the first records rather than with the writer: not during the
                    # worker's own start, but with a head start on the first segment.
                    self._ensure_converter()
                next_write = time.monotonic() + _WRITE_EVERY_S
                if roll:
                    self._roll(segment)
                if self._sent and time.monotonic() >= next_answers:
                    next_answers = time.monotonic() + _ANSWER_POLL_S
                    self._collect_answers()
                    if self._sent:
                        self._ensure_converter()
                with self._lock:
                    if roll:
                        self._flush_done = max(self._flush_done, flush_target)
                        self._wakeup.notify_all()
                if closing:
                    self._finish()
                    return
            except Exception:  # never let the thread die: capture would silently stop
                _log.exception("Capture for deployment %r: unexpected error in the writer thread.",
                               self.deployment)
                time.sleep(min(self.flush_interval_s, 1.0))

    def _ensure_folder(self) -> Path:
        if self._folder is None:
            name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            # Made under a dot-name (converters skip those) and renamed once locked, so no
            # converter ever sees this folder with its lock free while the writer lives.
            making = Path(self.spool_dir) / f".{name}"
            making.mkdir(parents=True)
            write_config(str(making / CONFIG_NAME), {"root": self.root, "deployment": self.deployment,
                                                      "redact": self.redact,
                                                      "flush_interval_s": self.flush_interval_s})
            fd = os.open(making / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            # Held while this writer lives: a converter finding it free knows the folder is orphaned.
            fcntl.flock(fd, fcntl.LOCK_EX)
            folder = making.with_name(name)
            os.rename(making, folder)
            self._lock_fd, self._folder = fd, folder
        return self._folder

    def _layout_for(self, item: tuple) -> LayoutBuffer:
        """The buffer of ``item``'s column layout (under the lock): a new one, or last write's kept one.

        Runs only when a request's layout is not the last one's (rarely): column labels that cannot
        be hashed (TypeError here) get a buffer of their own, keyed by a number, never kept for reuse;
        the writer thread encodes its requests one by one (:func:`.spool.encode_layouts`)."""
        predictions = item[9]
        key: tuple = (item[7],) if predictions is None else (item[7], predictions.dtype, predictions.shape[1:])
        try:
            layout = self._layouts.get(key)
        except TypeError:  # unhashable column labels
            key, layout = (_UNHASHABLE, next(_seq)), None
        if layout is None:
            layout = self._spare_layouts.pop(key, None) or LayoutBuffer(item[7], item[8], predictions)
            self._layouts[key] = layout
        self._last_layout = layout
        return layout

    def _keep_layouts(self, layouts: dict[tuple, LayoutBuffer]) -> None:
        """Written (or given up): emptied and kept for the next write, unless a burst made them big."""
        with self._lock:
            if len(self._spare_layouts) + len(layouts) > _KEEP_LAYOUTS:
                self._spare_layouts.clear()
            kept = sum(layout.nbytes for layout in self._spare_layouts.values())
            for key, layout in layouts.items():
                if kept + layout.nbytes <= _KEEP_BYTES and key[0] is not _UNHASHABLE and key not in self._layouts:
                    layout.clear()
                    self._spare_layouts[key] = layout
                    kept += layout.nbytes

    def _append(self, segment: _Segment, chunks: list[bytes], layouts: list[LayoutBuffer], requests: int,
                counted_bytes: int) -> None:
        """Encode what waits (records already encoded, and requests to encode together: batch
        records, from ``layouts``), and append it to the segment's file; requests that cannot be
        encoded or written are dropped and counted. ``requests``: how many ``chunks`` and ``layouts``
        hold; ``counted_bytes``: what the buffer bound counted for them.

        Never raises: whatever fails, every request of ``chunks`` and ``layouts`` ends up in the file
        or counted as dropped (an unexpected error, not an OSError, as a write error), so the buffer
        bound gets their room back and the counts add up."""
        size = counted_bytes  # what the counts hold for these requests until encoded
        total = requests
        try:
            buffers: list[Any] = list(chunks)
            encoded_size = sum(map(len, buffers))
            failed = 0
            if layouts:
                batched, batched_size, failed = encode_layouts(layouts)
                buffers += batched
                encoded_size += batched_size
            with self._lock:  # what waits is counted in the bytes it takes in the spool from now on
                segment.bytes += encoded_size - counted_bytes
                self._waiting_bytes += encoded_size - counted_bytes
                segment.requests -= failed
                self._waiting_requests -= failed
                requests, size = total - failed, encoded_size  # in ``buffers`` now
            if failed:
                self._drop(failed, DROP_CONVERT_ERROR)
            if self._segment_fd is None:
                path = self._ensure_folder() / f"{segment.name}{OPEN_SUFFIX}"
                self._segment_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            _write_all(self._segment_fd, buffers)
        except Exception as exc:
            # The records of this append are lost (a partial one is skipped as torn by the reader).
            with self._lock:
                segment.requests -= requests
                segment.bytes -= size
                self._waiting_requests -= requests
                self._waiting_bytes -= size
                first_of_burst = DROP_WRITE_ERROR not in self._warned
                self._warned.add(DROP_WRITE_ERROR)
            if first_of_burst:
                # An OSError is the disk's (full, gone); anything else is a flaw here: its traceback.
                _log.warning("Capture for deployment %r: spooling to %s failed (%s: %s); requests are dropped "
                             "and counted.", self.deployment, self.spool_dir, type(exc).__name__, exc,
                             exc_info=not isinstance(exc, OSError))
            self._drop(requests, DROP_WRITE_ERROR)
            if self._segment_fd is not None and segment.requests == 0:
                self._close_segment_file(segment, keep=False)

    def _close_segment_file(self, segment: _Segment, keep: bool) -> str | None:
        fd, self._segment_fd = self._segment_fd, None
        if fd is None or self._folder is None:
            return None
        with contextlib.suppress(OSError):
            os.close(fd)
        open_path = self._folder / f"{segment.name}{OPEN_SUFFIX}"
        if not keep:
            with contextlib.suppress(OSError):
                open_path.unlink()
            return None
        done = self._folder / f"{segment.name}{SEGMENT_SUFFIX}"
        os.replace(open_path, done)
        return str(done)

    def _roll(self, segment: _Segment) -> None:
        """Close the segment file and hand it to the converter."""
        if segment.requests == 0:
            self._close_segment_file(segment, keep=False)
            return
        try:
            path = self._close_segment_file(segment, keep=True)
        except OSError as exc:
            _log.warning("Capture for deployment %r: closing spool segment failed: %s", self.deployment, exc)
            path = None
        if path is None:
            self._lose(segment.requests, segment.bytes, DROP_WRITE_ERROR)
            return
        with self._lock:
            self._sent[os.path.basename(path)] = (segment.requests, segment.bytes)

    def _ensure_converter(self) -> None:
        """A converter of our own runs while segments wait (none to start with converter="external")."""
        if self._own is None or self._own.pid is not None:
            return
        if time.monotonic() < self._converter_started_at + _RESTART_PAUSE_S:
            return
        if self._converter_started_at > -math.inf and self._sent and not self._closed:
            _log.warning("Capture for deployment %r: the converter process is not running; started again for "
                         "the %d segments waiting.", self.deployment, len(self._sent))
        self._converter_started_at = time.monotonic()
        self._own.ensure(id(self))

    def _collect_answers(self) -> None:
        """Count what the converter answered (``.done`` files) for the segments handed to it."""
        folder = self._folder
        if folder is None:
            return
        try:
            names = set(os.listdir(folder))
        except OSError:
            return
        for segment in list(self._sent):
            done = segment.rsplit(".", 1)[0] + DONE_SUFFIX
            if done not in names:
                continue
            try:
                with open(folder / done) as file:
                    answer = json.load(file)
                os.unlink(folder / done)
            except (OSError, ValueError):
                continue  # read again next time
            with self._lock:
                requests, size = self._sent.pop(segment, (0, 0))
                if not requests:
                    continue
                written = min(int(answer.get("written", 0)), requests)
                self.written_requests += written
                self.written_rows += int(answer.get("rows", 0))
                self._waiting_requests -= requests
                self._waiting_bytes -= size
                self._wakeup.notify_all()
            convert_error = min(int(answer.get("convert_error", 0)), requests - written)
            write_error = requests - written - convert_error
            if "error" in answer:
                convert_error, write_error = requests - written, 0
            if convert_error:
                self._drop(convert_error, DROP_CONVERT_ERROR)
            if write_error:
                self._drop(write_error, DROP_WRITE_ERROR)

    def _finish(self) -> None:
        """On close: wait (within the close deadline) for the converter to answer for every segment,
        then remove the folder; what is still unanswered then is left to the converter, which
        converts the folder of a writer that is gone (its lock free) and removes it."""
        while self._sent and time.monotonic() < self._close_deadline:
            self._ensure_converter()
            self._collect_answers()
            if self._sent:
                time.sleep(_ANSWER_POLL_S)
        if self._folder is not None and not self._sent:
            shutil.rmtree(self._folder, ignore_errors=True)
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None
        if self._own is not None:
            # The last writer stops it; its last pass takes what is left (this folder, now free).
            self._own.release(id(self), self._close_deadline - time.monotonic())

    def _prune(self) -> None:
        if self.retention_days is None:  # no retention: _run never schedules a prune
            return
        try:
            prune_capture(self.root, self.deployment, self.retention_days)
        except Exception as exc:
            _log.warning("Capture for deployment %r: pruning old partitions failed: %s",
                         self.deployment, exc)

    def _lose(self, requests: int, size: int, reason: str) -> None:
        with self._lock:
            self._waiting_requests -= requests
            self._waiting_bytes -= size
        self._drop(requests, reason)

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
            self.on_drop(n=n, reason=reason)
