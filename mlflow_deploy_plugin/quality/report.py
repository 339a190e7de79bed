"""The quality job: a window of captured predictions joined to their labels -> per version, MLflow runs + tags.

Shaped like the drift job (:mod:`mlflow_deploy_plugin.monitoring.report_job`) and logged to the same
experiment (``-C drift_experiment``, default ``drift/<deployment>``). For each version that answered
in the window (by *prediction* time) one run ``quality-<deployment>-v<version>-<window end>`` holds:

* params ``deployment, model_name, task, window_start, window_end, min_labelled_rows`` (the version
  is the tag ``quality.model_version``: a ``model_version`` param would enter the drift policy's
  streak, which reads this experiment's runs by that param);
* metrics ``rows_answered``, ``rows_labelled``, ``label_coverage`` (labelled / answered) and, with
  at least ``min_labelled_rows`` labelled rows, one metric per figure of :mod:`.metrics` with its
  interval (``accuracy``, ``accuracy.ci_low``, ``accuracy.ci_high``, ``f1.<class>``...) and the
  version's training figure of the same meaning when its run logged one (``training.accuracy``);
  all stamped with the window end;
* artifacts ``quality_report.html`` (Evidently's classification/regression page under our figure
  table) and ``quality_summary.json``;
* tags ``quality.status`` (``ok`` or ``not_enough_labels``), ``quality.deployment``,
  ``quality.model_version``, ``quality.trigger``; when the same window was reported before (late
  labels came in), ``quality.rerun=true`` and ``quality.previous_run_id``.

Quality before the labels arrive (:mod:`.cbpe`): for a version whose captured answers hold class
probabilities, CBPE is calibrated on the version's *labelled captured rows of the* ``label_horizon``
*before the window* (never the window's own labels, so once they arrive the realised figure checks the
estimate out of sample) and the run gets ``estimated_accuracy`` (``.ci_low``, ``.ci_high``),
``estimated_roc_auc`` and ``cbpe.calibration_rows`` beside the realised ``accuracy``, and the tag
``quality.cbpe`` ("estimated accuracy 0.87 (realised 0.85, n = 4,210; ...)" or "... (no labels yet)").
When it cannot be calibrated (no earlier labels, too few, one class only) the tag says why instead.
A window without labels yet that the schedule reports for the estimate only (:mod:`.due`) is tagged
``quality.estimate_only=true``; estimated again while it lasts, it keeps its one run (metrics
stamped with the time of the estimate, so the newest is the run's latest value), and it sets the
version's ``quality.estimated_*`` tags and the ``quality_estimate`` verdicts, never the measured ones.
The version's reference data is not used: it holds the model's inputs without target or
probabilities (:mod:`mlflow_deploy_plugin.monitoring.reference` drops non-input columns).

Besides, every figure is appended to the version's *series* run (``quality-<deployment>-v<version>``,
one per version, tag ``quality.series``) at step = the window end in epoch minutes, so the MLflow
UI charts each version's quality over time as one line.

The model version is tagged with its latest window's figures (``quality.status``, ``quality.<figure>``,
``quality.summary`` such as "training accuracy 0.958 → production 0.81 (n = 4,210, 95% CI
0.80–0.82)", ``quality.report_run_id``, ``quality.window_end``); a re-run of an older window never
overwrites a newer one's tags. Below ``min_labelled_rows`` a version gets ``not_enough_labels``:
counts, no figures, no verdict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from mlflow_deploy_plugin.capture import capture_root
from mlflow_deploy_plugin.capture.layout import as_utc
from mlflow_deploy_plugin.quality.cbpe import CBPE, CalibrationError, Estimate
from mlflow_deploy_plugin.quality.join import (
    Labelled,
    answered_probabilities,
    join_labels,
    join_window,
    probability_columns,
    window_columns,
)
from mlflow_deploy_plugin.quality.labels import task_from_signature
from mlflow_deploy_plugin.quality.metrics import Figure, quality_figures
from mlflow_deploy_plugin.quality.page import figures_table, render_quality_html
from mlflow_deploy_plugin.spec import duration_s
from mlflow_deploy_plugin.state import StateStore

_log = logging.getLogger(__name__)

QualityStatus = Literal["ok", "not_enough_labels"]
#: The tag of a run made for CBPE's estimate only: a window whose labels have not come yet (quality/due.py).
ESTIMATE_ONLY_TAG = "quality.estimate_only"
HTML_ARTIFACT = "quality_report.html"
SUMMARY_ARTIFACT = "quality_summary.json"
#: The figures a version is tagged with, per task (the first is the headline of quality.summary).
HEADLINE = {"classification": ("accuracy", "f1_macro", "roc_auc", "log_loss"),
            "regression": ("mae", "rmse", "r2", "mape")}
# What a training run may call each figure (mlflow.evaluate and autolog names included), most
# held-out first: a validation/test figure is the fair comparison, a training one the last resort.
_TRAINING_NAMES = {
    "accuracy": ("accuracy_score",), "f1_macro": ("f1_macro", "f1_score_macro"), "roc_auc": ("roc_auc_score",),
    "log_loss": ("log_loss",), "precision_macro": ("precision_macro",), "recall_macro": ("recall_macro",),
    "mae": ("mean_absolute_error",), "rmse": ("root_mean_squared_error",), "r2": ("r2_score",),
    "mape": ("mean_absolute_percentage_error",),
}
_SPLITS = ("val_", "validation_", "test_", "eval_", "holdout_", "", "training_", "train_")
#: At most this many of a version's latest labelled rows calibrate CBPE (isotonic maps gain little
#: past it, and the fit stays well under a second).
CBPE_MAX_CALIBRATION_ROWS = 200_000


@dataclass
class Estimated:
    """CBPE's estimates of one version's window (:mod:`.cbpe`), or why there are none (``skipped``)."""

    estimates: dict[str, Estimate] = field(default_factory=dict)
    calibration_rows: int = 0
    source: str = ""
    skipped: str = ""


@dataclass
class QualityOutcome:
    """What one version's report found and where it logged it."""

    model_version: str
    status: QualityStatus
    run_id: str
    rows_answered: int
    rows_labelled: int
    figures: dict[str, Figure] = field(default_factory=dict)
    training: dict[str, tuple[str, float]] = field(default_factory=dict)
    summary: str = ""
    rerun_of: str | None = None
    estimated: Estimated | None = None

    def estimate_text(self) -> str:
        """CBPE's line: "estimated accuracy 0.87 (realised 0.85, n = 4,210; ...)", "... (no labels yet)",
        or why there is no estimate; empty when the capture holds no probabilities."""
        est = self.estimated
        if est is None:
            return ""
        accuracy = est.estimates.get("estimated_accuracy")
        if est.skipped or accuracy is None:
            return f"no accuracy estimate: {est.skipped or 'no answered rows with probabilities'}"
        realised = self.figures.get("accuracy")
        if realised is not None:
            against = f"realised {realised.value:.3f}, n = {realised.n:,}"
        elif self.rows_labelled == 0:
            against = "no labels yet"
        else:
            against = f"not enough labels yet, n = {self.rows_labelled:,}"
        text = (f"estimated accuracy {accuracy.value:.3f} ({against}; 95% CI {accuracy.low:.3f}–{accuracy.high:.3f} "
                f"over {accuracy.n:,} answered rows, calibrated on {est.calibration_rows:,} labelled rows {est.source})")
        auc = est.estimates.get("estimated_roc_auc")
        if auc is not None:
            real_auc = self.figures.get("roc_auc")
            text += f"; estimated ROC AUC {auc.value:.3f}" + (f" (realised {real_auc.value:.3f})" if real_auc else "")
        return text

    @property
    def coverage(self) -> float:
        return self.rows_labelled / self.rows_answered if self.rows_answered else 0.0

    def line(self) -> str:
        """One line for people (the CLI's output)."""
        text = (f"v{self.model_version}: quality.status={self.status} labelled={self.rows_labelled} "
                f"answered={self.rows_answered} coverage={self.coverage:.3f}")
        if self.summary:
            text += f" | {self.summary}"
        if self.estimated is not None:
            text += f" | {self.estimate_text()}"
        if self.rerun_of:
            text += f" | re-run of {self.rerun_of}"
        return f"{text} (run {self.run_id})"


