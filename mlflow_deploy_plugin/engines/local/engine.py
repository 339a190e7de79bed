"""The local engine on the CLI side: start, ask and inspect each deployment's supervisor process."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin.engines.base import FAILED, RUNNING, STOPPED, Engine, EngineError, EngineStatus
from mlflow_deploy_plugin.engines.local.mailbox import Mailbox, MailboxTimeout, SupervisorGone
from mlflow_deploy_plugin.spec import DeploymentSpec
from mlflow_deploy_plugin.state import PRIVATE_FILE_MODE, StateStore, make_private_dirs, pid_alive, read_json

SUPERVISOR_MODULE = "mlflow_deploy_plugin.engines.local.supervisor"
# Supervisors started before the engines/local/ layout run under their old module name; they speak
# the same mailbox and status files, so they must still be recognised after an upgrade.
_SUPERVISOR_MODULES = (SUPERVISOR_MODULE.encode(), b"mlflow_deploy_plugin.engines.supervisor")


def is_supervisor(pid: int | None, root: Path) -> bool:
    """Whether ``pid`` is alive AND is the supervisor of the deployment at ``root``.

    After a reboot ``status.json`` may name a pid that now belongs to an unrelated process: it must
    never be reported as running, let alone signalled.
    """
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return False
    return any(module in argv for module in _SUPERVISOR_MODULES) and str(root).encode() in argv


def _to_status(raw: dict[str, Any]) -> EngineStatus:
    """The supervisor's ``status.json`` as the common status; pids and ports go to ``details``."""
    common = {"state", "url", "model_version", "restarts", "last_error", "traffic", "started_at"}
    return EngineStatus(
        state=raw.get("state") or STOPPED,
        url=raw.get("url"),
        model_version=raw.get("model_version"),
        restarts=int(raw.get("restarts") or 0),
        last_error=raw.get("last_error"),
        traffic=tuple((str(version), float(percent)) for version, percent in raw.get("traffic") or []),
        healthy=raw.get("state") == RUNNING,
        started_at=raw.get("started_at"),
        details={key: value for key, value in raw.items() if key not in common},
    )


class LocalEngine(Engine):
    """Each deployment is a detached supervisor (``supervisor.py``) owning its port and workers."""

    name = "local"

    def start(self, spec: DeploymentSpec, timeout_s: float) -> EngineStatus:
        paths = self.store.paths(spec.name)
        make_private_dirs(paths.logs)
        log_fd = os.open(paths.logs / "supervisor.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
        with open(log_fd, "ab") as log:
            # umask 077: everything the supervisor, its workers and its agent create (logs, captured
            # inputs, model copies, metrics files) is readable by the deployment's owner only.
            process = subprocess.Popen(
                [sys.executable, "-m", SUPERVISOR_MODULE, str(paths.root)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
                umask=0o077,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            raw = read_json(paths.status) or {}
            if raw.get("pid") == process.pid and raw.get("state") in (RUNNING, FAILED):
                break
            if process.poll() is not None:
                break
            time.sleep(0.05)
        else:
            self._terminate(process.pid, 10.0)
            process.wait(timeout=30)
            raise EngineError(f"Deployment {spec.name!r} did not become ready within "
                              f"startup_timeout_s={timeout_s:g}s; see {paths.logs}.")
        raw = read_json(paths.status) or {}
        if raw.get("state") != RUNNING:
            process.wait(timeout=30)
            error = raw.get("last_error") or f"supervisor exited with code {process.returncode}"
            raise EngineError(f"Deployment {spec.name!r} failed to start: {error}")
        return _to_status(raw)

    def update(self, spec: DeploymentSpec, reason: str, timeout_s: float) -> EngineStatus:
        answer = self._ask(spec.name, {"op": "update", "spec": spec.to_dict(), "reason": reason}, timeout_s + 30)
        if not answer.get("ok"):
            raise EngineError(answer.get("error") or "update failed")
        return _to_status(answer["status"])

    def stop(self, name: str, timeout_s: float) -> None:
        raw = self.store.read_status(name) or {}
        pid = raw.get("pid")
        if pid is None or not is_supervisor(pid, self.store.paths(name).root):
            return
        with contextlib.suppress(EngineError):  # no answer in time: the signals below end it
            self._ask(name, {"op": "stop"}, timeout_s)
        self._terminate(pid, 5.0)

    def status(self, name: str) -> EngineStatus:
        """The supervisor's last word, corrected if the supervisor itself has died."""
        raw = dict(self.store.read_status(name) or {"state": STOPPED})
        alive = is_supervisor(raw.get("pid"), self.store.paths(name).root)
        if raw.get("state") not in (STOPPED, FAILED) and not alive:
            raw["state"] = FAILED
            raw["last_error"] = (raw.get("last_error") or "") + \
                " [the supervisor process is gone; delete and re-create the deployment]"
        return _to_status(raw)

    def agent_handle(self, name: str) -> str | None:
        status = self.status(name)
        pid = status.details.get("agent_pid")
        return f"pid {pid}" if status.serving and pid_alive(pid) else None

    def run_foreground(self, spec: DeploymentSpec, on_ready: Callable[[EngineStatus], None]) -> EngineStatus:
        """Run a supervisor in this process on a throw-away home: ``run-local`` leaves no state."""
        from mlflow_deploy_plugin.engines.local.supervisor import Supervisor

        with tempfile.TemporaryDirectory(prefix="mlflow-deploy-run-local-") as home:
            store = StateStore(Path(home))
            store.write_spec(spec)
            done = threading.Event()

            def announce() -> None:
                while not done.wait(0.1):
                    raw = store.read_status(spec.name) or {}
                    if raw.get("state") == RUNNING:
                        on_ready(_to_status(raw))
                        return
                    if raw.get("state") == FAILED:
                        return

            threading.Thread(target=announce, daemon=True).start()
            try:
                code = Supervisor(store.paths(spec.name)).run()
            finally:
                done.set()
            final = _to_status(store.read_status(spec.name) or {})
            if code != 0 and final.state != FAILED:
                final = dataclasses.replace(final, state=FAILED,
                                            last_error=final.last_error or f"supervisor exited with code {code}")
            return final

    # -- plumbing ------------------------------------------------------------------------------

    def _ask(self, name: str, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        status = self.status(name)
        if status.state in (STOPPED, FAILED):
            raise EngineError(f"Deployment {name!r} is {status.state}: {status.last_error or ''}".strip())
        root = self.store.paths(name).root
        pid = status.details.get("pid")
        try:
            return Mailbox(self.store.paths(name).requests).ask(
                request, timeout_s, alive=lambda: is_supervisor(pid, root))
        except (MailboxTimeout, SupervisorGone) as exc:
            raise EngineError(f"Deployment {name!r}: {exc}.") from None

    @staticmethod
    def _terminate(pid: int, grace_s: float) -> None:
        if not pid_alive(pid):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
