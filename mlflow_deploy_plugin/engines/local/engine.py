"""The local engine on the CLI side: start, ask and inspect each deployment's supervisor process.

What ``status`` reports is checked against the processes themselves (``processes.py``), never
taken from ``status.json`` on trust: after a reboot or a ``kill -9`` the file still says
``running``, and `get` must say instead that nothing runs and what brings it back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin import timeline
from mlflow_deploy_plugin.engines.base import (
    FAILED,
    RUNNING,
    STOPPED,
    UNHEALTHY,
    Engine,
    EngineError,
    EngineStatus,
)
from mlflow_deploy_plugin.engines.local.mailbox import Mailbox, MailboxTimeout, SupervisorGone
from mlflow_deploy_plugin.engines.local.processes import (
    SUPERVISOR_MODULE,
    early_output,
    is_supervisor,
    is_worker,
    live_workers,
    signal_pid,
    spawn_supervisor,
    take_supervisor_lock,
    tell_supervisor_go,
)
from mlflow_deploy_plugin.model_copy import ModelLoadError, ensure_local_copy, warn_environment_mismatches
from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
from mlflow_deploy_plugin.state import (
    PRIVATE_FILE_MODE,
    StateStore,
    make_private_dirs,
    pid_alive,
    read_json,
    write_json_atomic,
)

__all__ = ["SUPERVISOR_MODULE", "LocalEngine", "is_supervisor"]
_logger = logging.getLogger(__name__)
UP_HINT = "`mlflow-deploy up` starts it again"
# A supervisor lost to kill -9 is replaced by its own workers within seconds: commands wait that long.
TAKEOVER_WAIT_S = 15.0
PREFETCH_JOIN_S = 2.0  # how long a returning start waits for a model fetch still running
CHECK_JOIN_S = 5.0  # how long a returning switch waits for the environment checks of its new copies


def _fetch_copy(model: ModelRef, models_dir: Path, on_made: Callable[[str, Path], None] | None = None) -> None:
    """The local copy of ``model`` under ``models_dir`` (made if missing); ModelLoadError if it cannot be.

    ``on_made``: what to do with a copy this call made, instead of MLflow's environment checks at once
    (``model_copy.warn_environment_mismatches``)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar in the CLI's output
    folder = models_dir / model.model_name
    make_private_dirs(folder)  # model copies are user data, whatever the CLI's umask
    ensure_local_copy(model.version_uri, folder / model.model_version, on_made)


def _check_in_background(made: list[tuple[str, Path]]) -> threading.Thread:
    """MLflow's environment checks of the copies ``made``, on a thread: beside the supervisor's switch
    (which loads the version in a worker meanwhile), not before it starts."""

    def check() -> None:
        for model_uri, path in made:
            warn_environment_mismatches(model_uri, path)

    thread = threading.Thread(target=check, name="check-copies", daemon=True)
    thread.start()
    return thread


def _served_models(spec: DeploymentSpec) -> list[ModelRef]:
    """Every version a worker of ``spec`` loads: each traffic share's, and the shadow's."""
    return [share.model for share in spec.shares()] + ([spec.shadow] if spec.shadow is not None else [])


def _prefetch_models(spec: DeploymentSpec, models_dir: Path) -> threading.Thread:
    """Fetch the local copies of the versions the first worker loads, while it is still importing.

    On the cold start's critical path a worker spends seconds importing MLflow, then would open the
    registry itself (SQL store, schema check) to download the model; the CLI has the registry open
    already and a core to spare meanwhile. The worker finds the copy and loads it at once; if this
    fails, the worker fetches it itself and reports why it cannot. MLflow's environment checks of
    each copy made run here too (warnings in the CLI's output), not in the worker.
    """
    models = _served_models(spec)

    def made(model_uri: str, path: Path) -> None:
        timeline.mark("cli: model copy made")
        warn_environment_mismatches(model_uri, path)
        timeline.mark("cli: environment checks of the copy done")

    def fetch() -> None:
        for model in models:
            with contextlib.suppress(Exception):
                _fetch_copy(model, models_dir, made)

    thread = threading.Thread(target=fetch, name="prefetch-models", daemon=True)
    thread.start()
    return thread


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


def _keep_early_output(paths: Any, process: subprocess.Popen[bytes]) -> str:
    """Append what a supervisor started ahead of the create wrote before its go (it logs to
    ``logs/supervisor.log`` only from then on: an error of a broken environment would be lost) to
    that log; returns it ("" if nothing, or for a supervisor started with its log)."""
    output = early_output(process)
    if output.strip():
        how = "still running" if process.poll() is None else f"exit code {process.returncode}"
        header = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR [supervisor {process.pid}] what it wrote before "
                  f"its go ({how}):\n")
        with contextlib.suppress(OSError):
            fd = os.open(paths.logs / "supervisor.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
            try:  # one write: not interleaved with the supervisor's own lines
                os.write(fd, (header + output + ("" if output.endswith("\n") else "\n")).encode())
            finally:
                os.close(fd)
    return output


def _tail(text: str, lines: int = 3) -> str:
    """The last non-empty ``lines`` of ``text`` on one line (an error's traceback ends with its message)."""
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])


