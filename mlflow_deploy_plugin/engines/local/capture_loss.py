"""Count the captured requests a worker took with it when it died (standard library only).

A worker's capture writer holds what it answered in memory for up to a quarter of a second before
appending it to its spool file (``capture/writer.py``). ``kill -9``, the OOM killer or a segfault
loses that, and the dying worker cannot count it. It can leave the count behind, though: its
liveness file (``liveness.py``) holds two numbers the writer stores through a shared memory map
(no syscall on the request path): requests accepted into memory, and requests that left it
(appended, or counted as dropped). When the supervisor sees a worker gone, the difference is
what capture lost; :class:`CaptureLoss` adds it to the drop counter every dashboard and alert
already reads (``mlflow_deploy_capture_dropped_requests_total``), logs one line and records a
``capture_lost`` event (reason ``worker_died``) in the history.

A worker with a shadow version has a child predicting it (``shadow_process.py``), whose own capture
writer holds the shadow's answers the same way. The child dies with its worker (``PR_SET_PDEATHSIG``),
so the worker cannot count what the child held then; the child's counts are in
``run/live/<worker pid>.shadow`` (``liveness.ShadowTallyFile``) with its pid. :meth:`CaptureLoss.shadow_gone`
waits (bounded, :data:`SHADOW_EXIT_WAIT_S`) for that child to be gone, so the counts are final, adds
the difference the same way (event reason ``shadow_died_with_worker``) and removes the file. A
child the worker counted itself (it died while the worker lived) left no file, or one reset by its
successor: never counted twice.

The count is exact but for one case: a worker killed in the middle of an append counts that whole
append as lost, though the records it completed reach Parquet. So it is "at most" by the records
of one append, never fewer than were lost.

The counter lives in the Prometheus multiprocess folder as a file of its own
(``counter_supervisor.db``), in the layout ``prometheus_client`` reads (its ``mmap_dict.py``: a
used-bytes header, then per sample its JSON key and two doubles). It is written here with
``struct`` because the supervisor imports no third-party module; a unit test reads it with
``prometheus_client`` itself. Like every counter file it survives a takeover by a new supervisor
and is removed when a deployment starts afresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin.engines.local.capture_drop_metric import DROPPED_HELP, DROPPED_METRIC
from mlflow_deploy_plugin.engines.local.liveness import Liveness, read_shadow_tally
from mlflow_deploy_plugin.engines.local.processes import is_shadow_child
from mlflow_deploy_plugin.state import StateStore

_logger = logging.getLogger("mlflow_deploy_plugin.supervisor")

COUNTER_FILE = "counter_supervisor.db"  # "counter_" is how prometheus_client knows the type
REASON = "worker_died"
SHADOW_REASON = "shadow_died_with_worker"
# A killed worker's shadow child got its SIGKILL before the worker could be reaped: gone within
# milliseconds. Only a child without the parent-death signal (not Linux) finishes on its own, after
# its pipe ends; its counts are taken as they stand then (over what it will still spool, never under).
SHADOW_EXIT_WAIT_S = 2.0
_INT = struct.Struct("<i")
_VALUE = struct.Struct("<dd")  # value, timestamp (unused for counters)


def _sample_key(deployment: str) -> str:
    # prometheus_client.mmap_dict.mmap_key: [metric, sample, labels, help], keys sorted.
    return json.dumps([DROPPED_METRIC, f"{DROPPED_METRIC}_total", {"deployment": deployment}, DROPPED_HELP],
                      sort_keys=True)


def read_counter_file(path: Path) -> dict[str, float]:
    """The samples of a multiprocess counter file (key -> value); empty if it is missing or torn."""
    try:
        data = path.read_bytes()
    except OSError:
        return {}
    if len(data) < 8:
        return {}
    used = min(_INT.unpack_from(data, 0)[0], len(data))
    values: dict[str, float] = {}
    pos = 8
    while pos + 4 <= used:
        size = _INT.unpack_from(data, pos)[0]
        padded = size + (8 - (size + 4) % 8)
        if size < 0 or pos + 4 + padded + _VALUE.size > used:
            break
        key = data[pos + 4:pos + 4 + size].decode("utf-8", errors="replace")
        values[key] = _VALUE.unpack_from(data, pos + 4 + padded)[0]
        pos += 4 + padded + _VALUE.size
    return values


def write_counter_file(path: Path, values: dict[str, float]) -> None:
    """Write samples (key -> value) as a multiprocess counter file, atomically (a scrape reads
    either the old file or the new one, never half of one)."""
    body = b""
    for key, value in values.items():
        encoded = key.encode("utf-8")
        padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
        body += _INT.pack(len(encoded)) + padded + _VALUE.pack(value, 0.0)
    used = 8 + len(body)
    data = _INT.pack(used) + b"\0" * 4 + body
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not *.db: never read half-written
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temporary, path)


class CaptureLoss:
    """What the supervisor does when a worker is gone: count the capture it took with it."""

    def __init__(self, store: StateStore, name: str, metrics_dir: Path, lost: int = 0) -> None:
        """``lost``: the total so far (carried over from a previous supervisor's status)."""
        self.store = store
        self.name = name
        self.metrics_dir = metrics_dir
        self.lost = lost

    def worker_gone(self, pid: int, live: Liveness | None, how: str) -> int:
        """Worker ``pid`` is gone (``how``: its exit, as said in the log); ``live`` is its last
        liveness record. Returns the requests counted as dropped (0 when it held none)."""
        lost = live.capture_unsettled if live is not None else 0
        if lost <= 0:
            return 0
        self._count(lost, f"Worker pid {pid} {how} holding {lost} answered request(s) not yet in its capture "
                          f"spool: counted as dropped from capture ({REASON})", reason=REASON, pid=pid, exit=how)
        return lost

    def shadow_gone(self, pid: int, path: Path, how: str) -> int:
        """Worker ``pid`` is gone, and its shadow child with it: count the shadow answers the child
        held (its counts in ``path``, ``run/live/<pid>.shadow``) and remove the file. Returns the
        rows counted as dropped (0 when there is no file or it held none)."""
        tally = read_shadow_tally(path)
        if tally is None:
            return 0
        child = tally.child_pid
        if child and is_shadow_child(child, pid):  # its counts are final once it is gone
            deadline = time.monotonic() + SHADOW_EXIT_WAIT_S
            while is_shadow_child(child, pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if is_shadow_child(child, pid):
                _logger.warning("Shadow process %d of worker %d still runs %.0fs after its worker died: counting "
                                "what its capture holds as it stands", child, pid, SHADOW_EXIT_WAIT_S)
            tally = read_shadow_tally(path) or tally
        lost = tally.capture_unsettled
        if lost > 0:
            self._count(lost, f"Shadow process {child or '(pid not recorded)'} died with worker pid {pid} ({how}) "
                              f"holding {lost} shadow answer(s) not yet in its capture spool: counted as dropped "
                              f"from capture ({SHADOW_REASON})", reason=SHADOW_REASON, pid=pid, shadow_pid=child,
                        exit=how)
        with contextlib.suppress(OSError):  # after counting: a crash in between counts twice, never not at all
            path.unlink()
        return lost

    def _count(self, lost: int, message: str, **event: Any) -> None:
        """Add ``lost`` to the drop counter, log ``message`` and record a ``capture_lost`` event."""
        self.lost += lost
        try:
            path = self.metrics_dir / COUNTER_FILE
            values = read_counter_file(path)
            key = _sample_key(self.name)
            values[key] = values.get(key, 0.0) + lost
            write_counter_file(path, values)
        except OSError as exc:  # the log line and the history still say it
            _logger.warning("Could not add to the capture drop counter in %s: %s", self.metrics_dir, exc)
        _logger.warning("%s", message)
        self.store.append_history(self.name, "capture_lost", requests=lost, **event)

    def status(self) -> dict[str, Any]:
        """What ``status.json`` says about it."""
        return {"capture_lost": self.lost}
