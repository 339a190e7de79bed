"""Pieces of the local supervisor that need no process: dead workers' metrics, the mailbox."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlflow_deploy_plugin.engines.local.mailbox import Mailbox, MailboxTimeout, SupervisorGone
from mlflow_deploy_plugin.engines.local.supervisor import forget_worker_metrics


def test_a_dead_workers_live_gauges_are_forgotten_and_nothing_else(tmp_path: Path) -> None:
    names = ["gauge_livesum_123.db", "gauge_livemax_123.db", "gauge_livesum_1234.db", "counter_123.db",
             "histogram_123.db", "gauge_all_123.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    forget_worker_metrics(tmp_path, 123)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["gauge_livesum_1234.db", "counter_123.db", "histogram_123.db", "gauge_all_123.db"])


def test_mailbox_round_trip(tmp_path: Path) -> None:
    client, supervisor = Mailbox(tmp_path), Mailbox(tmp_path)
    stop = threading.Event()

    def serve() -> None:
        while not stop.wait(0.01):
            for request_id, request in supervisor.new_requests():
                supervisor.answer(request_id, {"ok": True, "echo": request["op"]})

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert client.ask({"op": "update"}, 10, alive=lambda: True) == {"ok": True, "echo": "update"}
        assert list(tmp_path.iterdir()) == []  # request and answer are cleaned up
    finally:
        stop.set()
        thread.join(5)


def test_mailbox_sees_each_request_once(tmp_path: Path) -> None:
    Mailbox(tmp_path)  # nothing there yet
    (tmp_path / "1-a.request.json").write_text('{"op": "stop"}')
    supervisor = Mailbox(tmp_path)
    assert list(supervisor.new_requests()) == [("1-a", {"op": "stop"})]
    assert list(supervisor.new_requests()) == []


def test_mailbox_gives_up_when_nobody_can_answer(tmp_path: Path) -> None:
    with pytest.raises(SupervisorGone):
        Mailbox(tmp_path).ask({"op": "stop"}, 10, alive=lambda: False)
    with pytest.raises(MailboxTimeout):
        Mailbox(tmp_path).ask({"op": "stop"}, 0.2, alive=lambda: True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("module", "expected"), [
    ("mlflow_deploy_plugin.engines.local.supervisor", True),
    ("mlflow_deploy_plugin.engines.supervisor", True),  # started before the engines/local/ layout
    ("some.other.module", False),
])
def test_a_supervisor_is_recognised_by_its_command_line(tmp_path: Path, module: str, expected: bool) -> None:
    import subprocess
    import sys

    from mlflow_deploy_plugin.engines.local.engine import is_supervisor

    root = tmp_path / "deployments" / "churn"
    # A stand-in process whose command line is what a supervisor's would be (it only sleeps).
    proc = subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()",
                             module, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"  # exec'd: its cmdline is final
        assert is_supervisor(proc.pid, root) is expected
        assert is_supervisor(proc.pid, tmp_path / "deployments" / "other") is False
    finally:
        proc.communicate(timeout=10)
    assert is_supervisor(proc.pid, root) is False  # gone


def test_a_deployments_processes_are_recognised_through_a_symlinked_home(tmp_path: Path) -> None:
    """Supervisor, agent and worker command lines spelled through a symlink (or relative to their
    working directory) name the same folder; another folder of the same name does not."""
    import subprocess
    import sys

    from mlflow_deploy_plugin.engines.local.processes import (
        AGENT_MODULE,
        SUPERVISOR_MODULE,
        WORKER_MODULE,
        is_agent,
        is_supervisor,
        is_worker,
    )

    real = tmp_path / "home" / "deployments" / "churn"
    (real / "run").mkdir(parents=True)
    (tmp_path / "linked").symlink_to(tmp_path / "home")
    linked = tmp_path / "linked" / "deployments" / "churn"
    other = tmp_path / "other" / "deployments" / "churn"
    (other / "run").mkdir(parents=True)
    code = "import sys; print('up', flush=True); sys.stdin.read()"
    argvs = {
        "supervisor": [SUPERVISOR_MODULE, str(linked)],
        "agent": [AGENT_MODULE, "deployments/churn"],  # relative to its working directory
        "worker": [WORKER_MODULE, "--generation", str(linked / "run" / "gen-1.json")],
    }
    procs = {kind: subprocess.Popen([sys.executable, "-c", code, *argv], cwd=tmp_path / "linked",
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for kind, argv in argvs.items()}
    try:
        for proc in procs.values():
            assert proc.stdout is not None and proc.stdout.readline() == "up\n"  # exec'd: cmdline final
        checks = {"supervisor": is_supervisor, "agent": is_agent, "worker": is_worker}
        for kind, check in checks.items():
            assert check(procs[kind].pid, real), kind
            assert check(procs[kind].pid, linked), kind
            assert not check(procs[kind].pid, other), kind
            others = [check(procs[k].pid, real) for k in checks if k != kind]
            assert others == [False, False], kind  # each check knows its own kind only
    finally:
        for proc in procs.values():
            proc.communicate(timeout=10)


def test_orphans_killed_at_shutdown_are_waited_for_until_gone_within_a_bound(tmp_path: Path) -> None:
    """The supervisor reads a killed orphan's capture tally once the orphan is gone (kill returns
    before the SIGKILL has stopped it); one that outlives the bound is named, never waited on forever."""
    import signal
    import subprocess
    import sys

    from mlflow_deploy_plugin.engines.local.processes import WORKER_MODULE, is_worker, wait_workers_gone

    root = tmp_path / "deployments" / "churn"
    # Stand-ins whose command lines are a worker's of `root` (they only wait for stdin to close).
    procs = [subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()",
                               WORKER_MODULE, str(root / "run" / "generation-1.json")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "up\n"  # exec'd: its cmdline is final
        killed, spared = procs
        assert all(is_worker(proc.pid, root) for proc in procs)
        os.kill(killed.pid, signal.SIGKILL)
        assert wait_workers_gone([killed.pid], root, 30.0) == []
        assert not is_worker(killed.pid, root)  # a zombie until reaped: gone all the same
        assert wait_workers_gone([killed.pid, spared.pid], root, 0.2) == [spared.pid]  # bounded
    finally:
        for proc in procs:
            proc.communicate(timeout=10)


def test_a_workers_word_wakes_the_supervisor_before_its_tick_ends(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in worker says ``loaded`` on its ready pipe: the supervisor's wait between ticks ends
    then (the tick is an hour here), and the worker gets its ``go``; once the worker is gone and its
    pipe at end of file, the supervisor sleeps its ticks instead of waking on that pipe forever."""
    import socket
    import subprocess
    import sys

    import mlflow_deploy_plugin.engines.local.supervisor as supervisor_module
    from mlflow_deploy_plugin.engines.local import worker_protocol as protocol
    from mlflow_deploy_plugin.engines.local.supervisor import Generation, Supervisor, Worker
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore

    monkeypatch.setattr(supervisor_module, "TICK_S", 3600.0)
    paths = StateStore(tmp_path / "home").paths("dep")
    paths.logs.mkdir(parents=True)
    supervisor = Supervisor(paths)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    code = (f"import os, sys; os.write({write_end}, b'{protocol.LOADED}\\n'); "
            f"sys.exit(0 if sys.stdin.readline().strip() == '{protocol.GO}' else 1)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, pass_fds=(write_end,))
    os.close(write_end)
    with socket.socket() as sock:
        spec = DeploymentSpec("dep", ModelRef("models:/m/1", "m", "1"))
        supervisor.current = Generation(1, spec, sock, paths.root / "generation-1.json")
        worker = Worker(proc, 1, 0, read_end, paths.logs / "worker-1-0.log")
        supervisor.workers[proc.pid] = worker
        try:
            waiting = threading.Thread(target=supervisor._wait_tick, daemon=True)
            waiting.start()
            waiting.join(60)  # a bound for a busy machine, far below the hour of the tick
            assert not waiting.is_alive(), "the supervisor slept through the worker's 'loaded'"
            worker.read_pipe()
            supervisor._release_loaded()
            assert worker.loaded_at is not None and worker.released
            assert proc.wait(timeout=60) == 0  # it got its go
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        worker.read_pipe()
        assert worker.pipe_closed
        slept: list[float] = []
        monkeypatch.setattr(supervisor_module.time, "sleep", slept.append)
        monkeypatch.setattr(supervisor_module.select, "select", lambda *args: pytest.fail("waited on a closed pipe"))
        supervisor._wait_tick()
        assert slept == [3600.0]
    os.close(read_end)


def test_a_supervisor_started_before_its_go_touches_nothing_and_leaves_at_end_of_file(tmp_path: Path) -> None:
    """``create`` starts the supervisor's interpreter while it resolves the model: a create that
    then fails (unknown version, already exists) closes its stdin, and it exits having made nothing,
    not even the deployment's folder or its log."""
    from mlflow_deploy_plugin.engines.local.processes import (
        early_output,
        spawn_supervisor,
        tell_supervisor_go,
    )
    from mlflow_deploy_plugin.state import StateStore

    paths = StateStore(tmp_path / "home").paths("not-yet")
    early = spawn_supervisor(paths, respawn=False, wait_for_go=True)
    assert early.stdin is not None
    early.stdin.close()
    assert early.wait(timeout=60) == 0
    assert early_output(early) == ""  # nothing to say
    assert not paths.root.exists()
    assert not tell_supervisor_go(early)  # gone: the caller spawns another instead
    # Told to go, it logs to the deployment's own log (here it finds no spec there, says so, exits 2).
    paths.logs.mkdir(parents=True)
    told = spawn_supervisor(paths, respawn=False, wait_for_go=True)
    assert tell_supervisor_go(told)
    assert told.wait(timeout=60) == 2
    assert early_output(told) == ""  # it said it in its log
    assert "No deployment spec" in (paths.logs / "supervisor.log").read_text()
    assert (paths.logs / "supervisor.log").stat().st_mode & 0o777 == 0o600



def test_a_stop_is_answered_while_the_first_workers_wait_for_a_slow_standby(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first workers wait for the warm standby that forks them (up to STANDBY_FIRST_WAIT_S) in
    the supervisor's loop: meanwhile a stop (``deployments delete``) is taken at the first tick and
    answered, before any worker starts. The supervisor runs here, in the test's main thread; its
    standby (and any worker) is a stand-in program that never says it is ready."""
    import ctypes
    import ctypes.util
    import signal

    import mlflow_deploy_plugin.engines.local.supervisor as supervisor_module
    from mlflow_deploy_plugin.engines.local.forkserver import PR_SET_CHILD_SUBREAPER
    from mlflow_deploy_plugin.engines.local.mailbox import Mailbox
    from mlflow_deploy_plugin.engines.local.supervisor import Supervisor
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore, read_json

    store = StateStore(tmp_path / "home")
    store.write_spec(DeploymentSpec("dep", ModelRef("models:/m/1", "m", "1")))
    paths = store.paths("dep")
    paths.logs.mkdir(parents=True, exist_ok=True)
    silent = tmp_path / "silent-interpreter"
    silent.write_text("#!/bin/sh\nexec cat >/dev/null\n")  # reads its stdin until it is closed, says nothing
    silent.chmod(0o700)
    monkeypatch.setattr(sys, "executable", str(silent))
    # Short enough that a supervisor blocking on the standby for it fails this test (it starts the
    # workers then, before the stop), long enough never to end on the way to the first tick.
    monkeypatch.setattr(supervisor_module, "STANDBY_FIRST_WAIT_S", 20.0)
    answers: list[dict] = []
    asking = threading.Thread(target=lambda: answers.append(
        Mailbox(paths.requests).ask({"op": "stop"}, 120, alive=lambda: True)), daemon=True)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        asking.start()
        deadline = time.monotonic() + 60
        while not list(paths.requests.glob("*.request.json")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert Supervisor(paths).run() == 0
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)  # the supervisor made the test's process one
    asking.join(60)
    assert answers and answers[0]["ok"], answers
    logs = sorted(path.name for path in paths.logs.glob("worker-*.log"))
    assert logs == ["worker-standby-1.log"], logs  # the standby was started, no worker ever was
    status = read_json(paths.status)
    assert status and status["state"] == "stopped" and status["standby_pid"] is None, status


def test_a_standby_that_dies_before_it_is_ready_is_started_again_only_after_a_backoff(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A standby that cannot start (a broken environment, OOM) is not started again at every tick:
    the next one waits, the wait doubling (0.5 s, 1 s, 2 s ... by default; 60 s here, so no tick of
    a loaded machine reaches it), and status.json says why there is none; one that gets ready clears
    the error, and the count once it has lived STANDBY_HEALTHY_S (0 here); one that stays alive but
    never gets ready is released and counted; one killed soon after it got ready counts too."""
    import socket
    import subprocess

    from mlflow_deploy_plugin.engines.local import supervisor as supervisor_module
    from mlflow_deploy_plugin.engines.local.supervisor import Generation, Supervisor, Worker

    monkeypatch.setattr(supervisor_module, "STANDBY_FIRST_BACKOFF_S", 60.0)
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore

    paths = StateStore(tmp_path / "home").paths("dep")
    for folder in (paths.logs, paths.metrics):
        folder.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(paths)
    started: list[subprocess.Popen[bytes]] = []

    def standby(code: str) -> Worker:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        log_path = paths.logs / f"worker-standby-{len(started) + 1}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-c", code.format(fd=write_end)], stdin=subprocess.PIPE,
                                    stdout=log, stderr=log, pass_fds=(write_end,))
        os.close(write_end)
        started.append(proc)
        worker = supervisor.standby = supervisor.workers[proc.pid] = Worker(proc, -1, -1, read_end, log_path)
        return worker

    def ready_standby() -> Worker:
        worker = standby("import os, sys; os.write({fd}, b'standby\\n'); sys.stdin.read()")
        deadline = time.monotonic() + 60
        while not worker.standby_ready and time.monotonic() < deadline:
            supervisor._wait_tick()
            worker.read_pipe()
        return worker

    broken = "import sys; sys.exit('ImportError: this environment is broken on purpose')"
    with socket.socket() as sock:
        supervisor.current = Generation(1, DeploymentSpec("dep", ModelRef("models:/m/1", "m", "1")), sock,
                                        paths.root / "generation-1.json")
        supervisor.standby_sock = sock
        try:
            for failures, delay in ((1, "60s"), (2, "120s"), (3, "240s")):
                started_standby = standby(broken)
                started_standby.popen.wait(timeout=60)
                supervisor._reap()
                assert supervisor.standby is None and supervisor.standby_failures == failures
                error = supervisor._status()["standby_error"]
                assert f"pid {started_standby.pid} exited with code 1 before it was ready" in error, error
                assert f"({failures} in a row; the next one starts in {delay})" in error, error
                assert "broken on purpose" in error, error
                supervisor._keep_standby()
                assert supervisor.standby is None  # not started again at once
            ready = ready_standby()
            supervisor._keep_standby()
            assert supervisor.standby is ready and supervisor.standby_failures == 3  # not yet proven
            assert supervisor._status()["standby_error"] is None  # but there is one
            # Killed soon after it got ready (within STANDBY_HEALTHY_S): a failure like the others.
            ready.popen.kill()
            ready.popen.wait(timeout=60)
            supervisor._reap()
            assert supervisor.standby is None and supervisor.standby_failures == 4
            assert "got ready (4 in a row; the next one starts in 300s)" in supervisor._status()["standby_error"]
            # One that lived long enough as a standby clears the count.
            monkeypatch.setattr(supervisor_module, "STANDBY_HEALTHY_S", 0.0)
            healthy = ready_standby()
            supervisor._keep_standby()
            assert supervisor.standby is healthy and supervisor.standby_failures == 0
            assert supervisor._status()["standby_error"] is None
            # Alive but never ready, past its deadline: released and counted.
            monkeypatch.setattr(supervisor_module, "STANDBY_FIRST_WAIT_S", 0.0)
            supervisor._release_standby()
            stuck = standby("import sys; sys.stdin.read()")
            supervisor._keep_standby()
            assert supervisor.standby is None and stuck.draining and supervisor.standby_failures == 1
            assert "was not ready 0s after it started (1 in a row" in supervisor._status()["standby_error"]
        finally:
            for proc in started:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=30)
            for worker in supervisor.workers.values():
                os.close(worker.ready_fd)


