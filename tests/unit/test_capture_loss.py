"""What a killed worker's capture writer held in memory is counted as dropped, in process.

The pieces: the writer's tally (accepted / settled requests) stored through the liveness file's
memory map, the liveness record that carries it past the worker's death, and the supervisor's
:class:`CaptureLoss`, which adds the difference to the drop counter ``/metrics`` and the agent read.
The end-to-end check (a worker killed under traffic) is in ``tests/test_self_healing.py``. A worker's
shadow child's counts (``<pid>.shadow``) are counted by the supervisor when both die together: here
with a real stand-in worker and a real shadow process (``assets/shadow_tally_worker.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

import mlflow_deploy_plugin.capture.writer as writer_module
from mlflow_deploy_plugin.capture import CapturedRequest, CaptureWriter
from mlflow_deploy_plugin.engines.local.capture_loss import (
    COUNTER_FILE,
    DROPPED_HELP,
    DROPPED_METRIC,
    CaptureLoss,
    read_counter_file,
)
from mlflow_deploy_plugin.engines.local.liveness import (
    Liveness,
    LivenessWriter,
    ShadowTally,
    ShadowTallyFile,
    read_liveness,
    read_shadow_tally,
    shadow_tally_path,
)
from mlflow_deploy_plugin.engines.local.processes import is_shadow_child
from mlflow_deploy_plugin.monitoring.capture_watch import dropped_total
from mlflow_deploy_plugin.serving.metrics import ServingMetrics
from mlflow_deploy_plugin.state import StateStore


def _request(i: int) -> CapturedRequest:
    return CapturedRequest(f"r-{i}", time.time(), "1", 200, 1.0, pd.DataFrame({"x": [float(i)]}), np.array([i]))


def _wait(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_the_tally_in_the_liveness_file_outlives_the_writer_and_leaves_the_rest_alone(tmp_path: Path) -> None:
    path = tmp_path / "live" / "123"
    live = LivenessWriter(path)
    tally = live.capture_tally()
    tally[0], tally[1] = 7, 3
    live.beat()
    live.predict_started(5)
    record = read_liveness(path)
    assert (record.capture_accepted, record.capture_settled, record.capture_unsettled) == (7, 3, 4)
    assert record.busy_rows == 5 and record.silent_for() < 5
    del tally, live  # the file keeps what was stored, as after a kill
    assert read_liveness(path).capture_unsettled == 4
    # A record written before the capture counts existed (32 bytes) reads as holding nothing.
    path.write_bytes(path.read_bytes()[:32])
    assert read_liveness(path).capture_unsettled == 0 and read_liveness(path).busy_rows == 5


def test_the_writer_tally_counts_what_memory_holds_until_it_is_spooled(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Appends wait an hour after the first: what is recorded meanwhile stays in memory, as in the
    # quarter second before a kill -9.
    monkeypatch.setattr(writer_module, "_WRITE_EVERY_S", 3600.0)
    live_path = tmp_path / "live" / "1"
    live = LivenessWriter(live_path)
    writer = CaptureWriter(str(tmp_path / "capture"), "dep", flush_interval_s=600, spool_dir=str(tmp_path / "spool"),
                           converter="external")
    try:
        writer.tally_into(live.capture_tally())
        assert writer.record(_request(0))
        _wait(lambda: writer.settled_requests == 1, "the first record to reach the spool file")
        assert read_liveness(live_path).capture_unsettled == 0
        for i in range(1, 10):
            assert writer.record(_request(i))
        held = read_liveness(live_path)
        assert (held.capture_accepted, held.capture_settled, held.capture_unsettled) == (10, 1, 9)
        spooled = sum(len(p.read_bytes()) for p in (tmp_path / "spool").rglob("seg-*"))
        assert spooled > 0
    finally:
        writer.close(timeout_s=0.5)  # no converter runs: it leaves the segment to the next one
    closed = read_liveness(live_path)
    assert (closed.capture_accepted, closed.capture_unsettled) == (10, 0), "close spools what memory held"


def test_records_after_the_first_reach_the_spool_file_without_waiting_for_the_segment_to_end(
        tmp_path: Path) -> None:
    # The segment ends only after 600 s: records must still leave memory every _WRITE_EVERY_S (what
    # a kill -9 loses), not sit there until the segment ends (the writer thread used to sleep until then).
    writer = CaptureWriter(str(tmp_path / "capture"), "dep", flush_interval_s=600, spool_dir=str(tmp_path / "spool"),
                           converter="external")
    try:
        assert writer.record(_request(0))
        _wait(lambda: writer.settled_requests == 1, "the first record to reach the spool file")
        for i in range(1, 10):
            assert writer.record(_request(i))
        _wait(lambda: writer.settled_requests == 10, "the later records to reach the spool file before the "
              "segment ends", timeout_s=60.0)
        assert writer.written_requests == 0, "appended to the open segment, not converted"
    finally:
        writer.close(timeout_s=0.5)


def test_an_unexpected_error_while_spooling_counts_the_requests_as_dropped_and_settled(tmp_path: Path) -> None:
    # A redaction that no longer pickles (set after the constructor checked it) fails the spool
    # folder's config with a pickling error, not an OSError. The requests the write took used to
    # vanish from every count: neither settled nor dropped, and held against the buffer bound forever.
    drops: list[tuple[int, str]] = []
    writer = CaptureWriter(str(tmp_path / "capture"), "dep", flush_interval_s=600, spool_dir=str(tmp_path / "spool"),
                           converter="external", on_drop=lambda n, reason: drops.append((n, reason)))
    try:
        writer.redact = lambda frame: frame  # a lambda does not pickle
        for i in range(5):
            assert writer.record(_request(i))
        _wait(lambda: writer.settled_requests == 5, "the failed write's requests to be settled")
        _wait(lambda: writer.buffered_requests == 0, "the failed write's requests to leave the buffer bound")
        assert writer.dropped_requests == 5
        assert sum(n for n, reason in drops if reason == "write_error") == 5, drops
        assert writer.buffered_bytes == 0
    finally:
        writer.close(timeout_s=0.5)


def _worker_counter_file(folder: Path, pid: int, deployment: str, value: float) -> None:
    """A counter file as a worker's prometheus_client writes it (multiprocess mode)."""
    values = MmapedDict(str(folder / f"counter_{pid}.db"))
    values.write_value(mmap_key(DROPPED_METRIC, f"{DROPPED_METRIC}_total", ["deployment"], [deployment],
                                DROPPED_HELP), value, 0.0)
    values.close()


