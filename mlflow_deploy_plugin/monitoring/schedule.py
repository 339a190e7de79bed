"""Scheduled drift reports (``-C drift_schedule="*/30 * * * *"``; a sixth field adds seconds).

Each deployment keeps ``drift_schedule.json`` in its folder: the end of the last window judged.
A run covers [last end, now - a few seconds for capture to settle), so after downtime a single catch-up run covers everything missed
instead of one run per missed tick. A per-deployment file lock (:func:`drift_lock`) keeps reports
from overlapping: scheduled runs of the deployment's own agent, of a separate `mlflow-deploy drift
schedule` process, and on-demand `mlflow-deploy drift report` runs (which wait for it). A failed
run is recorded in MLflow (status FAILED, with the error) and leaves the window start where it
was, so the next tick covers that data again; the first failure of a streak is also written to the
deployment's history (``drift_report_failed``), once.

Each report runs in a child process of its own (:mod:`.drift_process`): a report that crashes or
is killed (say by the out-of-memory killer) is a failed report like any other, and the agent whose
scheduler started it goes on following, promoting and rolling back. The running report's pid is in
``drift_schedule.json`` (``running_pid``, ``running_since_ms``) while it runs. When the scheduler
that started it dies too (the agent killed with ``kill -9``), the report process follows it and its
MLflow run would stay RUNNING for ever: the next scheduler of that deployment finds the stale
``running_pid`` and ends those runs FAILED before its first tick (:meth:`DriftScheduler.sweep_orphans`).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from croniter import croniter

from mlflow_deploy_plugin.monitoring.drift_lock import RUN_RECORDED, drift_lock
from mlflow_deploy_plugin.spec import SpecError
from mlflow_deploy_plugin.state import StateStore, read_json, write_json_atomic

_logger = logging.getLogger(__name__)
# Scheduled windows end this long before "now": captured rows reach disk up to a flush interval
# (2 s) after their request, and a row flushed after its window was judged would be in no window.
CAPTURE_SETTLE_S = 5.0
DriftJob = Callable[[str, datetime, datetime], Any]
def next_tick(cron: str, after: datetime) -> datetime:
    """The first time strictly after ``after`` that ``cron`` fires (UTC)."""
    return croniter(cron, after).get_next(datetime).astimezone(UTC)


def previous_tick(cron: str, before: datetime) -> datetime:
    """The last time at or before ``before`` that ``cron`` fired (UTC)."""
    return croniter(cron, before + timedelta(microseconds=1)).get_prev(datetime).astimezone(UTC)


def _record_failed_run(name: str, experiment: str | None, since: datetime, until: datetime, error: str) -> None:
    """Make a failure visible in MLflow even when it happened before the job opened its run."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment_name = experiment or f"drift/{name}"
    found = client.get_experiment_by_name(experiment_name)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment_name)
    run = client.create_run(experiment_id, run_name=f"drift {name} (failed)",
                            tags={"deployment": name, "drift.error": error[:4000]})
    client.log_param(run.info.run_id, "window_start", since.isoformat())
    client.log_param(run.info.run_id, "window_end", until.isoformat())
    client.set_terminated(run.info.run_id, status="FAILED")