def _iso(moment: datetime) -> str:
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def infer_task(configured: str | None, signature: Any, predictions: pd.Series | None) -> str:
    """``-C task`` if set, else the signature's output type, else the captured predictions: integral
    or text -> classification, other numbers -> regression."""
    if configured:
        return configured
    from_signature = task_from_signature(signature)
    if from_signature:
        return from_signature
    if predictions is not None and len(predictions):
        values = pd.to_numeric(predictions.dropna(), errors="coerce")
        if values.notna().all() and not np.all(np.mod(values.to_numpy(dtype=float), 1) == 0):
            return "regression"
    return "classification"


def deployment_task(spec: Any, paths: Any, predictions: pd.Series | None) -> str:
    """The task of a deployment's served model: ``-C task``, else its signature (the local copy's
    MLmodel), else what the captured ``predictions`` look like (:func:`infer_task`)."""
    if spec.config.task:
        return str(spec.config.task)
    signature = None
    with contextlib.suppress(Exception):
        from mlflow.models import Model

        local = paths.models / spec.model.model_name / spec.model.model_version / "MLmodel"
        signature = Model.load(str(local)).signature if local.exists() else None
    return infer_task(None, signature, predictions)


def training_figures(client: mlflow.MlflowClient, model_name: str, version: str) -> dict[str, tuple[str, float]]:
    """The version's own offline figures from its source run: ``{figure: (metric name, value)}``."""
    try:
        run_id = client.get_model_version(model_name, version).run_id
        if not run_id:
            return {}
        metrics = client.get_run(run_id).data.metrics
    except MlflowException:
        return {}
    found = {}
    for figure, aliases in _TRAINING_NAMES.items():
        for split in _SPLITS:
            name = next((f"{split}{n}" for n in (figure, *aliases) if f"{split}{n}" in metrics), None)
            if name is not None:
                found[figure] = (name, float(metrics[name]))
                break
    return found


