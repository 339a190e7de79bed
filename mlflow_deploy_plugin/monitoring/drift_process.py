"""A drift report in a child process of its own, so nothing a report does can take its caller down.

A report reads a window of captured traffic into memory, fits Evidently and loads the model: at
production volume it may use gigabytes or be killed by the kernel's out-of-memory killer. Run in the
agent's own process, that would stop following, promotion and rollback with it. So the agent's
scheduler (:mod:`.schedule`) and the canary's drift check (:mod:`..lifecycle.canary_drift`) start
``python -m mlflow_deploy_plugin.monitoring.drift_process`` instead: the child runs
:func:`.deployment_drift.run_deployment_drift` and writes what came out (status, run id, or the
error) to a small JSON result file. A child that dies without one (a signal, an OOM kill) is a
failed report: :func:`failure_of` says so, and :func:`fail_orphaned_runs` ends the MLflow run it
left RUNNING as FAILED, so the UI never shows a report that runs forever.

The child exits when its parent does (it checks every second), so a report never outlives the
agent that started it, and it never holds the drift lock itself: the caller does.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin.monitoring.drift_lock import RUN_RECORDED
from mlflow_deploy_plugin.state import StateStore, read_json, write_json_atomic

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessOutcome:
    """What a finished report process wrote: the run's status and id (as DriftOutcome names them)."""

    status: str | None
    run_id: str | None
    rows_current: int | None = None


class DriftProcessFailed(RuntimeError):
    """The report process failed: its error, or how it died."""


def command(store: StateStore, name: str, since: datetime, until: datetime, result: Path, *,
            trigger: str, version: str | None = None) -> list[str]:
    """The command line of one report process."""
    args = [sys.executable, "-m", "mlflow_deploy_plugin.monitoring.drift_process", "--home", str(store.home),
            "--name", name, "--since", since.isoformat(), "--until", until.isoformat(), "--trigger", trigger,
            "--result", str(result)]
    return args + (["--version", str(version)] if version else [])


def start(store: StateStore, name: str, since: datetime, until: datetime, result: Path, *, trigger: str,
          version: str | None = None) -> subprocess.Popen[bytes]:
    """Start a report process; its output goes to the deployment's ``logs/drift.log``."""
    result.unlink(missing_ok=True)
    logs = store.paths(name).logs
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "drift.log", "ab") as log:
        return subprocess.Popen(command(store, name, since, until, result, trigger=trigger, version=version),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))


def read_result(result: Path) -> dict[str, Any] | None:
    """The result file of a finished process, or None when it wrote none."""
    try:
        return read_json(result)
    except ValueError:  # torn: the process died while writing it
        return None


def failure_of(returncode: int, result: dict[str, Any] | None) -> str | None:
    """Why a finished report process failed, or None when it succeeded."""
    if result is not None and "error" not in result and returncode == 0:
        return None
    if result is not None and result.get("error"):
        return str(result["error"])
    if returncode < 0:
        try:
            signame = signal.Signals(-returncode).name
        except ValueError:
            signame = f"signal {-returncode}"
        hint = " (the out-of-memory killer sends SIGKILL)" if -returncode == signal.SIGKILL else ""
        return f"the drift report process was killed by {signame}{hint}"
    return f"the drift report process exited with status {returncode} without a result"


def outcome_of(result: dict[str, Any]) -> ProcessOutcome:
    return ProcessOutcome(status=result.get("status"), run_id=result.get("run_id"),
                          rows_current=result.get("rows_current"))


