"""Which quality windows are due: UTC days of predictions whose labels changed since their last report.

Scheduled quality follows the drift schedule (``-C drift_schedule``): each scheduled drift run
also calls :func:`run_due_quality`, which reports nothing when the deployment has no labels. Windows
are the UTC days of the *predictions* (the label partitions), so a label arriving late updates the
window it belongs to: that day is reported again (a re-run, tagged as such by the report), up to
``-C label_horizon`` back. ``mlflow-deploy quality report NAME --due`` does the same by hand.

Quality before the labels arrive: each scheduled run also reports, for CBPE's estimate only
(:mod:`.cbpe`; tag ``quality.estimate_only``), the UTC days of predictions within the horizon that
have *no* label yet: today's (so far) on every run, and an earlier day until it was estimated once
after it ended. Only when the capture holds class probabilities and some labelled predictions
before the day exist to calibrate on (else there is nothing to estimate with). The estimates go to
their own metrics (``estimated_accuracy``...), version tags (``quality.estimated_*``), verdicts and
gauges (``mlflow_deploy_quality_estimated``): never mistaken for measured figures; the policy
acts on them only with ``quality.use_estimates: true``. Once a day's labels come, it is reported
as measured (above) and no longer estimated.

What was reported (and estimated) when is kept in the deployment's ``quality_state.json`` (moved to
the archive with the rest of the deployment).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mlflow_deploy_plugin.capture import capture_root
from mlflow_deploy_plugin.capture.layout import as_utc, join_path, list_partitions, resolve_root
from mlflow_deploy_plugin.quality.join import probability_columns, window_columns
from mlflow_deploy_plugin.quality.labels import LABEL_FILE, STORED_SCHEMA, labels_root
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


#: An ended day is estimated once more at least this long after its end (late capture flushes).
ESTIMATE_SETTLE = timedelta(minutes=1)


def label_stamps(root: str, since: datetime, until: datetime) -> pd.DataFrame:
    """The prediction time (``_timestamp``) and arrival (``_labelled_at``) of each stored label
    predicted in [since, until): two timestamp columns, read without the ids and labels."""
    fs, base = resolve_root(labels_root(root))
    stamp = pa.timestamp("us", tz="UTC")
    since, until = as_utc(since), as_utc(until)
    tables = []
    for day, path in list_partitions(fs, base):
        if not since.date() <= day < until.date() + timedelta(days=1):
            continue
        file = join_path(path, LABEL_FILE)
        if fs.get_file_info(file).type != pafs.FileType.File:
            continue
        tables.append(pq.read_table(file, filesystem=fs, schema=STORED_SCHEMA, columns=["_timestamp", "_labelled_at"],
                                    filters=(pc.field("_timestamp") >= pa.scalar(since, stamp))
                                    & (pc.field("_timestamp") < pa.scalar(until, stamp))))
    if not tables:
        return STORED_SCHEMA.empty_table().select(["_timestamp", "_labelled_at"]).to_pandas()
    return pa.concat_tables(tables).to_pandas()


def estimate_days(captured: list[date], labelled: set[date], estimated: dict[str, str], now: datetime,
                  first: date) -> list[datetime]:
    """Start (UTC midnight) of each day of ``captured`` from ``first`` to today without a label, not
    yet estimated after its end (+ :data:`ESTIMATE_SETTLE`; today: always, it is still running)."""
    now = as_utc(now)
    due = []
    for day in captured:
        if day in labelled or not first <= day <= now.date():
            continue
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        last = estimated.get(day.isoformat())
        if last is None or pd.Timestamp(last) < pd.Timestamp(start + timedelta(days=1) + ESTIMATE_SETTLE):
            due.append(start)
    return sorted(due)


def run_due_quality(name: str, *, store: StateStore | None = None, now: datetime | None = None,
                    trigger: str = "scheduled", progress: Callable[[str], None] | None = None,
                    estimates: bool = True) -> list[QualityOutcome]:
    """Report every due day window of deployment ``name`` (see the module docstring); [] without labels.

    ``estimates``: also report CBPE's estimate of the days without labels yet.
    """
    store = store or StateStore()
    spec = store.read_spec(name)
    if spec is None:
        return []
    now = as_utc(now) if now is not None else datetime.now(UTC)
    config = spec.config
    paths = store.paths(name)
    root = capture_root(name, config.capture_uri, str(paths.capture))
    horizon = timedelta(seconds=duration_s(config.label_horizon))
    labels = label_stamps(root, now - horizon, now + timedelta(days=1))
    state_path = paths.root / STATE_FILE
    state = read_json(state_path) or {}
    reported: dict[str, str] = dict(state.get("reported") or {})
    estimated: dict[str, str] = dict(state.get("estimated") or {})
    outcomes: list[QualityOutcome] = []
    for day in due_days(labels, reported):
        started = datetime.now(UTC)
        outcomes.extend(run_deployment_quality(name, day, day + timedelta(days=1), store=store, progress=progress,
                                               trigger=trigger))
        reported[day.date().isoformat()] = started.isoformat()
    if estimates and not labels.empty and (config.task or "classification") == "classification":
        fs, base = resolve_root(root)
        labelled_days = set(pd.to_datetime(labels["_timestamp"], utc=True).dt.date)
        first_label = pd.to_datetime(labels["_timestamp"], utc=True).min().date()
        for day in estimate_days([d for d, _ in list_partitions(fs, base)], labelled_days, estimated, now,
                                 (now - horizon).date()):
            end = day + timedelta(days=1)
            # Something to estimate with: probabilities in the capture, labels before the day to calibrate on.
            if day.date() <= first_label or not probability_columns(window_columns(root, day, end)):
                continue
            outcomes.extend(run_deployment_quality(name, day, end, store=store, progress=progress, trigger=trigger,
                                                   estimate_only=True))
            # `now` (the run's start, before the capture was read): an estimate of a day counts as
            # its last only when it read the capture after the day (and its late flushes) ended.
            estimated[day.date().isoformat()] = now.isoformat()
    if outcomes or reported != state.get("reported") or estimated != (state.get("estimated") or {}):
        cutoff = (now - horizon).date().isoformat()
        write_json_atomic(state_path, {"reported": {d: t for d, t in reported.items() if d >= cutoff},
                                       "estimated": {d: t for d, t in estimated.items() if d >= cutoff}})
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
