"""Prometheus metrics of the serving app.

Workers run in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` is set by the supervisor) so
/metrics sums every worker of the deployment, and counters keep counting across an update's
worker swap instead of starting again from zero.

The latest drift, quality and shadow verdicts come from other processes (report jobs): they are
read from the deployment's ``verdicts.json`` on each scrape by :class:`VerdictCollector`
(``verdicts.py`` writes it), so Alertmanager rules can fire on them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# The supervisor (engines/local/capture_loss.py) writes the same counter: one name and help for both.
from mlflow_deploy_plugin.engines.local.capture_drop_metric import DROPPED_HELP, DROPPED_METRIC

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServingMetrics:
    """The metric families one worker records into."""

    def __init__(self, deployment_dir: Path | None = None) -> None:
        self.verdicts = VerdictCollector(deployment_dir) if deployment_dir is not None else None
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # Outside multiprocess mode use a private registry so building several apps in one
        # process (tests, run-local) never collides on metric names.
        registry = REGISTRY if self.multiprocess else CollectorRegistry()
        self._registry = registry
        self.requests = Counter(
            "mlflow_deploy_requests", "Requests answered by /invocations and V2 infer.",
            ["deployment", "model_version", "status"], registry=registry)
        self.latency = Histogram(
            "mlflow_deploy_request_latency_seconds", "Time to answer /invocations and V2 infer.",
            ["deployment", "model_version"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.success_latency = Histogram(
            "mlflow_deploy_success_latency_seconds",
            "Time to answer /invocations with a 2xx: what a canary's p99 is judged on (fast failures "
            "must not flatter it).",
            ["deployment", "model_version"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.rows = Counter(
            "mlflow_deploy_rows_predicted", "Input rows predicted.",
            ["deployment", "model_version"], registry=registry)
        self.in_flight = Gauge(
            "mlflow_deploy_in_flight_requests", "Requests being answered now.",
            ["deployment"], multiprocess_mode="livesum", registry=registry)
        self.queued = Gauge(
            "mlflow_deploy_queued_requests",
            "Requests waiting for the model (at most max_queue per worker and version; more get 503).",
            ["deployment"], multiprocess_mode="livesum", registry=registry)
        self.model_info = Gauge(
            "mlflow_deploy_model_version_info", "1 for each model version this deployment serves.",
            ["deployment", "model_name", "model_version", "model_uri"], multiprocess_mode="livemax",
            registry=registry)
        self.batch_rows = Histogram(
            "mlflow_deploy_predict_batch_rows",
            "Rows per model predict call: concurrent requests coalesced into one call count once (_count is "
            "the number of calls); a batch that failed and was retried request by request counts each retry.",
            ["deployment"], buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000), registry=registry)
        self.capture_dropped = Counter(
            DROPPED_METRIC, DROPPED_HELP,
            ["deployment"], registry=registry)
        # The shadow mirror (serving/shadow.py): its calls and the copies it could not predict.
        self.shadow_requests = Counter(
            "mlflow_deploy_shadow_calls", "Request copies the shadow version predicted, by outcome "
            "(ok, error: it raised, timeout: no answer within timeout_s).",
            ["deployment", "model_version", "outcome"], registry=registry)
        self.shadow_latency = Histogram(
            "mlflow_deploy_shadow_latency_seconds",
            "Duration of the shadow version's predict call that answered each request copy, one observation "
            "per copy: copies predicted together in one batched call each get that call's whole duration. "
            "Off the request path (at low CPU priority where the shadow has a process of its own), so not "
            "comparable with the primary's request latency; compare it between reports.",
            ["deployment", "model_version"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.shadow_dropped = Counter(
            "mlflow_deploy_shadow_dropped_requests", "Request copies not sent to the shadow version "
            "(queue_full: under pressure; busy: a shadow call still hangs; closed: worker stopping; "
            "crashed: the shadow process died or was replaced holding them; no_shadow: the queue filled while "
            "no shadow process was there to take them, starting or being replaced).",
            ["deployment", "reason"], registry=registry)

        if self.verdicts is not None and not self.multiprocess:
            registry.register(self.verdicts)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every worker of this deployment, and its verdicts."""
        if self.multiprocess:
            registry = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(registry)
            if self.verdicts is not None:
                registry.register(self.verdicts)
        else:
            registry = self._registry
        return generate_latest(registry), CONTENT_TYPE_LATEST