@contextlib.contextmanager
def _stand_in_standby(supervisor: Any, sock: Any, code: str) -> Iterator[Any]:
    """A process running ``code`` (``{fd}``: its ready pipe's end) as ``supervisor``'s warm standby on
    ``sock``; killed and its pipe closed afterwards."""
    import subprocess

    from mlflow_deploy_plugin.engines.local.supervisor import Worker

    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    proc = subprocess.Popen([sys.executable, "-c", code.format(fd=write_end)], stdin=subprocess.PIPE,
                            pass_fds=(write_end,))
    os.close(write_end)
    try:
        standby = supervisor.standby = Worker(proc, -1, -1, read_end, supervisor.paths.logs / "worker-standby-1.log")
        supervisor.workers[proc.pid], supervisor.standby_sock = standby, sock
        yield standby
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(read_end)


def test_a_warm_standby_that_does_not_fork_takes_the_work_of_a_worker_on_its_socket(tmp_path: Path) -> None:
    """Without forking (no subreaper), a ready standby started on the generation's socket becomes
    its worker: it is told the generation's spec file and counted as that worker, not a standby."""
    import socket

    from mlflow_deploy_plugin.engines.local import worker_protocol as protocol
    from mlflow_deploy_plugin.engines.local.supervisor import Generation, Supervisor
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore

    paths = StateStore(tmp_path / "home").paths("dep")
    supervisor = Supervisor(paths)
    spec_file = paths.root / "run" / "generation-2.json"
    code = (f"import os, sys; os.write({{fd}}, b'{protocol.STANDBY}\\n'); "
            f"sys.exit(0 if sys.stdin.readline().strip() == {str(spec_file)!r} else 1)")
    with socket.socket() as sock, _stand_in_standby(supervisor, sock, code) as standby:
        deadline = time.monotonic() + 60
        while not standby.standby_ready and time.monotonic() < deadline:
            supervisor._wait_tick()
            standby.read_pipe()
        generation = Generation(2, DeploymentSpec("dep", ModelRef("models:/m/2", "m", "2")), sock, spec_file)
        assert supervisor._spawn(generation, 0) is standby
        assert supervisor.standby is None and (standby.generation, standby.index) == (2, 0)
        assert standby.popen.wait(timeout=60) == 0  # it was told the generation's spec file


