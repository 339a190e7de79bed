"""Canary judgement: turn a challenger's live figures into pending / pass / fail.

Kept apart from the promotion gates because it judges something else at another time: the gates
read the registry once, before any traffic; the canary is judged again and again on what serving
measured while the challenger takes its share (:mod:`.traffic_stats` collects the figures), from
those figures alone: no registry, no model. Its results are :class:`.gates.GateResult` lines, so
reports and audit records read the same.

Canary checks in reports: ``canary.evidence``, ``canary.error_rate``, ``canary.p99_latency`` and
``canary.drift``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mlflow_deploy_plugin.lifecycle.gates import _EPS, GateResult, _fmt
from mlflow_deploy_plugin.lifecycle.policy import CanaryPolicy


@dataclass(frozen=True)
class CanaryStats:
    """What the serving side measured for the challenger since the canary started."""

    requests: int
    errors: int  # 5xx answers (client mistakes, 4xx, are not the challenger's fault)
    p99_latency_ms: float | None
    elapsed_s: float
    drift_status: str | None = None  # the challenger's latest ``drift.status`` tag, if any


@dataclass(frozen=True)
class CanaryVerdict:
    """``pending`` (keep waiting), ``pass`` (promote) or ``fail`` (roll the challenger back)."""

    status: Literal["pending", "pass", "fail"]
    results: list[GateResult]
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True only for a final pass."""
        return self.status == "pass"

    @property
    def pending(self) -> bool:
        """True while there is not enough evidence to judge."""
        return self.status == "pending"

    def summary(self) -> str:
        """A verdict line, then one line per check."""
        failed = [result.gate for result in self.results if not result.passed]
        head = f"canary {self.status}" + (f": {', '.join(failed)}" if self.status == "fail" else "")
        lines = [result.line("WAIT" if self.pending and not result.passed else None) for result in self.results]
        return "\n".join([head, *lines])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form for audit records and tags."""
        return {"status": self.status, "figures": self.figures,
                "results": [asdict(result) for result in self.results]}


def evaluate_canary(canary: CanaryPolicy, stats: CanaryStats) -> CanaryVerdict:
    """Judge a running canary: ``pending`` until ``min_requests`` or ``max_minutes`` is reached, then
    ``pass`` or ``fail``.

    Fails early, before the judging point, only when the outcome is already certain: the errors
    seen exceed the error budget of the ``min_requests`` window (``max_error_rate * min_requests``),
    or the challenger is reported drifted while ``require_no_drift`` is on. At ``max_minutes`` with
    fewer than ``min_requests`` requests, what there is gets judged; no traffic at all fails.
    """
    if stats.requests < 0 or stats.errors < 0 or stats.errors > stats.requests or stats.elapsed_s < 0:
        raise ValueError(f"inconsistent canary stats: {stats}")
    limit_s = canary.max_minutes * 60
    minutes = stats.elapsed_s / 60
    error_rate = stats.errors / stats.requests if stats.requests else None
    figures: dict[str, Any] = {"requests": stats.requests, "errors": stats.errors, "error_rate": error_rate,
                               "p99_latency_ms": stats.p99_latency_ms, "elapsed_s": stats.elapsed_s,
                               "drift_status": stats.drift_status, "min_requests": canary.min_requests,
                               "max_minutes": canary.max_minutes}
    progress = (f"{stats.requests} of {canary.min_requests} requests, {_fmt(minutes)} of "
                f"{_fmt(canary.max_minutes)} minutes")
    enough = stats.requests >= canary.min_requests
    timed_out = stats.elapsed_s >= limit_s

    drift = _canary_drift(canary, stats)
    if not (enough or timed_out):
        certain = [result for result in (drift, _early_error_check(canary, stats)) if result and not result.passed]
        if certain:
            return CanaryVerdict("fail", certain, figures)
        waiting = GateResult("canary.evidence", False, f"waiting for evidence: {progress}",
                             {"requests": stats.requests, "elapsed_s": stats.elapsed_s})
        return CanaryVerdict("pending", [waiting], figures)

    if stats.requests == 0:
        results = [GateResult("canary.evidence", False, f"no request reached the challenger in "
                                                        f"{_fmt(minutes)} minutes", {"requests": 0})]
        return CanaryVerdict("fail", results + ([drift] if drift else []), figures)

    why = "min_requests reached" if enough else (
        f"max_minutes reached with only {stats.requests} of {canary.min_requests} requests")
    results = [GateResult("canary.evidence", True, f"judged on {stats.requests} requests after "
                                                   f"{_fmt(minutes)} minutes ({why})",
                          {"requests": stats.requests, "elapsed_s": stats.elapsed_s})]
    if canary.max_error_rate is not None:
        assert error_rate is not None
        over = error_rate - canary.max_error_rate
        text = (f"error rate {_pct(error_rate)} ({stats.errors} of {stats.requests})")
        results.append(GateResult(
            "canary.error_rate", over <= _EPS,
            f"{text} > {_pct(canary.max_error_rate)} allowed (over by {_fmt(over * 100)} points)" if over > _EPS
            else f"{text} <= {_pct(canary.max_error_rate)} allowed",
            {"error_rate": error_rate, "max_error_rate": canary.max_error_rate}))
    if canary.max_p99_latency_ms is not None:
        p99 = stats.p99_latency_ms
        if p99 is None:
            results.append(GateResult("canary.p99_latency", False, "no p99 latency figure for the challenger",
                                      {"max_p99_latency_ms": canary.max_p99_latency_ms}))
        else:
            over = p99 - canary.max_p99_latency_ms
            results.append(GateResult(
                "canary.p99_latency", over <= _EPS,
                f"p99 latency {_fmt(p99)} ms > {_fmt(canary.max_p99_latency_ms)} ms allowed (over by "
                f"{_fmt(over)} ms)" if over > _EPS
                else f"p99 latency {_fmt(p99)} ms <= {_fmt(canary.max_p99_latency_ms)} ms allowed",
                {"p99_latency_ms": p99, "max_p99_latency_ms": canary.max_p99_latency_ms}))
    if drift:
        results.append(drift)
    status: Literal["pass", "fail"] = "pass" if all(result.passed for result in results) else "fail"
    return CanaryVerdict(status, results, figures)


def _pct(share: float) -> str:
    return f"{_fmt(share * 100)}%"


def _canary_drift(canary: CanaryPolicy, stats: CanaryStats) -> GateResult | None:
    if not canary.require_no_drift:
        return None
    if stats.drift_status is None:
        return GateResult("canary.drift", True, "no drift report for the challenger yet", {"drift_status": None})
    drifted = stats.drift_status.lower() == "drifted"
    return GateResult("canary.drift", not drifted, f"challenger drift status is {stats.drift_status!r}",
                      {"drift_status": stats.drift_status})


def _early_error_check(canary: CanaryPolicy, stats: CanaryStats) -> GateResult | None:
    if canary.max_error_rate is None:
        return None
    budget = canary.max_error_rate * canary.min_requests
    if stats.errors <= budget + _EPS:
        return None
    return GateResult(
        "canary.error_rate", False,
        f"{stats.errors} errors in {stats.requests} requests already exceed the error budget of the "
        f"{canary.min_requests}-request window ({_fmt(budget)} = {_pct(canary.max_error_rate)}): failing early",
        {"errors": stats.errors, "budget": budget, "max_error_rate": canary.max_error_rate})
