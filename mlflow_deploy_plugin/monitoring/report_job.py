"""The drift job: one window of captured traffic vs the reference data -> an MLflow run + version tags.

Steps (each announced through ``progress``): select the captured rows to judge, compute exact
verdicts on all of them (:func:`.drift_stats.compute_drift`), render the Evidently HTML from a
sample (:func:`.evidently_report.render_evidently_report`), log the run and tag the model version.

The run (experiment ``drift/<deployment>`` by default) holds:

* params ``deployment, model_name, model_version, window_start, window_end, rows_current,
  rows_reference, reference_source, methods`` (+ ``alpha, drift_share_threshold, min_rows,
  evidently_sample_rows``);
* metrics ``drift_share``, ``drifted_columns``, ``dataset_drifted`` (0/1), ``rows_current``,
  ``rows_reference``; per judged column ``drift_score.<column>`` (its test's p-value),
  ``drift_effect.<column>`` (its effect size), ``missing_rate.<column>`` (share of current rows
  without a value) and ``drifted.<column>`` (0/1); ``prediction_drift_score`` (one output) or
  ``prediction_drift_score.<output>`` and ``prediction_drift_effect[.<output>]`` (several outputs,
  as capture names them ``_prediction_<output>``) when prediction drift was checked; all stamped
  with the window end so charts over runs follow the data's time;
* data quality (:mod:`.data_quality`): per compared column ``data_quality.missing.<column>``,
  ``data_quality.out_of_range.<column>`` (numeric) or ``data_quality.new_categories.<column>``
  (categorical), and ``data_quality.columns_with_issues``; the tag ``data_quality.status`` (``ok`` or
  ``issues``, with ``data_quality.issues`` saying which), the ``data_quality`` section of the JSON
  summary and a per-column table at the top of the HTML;
* artifacts ``drift_report.html`` (Evidently) and ``drift_summary.json``;
* tags ``drift.status``; ``drift.skipped`` when part of the report could not be done (e.g. prediction
  drift, when the model's predictions on the reference data failed), saying what and why (also the
  ``skipped`` list of the JSON summary and the job's progress); if it failed, ``drift.error``.

``insufficient_data`` means no verdict: fewer usable rows than ``min_rows``, or no column could be
tested (e.g. all compared inputs null); such runs carry only row counts and the JSON summary.

The model version gets ``drift.status`` (``ok``, ``drifted``, ``insufficient_data``), ``drift.share``
(removed when there was no verdict, so a stale share never survives), ``drift.report_run_id`` and
``drift.checked_at`` (ISO 8601 UTC). A failing job ends its run FAILED and leaves the version tags
untouched: an error is not a verdict.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from mlflow_deploy_plugin.capture.columns import ParquetColumns, release_unused_memory

from .data_quality import ColumnQuality, DataQualityResult, Limits, check_column, insert_into_page
from .data_quality import html_table as data_quality_table
from .data_quality import metrics as data_quality_metrics
from .drift_methods import ColumnMethod, Floors, methods_to_spec, parse_floors, parse_methods
from .drift_stats import ColumnKind, DriftResult, Frame, compute_drift
from .evidently_report import DEFAULT_SAMPLE_ROWS, render_evidently_report, render_fallback_html

_log = logging.getLogger(__name__)

# Mirrors capture.layout.META_COLUMNS / PREDICTION_PREFIX (the capture layout shared with serving).
META_COLUMNS: tuple[str, ...] = (
    "_request_id", "_timestamp", "_deployment", "_model_version", "_status", "_latency_ms", "_row", "_role",
    "_model_name",
)
PREDICTION_PREFIX = "_prediction"
HTML_ARTIFACT = "drift_report.html"
SUMMARY_ARTIFACT = "drift_summary.json"

DriftStatus = Literal["ok", "drifted", "insufficient_data"]


@dataclass(frozen=True)
class DriftSettings:
    """How a deployment's drift is judged.

    ``methods`` accepts whatever :func:`.drift_methods.parse_methods` does (spec string such as
    ``"age=ks:0.01,city=psi:0.2"``, a YAML/JSON file path, or a mapping) and is stored parsed.
    ``min_rows`` defaults to 200: below that the tests have little power (KS at n=200 only detects
    ECDF gaps above ~0.1; a chi-square cell needs a category share of >= 2.5 % to expect 5 rows), so
    a verdict would be mostly noise: the job reports ``insufficient_data`` instead of a false alarm
    or a false all-clear. ``evidently_sample_rows`` bounds what Evidently sees (20k rows keep it at a
    few seconds and ~200 MB; its cost is linear in rows). ``floors`` are the global floors
    (:func:`.drift_methods.parse_floors`: effect size of numeric/categorical columns, missing-rate
    change), stored parsed.
    """

    min_rows: int = 200
    methods: Mapping[str, ColumnMethod | str] | str = field(default_factory=dict)
    num_method: str = "ks"
    cat_method: str = "chi2"
    alpha: float = 0.05
    drift_share_threshold: float = 0.5
    evidently_sample_rows: int = DEFAULT_SAMPLE_ROWS
    seed: int = 0
    floors: Floors | str | float | None = None

    def __post_init__(self) -> None:
        if self.min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {self.min_rows!r}.")
        if self.evidently_sample_rows < 1:
            raise ValueError(f"evidently_sample_rows must be >= 1, got {self.evidently_sample_rows!r}.")
        # Validate eagerly so a bad -C value fails at configuration time, not in a scheduled job.
        methods = self.methods if isinstance(self.methods, str) else dict(self.methods)
        object.__setattr__(self, "methods", parse_methods(methods))
        parse_methods({"<numeric default>": self.num_method, "<categorical default>": self.cat_method})
        object.__setattr__(self, "floors", parse_floors(self.floors))

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> DriftSettings:
        """Settings from a deployment config (``drift_min_rows``, ``drift_methods``,
        ``drift_effect_floor``; absent keys keep their defaults) with keyword overrides."""
        values: dict[str, Any] = {}
        if getattr(config, "drift_min_rows", None) is not None:
            values["min_rows"] = int(config.drift_min_rows)
        if getattr(config, "drift_methods", None):
            values["methods"] = config.drift_methods  # spec string, YAML/JSON path or mapping
        if getattr(config, "drift_effect_floor", None):
            values["floors"] = config.drift_effect_floor
        values.update(overrides)
        return cls(**values)

    @property
    def column_methods(self) -> Mapping[str, ColumnMethod]:
        """``methods`` as stored: ``__post_init__`` replaces whatever form was given by its parsed form."""
        return cast("Mapping[str, ColumnMethod]", self.methods)

    @property
    def resolved_floors(self) -> Floors:
        """``floors`` as stored: ``__post_init__`` replaces whatever form was given by its parsed form."""
        return cast(Floors, self.floors)

    def methods_description(self) -> str:
        """Compact text of the methods in force, e.g.
        ``num=ks,cat=chi2,alpha=0.05,floors=numeric=0.1,categorical=0.1,missing=0.05; age=psi:0.2``."""
        text = f"num={self.num_method},cat={self.cat_method},alpha={self.alpha:g},floors={self.resolved_floors}"
        if self.column_methods:
            text += "; " + methods_to_spec(self.column_methods)
        return text


@dataclass
class DriftOutcome:
    """What one drift job found and where it logged it."""

    status: DriftStatus
    run_id: str
    experiment_id: str
    rows_current: int
    rows_reference: int
    checked_at: datetime
    result: DriftResult | None
    prediction_drift: DriftResult | None
    summary: dict[str, Any]


def _iso(moment: datetime) -> str:
    return _utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


_BAD_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_.\- ]")


def metric_names(columns: list[str], prefix: str = "drift_score.") -> dict[str, str]:
    """Column -> metric name made of MLflow-safe characters (others become ``_``), unique."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for column in columns:
        base = (prefix + _BAD_METRIC_CHARS.sub("_", column))[:240].rstrip() or prefix.rstrip(".")
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names[column] = name
    return names


