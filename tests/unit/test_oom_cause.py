"""Telling an OOM kill from a ``kill -9`` (``engines/local/oom.py``): the cgroup counter found in
the layouts a machine may have (files in a temp folder laid out like ``/sys/fs/cgroup``), the
classification of SIGKILL deaths, and what the supervisor records for a real worker process
killed by SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlflow_deploy_plugin.engines.local.oom import (
    KILLED,
    OOM,
    UNKNOWN,
    WINDOW_S,
    OomKills,
    describe_sigkill,
    oom_counter_path,
    read_oom_kills,
)

V2_EVENTS = "low 0\nhigh 0\nmax 12\noom 3\noom_kill {n}\noom_group_kill 0\n"
V1_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill {n}\n"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_cgroup_v2_counter_of_the_group_itself(tmp_path: Path) -> None:
    events = _write(tmp_path / "user.slice" / "app.service" / "memory.events", V2_EVENTS.format(n=2))
    assert oom_counter_path("0::/user.slice/app.service\n", tmp_path) == events
    assert read_oom_kills(events) == 2  # not "oom 3" nor "oom_group_kill 0"


def test_a_group_without_the_memory_controller_is_charged_to_its_nearest_ancestor(tmp_path: Path) -> None:
    (tmp_path / "user.slice" / "session-3.scope").mkdir(parents=True)  # no memory.events here
    events = _write(tmp_path / "user.slice" / "memory.events", V2_EVENTS.format(n=0))
    assert oom_counter_path("0::/user.slice/session-3.scope", tmp_path) == events


def test_hybrid_mount_and_cgroup_v1(tmp_path: Path) -> None:
    # Hybrid (this kind of machine): cgroup2 at unified/ without memory, v1 memory controller.
    control = _write(tmp_path / "memory" / "process_api" / "abc" / "memory.oom_control", V1_CONTROL.format(n=5))
    text = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n"
    assert oom_counter_path(text, tmp_path) == control and read_oom_kills(control) == 5
    # A v2 counter under unified/ wins over v1 when present.
    events = _write(tmp_path / "unified" / "svc" / "memory.events", V2_EVENTS.format(n=1))
    assert oom_counter_path("4:memory:/process_api/abc\n0::/svc\n", tmp_path) == events


def test_no_counter_is_none_never_a_guess(tmp_path: Path) -> None:
    assert oom_counter_path("0::/\n", tmp_path) is None  # the root group has no memory.events
    assert oom_counter_path("", tmp_path) is None
    assert read_oom_kills(None) is None and read_oom_kills(tmp_path / "missing") is None
    assert read_oom_kills(_write(tmp_path / "odd", "oom_kill lots\n")) is None
    # Never reads above the cgroup mount, even for a group path that climbs out of it.
    _write(tmp_path.parent / "memory.events", V2_EVENTS.format(n=0))
    try:
        assert oom_counter_path("0::/../x\n", tmp_path) is None
    finally:
        (tmp_path.parent / "memory.events").unlink()


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_counter_rise_explains_one_sigkill_within_the_window(tmp_path: Path) -> None:
    events = _write(tmp_path / "memory.events", V2_EVENTS.format(n=4))
    clock = _Clock()
    kills = OomKills(events, clock)
    assert kills.cause_of_sigkill() == KILLED  # no rise since we started watching: a person
    _write(events, V2_EVENTS.format(n=6))  # two OOM kills
    clock.now += 0.5
    kills.poll()
    assert [kills.cause_of_sigkill() for _ in range(3)] == [OOM, OOM, KILLED]
    # A rise seen long before the death is not its cause (another process of the group).
    _write(events, V2_EVENTS.format(n=7))
    clock.now += 2
    kills.poll()
    clock.now += WINDOW_S + 1
    assert kills.cause_of_sigkill() == KILLED
    # A rise not yet polled is read at the death itself.
    _write(events, V2_EVENTS.format(n=8))
    assert kills.cause_of_sigkill() == OOM


def test_an_unreadable_counter_says_cause_unknown(tmp_path: Path) -> None:
    assert OomKills(None).cause_of_sigkill() == UNKNOWN
    events = _write(tmp_path / "memory.events", V2_EVENTS.format(n=0))
    kills = OomKills(events, _Clock())
    events.unlink()  # the group went away
    assert kills.cause_of_sigkill() == UNKNOWN
    assert "cause unknown" in describe_sigkill(UNKNOWN) and "OOM killer" in describe_sigkill(OOM)
    assert "not the OOM killer" in describe_sigkill(KILLED)


def _supervisor_reading_oom_kills(tmp_path: Path, oom_killed: bool | None) -> tuple[Any, Any, Path, Any]:
    """(store, paths, memory.events file, Supervisor) of deployment "dep" under ``tmp_path``; the
    supervisor reads OOM kills from that file, or has no counter when ``oom_killed`` is None."""
    from mlflow_deploy_plugin.engines.local.supervisor import Supervisor
    from mlflow_deploy_plugin.state import StateStore

    store = StateStore(tmp_path / "home")
    paths = store.paths("dep")
    paths.metrics.mkdir(parents=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    events = _write(tmp_path / "cgroup" / "memory.events", V2_EVENTS.format(n=0))
    supervisor = Supervisor(paths)
    supervisor.oom = OomKills(events if oom_killed is not None else None)
    return store, paths, events, supervisor


@pytest.mark.parametrize(("oom_killed", "cause"), [(True, OOM), (False, KILLED), (None, UNKNOWN)])
def test_the_supervisor_records_the_cause_of_a_workers_sigkill(tmp_path: Path, oom_killed: bool | None,
                                                               cause: str) -> None:
    """A real process standing in for a worker dies of SIGKILL inside a model call: the history's
    bad_request entry, ``last_error`` (what ``get`` shows) and ``oom_kills`` say why."""
    from mlflow_deploy_plugin.engines.local.liveness import LivenessWriter
    from mlflow_deploy_plugin.engines.local.supervisor import Generation, Worker
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef

    store, paths, events, supervisor = _supervisor_reading_oom_kills(tmp_path, oom_killed)
    spec = DeploymentSpec("dep", ModelRef("models:/m/1", "m", "1"))
    with socket.socket() as sock:
        supervisor.current = Generation(1, spec, sock, paths.root / "spec-1.json")
        supervisor.ever_ready = True
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        read_end, write_end = os.pipe()
        os.close(write_end)
        worker = Worker(proc, 1, 0, read_end, paths.logs / "worker-0.log", ready_at=1.0)
        supervisor.workers[proc.pid] = worker
        LivenessWriter(supervisor._live_path(proc.pid)).predict_started(3)  # inside a model call
        if oom_killed:
            _write(events, V2_EVENTS.format(n=1))  # the kernel counts before it signals
        proc.kill()
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        supervisor._reap()
    assert proc.pid not in supervisor.workers
    entries = [e for e in store.read_history("dep") if e["event"] == "bad_request"]
    assert [(e["cause"], e["rows"]) for e in entries] == [(cause, 3)]
    assert describe_sigkill(cause) in entries[0]["error"] and describe_sigkill(cause) in (supervisor.last_error or "")
    assert supervisor._status()["oom_kills"] == (1 if cause == OOM else 0)
    assert supervisor.bad_requests == 1


@pytest.mark.parametrize(("oom_killed", "cause"), [(True, OOM), (False, KILLED), (None, UNKNOWN)])
def test_an_update_whose_new_worker_was_killed_is_answered_with_the_cause(tmp_path: Path, oom_killed: bool | None,
                                                                          cause: str) -> None:
    """A worker of the pending generation (an update's, still loading) dies of SIGKILL: the update
    fails, and the answer its requester gets carries ``cause`` in the words ``crashed`` entries use,
    which the deployment core writes into the ``update_failed`` history entry (EngineError.cause)."""
    from mlflow_deploy_plugin.engines.local.supervisor import Generation, PendingUpdate, Worker
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import read_json

    store, paths, events, supervisor = _supervisor_reading_oom_kills(tmp_path, oom_killed)
    old, new = DeploymentSpec("dep", ModelRef("models:/m/1", "m", "1")), DeploymentSpec("dep", ModelRef("models:/m/2", "m", "2"))
    with socket.socket() as old_sock, socket.socket() as new_sock:
        supervisor.current = Generation(1, old, old_sock, paths.root / "spec-1.json")
        supervisor.ever_ready = True
        supervisor.pending = PendingUpdate("req-1", Generation(2, new, new_sock, paths.root / "spec-2.json"),
                                           deadline=float("inf"), reason="update")
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        read_end, write_end = os.pipe()
        os.close(write_end)
        supervisor.workers[proc.pid] = Worker(proc, 2, 0, read_end, paths.logs / "worker-0.log")  # loading
        if oom_killed:
            _write(events, V2_EVENTS.format(n=1))  # the kernel counts before it signals
        proc.kill()
        proc.wait(timeout=30)
        supervisor._reap()
    assert supervisor.pending is None and proc.pid not in supervisor.workers
    answer = read_json(paths.requests / "req-1.result.json")
    assert answer is not None and answer["ok"] is False
    assert answer["cause"] == cause and describe_sigkill(cause) in answer["error"]
    assert supervisor._status()["oom_kills"] == (1 if cause == OOM else 0)