def fail_orphaned_runs(store: StateStore, name: str, started_ms: int, error: str) -> int:
    """End as FAILED the drift runs of ``name`` a dead process left RUNNING (started after
    ``started_ms``); returns how many. Best effort: never raises."""
    try:
        import mlflow

        spec = store.read_spec(name)
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name((spec.config.drift_experiment if spec else None)
                                                   or f"drift/{name}")
        if experiment is None:
            return 0
        runs = client.search_runs([experiment.experiment_id], filter_string=(
            f"tags.`drift.deployment` = '{name}' and attributes.status = 'RUNNING' "
            f"and attributes.start_time >= {started_ms}"))
        for run in runs:
            client.set_tag(run.info.run_id, "drift.error", error[:5000])
            client.set_terminated(run.info.run_id, "FAILED")
        return len(runs)
    except Exception as exc:
        _logger.warning("Could not end the orphaned drift runs of %s: %s", name, exc)
        return 0


def run(store: StateStore, name: str, since: datetime, until: datetime, *, trigger: str,
        version: str | None = None, timeout_s: float = 3 * 3600.0,
        on_start: Callable[[subprocess.Popen[bytes]], None] | None = None) -> ProcessOutcome:
    """Run one report in a child process and wait for it (the scheduler's job); ``on_start`` is
    told the process once it runs.

    Raises DriftProcessFailed saying why it failed; the exception carries the RUN_RECORDED note when
    the failure is already recorded as a FAILED MLflow run (by the child, or here for a killed one).
    """
    import time

    result = store.paths(name).root / "run" / f"drift-{os.getpid()}-{threading.get_ident()}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    started_ms = int(time.time() * 1000)
    proc = start(store, name, since, until, result, trigger=trigger, version=version)
    _logger.info("Drift report of %s runs in process %d", name, proc.pid)
    try:
        if on_start is not None:
            on_start(proc)
        returncode = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        returncode = proc.wait()
        error: str | None = f"the drift report process took more than {timeout_s:.0f}s and was killed"
    except BaseException:  # the caller is stopping: take the report down with it
        proc.kill()
        proc.wait()
        raise
    else:
        error = None
    outcome = read_result(result)
    result.unlink(missing_ok=True)
    error = error or failure_of(returncode, outcome)
    if error is None:
        assert outcome is not None
        return outcome_of(outcome)
    failed = DriftProcessFailed(error)
    if outcome is not None and outcome.get("recorded") or fail_orphaned_runs(store, name, started_ms, error):
        failed.add_note(RUN_RECORDED)
    raise failed


def _exit_with_parent(parent: int) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)  # the agent is gone: a report must not outlive it
            threading.Event().wait(1.0)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlflow_deploy_plugin.monitoring.drift_process")
    parser.add_argument("--home", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--since", required=True)
    parser.add_argument("--until", required=True)
    parser.add_argument("--trigger", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--version")
    args = parser.parse_args(argv)
    _exit_with_parent(os.getppid())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [drift {args.name} %(process)d] %(name)s: %(message)s")
    from mlflow_deploy_plugin.monitoring.deployment_drift import run_deployment_drift

    result = Path(args.result)
    if args.trigger == "scheduled" and args.version is None:  # one scheduled run reports quality too
        from mlflow_deploy_plugin.quality.due import report_after_drift

        report_after_drift(args.home, args.name)
    try:
        # locked=True: the scheduler that started this process holds the deployment's drift lock; a
        # canary check judges the challenger, which no scheduled report judges, so it takes none.
        outcome = run_deployment_drift(
            args.name, datetime.fromisoformat(args.since), datetime.fromisoformat(args.until),
            store=StateStore(Path(args.home)), locked=True, trigger=args.trigger, version=args.version,
            progress=lambda message: _logger.info("%s", message))
    except Exception as exc:
        _logger.exception("Drift report of %s failed", args.name)
        write_json_atomic(result, {"error": f"{type(exc).__name__}: {exc}"[:4000],
                                   "recorded": RUN_RECORDED in getattr(exc, "__notes__", ())})
        return 1
    write_json_atomic(result, {"status": outcome.status, "run_id": outcome.run_id,
                               "rows_current": outcome.rows_current})
    return 0


if __name__ == "__main__":
    sys.exit(main())
