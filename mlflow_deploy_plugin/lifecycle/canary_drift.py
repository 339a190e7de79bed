"""The challenger's own drift during a canary (policy ``promotion.canary.require_no_drift``).

Capture records which version answered each row, so the challenger is judged on exactly the rows it
served since its canary started, against its own reference data, with the deployment's drift
settings (``-C drift_min_rows`` is the minimum row count: fewer rows is ``insufficient_data``, not a
verdict). The report runs in a child process (:mod:`..monitoring.drift_process`), started by the
controller once the canary has enough requests to be judged and polled at each cycle, so a report
that crashes or is killed never takes the controller down; it is logged to MLflow like any drift
report (``drift.trigger=canary``; such runs never count towards the drift policy's streak).

The check's state lives in the canary's state (``lifecycle_state.json``), so an agent restarted
mid-check starts the check again rather than waiting for a process that is gone.
"""

from __future__ import annotations

import logging
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin.state import StateStore

_logger = logging.getLogger(__name__)

# A check that found too few rows, or failed, is run again at most this often.
RECHECK_S = 30.0
TRIGGER = "canary"


class CanaryDriftCheck:
    """Runs and follows the drift checks of one deployment's canaries."""

    def __init__(self, store: StateStore, name: str) -> None:
        self.store = store
        self.name = name
        self._procs: dict[int, subprocess.Popen[bytes]] = {}  # started by this process: reaped here

    def status(self, canary: dict[str, Any], *, due: bool, recheck_s: float = RECHECK_S) -> dict[str, Any]:
        """The check's state for the canary ``canary`` (its ``drift_check`` entry, updated).

        ``due``: the canary has the traffic evidence to be judged, so a check may start now.
        ``status`` in the result: None while no verdict is known, else ``ok``, ``drifted``,
        ``insufficient_data`` or ``failed`` (with ``error``).
        """
        # Imported here: the monitoring package loads pandas and scipy, which the CLI verbs that build
        # a controller (rollback, watch) do not need.
        from mlflow_deploy_plugin.monitoring import drift_process

        check: dict[str, Any] = canary.setdefault("drift_check", {"status": None})
        pid = check.get("pid")
        if pid:
            proc = self._procs.get(pid)
            returncode = proc.poll() if proc is not None else 0
            if returncode is None:
                return check  # still running
            self._procs.pop(pid, None)
            # A process this controller did not start belongs to an agent that is gone: such a
            # process exits with its parent, so whatever it wrote is all there will be.
            result_path = self._result_path(canary)
            result = drift_process.read_result(result_path)
            result_path.unlink(missing_ok=True)
            error = (drift_process.failure_of(returncode, result) if result is not None or proc is not None
                     else "the drift check's process is gone (the agent restarted meanwhile)")
            check.pop("pid")
            check["finished_at"] = time.time()
            if error is None and result is not None:
                check.update(status=result.get("status"), run_id=result.get("run_id"),
                             rows=result.get("rows_current"), error=None)
            else:
                drift_process.fail_orphaned_runs(self.store, self.name, int(check["started_at"] * 1000),
                                                 str(error))
                check.update(status="failed", error=error, failures=check.get("failures", 0) + 1)
                _logger.warning("Canary drift check of %s failed: %s", self.name, error)
        if check.get("status") in ("ok", "drifted") or not due:
            return check
        if check.get("finished_at") and time.time() - check["finished_at"] < recheck_s:
            return check  # too few rows (or a failure) a moment ago: wait for more traffic
        self._start(canary, check)
        return check

    def _result_path(self, canary: dict[str, Any]) -> Path:
        return self.store.paths(self.name).root / "run" / f"canary-drift-v{canary['version']}.json"

    def _start(self, canary: dict[str, Any], check: dict[str, Any]) -> None:
        from mlflow_deploy_plugin.monitoring import drift_process

        since = datetime.fromtimestamp(canary["started_at"], tz=UTC)
        until = datetime.now(UTC)
        result = self._result_path(canary)
        result.parent.mkdir(parents=True, exist_ok=True)
        proc = drift_process.start(self.store, self.name, since, until, result, trigger=TRIGGER,
                                   version=str(canary["version"]))
        self._procs[proc.pid] = proc
        check.update(pid=proc.pid, started_at=time.time(), until=until.isoformat())
        _logger.info("Canary drift check of %s v%s started (process %d)", self.name, canary["version"], proc.pid)

    def stop(self, canary: dict[str, Any]) -> None:
        """The canary ended: a check still running is not needed any more."""
        pid = (canary.get("drift_check") or {}).get("pid")
        proc = self._procs.pop(pid, None) if pid else None
        if proc is not None and proc.poll() is None:
            proc.terminate()
