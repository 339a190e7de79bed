"""The background agent of one deployment: what runs beside the service, on its own schedule.

Started (and restarted if it dies) by the deployment's supervisor when the deployment needs it
(if the supervisor itself dies, the agent makes sure a new one is on its way, then stops: the new
supervisor starts a new agent):
scheduled drift reports (``-C drift_schedule``), following an alias, stage or ``latest`` URI
(polled every ``poll_interval_s``, at once when `mlflow-deploy watch` touches the deployment's
poke file after a webhook), policies (``-C policy``), notifications of its history to ``-C notify``
receivers (:mod:`.lifecycle.notifier`) and a watch on capture dropping rows
(:mod:`.monitoring.capture_watch`). It imports MLflow and Evidently, so it
lives in its own process: the supervisor stays small and the workers never pause for it. Each drift
report runs in a child process of the agent (:mod:`.monitoring.drift_process`): a report that
crashes or is killed by the out-of-memory killer is recorded as a failed report and tried again at
the next scheduled time, while the agent goes on following, promoting and rolling back.

Run as ``python -m mlflow_deploy_plugin.agent DEPLOYMENT_DIR``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from mlflow_deploy_plugin.spec import DeploymentSpec, SpecError
from mlflow_deploy_plugin.state import StateStore

_logger = logging.getLogger("mlflow_deploy_plugin.agent")
# How often the agent looks for a change left half done (one read of the engine's state: cheap).
RESUME_EVERY_S = 10.0


def _lifecycle_loop(store: StateStore, name: str, stop: threading.Event) -> None:
    from mlflow_deploy_plugin.lifecycle.controller import LifecycleController

    controller = LifecycleController(store, name)
    poke = store.paths(name).poke  # `mlflow-deploy watch` touches it after a webhook: look now
    last_poke = poke.stat().st_mtime if poke.exists() else 0.0
    next_poll = next_resume = 0.0
    while not stop.is_set():
        spec = store.read_spec(name)
        interval = spec.config.poll_interval_s if spec else 10.0
        poked = poke.exists() and poke.stat().st_mtime != last_poke
        due = poked or time.monotonic() >= next_poll
        if due or time.monotonic() >= next_resume:
            # First (at start, before every pass, and every RESUME_EVERY_S whatever the poll
            # interval): a change its maker left half done, killed between the engine's switch
            # and the spec write, is finished, so the pass compares the registry with what runs.
            try:
                controller.deployments.resume_interrupted(name)
            except Exception as exc:
                _logger.warning("Looking for an interrupted change of %s failed: %s", name, exc)
            next_resume = time.monotonic() + RESUME_EVERY_S
        if due:
            if poked:
                last_poke = poke.stat().st_mtime
            try:
                controller.cycle(actor="webhook" if poked else "registry-poll")
            except Exception as exc:  # an unreachable registry must not kill the agent: retry next time
                _logger.warning("Lifecycle cycle of %s failed: %s", name, exc)
            next_poll = time.monotonic() + interval
        stop.wait(0.1)


def _make_sure_a_supervisor_comes(store: StateStore, name: str, wait_s: float = 3.0) -> None:
    """The workers normally start the new supervisor (they hand it their socket); if none did
    within ``wait_s`` (no worker was alive, or none was scheduled in time), start one ourselves:
    it asks the workers still serving for their socket (``engines/local/handoff.py``)."""
    from mlflow_deploy_plugin.engines.local.processes import spawn_supervisor, supervisor_lock_held

    paths = store.paths(name)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if supervisor_lock_held(paths):
            return
        time.sleep(0.2)
    try:
        spawn_supervisor(paths, respawn=True)
    except OSError as exc:
        _logger.error("Could not start a new supervisor for %s: %s", name, exc)


def _spec_or_none(store: StateStore, name: str) -> DeploymentSpec | None:
    try:
        return store.read_spec(name)
    except SpecError:
        return None


def _take_agent_lock(path: Path, stop: threading.Event) -> int | None:
    """The fd holding the deployment's agent lock, waiting while another agent holds it; None if
    asked to stop first, or if the deployment's folder is gone."""
    try:
        if path.parent.parent.is_dir():  # the deployment exists (engines without run/ files: Ray)
            path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        _logger.warning("No agent lock at %s (%s): not starting.", path, exc)
        return None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if stop.wait(0.2):
                os.close(fd)
                return None


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m mlflow_deploy_plugin.agent DEPLOYMENT_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [agent %(process)d] %(name)s: %(message)s")
    root = Path(args[0]).resolve()
    store = StateStore(root.parent.parent)
    name = root.name
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    parent = os.getppid()

    def watch_parent() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                spec = _spec_or_none(store, name)
                if spec is not None and spec.engine != "local":
                    # Ray: the parent is the agent's actor, which Ray restarts (and it starts a new
                    # agent); a local supervisor here would serve the deployment on this machine.
                    _logger.warning("The %s engine's agent host is gone; stopping (its restart starts a new "
                                    "agent).", spec.engine)
                else:
                    _logger.warning("Supervisor is gone; stopping (a new supervisor starts a new agent).")
                    _make_sure_a_supervisor_comes(store, name)
                stop.set()

    threading.Thread(target=watch_parent, daemon=True).start()
    from mlflow_deploy_plugin.monitoring.schedule import DriftScheduler

    # One lifecycle controller per deployment at a time: after a supervisor takeover the new agent
    # starts while the old one may still be mid-pass on the same persisted operation. The kernel
    # drops this lock however the holder dies, so waiting for it is waiting for the old agent.
    lock_fd = _take_agent_lock(store.paths(name).root / "run" / "agent.lock", stop)
    if lock_fd is None:
        return 0
    _logger.info("Agent of %s started", name)
    drift = threading.Thread(target=DriftScheduler(store, [name]).run_forever, args=(stop,), daemon=True)
    drift.start()
    # Notifications (-C notify) and the capture-drop watch run in their own threads: a receiver
    # that is down or slow never delays following, judging or serving.
    from mlflow_deploy_plugin.lifecycle.notifier import Notifier
    from mlflow_deploy_plugin.monitoring.capture_watch import CaptureWatch

    notifier = threading.Thread(target=Notifier(store, name).run_forever, args=(stop,), daemon=True)
    notifier.start()
    threading.Thread(target=CaptureWatch(store, name).run_forever, args=(stop,), daemon=True).start()
    _lifecycle_loop(store, name, stop)
    drift.join(timeout=600)
    notifier.join(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