# Who asked for a report: "scheduled" (the deployment's schedule), "manual" (a person; never counts
# towards a policy's drift streak) or "manual-for-policy" (a person who wants it to count).
TRIGGER_TAG = "drift.trigger"
TRIGGERS = ("scheduled", "manual", "manual-for-policy")

# MLflow 3's UI files an experiment without this tag under GenAI "Evaluation runs"; drift reports
# belong with model training (runs, metric charts, artifacts).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _ensure_experiment(client: mlflow.MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind someone chose is theirs to keep
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException as exc:  # created concurrently by another job
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise exc from None
        return experiment.experiment_id


def select_current(captured: Frame, model_version: str, window_start: datetime | None = None,
                   window_end: datetime | None = None) -> tuple[Frame, dict[str, int]]:
    """Captured rows to judge: ``_status == 200``, served by ``model_version``, inside the window.

    ``captured`` is a DataFrame or a :class:`~mlflow_deploy_plugin.capture.columns.ParquetColumns`
    (only the three columns tested are read; the rows are kept as a mask). Returns the rows and
    counts of what was excluded and why.
    """
    counts = {"captured": len(captured)}
    keep = np.ones(len(captured), dtype=bool)
    if "_status" in captured.columns:
        ok = (pd.to_numeric(captured["_status"], errors="coerce") == 200).to_numpy()
        counts["excluded_status"] = int((keep & ~ok).sum())
        keep &= ok
    if "_model_version" in captured.columns:
        same = _text_equals(captured["_model_version"], str(model_version))
        counts["excluded_other_versions"] = int((keep & ~same).sum())
        keep &= same
    if "_timestamp" in captured.columns and (window_start is not None or window_end is not None):
        stamps = pd.to_datetime(captured["_timestamp"], utc=True)
        inside = np.ones(len(captured), dtype=bool)
        if window_start is not None:
            inside &= (stamps >= pd.Timestamp(_utc(window_start))).to_numpy()
        if window_end is not None:
            inside &= (stamps < pd.Timestamp(_utc(window_end))).to_numpy()
        counts["excluded_outside_window"] = int((keep & ~inside).sum())
        keep &= inside
    # No copy when every row qualifies (1M rows x 25 columns is ~200 MB); columns are not selected
    # here for the same reason: compute_drift only reads the reference's columns from it.
    current = captured if keep.all() else captured[keep]
    counts["current"] = len(current)
    return current, counts


