"""Pieces of self-healing that need no deployment: liveness records, the hung-worker guard, log
rotation, the port probe, the lock error, the mailbox's stale requests, the systemd units."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlflow_deploy_plugin.engines.local.liveness import LivenessWriter, read_liveness
from mlflow_deploy_plugin.engines.local.mailbox import Mailbox
from mlflow_deploy_plugin.engines.local.supervisor import bind_socket, rotate_logs
from mlflow_deploy_plugin.serving.watchdog import HungGuard, PredictWatch


def test_liveness_record_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "live" / "123"
    writer = LivenessWriter(path)
    assert read_liveness(path).busy_since == 0.0 and read_liveness(path).predicts == 0
    writer.predict_started(7)
    busy = read_liveness(path)
    assert busy.busy_rows == 7 and busy.busy_for() >= 0.0 and busy.busy_since > 0
    writer.predict_ended()
    writer.beat()
    idle = read_liveness(path)
    assert (idle.busy_since, idle.busy_rows, idle.predicts) == (0.0, 0, 1) and idle.silent_for() < 5
    assert read_liveness(tmp_path / "missing") is None


def test_predict_watch_times_each_call_and_says_when_one_is_hung(tmp_path: Path) -> None:
    writer = LivenessWriter(tmp_path / "1")
    watch = PredictWatch(writer, limit_s=0.2)
    release = threading.Event()
    predict = watch.wrap(lambda data, params=None: release.wait(5) and len(data))
    thread = threading.Thread(target=predict, args=([1, 2, 3],))
    thread.start()
    deadline = time.monotonic() + 5
    while not watch.hung:
        assert time.monotonic() < deadline, "the watch never saw the call as hung"
        time.sleep(0.01)
    assert read_liveness(tmp_path / "1").busy_rows == 3
    release.set()
    thread.join(5)
    assert not watch.hung and read_liveness(tmp_path / "1").predicts == 1


def _call(app, path: str = "/invocations"):
    """Run one HTTP request through an ASGI app; the messages it sent."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "headers": []}
    return app(scope, receive, send), sent


def test_hung_guard_answers_503_to_what_waits_and_to_what_comes() -> None:
    started = asyncio.Event()

    async def stuck_app(scope, receive, send) -> None:
        started.set()
        await asyncio.Event().wait()  # a request waiting on a model call that never returns

    async def scenario() -> None:
        guard = HungGuard(stuck_app)
        waiting, sent = _call(guard)
        task = asyncio.ensure_future(waiting)
        await started.wait()
        guard.declare_hung()
        await asyncio.wait_for(task, 5)
        assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
        assert (b"connection", b"close") in sent[0]["headers"]
        later, sent_later = _call(guard)
        await asyncio.wait_for(later, 5)
        assert sent_later[0]["status"] == 503
        assert b"TEMPORARILY_UNAVAILABLE" in sent_later[1]["body"]

    asyncio.run(scenario())


def test_hung_guard_lets_a_client_cancellation_through() -> None:
    async def stuck_app(scope, receive, send) -> None:
        await asyncio.Event().wait()

    async def scenario() -> None:
        guard = HungGuard(stuck_app)
        waiting, sent = _call(guard)
        task = asyncio.ensure_future(waiting)
        await asyncio.sleep(0.05)
        task.cancel()  # the client went away: no 503, the cancellation propagates
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sent == [] and not guard._waiting

    asyncio.run(scenario())


def test_logs_are_rotated_by_size_and_old_worker_logs_pruned(tmp_path: Path) -> None:
    log = tmp_path / "worker-1-0.log"
    with open(log, "ab") as writer:  # held open in append mode, as a worker's stdout is
        writer.write(b"x" * 5000)
        writer.flush()
        rotate_logs(tmp_path, max_bytes=1000, backups=2)
        assert log.stat().st_size == 0 and (tmp_path / "worker-1-0.log.1").stat().st_size == 5000
        writer.write(b"y" * 2000)
        writer.flush()
        rotate_logs(tmp_path, max_bytes=1000, backups=2)
        assert log.stat().st_size == 0
        assert (tmp_path / "worker-1-0.log.2").read_bytes() == b"x" * 5000
        assert (tmp_path / "worker-1-0.log.1").read_bytes() == b"y" * 2000
        writer.write(b"z")  # O_APPEND: continues at the start of the emptied file
        writer.flush()
    assert log.read_bytes() == b"z"
    for number in range(5):
        (tmp_path / f"worker-9-{number}.log").write_text("old")
    rotate_logs(tmp_path, max_bytes=1000, keep=3)
    assert len(list(tmp_path.glob("worker-*.log"))) == 3