def test_the_supervisor_adds_what_a_dead_worker_held_to_the_drop_counter(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "home")
    metrics = store.paths("dep").metrics
    metrics.mkdir(parents=True)
    _worker_counter_file(metrics, 111, "dep", 2.0)  # a buffer_full drop counted by a live worker
    loss = CaptureLoss(store, "dep", metrics)

    def gone(pid: int, accepted: int, settled: int) -> int:
        return loss.worker_gone(pid, Liveness(0.0, 0.0, 0, 9, accepted, settled), "killed by signal SIGKILL")

    assert gone(222, 10, 4) == 6 and gone(333, 5, 2) == 3
    assert gone(444, 8, 8) == 0 and loss.worker_gone(555, None, "exited with code 0") == 0
    # What /metrics (MultiProcessCollector over the folder) and the agent's capture watch read: one sum.
    assert dropped_total(str(metrics), "dep") == 2.0 + 6 + 3
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics))
    families = [f for f in registry.collect() if f.name == DROPPED_METRIC]
    assert len(families) == 1 and families[0].type == "counter"
    assert [s.value for s in families[0].samples if s.name.endswith("_total")] == [11.0]
    events = [e for e in store.read_history("dep") if e["event"] == "capture_lost"]
    assert [(e["pid"], e["requests"], e["reason"]) for e in events] == [(222, 6, "worker_died"),
                                                                         (333, 3, "worker_died")]
    assert loss.status() == {"capture_lost": 9}
    # A successor supervisor (takeover) adds to the same file: the counter goes on counting.
    successor = CaptureLoss(store, "dep", metrics, lost=loss.lost)
    successor.worker_gone(666, Liveness(0.0, 0.0, 0, 1, 1, 0), "(a previous supervisor's) is gone")
    assert dropped_total(str(metrics), "dep") == 12.0 and successor.status() == {"capture_lost": 10}
    assert list(read_counter_file(metrics / COUNTER_FILE).values()) == [10.0]


def test_the_counter_the_supervisor_writes_is_the_one_the_workers_count_in() -> None:
    counter = ServingMetrics().capture_dropped
    # Name and help are one constant (capture_drop_metric.py); the labels the supervisor writes are its own.
    assert counter._labelnames == ("deployment",)