def test_what_a_supervisor_started_ahead_of_the_create_writes_before_its_go_reaches_the_log_and_the_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``create`` starts the supervisor's interpreter before the deployment's folder is ready, with no
    log yet: what it writes until its go (here a broken environment: its package writes 200 kB of
    warnings, more than a pipe holds, then fails to import once it has read its go) is put in the
    deployment's supervisor log and in the create's error, its end (the error) included."""
    from mlflow_deploy_plugin.engines.base import EngineError
    from mlflow_deploy_plugin.engines.local.engine import LocalEngine
    from mlflow_deploy_plugin.engines.local.processes import tell_supervisor_go
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore

    broken = tmp_path / "broken" / "mlflow_deploy_plugin"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        "import sys\nsys.stderr.write('warning: noise\\n' * 14000)\nsys.stderr.flush()\nsys.stdin.readline()\n"
        "raise ImportError('this environment is broken on purpose')\n")
    monkeypatch.chdir(broken.parent)  # first on its path (`python -m` puts its working directory there)
    store = StateStore(tmp_path / "home")
    engine = LocalEngine(store)
    engine.prepare_start("dep")
    early = engine._early["dep"]
    paths = store.paths("dep")
    paths.logs.mkdir(parents=True)
    assert tell_supervisor_go(engine._early.pop("dep"))
    with pytest.raises(EngineError) as failed:
        engine._wait_started(DeploymentSpec("dep", ModelRef("models:/m/1", "m", "1")), paths, early, 60)
    assert "supervisor exited with code 1: " in str(failed.value) and "broken on purpose" in str(failed.value)
    log = (paths.logs / "supervisor.log").read_text()
    assert f"[supervisor {early.pid}] what it wrote before its go (exit code 1)" in log, log
    assert "ImportError: this environment is broken on purpose" in log, log


def test_a_standby_is_released_once_an_update_turns_warm_standby_off(tmp_path: Path) -> None:
    """`deployments update -C warm_standby=false`: the standby running (a forking one would go on
    forking the workers) is released, and none is started again."""
    import dataclasses
    import socket

    from mlflow_deploy_plugin.engines.local.supervisor import Generation, Supervisor
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore

    paths = StateStore(tmp_path / "home").paths("dep")
    supervisor = Supervisor(paths)
    spec = DeploymentSpec("dep", ModelRef("models:/m/1", "m", "1"))
    off = dataclasses.replace(spec, config=dataclasses.replace(spec.config, warm_standby=False))
    # A stand-in standby: ready, then waits until its stdin closes (as a released standby is told).
    ready = "import os, sys; os.write({fd}, b'standby\\n'); sys.stdin.read()"
    with socket.socket() as sock, _stand_in_standby(supervisor, sock, ready) as standby:
        supervisor.current = Generation(2, off, sock, paths.root / "generation-2.json")
        supervisor._keep_standby()
        assert supervisor.standby is None and standby.draining
        assert standby.popen.wait(timeout=60) is not None  # told to go (stdin closed, SIGTERM)
        supervisor._keep_standby()
        assert supervisor.standby is None  # and none started again


def test_a_standby_that_died_since_the_reaping_is_counted_when_the_next_is_due(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A standby that dies between the tick's reaping and the decision to keep one is counted as a
    failure (backoff included) there, not released as if it were healthy."""
    import socket

    from mlflow_deploy_plugin.engines.local import supervisor as supervisor_module
    from mlflow_deploy_plugin.engines.local.supervisor import Generation, Supervisor
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore

    monkeypatch.setattr(supervisor_module, "STANDBY_FIRST_BACKOFF_S", 60.0)  # no new one within the test
    paths = StateStore(tmp_path / "home").paths("dep")
    paths.logs.mkdir(parents=True)
    supervisor = Supervisor(paths)
    with socket.socket() as sock, _stand_in_standby(supervisor, sock, "import sys; sys.exit(3)") as standby:
        supervisor.current = Generation(1, DeploymentSpec("dep", ModelRef("models:/m/1", "m", "1")), sock,
                                        paths.root / "generation-1.json")
        standby.popen.wait(timeout=60)
        supervisor._keep_standby()  # no _reap() in between
        assert supervisor.standby is None and supervisor.standby_failures == 1
        assert (f"pid {standby.pid} exited with code 3 before it was ready (1 in a row; the next one starts in 60s)"
                in supervisor._status()["standby_error"])