def test_a_port_in_use_is_refused_unless_binding_beside_our_own_orphans() -> None:
    first = bind_socket("127.0.0.1", None)
    try:
        port = first.getsockname()[1]
        with pytest.raises(OSError) as raised:
            bind_socket("127.0.0.1", port)  # another deployment must never share it
        assert raised.value.errno == errno.EADDRINUSE
        beside = bind_socket("127.0.0.1", port, beside_orphans=True)  # a successor supervisor may
        beside.close()
        with socket.socket() as plain:
            plain.bind(("127.0.0.1", 0))
            plain.listen()
            with pytest.raises(OSError):  # a stranger's socket (no SO_REUSEPORT) is never joined
                bind_socket("127.0.0.1", plain.getsockname()[1], beside_orphans=True)
    finally:
        first.close()


def test_a_lock_held_too_long_is_a_busy_error_and_an_mlflow_exception(tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException

    from mlflow_deploy_plugin.deployments import Deployments
    from mlflow_deploy_plugin.engines.local import LocalEngine
    from mlflow_deploy_plugin.errors import Busy
    from mlflow_deploy_plugin.state import StateStore, file_lock
    from mlflow_deploy_plugin.target import _as_mlflow_errors

    store = StateStore(tmp_path)
    deployments = Deployments(store=store, engine=LocalEngine(store))
    with file_lock(store.paths("churn").lock):
        with pytest.raises(Busy, match="being changed by another command"), deployments._locked("churn", 0.2):
            pass
        with pytest.raises(MlflowException) as raised, _as_mlflow_errors(), deployments._locked("churn", 0.2):
            pass
    assert raised.value.error_code == "TEMPORARILY_UNAVAILABLE"
    assert "Traceback" not in raised.value.message


def test_mailbox_drops_requests_whose_client_died(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "1-a.request.json").write_text(f'{{"op": "stop", "client_pid": {dead.pid}}}')
    (tmp_path / "2-b.request.json").write_text(f'{{"op": "update", "client_pid": {os.getpid()}}}')
    assert [request["op"] for _, request in Mailbox(tmp_path).new_requests()] == ["update"]
    assert not (tmp_path / "1-a.request.json").exists()


def _unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (comments and sections aside), values by key."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_up_prints_systemd_units_that_own_the_deployments_processes(tmp_path: Path) -> None:
    """The supervisors `up` starts stay in the cgroup of the unit that ran it: that unit stays active
    (RemainAfterExit) and the periodic runs are reloads of it, so systemd never finds them left over
    from an ended unit; stopping the unit never stops the deployments (KillMode=process)."""
    from mlflow_deploy_plugin.cli import cli

    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "up", "--print-systemd-unit"])
    assert result.exit_code == 0, result.output
    assert result.output.count("[Service]") == 2 and "[Timer]" in result.output
    written = CliRunner().invoke(cli, ["--home", str(tmp_path), "up", "--print-systemd-unit",
                                       "--write-to", str(tmp_path / "units")])
    assert written.exit_code == 0
    units = tmp_path / "units"
    assert sorted(p.name for p in units.iterdir()) == ["mlflow-deploy-up-heal.service", "mlflow-deploy-up.service",
                                                       "mlflow-deploy-up.timer"]
    service = _unit_settings((units / "mlflow-deploy-up.service").read_text())
    heal = _unit_settings((units / "mlflow-deploy-up-heal.service").read_text())
    timer = _unit_settings((units / "mlflow-deploy-up.timer").read_text())
    assert service["Type"] == ["oneshot"] and service["RemainAfterExit"] == ["yes"]
    assert service["KillMode"] == ["process"] and service["WantedBy"] == ["default.target"]
    assert service["Environment"] == [f"MLFLOW_DEPLOY_HOME={tmp_path}"]
    assert service["ExecStart"] == service["ExecReload"] and service["ExecStart"][0].endswith(" up")
    # The timer never starts `up` in a unit of its own: it asks the service for a reload.
    assert timer["Unit"] == ["mlflow-deploy-up-heal.service"] and timer["OnUnitActiveSec"] == ["5min"]
    assert timer["WantedBy"] == ["timers.target"] and "OnActiveSec" in timer
    assert heal["Type"] == ["oneshot"] and "RemainAfterExit" not in heal
    assert heal["ExecStart"][0].endswith(" --user try-reload-or-restart mlflow-deploy-up.service")
    if shutil.which("systemd-analyze") is None:
        return
    runtime = tmp_path / "xdg-runtime"  # `verify --user` needs a runtime folder, not a running manager
    runtime.mkdir(mode=0o700)
    verified = subprocess.run(["systemd-analyze", "verify", "--user", *sorted(str(p) for p in units.iterdir())],
                              capture_output=True, text=True, timeout=120, cwd=units,
                              env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)))
    assert verified.returncode == 0 and "mlflow-deploy-up" not in verified.stderr, verified.stderr


def test_up_with_nothing_deployed_says_so(tmp_path: Path) -> None:
    from mlflow_deploy_plugin.cli import cli

    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "up"])
    assert result.exit_code == 0 and "No deployments" in result.output
