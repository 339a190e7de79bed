"""The channel that carries request copies from a serving worker to its shadow process.

The worker's request path only appends a copy to a bounded in-memory queue (never blocks, never
raises; a full queue drops the copy and counts it as ``queue_full``, as the in-process mirror does)
and wakes the sender thread only when it is idle. The sender writes all that wait (up to
``max_copies``, and about ``max_bytes`` of inputs, so 100-row or wide bodies make no huge message;
a copy larger than that goes alone) to the shadow process's pipe as one length-prefixed pickle,
then lets the next copies gather for :data:`GATHER_S` before it writes again, or until half the
queue waits (not after a full message, nor when a full one waits: that would only cap the copies
a second). Per copy, the serving process so pays a deque append; per message (~5 a second at up to
~600 requests a second, one per ``max_queue / 2`` copies above), one wake of the sender, one pickle
and one write. That is what keeps mirroring off the serving loop: each
wake of a thread of the worker is a thread that wants the GIL the event loop holds, and one message
per copy (a wake, a pickle of an array: tens of microseconds of CPU on a busy machine) cost the
primary more than anything else mirroring did.

A copy is sent in its cheapest form: the ``(columns, float64 array)`` the parser's fast path built
the frame on when there is one, consecutive ones with the same columns as one run with one array
(:func:`pack_copies`: an array's pickle costs microseconds whatever its size; a DataFrame's ~10x
more), else the decoded inputs. ``os.write`` releases the GIL, so a shadow process that reads slowly
only fills the pipe, then the queue, then drops: it never makes the worker wait.

The pipe may break (the shadow process died): the copies of the message that could not be written
are reported to ``on_lost`` and the channel waits, detached, for :meth:`CopyChannel.attach` (the
supervisor's restart) while new copies queue and, once the queue is full, are dropped (as
``no_shadow``: not pressure, there is no shadow process to take them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from mlflow_deploy_plugin.serving.shadow import CopyDropHook, CopyRun, frame_of_raw

_logger = logging.getLogger(__name__)

_HEAD = struct.Struct("<I")
MAX_FRAME_BYTES = 1 << 30  # a message larger than this is not one this protocol wrote
# After a message the sender lets the next copies gather this long before it writes them all in
# one: ~1/GATHER_S wakes of the sender a second whatever the request rate, until half the queue
# waits (nobody waits for a shadow's answer, and the shadow process gathers its batches for 200 ms
# anyway). A wake with its GIL handoff costs ~100 us of CPU on a busy machine (at 20 ms it was still
# most of what a copy cost), and at one request at a time each wake delays the request it lands on:
# at 50 ms, 20 wakes a second (with the child's events and the supervisor's polls, 30) touched ~4 %
# of ~700 requests a second (~6 us of the worker's CPU per request at c=1, benchmarks/shadow_cost.py).
GATHER_S = 0.2
# About this many bytes of inputs a message at most (a copy larger than that goes alone): the message
# is built, pickled and read whole, by both processes, and its run of rows stacked in one array.
MAX_MESSAGE_BYTES = 4 << 20
_FLOAT64 = np.dtype(np.float64)


def encode_frame(message: Any) -> bytes:
    """One message as written on a pipe: its length, then its pickle."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEAD.pack(len(body)) + body


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (a pipe takes at most its buffer per call)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FrameReader:
    """Reads the messages :func:`encode_frame` wrote to a pipe, one at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _exactly(self, size: int) -> bytes | None:
        chunks, left = [], size
        while left:
            chunk = os.read(self.fd, min(left, 1 << 20))
            if not chunk:
                return None  # end of the pipe: the writer is gone
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def read(self) -> Any | None:
        """The next message, or None at the end of the pipe (a torn last message reads as the end)."""
        head = self._exactly(_HEAD.size)
        if head is None:
            return None
        (size,) = _HEAD.unpack(head)
        if size > MAX_FRAME_BYTES:
            raise ValueError(f"message of {size} bytes on the shadow channel: not one of ours")
        body = self._exactly(size)
        return None if body is None else pickle.loads(body)


def copy_of(answer: Any) -> tuple[str, float, Any, dict[str, Any] | None]:
    """What the shadow process needs of an answered request: its id, time, inputs and params."""
    raw = getattr(answer, "raw_inputs", None)
    payload: Any = ("raw", raw[0], raw[1]) if isinstance(raw, tuple) and len(raw) == 2 else ("inputs", answer.inputs)
    return str(answer.request_id), float(answer.timestamp), payload, getattr(answer, "params", None) or None


def payload_bytes(copy: tuple) -> int:
    """About how many bytes a copy's inputs take in a message (an estimate: cheap, not a pickle)."""
    payload = copy[2]
    data = payload[2] if payload[0] == "raw" else payload[1]
    if isinstance(data, np.ndarray):
        return int(data.nbytes)
    shape = getattr(data, "shape", None)  # a DataFrame: its cells, 8 bytes each
    if isinstance(shape, tuple) and len(shape) == 2:
        return int(shape[0]) * int(shape[1]) * 8
    if isinstance(data, dict):  # named tensors
        return sum(int(value.nbytes) if isinstance(value, np.ndarray) else 8 * _length(value)
                   for value in data.values())
    return 8 * _length(data)