class DriftScheduler:
    """Runs due drift reports for a set of deployments (all scheduled ones when ``names`` is None)."""

    def __init__(self, store: StateStore, names: Iterable[str] | None = None, job: DriftJob | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self.names = list(names) if names is not None else None
        self.job = job or self._default_job
        self.clock = clock
        self._running: dict[str, threading.Thread] = {}
        self._processes: dict[str, subprocess.Popen[bytes]] = {}  # report processes running now
        self._stopping = threading.Event()  # set by run_forever's stop: a report cut short is no failure
        self.completed: list[tuple[str, str]] = []  # (deployment, "ok"|"failed: ...") for tests and logs

    def _default_job(self, name: str, since: datetime, until: datetime) -> Any:
        from mlflow_deploy_plugin.monitoring import drift_process

        def started(proc: subprocess.Popen[bytes]) -> None:
            self._processes[name] = proc
            path = self.store.paths(name).root / "drift_schedule.json"
            write_json_atomic(path, dict(self._state(name), running_pid=proc.pid, running_since_ms=started_ms))

        started_ms = int(time.time() * 1000)

        try:
            return drift_process.run(self.store, name, since, until, trigger="scheduled", on_start=started)
        finally:
            self._processes.pop(name, None)

    def sweep_orphans(self) -> int:
        """End FAILED the drift runs that a report left RUNNING when its scheduler died with it.

        A report recorded as running (``running_pid``) while no report holds the deployment's drift
        lock is one whose scheduler is gone: the kernel dropped the lock with it. Returns how many
        runs were ended. Called once before the first tick."""
        from mlflow_deploy_plugin.monitoring.drift_process import fail_orphaned_runs

        ended = 0
        for name in self.scheduled():
            state = self._state(name)
            if not state.get("running_pid"):
                continue
            paths = self.store.paths(name)
            with drift_lock(paths.root, wait=False) as held:
                if not held:
                    continue  # a report of another scheduler runs now: that one is alive
                error = (f"the scheduler that ran this report (process {state['running_pid']}'s parent) stopped "
                         "without ending it (killed?); the window is judged again at the next scheduled time")
                count = fail_orphaned_runs(self.store, name, int(state.get("running_since_ms") or 0), error)
                if count:
                    _logger.warning("Ended %d drift run(s) of %s left RUNNING by a stopped scheduler", count, name)
                ended += count
                fresh = self._state(name)
                fresh.pop("running_pid", None)
                fresh.pop("running_since_ms", None)
                write_json_atomic(paths.root / "drift_schedule.json", fresh)
        return ended

    def scheduled(self) -> dict[str, str]:
        """Deployment name -> cron expression, for the deployments this scheduler covers."""
        result = {}
        for name in self.names if self.names is not None else self.store.names():
            try:
                spec = self.store.read_spec(name)
            except SpecError as exc:  # one unreadable spec must not stop the others' reports
                _logger.error("Skipping %s: %s", name, exc)
                continue
            cron = spec.config.drift_schedule if spec else None
            if cron:
                result[name] = cron
        return result

    def _state(self, name: str) -> dict[str, Any]:
        return read_json(self.store.paths(name).root / "drift_schedule.json") or {}

    def _anchor(self, name: str, state: dict[str, Any]) -> datetime | None:
        """Where the next window starts: the end of the last one, or the deployment's creation."""
        if state.get("last_end"):
            return datetime.fromisoformat(state["last_end"])
        spec = self.store.read_spec(name)
        return datetime.fromtimestamp(spec.created_at, tz=UTC) if spec else None

    def due(self, name: str, cron: str, now: datetime) -> bool:
        """Whether a tick of ``cron`` has passed since the last window ended (or since creation)."""
        state = self._state(name)
        anchor = self._anchor(name, state)
        if anchor is None:
            return False
        if state.get("last_attempt"):
            # After a failure wait for the next tick too: no retry storm, the window still starts
            # at the last successful end.
            anchor = max(anchor, datetime.fromisoformat(state["last_attempt"]))
        return next_tick(cron, anchor) <= now - timedelta(seconds=CAPTURE_SETTLE_S)

    def tick(self) -> list[str]:
        """Start the runs that are due; returns the names started."""
        started = []
        now = self.clock()
        for name, thread in list(self._running.items()):
            if not thread.is_alive():
                del self._running[name]
        for name, cron in self.scheduled().items():
            if name in self._running or not self.due(name, cron, now):
                continue
            thread = threading.Thread(target=self._run, args=(name, cron), name=f"drift-{name}", daemon=True)
            self._running[name] = thread
            thread.start()
            started.append(name)
        return started

    def _run(self, name: str, cron: str) -> None:
        paths = self.store.paths(name)
        with drift_lock(paths.root, wait=False) as held:
            if not held:
                return  # another report of this deployment (scheduled or on demand) is running now
            state = self._state(name)
            until = self.clock() - timedelta(seconds=CAPTURE_SETTLE_S)
            since = self._anchor(name, state) or previous_tick(cron, until)
            spec = self.store.read_spec(name)
            max_window = timedelta(seconds=spec.config.drift_max_window_s if spec else 86400.0)
            if until - since > max_window:
                # After long downtime one catch-up run covers at most drift_max_window; the gap
                # before it is recorded, never silently dropped.
                skipped_until = until - max_window
                reason = (f"catch-up window {since.isoformat()} .. {skipped_until.isoformat()} not judged: "
                          f"longer than drift_max_window={spec.config.drift_max_window if spec else '24h'}")
                if state.get("carried_from"):
                    # A quiet deployment whose windows kept being carried forward: the oldest part
                    # slides out of the window at every tick; logged, not a history event each time.
                    _logger.info("Drift report of %s: %s", name, reason)
                else:
                    _logger.warning("Drift report of %s: %s", name, reason)
                    self.store.append_history(name, "drift_window_skipped", reason=reason, actor="drift-schedule",
                                              window={"start": since.isoformat(), "end": skipped_until.isoformat()})
                since = skipped_until
            try:
                outcome = self.job(name, since, until)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if self._stopping.is_set():
                    # Interrupted by a stop (its run ended KILLED): the window is judged after the restart.
                    _logger.info("Scheduled drift report of %s interrupted by the stop: %s", name, error)
                    return
                _logger.error("Scheduled drift report of %s failed: %s\n%s", name, error, traceback.format_exc())
                if not state.get("last_error"):  # the first failure of a streak, not every tick
                    try:
                        self.store.append_history(name, "drift_report_failed", actor="drift-schedule", reason=(
                            f"{error}; window {since.isoformat()} .. {until.isoformat()} is judged again at "
                            "the next scheduled time"))
                    except OSError as history_error:  # deleted meanwhile
                        _logger.warning("Could not record the failed report of %s: %s", name, history_error)
                try:
                    if RUN_RECORDED not in getattr(exc, "__notes__", ()):
                        _record_failed_run(name, spec.config.drift_experiment if spec else None, since, until,
                                           error)
                except Exception as record_error:
                    _logger.error("Could not record the failed run in MLflow: %s", record_error)
                write_json_atomic(paths.root / "drift_schedule.json",
                                  dict(state, last_error=error, last_attempt=until.isoformat()))
                self.completed.append((name, f"failed: {error}"))
                return
            status = getattr(outcome, "status", None)
            # Too few rows for a verdict: the window is carried forward into the next one (which
            # starts where this one started) instead of being skipped.
            carried = status == "insufficient_data"
            write_json_atomic(paths.root / "drift_schedule.json", {
                "last_end": (since if carried else until).isoformat(), "last_run_id": getattr(outcome, "run_id", None),
                "last_status": status, "last_attempt": until.isoformat(),
                **({"carried_from": since.isoformat()} if carried else {}),
            })
            self.completed.append((name, "ok"))

    def run_forever(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Tick until ``stop`` is set; then wait for runs in progress to end."""
        try:
            self.sweep_orphans()
        except Exception as exc:  # best effort: never keeps the schedule from running
            _logger.warning("Could not end the drift runs a stopped scheduler left RUNNING: %s", exc)
        while not stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # a broken spec must not stop the other deployments' reports
                _logger.error("Drift scheduler tick failed: %s", exc)
            stop.wait(interval_s)
        self._stopping.set()
        for proc in list(self._processes.values()):  # stopping: reports in progress end with us,
            proc.send_signal(signal.SIGINT)  # as KeyboardInterrupt: the report ends its run KILLED
        for thread in list(self._running.values()):
            thread.join(timeout=600)


def wait_for_runs(scheduler: DriftScheduler, timeout_s: float) -> None:
    """Block until no run is in progress (used by tests and graceful shutdown)."""
    deadline = time.monotonic() + timeout_s
    while any(t.is_alive() for t in scheduler._running.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
