"""Per-version request figures read from a deployment's own Prometheus /metrics.

The canary is judged on what the service measured, per model version, diffed against a baseline
taken when the canary started:

- an error is every answer that is not 2xx, model exceptions (which the MLflow scoring protocol
  answers with 400) included: it is what the user experienced. Requests both versions refuse
  (malformed JSON) are not the challenger's fault; the verdict compares its error share with the
  champion's over the same window instead of excusing 4xx;
- latency comes from the histogram of *successful* answers (``mlflow_deploy_success_latency_seconds``):
  a version that fails fast must not look fast. Deployments started before that histogram existed
  fall back to the histogram of all answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from mlflow_deploy_plugin.deployment_http import deployment_session


@dataclass
class VersionFigures:
    """Cumulative counters of one model version."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound (s) -> cumulative count

    def to_dict(self) -> dict:
        return {"requests": self.requests, "errors": self.errors,
                "buckets": {str(k): v for k, v in self.buckets.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> VersionFigures:
        return cls(data["requests"], data["errors"], {float(k): v for k, v in data["buckets"].items()})


def _is_error(status: str) -> bool:
    return not status.startswith("2")


def scrape(url: str, token: str | None = None, timeout_s: float = 5.0,
           tls_cert: str | None = None) -> dict[str, VersionFigures]:
    """Model version -> cumulative figures, from ``url``/metrics (over TLS, trusting the deployment's
    own certificate, which is often self-signed)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with deployment_session(url, tls_cert) as session:
        response = session.get(f"{url}/metrics", headers=headers, timeout=timeout_s)
    response.raise_for_status()
    return parse(response.text)


def parse_all(texts: list[str]) -> dict[str, VersionFigures]:
    """Model version -> figures summed over several expositions (one per replica)."""
    total: dict[str, VersionFigures] = {}
    for text in texts:
        for version, figures in parse(text).items():
            entry = total.setdefault(version, VersionFigures())
            entry.requests += figures.requests
            entry.errors += figures.errors
            for bound, count in figures.buckets.items():
                entry.buckets[bound] = entry.buckets.get(bound, 0.0) + count
    return total


def parse(text: str) -> dict[str, VersionFigures]:
    """Model version -> cumulative figures, from a Prometheus text exposition."""
    figures: dict[str, VersionFigures] = {}
    all_answers: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            version = sample.labels.get("model_version")
            if version is None:
                continue
            entry = figures.setdefault(version, VersionFigures())
            if sample.name == "mlflow_deploy_requests_total":
                entry.requests += sample.value
                if _is_error(sample.labels.get("status", "")):
                    entry.errors += sample.value
            elif sample.name == "mlflow_deploy_success_latency_seconds_bucket":
                bound = float(sample.labels["le"])
                entry.buckets[bound] = entry.buckets.get(bound, 0.0) + sample.value
            elif sample.name == "mlflow_deploy_request_latency_seconds_bucket":
                buckets = all_answers.setdefault(version, {})
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    for version, entry in figures.items():
        if not entry.buckets and version in all_answers:
            entry.buckets = all_answers[version]  # a service from before the success histogram
    return figures


def since(now: VersionFigures, baseline: VersionFigures | None) -> VersionFigures:
    """The figures accumulated after ``baseline``."""
    if baseline is None:
        return now
    return VersionFigures(now.requests - baseline.requests, now.errors - baseline.errors,
                          {k: v - baseline.buckets.get(k, 0.0) for k, v in now.buckets.items()})


def p99_ms(figures: VersionFigures, quantile: float = 0.99) -> float | None:
    """The p99 latency in ms, interpolated linearly within its histogram bucket.

    What Prometheus' ``histogram_quantile`` computes: reading the bucket's upper bound instead would
    report 250 ms for answers that all took 101 ms. When the quantile falls in the ``+Inf`` bucket,
    the largest finite bound is the answer (nothing better is known).
    """
    total = figures.buckets.get(math.inf, 0.0)
    if total <= 0:
        return None
    rank = quantile * total
    lower, below = 0.0, 0.0
    for bound in sorted(figures.buckets):
        count = figures.buckets[bound]
        if count >= rank:
            if not math.isfinite(bound):
                return lower * 1000.0
            if count <= below:
                return bound * 1000.0
            return (lower + (bound - lower) * (rank - below) / (count - below)) * 1000.0
        lower, below = bound, count
    return lower * 1000.0