def _length(value: Any) -> int:
    try:
        return len(value)
    except TypeError:
        return 1


def _raw_parts(copy: tuple) -> tuple[tuple, np.ndarray] | None:
    """A copy's ``(columns, float64 rows x columns array)`` when it travels in a run (no params)."""
    payload = copy[2]
    if payload[0] != "raw" or copy[3] is not None:
        return None
    columns, values = payload[1], payload[2]
    if (type(columns) is not tuple or type(values) is not np.ndarray or values.dtype != _FLOAT64
            or values.ndim != 2 or values.shape[1] != len(columns)):
        return None
    return columns, values


def pack_copies(copies: list[tuple]) -> list[tuple]:
    """The items of one ``copies`` message (see :func:`unpack_copies`).

    Consecutive copies with the parser's raw rows, the same columns and no params travel as one
    *run*: ``("run", columns, request_ids, timestamps, row_counts, values)``, their arrays stacked
    in one: the columns are pickled once and one array per message, not one per copy (an array's
    pickle costs microseconds whatever its size). Any other copy travels as ``("one", *copy)``.
    """
    items: list[tuple] = []
    run: list[tuple[tuple, tuple, np.ndarray]] = []

    def close_run() -> None:
        if run:
            columns = run[0][1]
            arrays = [values for _, _, values in run]
            items.append(("run", columns, [copy[0] for copy, _, _ in run], [copy[1] for copy, _, _ in run],
                          [len(values) for values in arrays], arrays[0] if len(arrays) == 1 else np.concatenate(arrays)))
            run.clear()

    for copy in copies:
        parts = _raw_parts(copy)
        if parts is None:
            close_run()
            items.append(("one", *copy))
        else:
            if run and run[0][1] != parts[0]:
                close_run()
            run.append((copy, *parts))
    close_run()
    return items


def unpack_copies(items: list[tuple]) -> list[Copy | CopyRun | int]:
    """The copies of a ``copies`` message in their order: a run as one :class:`CopyRun` (for
    :meth:`ShadowMirror.submit_run`: its copies get no DataFrame each), any other copy as a
    :class:`Copy`; an int stands for that many copies that could not be read (counted as dropped by
    the caller: they are not ours)."""
    out: list[Copy | CopyRun | int] = []
    for item in items:
        try:
            if item[0] == "one":
                out.append(Copy(*item[1:]))
                continue
            _, columns, request_ids, timestamps, counts, values = item
            # Checked whole before it goes on: a run that fails is counted as dropped in full, so
            # none of its copies may have been handed on (predicted and counted as dropped).
            if (type(columns) is not tuple or type(values) is not np.ndarray or values.dtype != _FLOAT64
                    or values.ndim != 2 or values.shape[1] != len(columns)):
                raise ValueError("a run of copies whose rows are not a float64 array of its columns")
            if (len(request_ids) != len(timestamps) or len(counts) != len(request_ids)
                    or not all(type(count) is int and count >= 0 for count in counts)
                    or sum(counts) != len(values)
                    or not all(type(request_id) is str for request_id in request_ids)):
                raise ValueError("a run of copies whose lengths disagree")
            out.append(CopyRun(columns, list(request_ids), [float(t) for t in timestamps], list(counts), values))
        except Exception:
            _logger.exception("Request copies for the shadow could not be read")
            out.append(len(item[2]) if item[0] == "run" and isinstance(item[2], list) else 1)
    return out


