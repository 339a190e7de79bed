"""The shadow report: a window of paired answers (primary vs shadow) compared, logged to MLflow, recorded.

``mlflow-deploy shadow report NAME`` and the policy's shadow stage both call
:func:`run_shadow_report`. It reads the window of captured rows *with* the shadow's
(``read_capture(shadow=True)``) and the labels stored for them, compares the pairs
(:mod:`.shadow_compare`), and, like the drift and quality jobs, logs one MLflow run to the
deployment's drift experiment (``-C drift_experiment``, default ``drift/<deployment>``):

* run ``shadow-<deployment>-v<shadow>-<window end>``; params ``deployment, model_name, task,
  window_start, window_end`` (no ``model_version`` param: the drift policy's streak searches this
  experiment by that param); tags ``shadow.deployment``, ``shadow.model_version`` (the shadow's),
  ``shadow.primary_versions``, ``shadow.summary``;
* metrics: every figure of :meth:`ShadowComparison.figures` (agreement, error rates, latency
  quantiles, difference quantiles, labelled figures and the paired test's p-value);
* artifacts ``shadow_report.html`` (figures, confusion table or difference quantiles, labelled
  comparison) and ``shadow_summary.json``.

The shadow version is tagged ``shadow.agreement`` / ``shadow.summary`` / ``shadow.report_run_id``, and the
verdict is recorded for alerts and Prometheus through :func:`mlflow_deploy_plugin.verdicts.record_verdict`
(``verdicts.json``, read by the ``/metrics`` gauges, and the ``shadow_verdict`` history event, which
notifications announce).
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from mlflow_deploy_plugin.capture import capture_root, read_capture
from mlflow_deploy_plugin.capture.layout import as_utc
from mlflow_deploy_plugin.errors import InvalidRequest, NotFound
from mlflow_deploy_plugin.monitoring.shadow_compare import ShadowComparison, compare_pairs
from mlflow_deploy_plugin.state import StateStore
from mlflow_deploy_plugin.verdicts import record_verdict

_log = logging.getLogger(__name__)

HTML_ARTIFACT = "shadow_report.html"
LATENCY_NOTE = ("Latency: the primary's is the time to answer each request; the shadow's is the call that "
                "predicted its copy, a batch of copies gathered off the request path (at low CPU priority, in a "
                "process of its own). Compare the shadow's latency between reports, not with the primary's.")
SUMMARY_ARTIFACT = "shadow_summary.json"


@dataclass
class ShadowReport:
    """One window's comparison and where it was logged."""

    deployment: str
    window_start: datetime
    window_end: datetime
    comparison: ShadowComparison
    run_id: str | None

    def line(self) -> str:
        return (f"shadow v{self.comparison.shadow_version} vs "
                f"v{', v'.join(self.comparison.primary_versions) or '?'}: {self.comparison.summary()}"
                + (f" (run {self.run_id})" if self.run_id else ""))


def _no_deployment(name: str) -> NotFound:
    return NotFound(f"No deployment named {name!r}. `mlflow deployments list -t lifecycle` shows the "
                    "deployments there are.")


def _iso(moment: datetime) -> str:
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def compare_window(name: str, since: datetime, until: datetime, *, store: StateStore,
                   shadow_version: str | None = None) -> ShadowComparison:
    """The pairs of deployment ``name`` in [since, until), labels joined (nothing logged).

    ``shadow_version``: only that shadow version's pairs (a window may span a change of shadow);
    default: the shadow version that answered last in the window.
    """
    from mlflow_deploy_plugin.quality.labels import labels_root, read_labels

    spec = store.read_spec(name)
    if spec is None:
        raise _no_deployment(name)
    root = capture_root(name, spec.config.capture_uri, str(store.paths(name).capture))
    captured = read_capture(root, since=since, until=until, shadow=True)
    if "_role" in captured:
        shadows = captured[captured["_role"] == "shadow"]
        if shadow_version is None and len(shadows):
            # The latest shadow of the window: pairs of two shadow versions are never mixed.
            shadow_version = str(shadows["_model_version"].iloc[shadows["_timestamp"].argmax()])
        if shadow_version is not None:
            other = (captured["_role"] == "shadow") & (captured["_model_version"].astype(str) != shadow_version)
            captured = captured[~other]
    labels = read_labels(labels_root(root), since, until)
    # The copies it dropped are counted from the sample rate it runs with: known for the current
    # shadow only (a past one's is not kept), which alone was mirrored to up to the window's end.
    current = spec.shadow is not None and (shadow_version is None or spec.shadow.model_version == shadow_version)
    return compare_pairs(captured, task=spec.config.task, labels=labels,
                         sample_rate=spec.config.shadow_sample_rate if current else None, open_end=current)


