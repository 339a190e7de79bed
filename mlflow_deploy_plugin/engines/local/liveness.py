"""A worker's liveness record: a 48-byte file its supervisor reads (standard library only).

Readiness (``/health``, the ``ready`` line on the pipe) says a worker *can* serve; liveness says it
still *does*. Each worker keeps ``run/live/<pid>`` up to date with ``os.pwrite`` (microseconds, no
lock, no pipe that could fill and block the predict thread):

- ``heartbeat``: written by the event loop every ``HEARTBEAT_S``; stale means the loop is stuck;
- ``busy_since`` / ``busy_rows``: written by the predict thread around every model call; a call
  older than ``timeout_s + HUNG_GRACE_S`` is hung (no request may wait that long anyway);
- ``predicts``: calls completed, so a crash can be told apart: before serving anything (the
  version cannot stay up) or while predicting (a request killed it);
- ``capture_accepted`` / ``capture_settled``: requests the capture writer took into memory, and
  those that left memory (appended to the spool file, or counted as dropped). Written through a
  shared memory map, not a syscall: ``record()`` runs on the request path, where a write per
  request costs throughput (each releases the GIL). Their difference when the worker died is
  what ``kill -9`` took with it: the requests answered but in no spool file and counted nowhere.
  The supervisor adds it to the capture drop counter (``capture_loss.py``).

A worker with a shadow version also keeps ``run/live/<pid>.shadow`` (:class:`ShadowTallyFile`): the
same two capture counts of its shadow child's writer (``engines/local/shadow_process.py``), and the
child's pid. The child dies with its worker, so when the worker is killed the supervisor counts the
shadow rows the child held as well, once the child is gone.

The files survive the worker's death (they are plain page cache), which is what lets the supervisor
tell a poison request from a broken version after the fact. Times are ``time.monotonic()``:
CLOCK_MONOTONIC is the same clock in every process of the machine.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_S = 0.5
HUNG_GRACE_S = 2.0  # beyond timeout_s: every request waiting on the call has had its answer by then
# heartbeat, busy_since, busy_rows, predicts, capture_accepted, capture_settled
_LAYOUT = struct.Struct("<ddqqqq")
_OLD_LAYOUT_SIZE = 32  # a record without the capture counts (read as 0, 0)
_CAPTURE_OFFSET = 32
_BUSY = struct.Struct("<dq")
# A shadow child's capture_accepted, capture_settled (stored by the child), then its pid (by the worker).
_SHADOW_LAYOUT = struct.Struct("<qqq")
SHADOW_COUNTS_SIZE = 16  # what the child maps: the two counts, not the pid
SHADOW_SUFFIX = ".shadow"


def liveness_dir(run_dir: Path) -> Path:
    return run_dir / "live"


def shadow_tally_path(live_dir: Path, worker_pid: int) -> Path:
    """Where worker ``worker_pid`` keeps its shadow child's capture counts."""
    return live_dir / f"{worker_pid}{SHADOW_SUFFIX}"


@dataclass(frozen=True)
class Liveness:
    heartbeat: float
    busy_since: float  # 0.0 when no predict runs
    busy_rows: int
    predicts: int
    capture_accepted: int = 0
    capture_settled: int = 0

    @property
    def capture_unsettled(self) -> int:
        """Requests the capture writer held in memory (not yet in its spool file, not counted as
        dropped) at the last update: after the worker died, what its death lost from capture."""
        return max(0, self.capture_accepted - self.capture_settled)

    def busy_for(self, now: float | None = None) -> float:
        return ((now or time.monotonic()) - self.busy_since) if self.busy_since else 0.0

    def silent_for(self, now: float | None = None) -> float:
        return (now or time.monotonic()) - self.heartbeat