#: From this many rows (both sides), Evidently is imported on a thread while the statistics run.
PRELOAD_EVIDENTLY_MIN_ROWS = 2_000_000


def _import_evidently_in_background() -> None:
    """Start importing Evidently (~5 s, nearly all of it Python) beside the statistics of a large
    window, whose sorts and searches release the GIL, rather than after them: the report is that
    much sooner. A failed import is left for the rendering step to meet and report."""
    def load() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module("evidently.presets")

    threading.Thread(target=load, name="import-evidently", daemon=True).start()


def _text_equals(series: pd.Series, value: str) -> np.ndarray:
    """``series.astype(str) == value`` as a bool array; a categorical (a column read from disk) is
    compared through its categories, not by turning millions of codes into strings."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        # A missing value's text: None in an object column reads as "None".
        matches = np.append(series.cat.categories.astype(str) == value, value == "None")
        return matches[series.cat.codes.to_numpy()]  # code -1 (missing) picks the last entry
    return (series.astype(str) == value).to_numpy()


def judge_window(reference: Frame, current: Frame, settings: DriftSettings,
                 reference_predictions: pd.Series | pd.DataFrame | None = None,
                 reference_predictions_skipped: str | None = None,
                 ) -> tuple[DriftResult, DriftResult | None, dict[str, Any], DataQualityResult]:
    """The exact figures of one window: drift per column, prediction drift and data quality.

    ``reference`` and ``current`` are DataFrames, or tables read from disk one column at a time
    (:class:`~mlflow_deploy_plugin.capture.columns.ParquetColumns`, whatever their size): the figures
    are the same either way. Data quality is checked on each column while the drift statistics hold
    it, so a column is read (and, for numbers, sorted) once.

    Returns ``(drift, prediction drift or None, prediction drift summary, data quality)``.
    """
    limits = Limits()
    rows = len(current)
    quality: dict[str, ColumnQuality] = {}

    def check(name: str, ref: pd.Series, cur: pd.Series | None, kind: ColumnKind | None) -> None:
        quality[name] = check_column(name, ref, cur, rows, limits, kind=kind)

    result = compute_drift(  # reads the reference's columns of `current`, no copy
        reference, current, methods=settings.column_methods,
        num_method=settings.num_method, cat_method=settings.cat_method, alpha=settings.alpha,
        drift_share_threshold=settings.drift_share_threshold, floors=settings.resolved_floors,
        ignore_columns=[c for c in current.columns if c in META_COLUMNS or str(c).startswith(PREDICTION_PREFIX)],
        on_column=check,
    )
    data_quality = DataQualityResult(tuple(quality[str(name)] for name in reference.columns), limits, rows,
                                     len(reference))
    prediction, prediction_summary = _prediction_drift(current, reference_predictions, settings,
                                                       reference_predictions_skipped)
    return result, prediction, prediction_summary, data_quality


def _prediction_drift(current: Frame, reference_predictions: pd.Series | pd.DataFrame | None,
                      settings: DriftSettings, why_missing: str | None = None,
                      ) -> tuple[DriftResult | None, dict[str, Any]]:
    """Drift of the model's outputs: the captured ``_prediction`` (one output) or
    ``_prediction_<output>`` columns (several: named columns, or ``_prediction_0``, ``_prediction_1``...
    for a 2-D array, as :func:`mlflow_deploy_plugin.capture.prediction_columns` writes them) against
    the model's predictions on the reference data, judged like inputs. An output the capture lacks
    while others are there is drifted (the model's output changed shape)."""
    if reference_predictions is None:
        return None, {"skipped": why_missing or "no reference predictions given (the model's predictions on "
                                                "the reference data are needed to compare outputs)"}
    if isinstance(reference_predictions, pd.Series):
        pairs = {"prediction": (PREDICTION_PREFIX, reference_predictions)}
    else:
        pairs = {str(col): (f"{PREDICTION_PREFIX}_{col}", reference_predictions[col])
                 for col in reference_predictions.columns}
    if not any(cap in current.columns for cap, _ in pairs.values()):
        captured = [c for c in current.columns if str(c).startswith(PREDICTION_PREFIX)]
        return None, {"skipped": f"captured rows have no {[cap for cap, _ in pairs.values()]} column(s) to "
                                 f"compare (captured outputs: {captured})"}
    ref = pd.DataFrame({name: series.reset_index(drop=True) for name, (_, series) in pairs.items()})
    cur = pd.DataFrame({name: current[cap].reset_index(drop=True) for name, (cap, _) in pairs.items()
                        if cap in current.columns}, index=pd.RangeIndex(len(current)))
    result = compute_drift(ref, cur, num_method=settings.num_method, cat_method=settings.cat_method,
                           alpha=settings.alpha, drift_share_threshold=settings.drift_share_threshold,
                           floors=settings.resolved_floors)
    return result, {**result.to_dict(), "captured_columns": {name: cap for name, (cap, _) in pairs.items()}}


def _column_metrics(result: DriftResult, score: str, effect: str, *, missing: str | None = None,
                    drifted: str | None = None, single: str | None = None) -> dict[str, float]:
    """Per-column figures as metrics: ``<prefix>.<column>`` with MLflow-safe names (one column named
    ``single`` drops the suffix: ``prediction_drift_score``)."""
    judged = [c for c in result.columns if c.skipped_reason is None]
    metrics: dict[str, float] = {}
    prefixes = [(score, "score"), (effect, "effect_size"), (missing, "missing_rate_cur"), (drifted, "drifted")]
    for prefix, attr in prefixes:
        if prefix is None:
            continue
        names = metric_names([c.name for c in judged], prefix=f"{prefix}.")
        for col in judged:
            value = getattr(col, attr)
            if value is not None:
                metrics[prefix if col.name == single else names[col.name]] = float(value)
    return metrics


def run_drift_report(
    *,
    deployment: str,
    model_name: str,
    model_version: str,
    captured: Frame,
    reference: Frame,
    reference_source: str,
    window_start: datetime,
    window_end: datetime,
    settings: DriftSettings | None = None,
    client: mlflow.MlflowClient | None = None,
    experiment_name: str | None = None,
    progress: Callable[[str], None] | None = None,
    reference_predictions: pd.Series | pd.DataFrame | None = None,
    reference_predictions_skipped: str | None = None,
    skipped: Sequence[str] = (),
    trigger: str = "manual",
) -> DriftOutcome:
    """Judge one window of captured traffic against the reference data and log the result.

    Args:
        deployment: Deployment name (names the default experiment ``drift/<deployment>``).
        model_name: Registered model name; its version ``model_version`` is tagged.
        model_version: The served version; captured rows of other versions are ignored.
        captured: Capture table read back from Parquet (meta columns, inputs, ``_prediction*``): a
            DataFrame, or the window as :func:`mlflow_deploy_plugin.capture.open_capture` opens it
            (read one column at a time: any size fits in one column's memory).
        reference: Reference features (see :func:`.reference.resolve_reference_data`), a DataFrame
            or a table read one column at a time; its columns are the ones compared.
        reference_source: Where the reference came from (logged as a param).
        window_start: Start of the captured window (inclusive; naive means UTC).
        window_end: End of the window (exclusive).
        settings: Methods, thresholds, minimum rows, Evidently sample size.
        client: Tracking/registry client (default: ``MlflowClient()``).
        experiment_name: Experiment of the run (created if missing).
        progress: Called with a short message at each step.
        reference_predictions: The model's predictions on ``reference`` (Series for ``_prediction``,
            DataFrame for ``_prediction_<col>``); without them prediction drift is skipped.
        reference_predictions_skipped: Why ``reference_predictions`` is None (reported as the reason
            prediction drift was skipped).
        skipped: What the caller could not do before the job (e.g. select the model's input columns
            of the reference), one "what: why" each; reported with the job's own skips.

    Raises:
        Whatever failed; the run is then ended FAILED with a ``drift.error`` tag.
    """
    settings = settings or DriftSettings()
    client = client or mlflow.MlflowClient()
    say = progress or (lambda _msg: None)
    model_version = str(model_version)
    checked_at = datetime.now(UTC)
    window = {"start": _iso(window_start), "end": _iso(window_end)}
    skipped_notes = list(skipped)

    say(f"reading {len(captured):,} captured rows of deployment {deployment!r}")
    current, row_counts = select_current(captured, model_version, window_start, window_end)
    feature_columns = [c for c in reference.columns if c in current.columns]
    rows_current, rows_reference = len(current), len(reference)

    experiment_id = _ensure_experiment(client, experiment_name or f"drift/{deployment}")
    run_name = f"drift-{deployment}-v{model_version}-{_utc(window_end):%Y%m%dT%H%M%SZ}"
    run = client.create_run(experiment_id, run_name=run_name, tags={
        "drift.deployment": deployment, "drift.model_name": model_name, "drift.model_version": model_version,
        TRIGGER_TAG: trigger,
    })
    run_id = run.info.run_id
    try:
        params = {
            "deployment": deployment, "model_name": model_name, "model_version": model_version,
            "window_start": window["start"], "window_end": window["end"],
            "rows_current": str(rows_current), "rows_reference": str(rows_reference),
            "reference_source": reference_source, "methods": settings.methods_description(),
            "alpha": f"{settings.alpha:g}", "drift_share_threshold": f"{settings.drift_share_threshold:g}",
            "min_rows": str(settings.min_rows), "evidently_sample_rows": str(settings.evidently_sample_rows),
        }
        client.log_batch(run_id, params=[Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()])
        stamp = int(_utc(window_end).timestamp() * 1000)
        summary: dict[str, Any] = {
            "deployment": deployment, "model_name": model_name, "model_version": model_version,
            "window": window, "checked_at": _iso(checked_at), "reference_source": reference_source,
            "rows": {**row_counts, "reference": rows_reference, "compared_columns": len(feature_columns)},
            "settings": {"min_rows": settings.min_rows, "alpha": settings.alpha,
                         "drift_share_threshold": settings.drift_share_threshold,
                         "num_method": settings.num_method, "cat_method": settings.cat_method,
                         "methods": {c: str(m) for c, m in settings.column_methods.items()},
                         "floors": {"numeric": settings.resolved_floors.numeric,
                                    "categorical": settings.resolved_floors.categorical,
                                    "missing": settings.resolved_floors.missing},
                         "evidently_sample_rows": settings.evidently_sample_rows},
        }

        result: DriftResult | None = None
        prediction: DriftResult | None = None
        data_quality: DataQualityResult | None = None
        with tempfile.TemporaryDirectory(prefix="mlflow-deploy-drift-") as tmp:
            if rows_current < settings.min_rows:
                status: DriftStatus = "insufficient_data"
                say(f"only {rows_current:,} usable rows (< min_rows={settings.min_rows}): no verdict")
                summary.update(status=status, reason=f"{rows_current} rows < min_rows {settings.min_rows}")
                metrics: dict[str, float] = {"rows_current": rows_current, "rows_reference": rows_reference}
                if reference_predictions_skipped:
                    skipped_notes.append(f"prediction drift: {reference_predictions_skipped}")
            else:
                if not feature_columns:
                    raise ValueError(
                        f"the captured rows have none of the reference columns "
                        f"{[str(c) for c in reference.columns][:20]}; captured columns: "
                        f"{[str(c) for c in current.columns if c not in META_COLUMNS][:20]}")
                say(f"computing drift on {rows_current:,} current x {rows_reference:,} reference rows, "
                    f"{len(feature_columns)} columns")
                started = time.perf_counter()
                if rows_current + rows_reference >= PRELOAD_EVIDENTLY_MIN_ROWS:
                    _import_evidently_in_background()
                for side, seed in ((current, settings.seed + 1), (reference, settings.seed)):
                    if isinstance(side, ParquetColumns):  # the Evidently sample is kept as columns stream by
                        side.keep_sample(settings.evidently_sample_rows, seed)
                        side.numbers_as_float64()  # the statistics' own conversion: one array per side
                release_unused_memory()  # what selecting the rows freed, before the largest step
                result, prediction, prediction_summary, data_quality = judge_window(
                    reference, current, settings, reference_predictions, reference_predictions_skipped)
                compute_s = time.perf_counter() - started
                if prediction is None:
                    skipped_notes.append(f"prediction drift: {prediction_summary['skipped']}")
                status = "drifted" if result.dataset_drifted else "ok"
                if result.n_tested == 0:  # e.g. every compared input is null on both sides
                    status = "insufficient_data"
                    summary["reason"] = "no column could be tested: " + "; ".join(
                        f"{c.name}: {c.skipped_reason}" for c in result.columns)[:2000]
                summary.update(status=status, dataset={
                    "drift_share": result.drift_share, "n_drifted": result.n_drifted,
                    "n_tested": result.n_tested, "dataset_drifted": result.dataset_drifted,
                    "drifted_columns": result.drifted_columns,
                    "missing_in_current": result.missing_in_current,
                    "new_in_current": result.new_in_current,
                    "rows_compared": {"reference": rows_reference, "current": rows_current},
                    "compute_seconds": round(compute_s, 3),
                }, columns=result.to_dict()["columns"], prediction_drift=prediction_summary)

                html_path = Path(tmp) / HTML_ARTIFACT
                if result.n_tested == 0:
                    render_fallback_html(result, html_path, "no column could be tested")
                    evidently_info: dict[str, Any] = {"skipped": "no column could be tested"}
                else:
                    release_unused_memory()  # the last column's pages, before Evidently's own peak
                    rows_seen = min(settings.evidently_sample_rows, max(rows_current, rows_reference))
                    say(f"rendering the Evidently report from up to {rows_seen:,} rows per dataset")
                    try:
                        evidently_info = render_evidently_report(
                            reference, current, result, str(html_path),
                            sample_rows=settings.evidently_sample_rows, seed=settings.seed)
                    except Exception as exc:
                        # The verdicts are exact and independent of Evidently: keep them, say what broke.
                        _log.exception("Evidently failed to render the drift report")
                        error = f"{type(exc).__name__}: {exc}"
                        render_fallback_html(result, html_path, f"Evidently failed to render: {error}")
                        evidently_info = {"error": error[:2000]}
                        client.set_tag(run_id, "drift.report_error", error[:MAX_TAG_VAL_LENGTH])
                summary["evidently"] = evidently_info
                insert_into_page(str(html_path), data_quality_table(data_quality))
                summary["data_quality"] = data_quality.to_dict()
                metrics = {"rows_current": rows_current, "rows_reference": rows_reference,
                           **data_quality_metrics(data_quality, metric_names(
                               [c.name for c in data_quality.columns], prefix=""))}
                if result.n_tested:  # no verdict, no drift figures (a 0 share would read as "no drift")
                    metrics.update({
                        "drift_share": result.drift_share, "drifted_columns": result.n_drifted,
                        "dataset_drifted": int(result.dataset_drifted),
                        **_column_metrics(result, "drift_score", "drift_effect", missing="missing_rate",
                                          drifted="drifted"),
                    })
                if prediction is not None:
                    metrics.update(_column_metrics(prediction, "prediction_drift_score", "prediction_drift_effect",
                                                   drifted="prediction_drifted", single="prediction"))

            for note in skipped_notes:
                say(f"skipped {note}")
            summary["skipped"] = skipped_notes
            say("logging the drift report to MLflow")
            entries = [Metric(k, float(v), stamp, 0) for k, v in metrics.items()]
            for i in range(0, len(entries), MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=entries[i:i + MAX_METRICS_PER_BATCH])
            summary_path = Path(tmp) / SUMMARY_ARTIFACT
            summary_path.write_text(json.dumps(summary, indent=2, default=str, allow_nan=False))
            client.log_artifact(run_id, str(summary_path))
            if result is not None:
                client.log_artifact(run_id, str(Path(tmp) / HTML_ARTIFACT))

        if skipped_notes:
            client.set_tag(run_id, "drift.skipped", "; ".join(skipped_notes)[:MAX_TAG_VAL_LENGTH])
        client.set_tag(run_id, "drift.status", status)
        if data_quality is not None:
            client.set_tag(run_id, "data_quality.status", data_quality.status)
            if data_quality.issues:
                client.set_tag(run_id, "data_quality.issues",
                               "; ".join(data_quality.issue_lines())[:MAX_TAG_VAL_LENGTH])
        share = result.drift_share if result is not None and status != "insufficient_data" else None
        _tag_version(client, model_name, model_version, status, share, run_id, checked_at)
        client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        try:
            client.set_tag(run_id, "drift.error", f"{type(exc).__name__}: {exc}"[:MAX_TAG_VAL_LENGTH])
            client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        except Exception:  # never hide the original error behind a logging failure
            _log.exception("Could not mark drift run %s as failed", run_id)
        raise
    say(f"done: {status} (run {run_id})")
    return DriftOutcome(status=status, run_id=run_id, experiment_id=experiment_id, rows_current=rows_current,
                        rows_reference=rows_reference, checked_at=checked_at, result=result,
                        prediction_drift=prediction, summary=summary)


def _tag_version(client: mlflow.MlflowClient, model_name: str, model_version: str, status: DriftStatus,
                 share: float | None, run_id: str, checked_at: datetime) -> None:
    client.set_model_version_tag(model_name, model_version, "drift.status", status)
    if share is not None:
        client.set_model_version_tag(model_name, model_version, "drift.share", f"{share:.4f}")
    else:
        # No verdict: a share from an earlier check must not pass for this one.
        with contextlib.suppress(MlflowException):
            client.delete_model_version_tag(model_name, model_version, "drift.share")
    client.set_model_version_tag(model_name, model_version, "drift.report_run_id", run_id)
    client.set_model_version_tag(model_name, model_version, "drift.checked_at", _iso(checked_at))