def observe_many(histogram: Histogram, amount: float, count: int) -> None:
    """``count`` observations of the same ``amount`` (a shadow batch's copies share their call's time).

    prometheus_client has no bulk observe; in multiprocess mode each observation is two locked writes
    to a memory-mapped file, so this adds ``amount * count`` to the sum and ``count`` to the bucket
    once, as ``observe`` would ``count`` times. If the client's internals ever differ, it observes
    one by one.
    """
    if count == 1:
        histogram.observe(amount)
        return
    if count < 1:
        return
    try:
        bounds, buckets, total = histogram._upper_bounds, histogram._buckets, histogram._sum  # noqa: SLF001
    except AttributeError:
        for _ in range(count):
            histogram.observe(amount)
        return
    total.inc(amount * count)
    for bound, bucket in zip(bounds, buckets, strict=True):
        if amount <= bound:
            bucket.inc(count)
            break


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class VerdictCollector(Collector):
    """Gauges of the latest drift, quality (measured and estimated) and shadow verdict per version, from
    ``verdicts.json``.

    Read on every scrape (a small file): a verdict written by a report job a second ago shows at
    once, in every worker, without the worker hearing of the job. Gauge names are the contract of
    ``examples/prometheus/alerts.yml`` and ``examples/grafana/dashboard.json``.
    """

    def __init__(self, deployment_dir: Path) -> None:
        self.deployment_dir = Path(deployment_dir)

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # names vary with the file; describing nothing keeps registration cheap and safe

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from mlflow_deploy_plugin.state import DeploymentPaths
        from mlflow_deploy_plugin.verdicts import read_verdicts

        paths = DeploymentPaths(self.deployment_dir)
        verdicts = read_verdicts(paths)
        name = paths.name
        labels = ["deployment", "model_version"]
        drift_share = GaugeMetricFamily("mlflow_deploy_drift_share",
                                        "Share of judged columns that drifted in the latest drift report.", labels=labels)
        drift_detected = GaugeMetricFamily("mlflow_deploy_drift_detected",
                                           "1 if the latest drift report found the data drifted, else 0.", labels=labels)
        drift_checked = GaugeMetricFamily("mlflow_deploy_drift_checked_timestamp_seconds",
                                          "When the latest drift report of this version ended (unix time).", labels=labels)
        for version, entry in verdicts["drift"].items():
            share = _number(entry.get("share"))
            if share is not None:
                drift_share.add_metric([name, version], share)
            if entry.get("status") in ("ok", "drifted"):
                drift_detected.add_metric([name, version], 1.0 if entry.get("status") == "drifted" else 0.0)
            if (checked := _number(entry.get("checked_at"))) is not None:
                drift_checked.add_metric([name, version], checked)
        quality = GaugeMetricFamily("mlflow_deploy_quality",
                                    "Latest labelled quality figure of this version (accuracy, f1_macro, rmse, ...).",
                                    labels=[*labels, "figure"])
        quality_rows = GaugeMetricFamily("mlflow_deploy_quality_labelled_rows",
                                         "Labelled rows the latest quality figures rest on.", labels=labels)
        quality_checked = GaugeMetricFamily("mlflow_deploy_quality_checked_timestamp_seconds",
                                            "When the latest quality report of this version ended (unix time).",
                                            labels=labels)
        for version, entry in verdicts["quality"].items():
            for figure, value in (entry.get("figures") or {}).items():
                if (number := _number(value)) is not None:
                    quality.add_metric([name, version, str(figure)], number)
            if (rows := _number(entry.get("labelled_rows"))) is not None:
                quality_rows.add_metric([name, version], rows)
            if (checked := _number(entry.get("checked_at"))) is not None:
                quality_checked.add_metric([name, version], checked)
        # CBPE's estimates of windows without labels yet: their own names, never mistaken for measured figures.
        estimated = GaugeMetricFamily("mlflow_deploy_quality_estimated",
                                      "Estimated quality of this version's latest window without labels "
                                      "(CBPE: estimated_accuracy and its ci_low/ci_high, estimated_roc_auc).",
                                      labels=[*labels, "figure"])
        estimated_rows = GaugeMetricFamily("mlflow_deploy_quality_estimated_rows",
                                           "Answered rows the latest quality estimate rests on.", labels=labels)
        for version, entry in verdicts["quality_estimate"].items():
            for figure, value in (entry.get("figures") or {}).items():
                if (number := _number(value)) is not None:
                    estimated.add_metric([name, version, str(figure)], number)
            if (rows := _number(entry.get("answered_rows"))) is not None:
                estimated_rows.add_metric([name, version], rows)
        agreement = GaugeMetricFamily("mlflow_deploy_shadow_agreement",
                                      "Share of requests on which the shadow version answered like the primary "
                                      "(latest shadow report; model_version is the shadow's).", labels=labels)
        shadow_requests = GaugeMetricFamily("mlflow_deploy_shadow_requests",
                                            "Paired requests the latest shadow report compared.", labels=labels)
        shadow_figure = GaugeMetricFamily("mlflow_deploy_shadow_figure",
                                          "Other figures of the latest shadow report (e.g. mean_abs_difference).",
                                          labels=[*labels, "figure"])
        shadow_checked = GaugeMetricFamily("mlflow_deploy_shadow_checked_timestamp_seconds",
                                           "When the latest shadow report of this version ended (unix time).",
                                           labels=labels)
        for version, entry in verdicts["shadow"].items():
            if (value := _number(entry.get("agreement"))) is not None:
                agreement.add_metric([name, version], value)
            if (count := _number(entry.get("requests"))) is not None:
                shadow_requests.add_metric([name, version], count)
            for figure, raw in (entry.get("figures") or {}).items():
                if (number := _number(raw)) is not None:
                    shadow_figure.add_metric([name, version, str(figure)], number)
            if (checked := _number(entry.get("checked_at"))) is not None:
                shadow_checked.add_metric([name, version], checked)
        yield from (drift_share, drift_detected, drift_checked, quality, quality_rows, quality_checked,
                    estimated, estimated_rows, agreement, shadow_requests, shadow_figure, shadow_checked)