class LivenessWriter:
    """The worker's side: one file, written in place."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._predicts = 0
        self._busy_since = 0.0
        os.pwrite(self._fd, _LAYOUT.pack(time.monotonic(), 0.0, 0, 0, 0, 0), 0)
        self._map: mmap.mmap | None = None

    def capture_tally(self) -> memoryview:
        """The two capture counts (accepted, settled) as a writable ``memoryview`` of int64 in this
        file's page cache: the capture writer stores into it without a syscall, and what it stored
        is there for the supervisor to read after the worker is gone, however it went."""
        if self._map is None:
            self._map = mmap.mmap(self._fd, _LAYOUT.size)
        return memoryview(self._map)[_CAPTURE_OFFSET:_LAYOUT.size].cast("q")

    def beat(self) -> None:
        """Event loop: still turning."""
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, struct.pack("<d", time.monotonic()), 0)

    def predict_started(self, rows: int) -> None:
        self._busy_since = time.monotonic()
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, _BUSY.pack(self._busy_since, rows), 8)

    def predict_ended(self) -> None:
        self._busy_since = 0.0
        self._predicts += 1
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, _BUSY.pack(0.0, 0) + struct.pack("<q", self._predicts), 8)

    def busy_for(self) -> float:
        """How long the current model call has run (0 when none runs)."""
        since = self._busy_since
        return time.monotonic() - since if since else 0.0


def read_liveness(path: Path) -> Liveness | None:
    """The supervisor's side: the worker's last record, or None before it wrote one."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_LAYOUT.size)
    except OSError:
        return None
    if len(raw) < _OLD_LAYOUT_SIZE:
        return None
    return Liveness(*_LAYOUT.unpack(raw.ljust(_LAYOUT.size, b"\0")))


@dataclass(frozen=True)
class ShadowTally:
    """A shadow child's capture counts as its writer last stored them, and the child's pid (0: not known)."""

    capture_accepted: int
    capture_settled: int
    child_pid: int

    @property
    def capture_unsettled(self) -> int:
        """Shadow answers the child's writer held in memory (neither spooled nor counted as dropped)."""
        return max(0, self.capture_accepted - self.capture_settled)


class ShadowTallyFile:
    """The worker's side of one shadow child's capture counts: a 24-byte file the child's capture
    writer stores into through a shared memory map (its first :data:`SHADOW_COUNTS_SIZE` bytes), read
    after the child is gone, however it went.

    ``path``: ``run/live/<worker pid>.shadow`` (:func:`shadow_tally_path`), so that the supervisor
    finds it when the worker is killed and its child dies with it; ``None`` (no supervisor: tests,
    Ray replicas) makes it an unlinked file only the worker reads. One child at a time per worker:
    the worker counts a dead child and :meth:`close` s its file before it starts the next.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is None:
            with tempfile.TemporaryFile() as handle:  # unlinked: nothing is left behind, whatever happens
                self.fd = os.dup(handle.fileno())
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_TRUNC: a file left by a dead process that had this pid holds nothing of ours.
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, _SHADOW_LAYOUT.size)

    def started(self, child_pid: int) -> None:
        """The child now running is ``child_pid``: the supervisor waits for it before it reads the counts."""
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, struct.pack("<q", child_pid), SHADOW_COUNTS_SIZE)

    def read(self) -> ShadowTally:
        """The counts as the child last stored them."""
        return _unpack_shadow(os.pread(self.fd, _SHADOW_LAYOUT.size, 0))

    def close(self) -> None:
        """Remove the file and close it: the child's counts were read (and counted) or never mattered."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _unpack_shadow(raw: bytes) -> ShadowTally:
    return ShadowTally(*_SHADOW_LAYOUT.unpack(raw[:_SHADOW_LAYOUT.size].ljust(_SHADOW_LAYOUT.size, b"\0")))


def read_shadow_tally(path: Path) -> ShadowTally | None:
    """The supervisor's side: a worker's shadow child's last counts, or None when there is no file."""
    try:
        with open(path, "rb") as handle:
            return _unpack_shadow(handle.read(_SHADOW_LAYOUT.size))
    except OSError:
        return None