def test_a_new_supervisor_counts_workers_that_died_while_none_watched(tmp_path: Path) -> None:
    """After everything was killed (or a reboot), the next supervisor finds the dead workers' liveness
    files: what each held is counted once, and the files go."""
    from mlflow_deploy_plugin.engines.local.supervisor import Supervisor

    store = StateStore(tmp_path / "home")
    paths = store.paths("dep")
    paths.metrics.mkdir(parents=True)
    live_dir = paths.root / "run" / "live"
    no_such_pid = 4_194_304 + 17  # above Linux's largest pid_max: never a running process
    for pid, (accepted, settled) in ((no_such_pid, (12, 5)), (no_such_pid + 1, (3, 3))):
        tally = LivenessWriter(live_dir / str(pid)).capture_tally()
        tally[0], tally[1] = accepted, settled
    supervisor = Supervisor(paths)
    supervisor._count_dead_workers()
    assert supervisor._status()["capture_lost"] == 7 and dropped_total(str(paths.metrics), "dep") == 7.0
    assert [(e["pid"], e["requests"]) for e in store.read_history("dep") if e["event"] == "capture_lost"] == [
        (no_such_pid, 7)]
    assert not list(live_dir.iterdir())
    supervisor._count_dead_workers()  # counted once
    assert dropped_total(str(paths.metrics), "dep") == 7.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_a_killed_workers_shadow_child_is_counted_once_with_it_and_its_files_go(tmp_path: Path) -> None:
    """A worker killed with its shadow child: the supervisor counts what each held (the worker's 3 - 1,
    the child's 9 - 4), once, and removes the liveness and ``.shadow`` files."""
    from mlflow_deploy_plugin.engines.local.supervisor import Supervisor

    store = StateStore(tmp_path / "home")
    paths = store.paths("dep")
    paths.metrics.mkdir(parents=True)
    live_dir = paths.root / "run" / "live"
    worker = subprocess.Popen([sys.executable, str(Path(__file__).parent / "assets" / "shadow_tally_worker.py"),
                               str(live_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        assert line.strip().isdigit(), f"the stand-in worker said {line!r} (exit {worker.poll()})"
        child = int(line)
        path = shadow_tally_path(live_dir, worker.pid)
        assert read_shadow_tally(path) == ShadowTally(9, 4, child)
        assert path.stat().st_mode & 0o777 == 0o600
        assert is_shadow_child(child, worker.pid) and not is_shadow_child(child, worker.pid + 1)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(60)
        supervisor = Supervisor(paths)
        supervisor._worker_gone(worker.pid, "killed by signal SIGKILL")
        assert not is_shadow_child(child, worker.pid), "counted before the child was gone"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(60)
        if child and is_shadow_child(child, worker.pid):
            os.kill(child, signal.SIGKILL)
        for stream in (worker.stdin, worker.stdout):
            if stream is not None:
                stream.close()
    assert dropped_total(str(paths.metrics), "dep") == 2 + 5 and supervisor._status()["capture_lost"] == 7
    events = [e for e in store.read_history("dep") if e["event"] == "capture_lost"]
    assert [(e["reason"], e["pid"], e["requests"], e.get("shadow_pid")) for e in events] == [
        ("worker_died", worker.pid, 2, None), ("shadow_died_with_worker", worker.pid, 5, child)]
    assert not list(live_dir.iterdir())
    supervisor._worker_gone(worker.pid, "killed by signal SIGKILL")  # counted once
    supervisor._count_dead_workers()
    assert dropped_total(str(paths.metrics), "dep") == 7.0


def test_a_shadow_tally_the_worker_counted_is_not_counted_again(tmp_path: Path) -> None:
    """The worker counts a child that died while it lived and closes its file; a lone ``.shadow`` file
    (its liveness file gone) of a dead worker is still counted by the next supervisor."""
    from mlflow_deploy_plugin.engines.local.supervisor import Supervisor

    store = StateStore(tmp_path / "home")
    paths = store.paths("dep")
    paths.metrics.mkdir(parents=True)
    live_dir = paths.root / "run" / "live"
    no_such_pid = 4_194_304 + 23  # above Linux's largest pid_max: never a running process
    counted = ShadowTallyFile(shadow_tally_path(live_dir, no_such_pid))
    os.pwrite(counted.fd, (6).to_bytes(8, "little"), 0)
    assert read_shadow_tally(shadow_tally_path(live_dir, no_such_pid)).capture_unsettled == 6
    counted.close()  # what ShadowProcess does once it has counted the 6
    lone = ShadowTallyFile(shadow_tally_path(live_dir, no_such_pid + 1))
    os.pwrite(lone.fd, (4).to_bytes(8, "little") + (1).to_bytes(8, "little"), 0)
    os.close(lone.fd)  # killed: the file stays
    unlinked = ShadowTallyFile(None)  # no supervisor: nothing on disk
    assert unlinked.read().capture_unsettled == 0
    unlinked.close()
    supervisor = Supervisor(paths)
    supervisor._count_dead_workers()
    assert dropped_total(str(paths.metrics), "dep") == 3.0 and not list(live_dir.iterdir())
    assert [(e["pid"], e["requests"], e["reason"]) for e in store.read_history("dep")
            if e["event"] == "capture_lost"] == [(no_such_pid + 1, 3, "shadow_died_with_worker")]
