"""Which quality windows are due: UTC days of predictions whose labels changed since their last report.

Scheduled quality follows the drift schedule (``-C drift_schedule``): each scheduled drift run
also calls :func:`run_due_quality`, which reports nothing when the deployment has no labels. Windows
are the UTC days of the *predictions* (the label partitions), so a label arriving late updates the
window it belongs to: that day is reported again (a re-run, tagged as such by the report), up to
``-C label_horizon`` back. ``mlflow-deploy quality report NAME --due`` does the same by hand.

What was reported when is kept in the deployment's ``quality_state.json`` (moved to the archive
with the rest of the deployment).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pandas as pd

from mlflow_deploy_plugin.capture import capture_root
from mlflow_deploy_plugin.capture.layout import as_utc
from mlflow_deploy_plugin.quality.labels import labels_root, read_labels
from mlflow_deploy_plugin.quality.report import QualityOutcome, run_deployment_quality
from mlflow_deploy_plugin.spec import duration_s
from mlflow_deploy_plugin.state import StateStore, read_json, write_json_atomic

_log = logging.getLogger(__name__)
STATE_FILE = "quality_state.json"


def due_days(labels: pd.DataFrame, reported: dict[str, str]) -> list[datetime]:
    """Start (UTC midnight) of each prediction day with a label added after that day's last report."""
    if labels.empty:
        return []
    stamps = pd.to_datetime(labels["_timestamp"], utc=True)
    added = pd.to_datetime(labels["_labelled_at"], utc=True)
    latest = added.groupby(stamps.dt.floor("D")).max()
    due = []
    for day, newest in latest.items():
        last = reported.get(day.date().isoformat())
        if last is None or newest > pd.Timestamp(last):
            due.append(day.to_pydatetime())
    return sorted(due)


def run_due_quality(name: str, *, store: StateStore | None = None, now: datetime | None = None,
                    trigger: str = "scheduled", progress: Callable[[str], None] | None = None,
                    ) -> list[QualityOutcome]:
    """Report every due day window of deployment ``name`` (see the module docstring); [] without labels."""
    store = store or StateStore()
    spec = store.read_spec(name)
    if spec is None:
        return []
    now = as_utc(now) if now is not None else datetime.now(UTC)
    config = spec.config
    paths = store.paths(name)
    root = capture_root(name, config.capture_uri, str(paths.capture))
    horizon = timedelta(seconds=duration_s(config.label_horizon))
    labels = read_labels(labels_root(root), now - horizon, now + timedelta(days=1))
    state_path = paths.root / STATE_FILE
    state = read_json(state_path) or {}
    reported: dict[str, str] = dict(state.get("reported") or {})
    outcomes: list[QualityOutcome] = []
    for day in due_days(labels, reported):
        started = datetime.now(UTC)
        outcomes.extend(run_deployment_quality(name, day, day + timedelta(days=1), store=store, progress=progress,
                                               trigger=trigger))
        reported[day.date().isoformat()] = started.isoformat()
    if outcomes or reported != state.get("reported"):
        cutoff = (now - horizon).date().isoformat()
        write_json_atomic(state_path, {"reported": {d: t for d, t in reported.items() if d >= cutoff}})
    return outcomes


def report_after_drift(home: str, name: str) -> None:
    """The scheduled drift process's hook: due quality windows too, never failing the drift run."""
    from pathlib import Path

    try:
        for outcome in run_due_quality(name, store=StateStore(Path(home)),
                                       progress=lambda message: _log.info("%s", message)):
            _log.info("Quality of %s %s", name, outcome.line())
    except Exception:
        _log.exception("Scheduled quality report of %s failed", name)