def test_a_worker_started_in_place_of_a_killed_one_is_announced_once_it_serves(tmp_path: Path) -> None:
    """kill -9 of a serving worker writes `crashed`; once the worker started in its place says ready,
    `worker_recovered` (the fault's "healed" for alert receivers), once. Real stand-in processes on
    real pipes; the supervisor's own reaping."""
    import socket
    import subprocess

    from conftest import wait_for

    from mlflow_deploy_plugin.engines.local import worker_protocol as protocol
    from mlflow_deploy_plugin.engines.local.supervisor import Generation, Supervisor, Worker
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore

    paths = StateStore(tmp_path / "home").paths("dep")
    paths.logs.mkdir(parents=True)
    supervisor = Supervisor(paths)
    started: list[tuple[subprocess.Popen, int]] = []

    def stand_in() -> Worker:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        word = f"os.write({write_end}, b'{protocol.READY}\\n')"
        proc = subprocess.Popen([sys.executable, "-c", f"import os, sys; {word}; sys.stdin.readline()"],
                                stdin=subprocess.PIPE, pass_fds=(write_end,))
        os.close(write_end)
        started.append((proc, read_end))
        worker = supervisor.workers[proc.pid] = Worker(proc, 1, 0, read_end, paths.logs / f"worker-{proc.pid}.log")
        return worker

    def events() -> list[str]:
        return [event["event"] for event in supervisor.store.read_history("dep")]

    try:
        with socket.socket() as sock:
            spec = DeploymentSpec("dep", ModelRef("models:/m/1", "m", "1"))
            supervisor.current = Generation(1, spec, sock, paths.root / "generation-1.json")
            supervisor.ever_ready = True
            first = stand_in()
            wait_for(lambda: first.read_pipe() or first.ready_at, 60, "the first worker to say ready")
            first.popen.kill()
            first.popen.wait(timeout=30)
            supervisor._reap()
            assert events() == ["crashed"] and 0 in supervisor.respawn_at
            supervisor.respawn_at.clear()  # started here by hand: a stand-in, not a real worker
            second = stand_in()
            supervisor._announce_recovered()
            assert events() == ["crashed"]  # its `ready` not read yet: not serving
            wait_for(lambda: second.read_pipe() or second.ready_at, 60, "the second worker to say ready")
            supervisor._announce_recovered()
            supervisor._announce_recovered()
            recovered = supervisor.store.read_history("dep")[-1]
            assert events() == ["crashed", "worker_recovered"]
            assert (recovered["fault"], recovered["pid"], recovered["index"]) == ("crashed", second.pid, 0)
            assert recovered["down_s"] >= 0 and "worker" in recovered["error"]
    finally:
        for proc, read_end in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            with contextlib.suppress(OSError):  # the supervisor closed the reaped one's
                os.close(read_end)


