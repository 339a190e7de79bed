"""Prometheus metrics of the serving app.

Workers run in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` is set by the supervisor) so
/metrics sums every worker of the deployment, and counters keep counting across an update's
worker swap instead of starting again from zero.
"""

from __future__ import annotations

import os

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

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServingMetrics:
    """The metric families one worker records into."""

    def __init__(self) -> None:
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
            "mlflow_deploy_capture_dropped_requests", "Requests not captured (buffer full or write error).",
            ["deployment"], registry=registry)
        # The shadow mirror (serving/shadow.py): its calls and the copies it could not predict.
        self.shadow_requests = Counter(
            "mlflow_deploy_shadow_calls", "Request copies the shadow version predicted, by outcome "
            "(ok, error: it raised, timeout: no answer within timeout_s).",
            ["deployment", "model_version", "outcome"], registry=registry)
        self.shadow_latency = Histogram(
            "mlflow_deploy_shadow_latency_seconds", "Time the shadow version took per request copy.",
            ["deployment", "model_version"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.shadow_dropped = Counter(
            "mlflow_deploy_shadow_dropped_requests", "Request copies not sent to the shadow version "
            "(queue_full: under pressure; busy: a shadow call still hangs; closed: worker stopping).",
            ["deployment", "reason"], registry=registry)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every worker of this deployment."""
        if self.multiprocess:
            registry = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(registry)
        else:
            registry = self._registry
        return generate_latest(registry), CONTENT_TYPE_LATEST