def _ensure_experiment(client: mlflow.MlflowClient, name: str) -> str:
    from mlflow_deploy_plugin.monitoring.report_job import _ensure_experiment as ensure

    return ensure(client, name)


def _describe(fig: Figure, training: tuple[str, float] | None) -> str:
    before = f"{training[0].replace('_', ' ')} {training[1]:.3g} → " if training else ""
    return (f"{before}production {fig.name} {fig.value:.3g} (n = {fig.n:,}, 95% CI "
            f"{fig.low:.3g}–{fig.high:.3g})")


def _previous_run(client: mlflow.MlflowClient, experiment_id: str, deployment: str, version: str,
                  start: str, end: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=(f"tags.`quality.deployment` = '{deployment}' and tags.`quality.model_version` = '{version}' "
                       f"and params.window_start = '{start}' and params.window_end = '{end}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _series_run(client: mlflow.MlflowClient, experiment_id: str, deployment: str, model_name: str,
                version: str) -> str:
    key = f"{deployment}/v{version}"
    runs = client.search_runs([experiment_id], filter_string=f"tags.`quality.series` = '{key}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"quality-{deployment}-v{version}", tags={
        "quality.series": key, "quality.deployment": deployment, "quality.model_name": model_name,
        "quality.model_version": version})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _log_metrics(client: mlflow.MlflowClient, run_id: str, metrics: dict[str, float], stamp: int, step: int) -> None:
    entries = [Metric(k, float(v), stamp, step) for k, v in metrics.items() if np.isfinite(v)]
    for i in range(0, len(entries), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=entries[i:i + MAX_METRICS_PER_BATCH])


