"""The channel that carries request copies from a serving worker to its shadow process.

The worker's request path only appends a copy to a bounded in-memory queue (never blocks, never
raises; a full queue drops the copy and counts it as ``queue_full``, as the in-process mirror does).
One sender thread takes what waits, gathered (up to ``max_copies`` per message), and writes it to
the shadow process's pipe as one length-prefixed pickle. A copy is sent in its cheapest form: the
``(columns, float64 array)`` the parser's fast path built the frame on when there is one (pickling
an array is a memory copy; a DataFrame's pickle costs ~10x more), else the decoded inputs.
``os.write`` releases the GIL, so a shadow process that reads slowly only fills the pipe, then the
queue, then drops: it never makes the worker wait.

The pipe may break (the shadow process died): the copies of the message that could not be written
are reported to ``on_lost`` and the channel waits, detached, for :meth:`CopyChannel.attach` (the
supervisor's restart) while new copies queue and, once the queue is full, are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pandas as pd

_logger = logging.getLogger(__name__)

_HEAD = struct.Struct("<I")
MAX_FRAME_BYTES = 1 << 30  # a message larger than this is not one this protocol wrote


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


class Copy:
    """A request copy as the shadow process rebuilds it (what :meth:`ShadowMirror.submit` reads)."""

    __slots__ = ("request_id", "timestamp", "inputs", "params", "raw_inputs")

    def __init__(self, request_id: str, timestamp: float, payload: Any, params: dict[str, Any] | None) -> None:
        from mlflow_deploy_plugin.serving.frames import mark_float64

        self.request_id = request_id
        self.timestamp = timestamp
        self.params = params
        self.raw_inputs = None
        if payload[0] == "raw":  # rebuilt exactly as the parser's fast path built the primary's frame
            columns, values = payload[1], payload[2]
            self.raw_inputs = (tuple(columns), values)
            self.inputs: Any = mark_float64(pd.DataFrame(values, columns=list(columns)))
        else:
            self.inputs = payload[1]


class CopyChannel:
    """A bounded queue of request copies and the thread that writes them, gathered, to a pipe."""

    def __init__(self, max_queue: int, on_drop: Callable[[str], None],
                 on_lost: Callable[[int], None] | None = None, max_copies: int = 256) -> None:
        """``on_drop(reason)`` counts a copy the queue could not take; ``on_lost(n)`` the copies of a
        message the pipe did not take (its reader died)."""
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self._queue: queue.Queue[tuple | None] = queue.Queue(maxsize=max_queue)
        self._on_drop = on_drop
        self._on_lost = on_lost
        self._max_copies = max_copies
        self._fd: int | None = None
        # Held while a message is written, so a detach never splits a message and `sent` is exact.
        self._write_lock = threading.Lock()
        self._attached = threading.Condition(threading.Lock())
        self._closing = False
        self.sent = 0  # copies written to the current pipe since it was attached
        self._thread = threading.Thread(target=self._run, name="shadow-channel", daemon=True)
        self._thread.start()

    def put(self, copy: tuple) -> bool:
        """Queue one copy (see :func:`copy_of`); never blocks: False (and counted) when the queue is full."""
        if self._closing:
            self._on_drop("closed")
            return False
        try:
            self._queue.put_nowait(copy)
        except queue.Full:
            self._on_drop("queue_full")
            return False
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

    def send_control(self, message: Any, timeout_s: float = 5.0) -> bool:
        """Write one control message (flush, close) to the current pipe, after any message being written.

        False if there is no pipe, or if the message being written has not gone within ``timeout_s``
        (a child that stopped reading: the caller kills it, which ends that write).
        """
        data = encode_frame(message)
        if not self._write_lock.acquire(timeout=max(0.0, timeout_s)):
            return False
        try:
            if self._fd is None:
                return False
            try:
                write_all(self._fd, data)
            except OSError:
                return False
        finally:
            self._write_lock.release()
        return True

    def waiting(self) -> int:
        """Copies queued or being written (neither written nor counted as lost or dropped yet)."""
        return self._queue.unfinished_tasks

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                return
            batch = [first]
            stop = False
            while len(batch) < self._max_copies:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                self._send(batch)
            finally:
                for _ in range(len(batch) + stop):
                    self._queue.task_done()
            if stop:
                return

    def _send(self, batch: list[tuple]) -> None:
        try:
            data = encode_frame(("copies", batch))
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
                        for _ in batch:
                            self._on_drop("closed")
                        return
                    continue  # detached between the wait and the lock: wait for the next pipe
                try:
                    write_all(self._fd, data)
                except OSError:  # the shadow process is gone: the supervisor replaces it
                    self._lost(len(batch))
                    return
                self.sent += len(batch)
                return

    def _lost(self, count: int) -> None:
        if self._on_lost is not None:
            self._on_lost(count)

    def close(self, timeout_s: float) -> None:
        """Write what is queued (for up to ``timeout_s``), then stop; copies left are dropped as ``closed``."""
        deadline = time.monotonic() + timeout_s
        if self._fd is None:  # no shadow process to write to (it is being replaced): do not wait for one
            self._closing = True
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=max(0.0, timeout_s))
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._closing = True
        with self._attached:
            self._attached.notify_all()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            if item is not None:
                self._on_drop("closed")