def _reap_within(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """Wait ``grace_s`` for ``process`` to exit, then kill it; reaped either way."""
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


class LocalEngine(Engine):
    """Each deployment is a detached supervisor (``supervisor.py``) owning its port and workers."""

    name = "local"

    def __init__(self, store: StateStore) -> None:
        super().__init__(store)
        self._early: dict[str, subprocess.Popen[bytes]] = {}  # supervisors waiting for their go

    def prepare_start(self, name: str) -> None:
        """Start the supervisor's interpreter now, while the caller resolves the model: it imports,
        then waits for its go from :meth:`start` before touching anything of the deployment."""
        self.cancel_start(name)
        try:
            self._early[name] = spawn_supervisor(self.store.paths(name), respawn=False, wait_for_go=True)
        except OSError:
            return  # start spawns one as usual (and says what fails, if it does again)
        timeline.mark("cli: supervisor spawned, waiting for its go")

    def cancel_start(self, name: str) -> None:
        """End a supervisor :meth:`prepare_start` started that got no go (end of file: it exits)."""
        early = self._early.pop(name, None)
        if early is None:
            return
        with contextlib.suppress(OSError):
            if early.stdin is not None:
                early.stdin.close()
        _reap_within(early, 10)
        # End of file makes it exit 0; anything else is an error of its own (a broken environment, which
        # the next create would meet too): said here, since it never got a log.
        output = early_output(early)
        if early.returncode != 0:
            _logger.warning("The supervisor started ahead of the create (pid %d) exited with code %s before its "
                            "go: %s", early.pid, early.returncode, _tail(output) or "(it wrote nothing)")

    def start(self, spec: DeploymentSpec, timeout_s: float) -> EngineStatus:
        """Start a supervisor (or tell the one :meth:`prepare_start` started to go) and wait until the
        deployment serves.

        If another supervisor wins the deployment's lock meanwhile (one that orphaned workers
        started), that one is the deployment's supervisor: wait for it instead.
        """
        paths = self.store.paths(spec.name)
        make_private_dirs(paths.logs)
        early = self._early.pop(spec.name, None)
        if early is not None and tell_supervisor_go(early):
            process = early
            timeline.mark("cli: supervisor told to go")
        else:
            if early is not None:  # exited (or is exiting) before its go: reaped, started again below
                _reap_within(early, 30)
                _keep_early_output(paths, early)
            process = spawn_supervisor(paths, respawn=False)
            timeline.mark("cli: supervisor spawned")
        prefetch = _prefetch_models(spec, paths.models)
        try:
            return self._wait_started(spec, paths, process, timeout_s)
        finally:
            _keep_early_output(paths, process)  # written before its go (it logs to the log since)
            # Done long before the worker is ready, unless it raced the worker's own fetch: not
            # left copying into a folder a failed create is about to archive.
            prefetch.join(PREFETCH_JOIN_S)

    def _wait_started(self, spec: DeploymentSpec, paths: Any, process: Any, timeout_s: float) -> EngineStatus:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            raw = read_json(paths.status) or {}
            pid = raw.get("pid")
            ours = pid == process.pid
            exited = process.poll() is not None
            if (ours or is_supervisor(pid, paths.root)) and raw.get("state") == RUNNING:
                break
            if ours and raw.get("state") == FAILED:
                break
            if exited and not is_supervisor(pid, paths.root):
                break
            time.sleep(0.05)
        else:
            if process.poll() is None:  # once reaped, its pid may already be another process's
                self._terminate(process.pid, 10.0)
                process.wait(timeout=30)
            _keep_early_output(paths, process)
            raise EngineError(f"Deployment {spec.name!r} did not become ready within "
                              f"startup_timeout_s={timeout_s:g}s; see {paths.logs}.")
        raw = read_json(paths.status) or {}
        if raw.get("state") != RUNNING:
            process.wait(timeout=30)
            early = _keep_early_output(paths, process)
            error = raw.get("last_error") or (f"supervisor exited with code {process.returncode}"
                                              + (f": {_tail(early)}" if early.strip() else ""))
            raise EngineError(f"Deployment {spec.name!r} failed to start: {error}")
        return _to_status(raw)

    def update(self, spec: DeploymentSpec, reason: str, timeout_s: float) -> EngineStatus:
        """Swap to ``spec`` with zero downtime; EngineError says why not, and what serves keeps serving.

        The local copies come first, here: the caller (the CLI, the agent) has the registry open
        already, and the new workers then find their copies and load at once. A copy that cannot be
        made (artifacts the registry cannot give, a damaged folder in its place) fails the update now,
        before any worker spends seconds of CPU importing MLflow only to fail on it; a lifecycle step
        that retries such a switch would pay that at every attempt.
        """
        made: list[tuple[str, Path]] = []
        try:
            for model in _served_models(spec):
                _fetch_copy(model, self.store.paths(spec.name).models, lambda uri, path: made.append((uri, path)))
        except (ModelLoadError, OSError) as exc:  # OSError: the models folder itself cannot be made
            raise EngineError(str(exc)) from exc
        checks = _check_in_background(made)
        try:
            answer = self._ask(spec.name, {"op": "update", "spec": spec.to_dict(), "reason": reason},
                               timeout_s + 30)
        finally:
            checks.join(CHECK_JOIN_S)  # its warnings belong to this command's output
        if not answer.get("ok"):
            # A new worker killed by SIGKILL while it loaded: the supervisor says what killed it.
            raise EngineError(answer.get("error") or "update failed", cause=answer.get("cause"))
        return _to_status(answer["status"])

    def stop(self, name: str, timeout_s: float) -> None:
        """Stop the supervisor (it drains every worker, a predecessor's included); then, holding
        the supervisor lock so no orphan can start a new one, end whatever is left."""
        paths = self.store.paths(name)
        if not paths.root.exists():
            return
        deadline = time.monotonic() + TAKEOVER_WAIT_S
        while True:
            pid = (self.store.read_status(name) or {}).get("pid")
            if isinstance(pid, int) and is_supervisor(pid, paths.root):
                with contextlib.suppress(EngineError):  # no answer in time: the signals below end it
                    self._ask(name, {"op": "stop"}, timeout_s)
                self._terminate(pid, 5.0)
            # A successor an orphaned worker just started may hold the lock: stop that one too.
            lock = take_supervisor_lock(paths, wait_s=1.0)
            if lock is not None or time.monotonic() > deadline:
                break
        try:
            raw = self.store.read_status(name) or {}
            left = live_workers(raw, paths.root)
            for worker in left:
                signal_pid(worker, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while any(is_worker(worker, paths.root) for worker in left) and time.monotonic() < deadline:
                time.sleep(0.05)
            for worker in left:
                if is_worker(worker, paths.root):
                    signal_pid(worker, signal.SIGKILL)
            if lock is not None and raw and raw.get("state") != STOPPED:
                # Nobody else will say it: a late orphan's supervisor reads this and stays away.
                write_json_atomic(paths.status, dict(raw, state=STOPPED, worker_pids=[], other_pids=[],
                                                     updated_at=time.time()))
        finally:
            if lock is not None:
                os.close(lock)

    def status(self, name: str) -> EngineStatus:
        """The supervisor's last word, corrected by what actually runs."""
        paths = self.store.paths(name)
        raw = dict(self.store.read_status(name) or {"state": STOPPED})
        alive = is_supervisor(raw.get("pid"), paths.root)
        raw["supervisor_alive"] = alive
        if alive:
            return _to_status(raw)
        state = raw.get("state")
        serving = live_workers(raw, paths.root)
        if state == FAILED:
            raw["last_error"] = (f"{raw.get('last_error') or 'failed'} [nothing runs: update it to a version "
                                 f"that stays up, or fix the cause and run `mlflow-deploy up --retry-failed`]")
        elif serving and state in (RUNNING, UNHEALTHY):
            raw["last_error"] = (f"{raw.get('last_error') or ''} [the supervisor is gone; its workers "
                                 f"{serving} keep serving and start a new one within seconds; {UP_HINT} too]").strip()
            raw["worker_pids"] = serving
        elif raw.get("pid") is not None and paths.spec.exists():
            was = "was stopped" if state == STOPPED else "processes are gone (machine restarted, or killed)"
            raw["state"] = STOPPED
            raw["last_error"] = f"not running: its {was}; {UP_HINT}"
            raw["worker_pids"] = []
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
                code = Supervisor(store.paths(spec.name), heal=False).run()
            finally:
                done.set()
            final = _to_status(store.read_status(spec.name) or {})
            if code != 0 and final.state != FAILED:
                final = dataclasses.replace(final, state=FAILED,
                                            last_error=final.last_error or f"supervisor exited with code {code}")
            return final

    # -- plumbing ------------------------------------------------------------------------------

    def _ask(self, name: str, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        root = self.store.paths(name).root
        deadline = time.monotonic() + TAKEOVER_WAIT_S
        while True:  # a supervisor being replaced after kill -9 answers in a few seconds
            status = self.status(name)
            if status.state in (STOPPED, FAILED):
                raise EngineError(f"Deployment {name!r} is {status.state}: {status.last_error or ''}".strip())
            if status.details.get("supervisor_alive") or time.monotonic() > deadline:
                break
            time.sleep(0.2)

        last_seen = time.monotonic()

        def someone_can_answer() -> bool:
            # Whoever supervises now answers: the supervisor, or the successor of one that died
            # (its orphaned workers start it within seconds, and it reads the waiting request).
            nonlocal last_seen
            raw = read_json(self.store.paths(name).status) or {}
            if is_supervisor(raw.get("pid"), root):
                last_seen = time.monotonic()
                return True
            return time.monotonic() - last_seen < TAKEOVER_WAIT_S and bool(live_workers(raw, root))

        try:
            return Mailbox(self.store.paths(name).requests).ask(request, timeout_s, alive=someone_can_answer)
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