def report_version(
    *, deployment: str, model_name: str, labelled: Labelled, task: str, window_start: datetime,
    window_end: datetime, min_labelled_rows: int, client: mlflow.MlflowClient, experiment_id: str,
    trigger: str = "manual", progress: Callable[[str], None] | None = None, estimated: Estimated | None = None,
    estimate_only: bool = False,
) -> QualityOutcome:
    """Compute, log and tag one version's quality over one window (see the module docstring).

    ``estimated``: CBPE's estimates of the window (:func:`estimate_versions`), logged beside the
    realised figures; None when the capture holds no probabilities. ``estimate_only``: a window
    without labels yet, reported for the estimate (tag ``quality.estimate_only``): the version's
    measured ``quality.*`` tags are left alone, its ``quality.estimated_*`` tags are set instead.
    """
    say = progress or (lambda _m: None)
    version = labelled.version
    start, end = _iso(window_start), _iso(window_end)
    # No `model_version` param: the drift policy's streak searches this experiment by that param
    # (drift runs); the version is in the tag quality.model_version and the run name.
    params = {"deployment": deployment, "model_name": model_name, "task": task,
              "window_start": start, "window_end": end, "min_labelled_rows": str(min_labelled_rows)}
    params = {k: v[:MAX_PARAM_VAL_LENGTH] for k, v in params.items()}
    rerun_of = _previous_run(client, experiment_id, deployment, version, start, end)
    reused = None
    if estimate_only and rerun_of is not None:
        # A window without labels is estimated on every scheduled run while it lasts: one run per
        # window, updated (its latest metrics are the newest estimate), not a run per tick.
        previous = client.get_run(rerun_of)
        if previous.data.tags.get(ESTIMATE_ONLY_TAG) == "true" and previous.data.params == params:
            reused, rerun_of = rerun_of, None
            client.set_tag(reused, "quality.trigger", trigger)
    if reused is None:
        run_id = client.create_run(
            experiment_id, run_name=f"quality-{deployment}-v{version}-{as_utc(window_end):%Y%m%dT%H%M%SZ}",
            tags={"quality.deployment": deployment, "quality.model_name": model_name,
                  "quality.model_version": version, "quality.trigger": trigger,
                  **({ESTIMATE_ONLY_TAG: "true"} if estimate_only else {}),
                  **({"quality.rerun": "true", "quality.previous_run_id": rerun_of} if rerun_of else {})}).info.run_id
    else:
        run_id = reused
    try:
        if reused is None:
            client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        # An estimate is stamped with the time it was made (a newer one of the same window must
        # win as the run's latest value); a measured window with its end.
        stamp = int(time.time() * 1000) if estimate_only else int(as_utc(window_end).timestamp() * 1000)
        step = int(as_utc(window_end).timestamp() // 60)
        metrics: dict[str, float] = {"rows_answered": labelled.answered, "rows_labelled": labelled.n,
                                     "label_coverage": labelled.coverage}
        outcome = QualityOutcome(version, "not_enough_labels", run_id, labelled.answered, labelled.n, rerun_of=rerun_of,
                                 estimated=estimated)
        if estimated is not None:
            for est in estimated.estimates.values():
                metrics[est.name] = est.value
                if np.isfinite(est.low):
                    metrics[f"{est.name}.ci_low"] = est.low
                    metrics[f"{est.name}.ci_high"] = est.high
            if estimated.estimates:
                metrics["cbpe.calibration_rows"] = estimated.calibration_rows
        training = training_figures(client, model_name, version)
        if estimated is not None:  # the policy's max_drop compares an estimate with its training figure too
            for estimate_name in estimated.estimates:
                base = estimate_name.removeprefix("estimated_")
                if base in training:
                    metrics[f"training.{base}"] = training[base][1]
        if labelled.n >= min_labelled_rows:
            say(f"v{version}: computing {task} quality on {labelled.n:,} labelled rows")
            figures = quality_figures(task, labelled.prediction, labelled.label, labelled.probabilities)
            outcome.status = "ok"
            outcome.figures = {f.name: f for f in figures}
            outcome.training = {k: v for k, v in training.items() if k in outcome.figures}
            for fig in figures:
                metrics[fig.name] = fig.value
                metrics[f"{fig.name}.ci_low"] = fig.low
                metrics[f"{fig.name}.ci_high"] = fig.high
            for name, (_, value) in outcome.training.items():
                metrics[f"training.{name}"] = value
            headline = next((outcome.figures[n] for n in HEADLINE[task] if n in outcome.figures), None)
            if headline is not None:
                outcome.summary = _describe(headline, outcome.training.get(headline.name))
        else:
            say(f"v{version}: {labelled.n} labelled rows < quality_min_labelled_rows={min_labelled_rows}: "
                "not enough labels")
            outcome.summary = f"not enough labels ({labelled.n} < {min_labelled_rows})"
        _log_metrics(client, run_id, metrics, stamp, 0)
        summary = {
            "deployment": deployment, "model_name": model_name, "model_version": version, "task": task,
            "window": {"start": start, "end": end}, "status": outcome.status,
            "rows": {"answered": labelled.answered, "labelled": labelled.n, "coverage": labelled.coverage},
            "min_labelled_rows": min_labelled_rows, "rerun_of": rerun_of, "summary": outcome.summary,
            "figures": {n: dataclasses.asdict(f) for n, f in outcome.figures.items()},
            "training": {n: {"metric": m, "value": v} for n, (m, v) in outcome.training.items()},
            "estimates": None if estimated is None else {
                "text": outcome.estimate_text(), "skipped": estimated.skipped or None,
                "calibration_rows": estimated.calibration_rows, "calibration_source": estimated.source,
                "figures": {n: dataclasses.asdict(e) for n, e in estimated.estimates.items()}},
        }
        with tempfile.TemporaryDirectory(prefix="mlflow-deploy-quality-") as tmp:
            (Path(tmp) / SUMMARY_ARTIFACT).write_text(json.dumps(summary, indent=2, default=str))
            client.log_artifact(run_id, str(Path(tmp) / SUMMARY_ARTIFACT))
            if outcome.status == "ok" or (estimated is not None and estimated.estimates):
                say(f"v{version}: rendering the Evidently {task} report")
                table = figures_table(f"{deployment} v{version}: quality {start} – {end}",
                                      list(outcome.figures.values()), outcome.training,
                                      f"{labelled.n:,} labelled of {labelled.answered:,} answered rows "
                                      f"(coverage {labelled.coverage:.1%}). {outcome.summary}",
                                      estimate=outcome.estimate_text())
                ok = outcome.status == "ok"
                problem = render_quality_html(Path(tmp) / HTML_ARTIFACT, task=task,
                                              prediction=labelled.prediction if ok else labelled.prediction[:0],
                                              label=labelled.label if ok else labelled.label[:0], table=table)
                if problem and ok:
                    client.set_tag(run_id, "quality.report_error", problem[:MAX_TAG_VAL_LENGTH])
                client.log_artifact(run_id, str(Path(tmp) / HTML_ARTIFACT))
        client.set_tag(run_id, "quality.status", outcome.status)
        if estimated is not None:
            client.set_tag(run_id, "quality.cbpe", outcome.estimate_text()[:MAX_TAG_VAL_LENGTH])
        if outcome.summary:
            client.set_tag(run_id, "quality.summary", outcome.summary[:MAX_TAG_VAL_LENGTH])
        series_metrics = {k: v for k, v in metrics.items() if not k.startswith("training.")
                          and (not estimate_only or k.startswith(("estimated_", "cbpe.")))}
        _log_metrics(client, _series_run(client, experiment_id, deployment, model_name, version),
                     series_metrics, stamp, step)
        if estimate_only:
            _tag_version_estimate(client, model_name, version, outcome, end)
        else:
            _tag_version(client, model_name, version, outcome, task, end)
        client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        with contextlib.suppress(Exception):
            client.set_tag(run_id, "quality.error", f"{type(exc).__name__}: {exc}"[:MAX_TAG_VAL_LENGTH])
            client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    return outcome


def _tag_version(client: mlflow.MlflowClient, model_name: str, version: str, outcome: QualityOutcome,
                 task: str, window_end: str) -> None:
    try:
        tags = client.get_model_version(model_name, version).tags
    except MlflowException:
        return  # e.g. the version was deleted meanwhile: the run holds the figures
    if tags.get("quality.window_end", "") > window_end:
        return  # a re-run of an older window: the newer window's figures stay
    client.set_model_version_tag(model_name, version, "quality.status", outcome.status)
    for name in HEADLINE[task]:
        fig = outcome.figures.get(name)
        if fig is not None:
            client.set_model_version_tag(model_name, version, f"quality.{name}", f"{fig.value:.4f}")
        else:
            with contextlib.suppress(MlflowException):  # a stale figure must not pass for this window's
                client.delete_model_version_tag(model_name, version, f"quality.{name}")
    client.set_model_version_tag(model_name, version, "quality.summary", outcome.summary[:MAX_TAG_VAL_LENGTH])
    client.set_model_version_tag(model_name, version, "quality.labelled_rows", str(outcome.rows_labelled))
    client.set_model_version_tag(model_name, version, "quality.report_run_id", outcome.run_id)
    client.set_model_version_tag(model_name, version, "quality.window_end", window_end)
    client.set_model_version_tag(model_name, version, "quality.checked_at", _iso(datetime.now(UTC)))


def _tag_version_estimate(client: mlflow.MlflowClient, model_name: str, version: str, outcome: QualityOutcome,
                          window_end: str) -> None:
    """The version's ``quality.estimated_*`` tags: CBPE's latest estimate of a window without labels."""
    try:
        tags = client.get_model_version(model_name, version).tags
    except MlflowException:
        return
    if tags.get("quality.estimate_window_end", "") > window_end:
        return
    estimates = outcome.estimated.estimates if outcome.estimated is not None else {}
    for name in ("estimated_accuracy", "estimated_roc_auc"):
        if name in estimates:
            client.set_model_version_tag(model_name, version, f"quality.{name}", f"{estimates[name].value:.4f}")
        else:
            with contextlib.suppress(MlflowException):
                client.delete_model_version_tag(model_name, version, f"quality.{name}")
    client.set_model_version_tag(model_name, version, "quality.estimate", outcome.estimate_text()[:MAX_TAG_VAL_LENGTH])
    client.set_model_version_tag(model_name, version, "quality.estimate_window_end", window_end)


def run_quality_report(
    *, deployment: str, model_name: str, captured: pd.DataFrame | None = None, labels: pd.DataFrame | None = None,
    task: str, joined: list[Labelled] | None = None,
    answered: dict[str, tuple[pd.Series | None, pd.DataFrame]] | None = None,
    window_start: datetime, window_end: datetime, min_labelled_rows: int = 100,
    client: mlflow.MlflowClient | None = None, experiment_name: str | None = None,
    progress: Callable[[str], None] | None = None, trigger: str = "manual",
    calibration: list[Labelled] | None = None, calibration_source: str = "", estimate_only: bool = False,
) -> list[QualityOutcome]:
    """Report every version that answered in ``captured`` (already cut to the window) against ``labels``.

    ``calibration``: labelled rows per version from *before* the window (:func:`join_labels` of an
    earlier capture) to calibrate CBPE on; None leaves the estimate out. ``calibration_source`` says
    where they come from, for the output.
    """
    client = client or mlflow.MlflowClient()
    if joined is None:
        assert captured is not None and labels is not None, "captured and labels, or joined"
        joined = join_labels(captured, labels)
    if not joined:
        return []
    estimated = ({} if calibration is None or task != "classification"
                 else estimate_versions(captured, calibration, calibration_source, min_labelled_rows,
                                        answered=answered))
    experiment_id = _ensure_experiment(client, experiment_name or f"drift/{deployment}")
    return [report_version(deployment=deployment, model_name=model_name, labelled=one, task=task,
                           window_start=window_start, window_end=window_end, min_labelled_rows=min_labelled_rows,
                           client=client, experiment_id=experiment_id, trigger=trigger, progress=progress,
                           estimated=estimated.get(one.version), estimate_only=estimate_only)
            for one in joined]


def estimate_versions(captured: pd.DataFrame | None, calibration: list[Labelled], source: str,
                      min_rows: int, *, answered: dict[str, tuple[pd.Series | None, pd.DataFrame]] | None = None,
                      ) -> dict[str, Estimated]:
    """CBPE per version of ``captured`` whose answers hold probabilities, calibrated on the same
    version's labelled rows in ``calibration`` (at least ``min_rows``); never raises for data that
    cannot calibrate: the result says why."""
    by_version = {one.version: one for one in calibration}
    out = {}
    if answered is None:
        assert captured is not None, "captured or answered"
        answered = answered_probabilities(captured)
    for version, (prediction, probabilities) in answered.items():
        cal = by_version.get(version)
        where = f"of v{version} {source}".rstrip()
        if cal is None or cal.n == 0 or cal.probabilities is None:
            out[version] = Estimated(source=where, skipped=f"no labelled rows {where} to calibrate on")
            continue
        cal_probs, cal_label = cal.probabilities.tail(CBPE_MAX_CALIBRATION_ROWS), cal.label.tail(CBPE_MAX_CALIBRATION_ROWS)
        try:
            cbpe = CBPE.fit(cal_probs.reset_index(drop=True), cal_label.reset_index(drop=True), min_rows=min_rows)
            estimates = cbpe.estimate(probabilities, prediction)
        except CalibrationError as exc:
            out[version] = Estimated(source=where, skipped=f"cannot calibrate on the labelled rows {where}: {exc}")
            continue
        out[version] = Estimated({e.name: e for e in estimates}, cbpe.n_calibration, where)
    return out


def run_deployment_quality(name: str, since: datetime | None = None, until: datetime | None = None, *,
                           store: StateStore | None = None, progress: Callable[[str], None] | None = None,
                           trigger: str = "manual", estimate_only: bool = False) -> list[QualityOutcome]:
    """Report deployment ``name``'s quality over the predictions made in [since, until) (default: 24 h).

    ``estimate_only``: a window without labels yet, reported for CBPE's estimate (see
    :func:`report_version`); its figures go to the ``quality_estimate`` verdicts (gauges
    ``mlflow_deploy_quality_estimated``), never to the measured ones.

    Raises MlflowException (RESOURCE_DOES_NOT_EXIST) for an unknown deployment.
    """
    store = store or StateStore()
    spec = store.read_spec(name)
    if spec is None:
        raise MlflowException(f"No deployment named {name!r}.", error_code=RESOURCE_DOES_NOT_EXIST)
    config = spec.config
    until = as_utc(until) if until is not None else datetime.now(UTC)
    since = as_utc(since) if since is not None else until - timedelta(hours=24)
    say = progress or (lambda _m: None)
    paths = store.paths(name)
    root = capture_root(name, config.capture_uri, str(paths.capture))
    say(f"Reading captured predictions of {name!r} from {since:%Y-%m-%d %H:%M:%S} to {until:%Y-%m-%d %H:%M:%S} UTC")
    columns = window_columns(root, since, until)
    calibration, source = None, ""
    probas = probability_columns(columns)
    if probas and (config.task or "classification") == "classification":
        # CBPE's calibration: the labelled rows of the label horizon before the window (see the docstring).
        cal_since = since - timedelta(seconds=duration_s(config.label_horizon))
        source = f"predicted {cal_since:%Y-%m-%d %H:%M} – {since:%Y-%m-%d %H:%M} UTC"
        say("Joining the labelled predictions before the window to calibrate CBPE")
        # Streamed like the window, keeping each version's latest rows only: the horizon may be long.
        calibration = join_window(root, cal_since, since, task_for=lambda _p: "classification",
                                  keep_last=CBPE_MAX_CALIBRATION_ROWS, labelled_days_only=True).labelled
    # Joined one day partition at a time, keeping only the labelled rows: memory follows the labels.
    window = join_window(root, since, until, task_for=lambda predictions: deployment_task(spec, paths, predictions),
                         probabilities_of_all=bool(calibration), progress=progress)
    say(f"{window.rows:,} captured rows, {window.labels:,} labels in the window")
    outcomes = run_quality_report(
        deployment=name, model_name=spec.model.model_name, joined=window.labelled, answered=window.answered,
        task=window.task, window_start=since, window_end=until, min_labelled_rows=config.quality_min_labelled_rows,
        experiment_name=config.drift_experiment, progress=progress, trigger=trigger,
        calibration=calibration, calibration_source=source, estimate_only=estimate_only)
    if estimate_only:
        _record_estimates(paths, spec.model.model_name, outcomes, until, trigger)
    else:
        _record_verdicts(paths, spec.model.model_name, outcomes, until, trigger)
    return outcomes


def _record_verdicts(paths: Any, model_name: str, outcomes: list[QualityOutcome], window_end: datetime,
                     trigger: str) -> None:
    """The figures for the Prometheus gauges and the history (so `-C notify` receivers hear of them)."""
    from mlflow_deploy_plugin.verdicts import record_verdict

    for outcome in outcomes:
        try:
            record_verdict(paths, "quality", outcome.model_version, model_name=model_name, status=outcome.status,
                           figures={name: figure.value for name, figure in outcome.figures.items()},
                           labelled_rows=outcome.rows_labelled, window_end=_iso(window_end),
                           run_id=outcome.run_id, trigger=trigger)
        except (OSError, TimeoutError) as exc:  # the report is in MLflow already: never fail it here
            _log.warning("Could not record the quality verdict of v%s: %s", outcome.model_version, exc)


def _record_estimates(paths: Any, model_name: str, outcomes: list[QualityOutcome], window_end: datetime,
                      trigger: str) -> None:
    """CBPE's figures of a window without labels, for the ``mlflow_deploy_quality_estimated`` gauges
    and the history (``quality_estimate_verdict``); versions without an estimate are left out."""
    from mlflow_deploy_plugin.verdicts import record_verdict

    for outcome in outcomes:
        est = outcome.estimated
        if est is None or not est.estimates:
            continue
        figures: dict[str, float] = {}
        for item in est.estimates.values():
            figures[item.name] = item.value
            if np.isfinite(item.low):
                figures[f"{item.name}.ci_low"], figures[f"{item.name}.ci_high"] = item.low, item.high
        answered = max(item.n for item in est.estimates.values())
        try:
            record_verdict(paths, "quality_estimate", outcome.model_version, model_name=model_name, figures=figures,
                           answered_rows=answered, calibration_rows=est.calibration_rows,
                           window_end=_iso(window_end), run_id=outcome.run_id, trigger=trigger,
                           text=outcome.estimate_text())
        except (OSError, TimeoutError) as exc:
            _log.warning("Could not record the quality estimate of v%s: %s", outcome.model_version, exc)