def run_shadow_report(name: str, since: datetime | None = None, until: datetime | None = None, *,
                      store: StateStore | None = None, log_to_mlflow: bool = True, actor: str = "shadow-report",
                      shadow_version: str | None = None,
                      progress: Callable[[str], None] | None = None) -> ShadowReport:
    """Compare deployment ``name``'s pairs in [since, until) (default: the last 24 h), log and record it.

    ``shadow_version``: whose pairs (default: the shadow version that answered last in the window)."""
    store = store or StateStore()
    spec = store.read_spec(name)
    if spec is None:
        raise _no_deployment(name)
    until = as_utc(until) if until is not None else datetime.now(UTC)
    since = as_utc(since) if since is not None else until - timedelta(hours=24)
    say = progress or (lambda _m: None)
    comparison = compare_window(name, since, until, store=store, shadow_version=shadow_version)
    if comparison.requests == 0:
        if shadow_version is not None:
            why = (f" of shadow v{shadow_version} (leave out --shadow-version for the shadow that answered last; "
                   f"the current shadow is {f'v{spec.shadow.model_version}' if spec.shadow else 'none'})")
        elif spec.shadow is None:
            why = " (it has no shadow now: -C shadow=models:/NAME/VERSION; a past shadow's pairs: a window it ran in)"
        else:
            why = (f" (shadow v{spec.shadow.model_version} is set: a request is paired once the primary's row was "
                   "captured and the shadow answered; send requests, or widen --since)")
        raise InvalidRequest(f"Deployment {name!r} has no paired primary/shadow requests{why} from {_iso(since)} "
                             f"to {_iso(until)}.")
    say(comparison.summary())
    return report_comparison(store, name, comparison, since, until, actor=actor, log_to_mlflow=log_to_mlflow)


def report_comparison(store: StateStore, name: str, comparison: ShadowComparison, since: datetime, until: datetime,
                      *, actor: str, log_to_mlflow: bool = True, verdict: dict[str, Any] | None = None,
                      ) -> ShadowReport:
    """Log ``comparison`` (a run, unless not ``log_to_mlflow``) and record it as the shadow verdict;
    ``verdict`` (the policy's judgement) goes into the record beside the figures."""
    spec = store.read_spec(name)
    if spec is None:
        raise _no_deployment(name)
    # Captured rows name the shadow's version, not its model: the current shadow's model when it is that
    # version, else the served model (a past shadow stage tried a challenger of it).
    current = spec.shadow is not None and spec.shadow.model_version == comparison.shadow_version
    model_name = spec.shadow.model_name if current and spec.shadow is not None else spec.model.model_name
    run_id = None
    if log_to_mlflow:
        run_id = _log_run(name, model_name, spec.config.drift_experiment, comparison, since, until)
    _record(store, name, model_name, comparison, run_id, since, until, actor, verdict)
    return ShadowReport(name, since, until, comparison, run_id)