class Copy:
    """A request copy as the shadow process rebuilds it (what :meth:`ShadowMirror.submit` reads)."""

    __slots__ = ("request_id", "timestamp", "inputs", "params", "raw_inputs")

    def __init__(self, request_id: str, timestamp: float, payload: Any, params: dict[str, Any] | None) -> None:
        self.request_id = request_id
        self.timestamp = timestamp
        self.params = params
        self.raw_inputs = None
        if payload[0] == "raw":  # rebuilt exactly as the parser's fast path built the primary's frame
            columns, values = payload[1], payload[2]
            self.raw_inputs = (tuple(columns), values)
            self.inputs: Any = frame_of_raw(columns, values)
        else:
            self.inputs = payload[1]


class CopyChannel:
    """A bounded queue of request copies and the thread that writes them, gathered, to a pipe."""

    def __init__(self, max_queue: int, on_drop: CopyDropHook,
                 on_lost: Callable[[int], None] | None = None, max_copies: int = 256,
                 gather_s: float = GATHER_S, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        """``on_drop(reason=, count=)`` counts copies the queue could not take (or held at close);
        ``on_lost(n)`` the copies of a message the pipe did not take (its reader died). ``gather_s``:
        how long the sender lets copies gather once one waits (see the module's docstring)."""
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self._max_queue = max_queue
        self._pending: deque[tuple] = deque()
        # Guards _pending and the counts: held for a few bytecodes, by the request path and the sender.
        self._lock = threading.Lock()
        self._unfinished = 0  # copies queued or being written (neither written nor counted yet)
        self._finished = 0  # copies written, lost or dropped since the start, in queue order (_drained)
        self._wake = threading.Event()  # set when the first copy arrives in an empty queue, and to stop
        self._hurry = threading.Event()  # set to write what waits now (close, a control message)
        # Ends the sender's gathering early: set with _hurry, and when half the queue waits (a gather
        # that let the queue fill would drop copies as queue_full while the next message is written).
        self._gathered = threading.Event()
        self._send_at = max(1, min(max_copies, max_queue // 2))
        self._progress = threading.Condition(self._lock)  # notified when copies are written or counted
        self._stopping = False  # the sender writes what waits, then ends
        self._on_drop = on_drop
        self._on_lost = on_lost
        self._max_copies = max_copies
        self._max_bytes = max_bytes
        self._gather_s = max(0.0, gather_s)
        self._fd: int | None = None
        # Held while a message is written, so a detach never splits a message and `sent` is exact.
        self._write_lock = threading.Lock()
        self._attached = threading.Condition(threading.Lock())
        self._closing = False
        self.sent = 0  # copies written to the current pipe since it was attached
        self.messages = 0  # messages of copies written (each one a wake of the sender)
        self._thread = threading.Thread(target=self._run, name="shadow-channel", daemon=True)
        self._thread.start()

    def put(self, copy: tuple) -> bool:
        """Queue one copy (see :func:`copy_of`); never blocks: False (and counted) when the queue is full."""
        with self._lock:
            if self._closing:
                reason = "closed"
            elif len(self._pending) >= self._max_queue:
                # Full for want of a shadow process (starting, or being replaced), or under pressure.
                reason = "no_shadow" if self._fd is None else "queue_full"
            else:
                self._pending.append(copy)
                self._unfinished += 1
                queued = len(self._pending)
                reason = ""
        if reason:
            self._on_drop(reason=reason, count=1)
            return False
        if queued == 1:  # only then: the sender is waiting, or will take this one with those it is taking
            self._wake.set()
        elif queued == self._send_at:  # enough for a message: gathering longer only risks a full queue
            self._gathered.set()
        return True

    def attach(self, fd: int) -> None:
        """Write to ``fd`` from now on (a fresh shadow process's pipe)."""
        with self._write_lock, self._attached:
            self._fd = fd
            self.sent = 0
            self._attached.notify_all()

    def detach(self) -> int:
        """Stop writing to the current pipe (its reader is gone); returns the copies written to it."""
        with self._write_lock:
            fd, self._fd = self._fd, None
            sent, self.sent = self.sent, 0
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        return sent

    def send_control(self, message: Callable[[], Any], timeout_s: float = 5.0) -> bool:
        """Write one control message (flush, close) to the current pipe, after the copies queued before it.

        ``message()`` makes the message at the moment it is written, once those copies have gone:
        a budget it carries is then what the caller has left, not what it had before the wait.
        False if there is no pipe, or if those copies have not gone within ``timeout_s`` (a child that
        stopped reading: the caller kills it, which ends that write).
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        if self._fd is None:
            return False
        if not self._drained(deadline):
            return False
        if not self._write_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            if self._fd is None:
                return False
            data = encode_frame(message())
            try:
                write_all(self._fd, data)
            except OSError:
                return False
        finally:
            self._write_lock.release()
        return True

    def _drained(self, deadline: float) -> bool:
        """Have the sender write what is queued now (no gathering) and wait for it until ``deadline``."""
        with self._lock:
            target = self._unfinished
            if not target:
                return True
            base = self._finished
        self._hurry_now()
        with self._progress:
            while self._finished - base < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._progress.wait(left)
        return True

    def waiting(self) -> int:
        """Copies queued or being written (neither written nor counted as lost or dropped yet)."""
        return self._unfinished

    def _run(self) -> None:
        while True:
            self._wake.wait()  # the first copy in an empty queue, a hurry, or the close
            while True:
                self._wake.clear()  # a copy put from now on finds the queue empty and sets it again
                with self._lock:
                    batch = self._take()
                    if not batch:
                        self._hurry.clear()
                        stop = self._stopping
                        break
                    # A full message leaves a backlog behind: gathering cannot make the next one
                    # larger, only cap the copies a second (at max_copies / GATHER_S, ~5,100 a
                    # second), then drop them.
                    full = len(batch) == self._max_copies or bool(self._pending)
                try:
                    self._send(batch)
                finally:
                    with self._progress:
                        self._unfinished -= len(batch)
                        self._finished += len(batch)
                        self._progress.notify_all()
                if self._gather_s and not full and not self._stopping:
                    # Let the copies of the next moments gather, then write them in one message:
                    # under load this thread wakes once per GATHER_S (or per half a queue of
                    # copies), not once per copy, which is what keeps it off the serving loop's
                    # GIL. (The first copy after a quiet spell goes at once: a wake per copy only
                    # when copies are rare. Not after a full message, nor while one waits, e.g.
                    # behind a slow write.) Cleared before the queue is looked at: a put that
                    # reaches _send_at after this sets it again and ends the wait.
                    self._gathered.clear()
                    if len(self._pending) < self._send_at and not self._hurry.is_set():
                        self._gathered.wait(self._gather_s)
            if stop:
                return

    def _take(self) -> list[tuple]:
        """The next message's copies, out of the queue (the lock held): up to ``max_copies`` and
        about ``max_bytes`` of inputs, at least one."""
        pending, size = self._pending, 0
        batch: list[tuple] = []
        while pending and len(batch) < self._max_copies:
            size += payload_bytes(pending[0])
            if batch and size > self._max_bytes:
                break
            batch.append(pending.popleft())
        return batch

    def _send(self, batch: list[tuple]) -> None:
        try:
            data = encode_frame(("copies", pack_copies(batch)))
        except Exception:  # an input that does not pickle: those copies cannot reach the shadow
            _logger.exception("Request copies for the shadow could not be encoded")
            self._lost(len(batch))
            return
        while True:
            with self._attached:
                while self._fd is None and not self._closing:
                    self._attached.wait(0.5)
            with self._write_lock:
                if self._fd is None:
                    if self._closing:
                        self._on_drop(reason="closed", count=len(batch))
                        return
                    continue  # detached between the wait and the lock: wait for the next pipe
                try:
                    write_all(self._fd, data)
                except OSError:  # the shadow process is gone: the supervisor replaces it
                    self._lost(len(batch))
                    return
                self.sent += len(batch)
                self.messages += 1
                return

    def _hurry_now(self) -> None:
        """Have the sender write what waits at once: no gathering until the queue is empty again."""
        self._hurry.set()
        self._gathered.set()
        self._wake.set()

    def _lost(self, count: int) -> None:
        if self._on_lost is not None:
            self._on_lost(count)

    def close(self, timeout_s: float) -> None:
        """Write what is queued (for up to ``timeout_s``), then stop; copies left are dropped as ``closed``."""
        deadline = time.monotonic() + timeout_s
        if self._fd is None:  # no shadow process to write to (it is being replaced): do not wait for one
            self._closing = True
            with self._attached:
                self._attached.notify_all()
        self._stopping = True
        self._hurry_now()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._closing = True  # from now on put() drops: nothing is left behind in the queue
            left = list(self._pending)
            self._pending.clear()
            self._unfinished -= len(left)
            self._finished += len(left)
        with self._attached:
            self._attached.notify_all()
        if left:
            self._on_drop(reason="closed", count=len(left))