def test_only_a_hung_worker_of_the_serving_generation_waits_for_its_recovery(tmp_path: Path) -> None:
    """A hung worker of the serving generation is replaced, so its `worker_recovered` follows; one of a
    pending update is not replaced (the update goes on or fails), so nothing may wait for its
    recovery: the entry would never be written nor cleared. Real processes, SIGTERMed as hung."""
    import socket
    import subprocess

    from mlflow_deploy_plugin.engines.local.supervisor import Generation, Supervisor, Worker
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore

    paths = StateStore(tmp_path / "home").paths("dep")
    paths.logs.mkdir(parents=True)
    supervisor = Supervisor(paths)
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(2)]
    try:
        with socket.socket() as sock:
            spec = DeploymentSpec("dep", ModelRef("models:/m/1", "m", "1"))
            supervisor.current = Generation(1, spec, sock, paths.root / "generation-1.json")
            serving = Worker(procs[0], 1, 0, -1, paths.logs / "worker-a.log")
            pending = Worker(procs[1], 2, 1, -1, paths.logs / "worker-b.log")
            supervisor._replace_hung(pending, "model call running for 99s")
            supervisor._replace_hung(serving, "model call running for 99s")
            assert set(supervisor.healing) == {0}, supervisor.healing
            assert supervisor.healing[0][0] == "worker_hung" and 0 in supervisor.respawn_at
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