def _log_run(name: str, model_name: str, experiment: str | None, comparison: ShadowComparison,
             since: datetime, until: datetime) -> str:
    from mlflow_deploy_plugin.monitoring.report_job import _ensure_experiment

    client = mlflow.MlflowClient()
    experiment_id = _ensure_experiment(client, experiment or f"drift/{name}")
    version = comparison.shadow_version or "?"
    run = client.create_run(experiment_id, run_name=f"shadow-{name}-v{version}-{as_utc(until):%Y%m%dT%H%M%SZ}", tags={
        "shadow.deployment": name, "shadow.model_name": model_name, "shadow.model_version": version,
        "shadow.primary_versions": ",".join(comparison.primary_versions),
        "shadow.summary": comparison.summary()[:MAX_TAG_VAL_LENGTH]})
    run_id = run.info.run_id
    try:
        params = {"deployment": name, "model_name": model_name, "task": comparison.task,
                  "window_start": _iso(since), "window_end": _iso(until)}
        stamp = int(as_utc(until).timestamp() * 1000)
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(k, v, stamp, 0) for k, v in comparison.figures().items()])
        with tempfile.TemporaryDirectory(prefix="mlflow-deploy-shadow-") as tmp:
            summary = {"deployment": name, "window": {"start": _iso(since), "end": _iso(until)},
                       "summary": comparison.summary(), **comparison.to_dict()}
            (Path(tmp) / SUMMARY_ARTIFACT).write_text(json.dumps(summary, indent=2, default=str))
            (Path(tmp) / HTML_ARTIFACT).write_text(render_html(name, comparison, since, until))
            client.log_artifact(run_id, str(Path(tmp) / SUMMARY_ARTIFACT))
            client.log_artifact(run_id, str(Path(tmp) / HTML_ARTIFACT))
        with contextlib.suppress(MlflowException):  # a deleted version: the run holds the figures
            if comparison.shadow_version:
                if comparison.agreement is not None:
                    client.set_model_version_tag(model_name, version, "shadow.agreement", f"{comparison.agreement:.4f}")
                client.set_model_version_tag(model_name, version, "shadow.summary",
                                             comparison.summary()[:MAX_TAG_VAL_LENGTH])
                client.set_model_version_tag(model_name, version, "shadow.report_run_id", run_id)
        client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        with contextlib.suppress(Exception):
            client.set_tag(run_id, "shadow.error", f"{type(exc).__name__}: {exc}"[:MAX_TAG_VAL_LENGTH])
            client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def _record(store: StateStore, name: str, model_name: str, comparison: ShadowComparison, run_id: str | None,
            since: datetime, until: datetime, actor: str, verdict: dict[str, Any] | None = None) -> None:
    """The verdict for alerts, gauges and the history (see the module docstring)."""
    version = comparison.shadow_version or "?"
    figures = comparison.figures()
    details: dict[str, Any] = {"agreement": comparison.agreement, "requests": comparison.requests, "figures": figures,
               "summary": comparison.summary(), "run_id": run_id, "window_end": _iso(until),
               "window_start": _iso(since), "primary_versions": comparison.primary_versions,
               **({"verdict": verdict} if verdict else {})}
    record_verdict(store.paths(name), "shadow", version, model_name=model_name, **details)


def render_html(name: str, comparison: ShadowComparison, since: datetime, until: datetime) -> str:
    """A self-contained page: the figures, the confusion table or the differences, the labelled test."""
    def table(rows: list[tuple[str, Any]]) -> str:
        body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
        return f"<table>{body}</table>"

    parts = [f"<h1>Shadow report: {html.escape(name)}</h1>",
             f"<p>Shadow v{html.escape(str(comparison.shadow_version))} against primary "
             f"v{html.escape(', v'.join(comparison.primary_versions))}, predictions made {_iso(since)} – "
             f"{_iso(until)}, paired on request id and row.</p>",
             f"<p><b>{html.escape(comparison.summary())}</b></p>",
             "<h2>Figures</h2>", table(sorted(comparison.figures().items())),
             f"<p>{html.escape(LATENCY_NOTE)}</p>"]
    if comparison.confusion:
        classes = sorted({c for row in comparison.confusion.values() for c in row})
        head = "".join(f"<th>shadow {html.escape(c)}</th>" for c in classes)
        rows = "".join(f"<tr><th>primary {html.escape(p)}</th>"
                       + "".join(f"<td>{comparison.confusion[p].get(c, 0)}</td>" for c in classes) + "</tr>"
                       for p in sorted(comparison.confusion))
        parts += ["<h2>Confusion table between the versions (rows)</h2>", f"<table><tr><th></th>{head}</tr>{rows}</table>"]
    if comparison.difference:
        parts += ["<h2>Differences shadow − primary</h2>", table(list(comparison.difference.items()))]
    if comparison.labelled is not None:
        lab = comparison.labelled
        parts += ["<h2>On labelled rows (paired)</h2>", table([
            ("labelled rows", lab.rows), (f"primary {lab.metric}", lab.primary), (f"shadow {lab.metric}", lab.shadow),
            ("test", lab.test), ("p-value", lab.p_value), ("shadow significantly worse", lab.shadow_worse),
            *lab.discordant.items()])]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Shadow report {html.escape(name)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
