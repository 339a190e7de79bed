"""The local engine: each deployment is a detached supervisor process on this machine."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin.state import (
    STATUS_FAILED,
    STATUS_RUNNING,
    STATUS_STOPPED,
    StateStore,
    pid_alive,
    read_json,
    write_json_atomic,
)


class EngineError(RuntimeError):
    """The engine could not do what was asked; the message says why."""


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
    return b"mlflow_deploy_plugin.engines.supervisor" in argv and str(root).encode() in argv


class LocalEngine:
    """Starts, updates, stops and inspects supervisor processes (see ``supervisor.py``)."""

    name = "local"

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def start(self, name: str, timeout_s: float) -> dict[str, Any]:
        """Start the deployment whose spec is already written; wait until it serves or fails."""
        paths = self.store.paths(name)
        paths.logs.mkdir(parents=True, exist_ok=True)
        with open(paths.logs / "supervisor.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "mlflow_deploy_plugin.engines.supervisor", str(paths.root)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = read_json(paths.status) or {}
            if status.get("pid") == process.pid and status.get("state") in (STATUS_RUNNING, STATUS_FAILED):
                break
            if process.poll() is not None:
                break
            time.sleep(0.05)
        else:
            self._terminate(process.pid, 10.0)
            raise EngineError(f"Deployment {name!r} did not become ready within startup_timeout_s={timeout_s:g}s; "
                              f"see {paths.logs}.")
        status = read_json(paths.status) or {}
        if status.get("state") != STATUS_RUNNING:
            process.wait(timeout=30)
            error = status.get("last_error") or f"supervisor exited with code {process.returncode}"
            raise EngineError(f"Deployment {name!r} failed to start: {error}")
        return status

    def update(self, name: str, spec: dict[str, Any], reason: str, timeout_s: float) -> dict[str, Any]:
        """Ask the running supervisor to swap to ``spec``; returns the new status or raises."""
        answer = self._request(name, {"op": "update", "spec": spec, "reason": reason}, timeout_s + 30)
        if not answer.get("ok"):
            raise EngineError(answer.get("error") or "update failed")
        return answer["status"]

    def stop(self, name: str, timeout_s: float) -> None:
        """Stop gracefully (in-flight requests finish); kill after ``timeout_s``."""
        status = self.store.read_status(name) or {}
        pid = status.get("pid")
        if not is_supervisor(pid, self.store.paths(name).root):
            return
        with contextlib.suppress(EngineError):
            self._request(name, {"op": "stop"}, timeout_s)
        self._terminate(pid, 5.0)

    def status(self, name: str) -> dict[str, Any]:
        """The supervisor's last word, corrected if the supervisor itself has died."""
        status = dict(self.store.read_status(name) or {"state": STATUS_STOPPED})
        alive = is_supervisor(status.get("pid"), self.store.paths(name).root)
        if status.get("state") not in (STATUS_STOPPED, STATUS_FAILED) and not alive:
            status["state"] = STATUS_FAILED
            status["last_error"] = (status.get("last_error") or "") + \
                " [the supervisor process is gone; delete and re-create the deployment]"
        return status

    def _request(self, name: str, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        paths = self.store.paths(name)
        status = self.status(name)
        if status.get("state") in (STATUS_STOPPED, STATUS_FAILED):
            raise EngineError(f"Deployment {name!r} is {status.get('state')}: {status.get('last_error') or ''}".strip())
        request_id = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        result_path = paths.requests / f"{request_id}.result.json"
        request_path = paths.requests / f"{request_id}.request.json"
        write_json_atomic(request_path, request)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                answer = read_json(result_path)
                if answer is not None:
                    return answer
                if not is_supervisor(status.get("pid"), paths.root):
                    raise EngineError(f"Deployment {name!r}: supervisor exited before answering.")
                time.sleep(0.05)
            raise EngineError(f"Deployment {name!r} did not answer {request['op']!r} within {timeout_s:.0f}s.")
        finally:
            for path in (request_path, result_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

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

