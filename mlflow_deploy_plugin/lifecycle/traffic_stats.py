"""Per-version request figures read from a deployment's own Prometheus /metrics.

The canary is judged on what the service measured: request and error counts and the latency
histogram, per model version, diffed against a baseline taken when the canary started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import requests
from prometheus_client.parser import text_string_to_metric_families


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
    # Only 5xx: a 4xx is the client's mistake (bad JSON, wrong columns) and would let a few bad
    # clients fail a healthy challenger. Input incompatibility is the signature gate's job.
    return status.startswith("5")


def scrape(url: str, token: str | None = None, timeout_s: float = 5.0) -> dict[str, VersionFigures]:
    """Model version -> cumulative figures, from ``url``/metrics."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.get(f"{url}/metrics", headers=headers, timeout=timeout_s)
    response.raise_for_status()
    figures: dict[str, VersionFigures] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            version = sample.labels.get("model_version")
            if version is None:
                continue
            entry = figures.setdefault(version, VersionFigures())
            if sample.name == "mlflow_deploy_requests_total":
                entry.requests += sample.value
                if _is_error(sample.labels.get("status", "")):
                    entry.errors += sample.value
            elif sample.name == "mlflow_deploy_request_latency_seconds_bucket":
                bound = float(sample.labels["le"])
                entry.buckets[bound] = entry.buckets.get(bound, 0.0) + sample.value
    return figures


def since(now: VersionFigures, baseline: VersionFigures | None) -> VersionFigures:
    """The figures accumulated after ``baseline``."""
    if baseline is None:
        return now
    return VersionFigures(now.requests - baseline.requests, now.errors - baseline.errors,
                          {k: v - baseline.buckets.get(k, 0.0) for k, v in now.buckets.items()})


def p99_ms(figures: VersionFigures) -> float | None:
    """Upper bound of the p99 latency from the histogram buckets (conservative), in ms."""
    total = figures.buckets.get(math.inf, 0.0)
    if total <= 0:
        return None
    for bound in sorted(figures.buckets):
        if figures.buckets[bound] >= 0.99 * total:
            return bound * 1000.0 if math.isfinite(bound) else math.inf
    return math.inf
