"""Canary judgement: turn a challenger's live figures into pending / pass / fail.

Kept apart from the promotion gates because it judges something else at another time: the gates
read the registry once, before any traffic; the canary is judged again and again on what serving
measured while the challenger takes its share (:mod:`.traffic_stats` collects the figures), from
those figures alone: no registry, no model. Its results are :class:`.gates.GateResult` lines, so
reports and audit records read the same.

Canary checks in reports: ``canary.evidence``, ``canary.error_rate``, ``canary.p99_latency`` and
``canary.drift``.

How a canary is judged (what an on-call engineer signs off on):

- **Errors** are every answer that is not 2xx, model exceptions included. Requests that any
  version would refuse (malformed JSON) are not the challenger's fault, so its error share is
  compared with the champion's over the same window: it fails when it is higher by more than
  ``max_error_rate``. A challenger whose new input schema refuses requests the champion accepts
  is worse, and fails. With no champion traffic in the window, the challenger's own share is
  judged against ``max_error_rate``.
- **Latency** is the p99 of successful answers, interpolated within its histogram bucket.
- **Evidence**: judged at ``min_requests``; at ``max_minutes`` with fewer, there is not enough
  evidence: the challenger is rejected, or (``insufficient_evidence: extend``) the canary goes on
  until ``min_requests`` arrive. A challenger is never promoted on a handful of requests.
- **Drift** (``require_no_drift``): the rows the challenger itself served since the canary
  started are judged against its own reference data (:mod:`.canary_drift`). ``drifted`` fails it
  at once; ``ok`` passes; no verdict yet (the check runs, or found fewer than the deployment's
  ``drift_min_rows`` rows) keeps the canary waiting, and at ``max_minutes`` is not enough evidence,
  handled as above. A challenger is never promoted without that verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mlflow_deploy_plugin.lifecycle.gates import _EPS, GateResult, StageVerdict, _fmt
from mlflow_deploy_plugin.lifecycle.policy import CanaryPolicy


@dataclass(frozen=True)
class CanaryStats:
    """What the serving side measured for the challenger since the canary started."""

    requests: int
    errors: int  # answers that were not 2xx
    p99_latency_ms: float | None  # of successful answers
    elapsed_s: float
    # The drift check of the challenger's own rows (require_no_drift): None while there is no result,
    # else ok | drifted | insufficient_data | failed; ``drift_detail`` says on what it was judged.
    drift_status: str | None = None
    drift_detail: str | None = None
    champion_requests: int = 0  # the champion's answers over the same window
    champion_errors: int = 0

    @property
    def champion_error_rate(self) -> float | None:
        return self.champion_errors / self.champion_requests if self.champion_requests else None


class CanaryVerdict(StageVerdict):
    """``pending`` (keep waiting), ``pass`` (promote) or ``fail`` (roll the challenger back)."""

    stage = "canary"


def evaluate_canary(canary: CanaryPolicy, stats: CanaryStats) -> CanaryVerdict:
    """Judge a running canary: ``pending`` until ``min_requests`` is reached, then ``pass`` or
    ``fail`` (see the module docstring for how).

    Fails early, before the judging point, only when the outcome is already certain: the errors
    seen beyond the champion's rate exceed the error budget of the ``min_requests`` window
    (``max_error_rate * min_requests``), or the challenger is reported drifted while
    ``require_no_drift`` is on. At ``max_minutes`` with fewer than ``min_requests`` requests there is
    not enough evidence: ``fail``, or ``pending`` with ``insufficient_evidence: extend``.
    """
    if stats.requests < 0 or stats.errors < 0 or stats.errors > stats.requests or stats.elapsed_s < 0 \
            or stats.champion_errors < 0 or stats.champion_errors > stats.champion_requests:
        raise ValueError(f"inconsistent canary stats: {stats}")
    limit_s = canary.max_minutes * 60
    minutes = stats.elapsed_s / 60
    error_rate = stats.errors / stats.requests if stats.requests else None
    figures: dict[str, Any] = {"requests": stats.requests, "errors": stats.errors, "error_rate": error_rate,
                               "p99_latency_ms": stats.p99_latency_ms, "elapsed_s": stats.elapsed_s,
                               "drift_status": stats.drift_status, "min_requests": canary.min_requests,
                               "max_minutes": canary.max_minutes, "champion_requests": stats.champion_requests,
                               "champion_errors": stats.champion_errors,
                               "champion_error_rate": stats.champion_error_rate}
    progress = (f"{stats.requests} of {canary.min_requests} requests, {_fmt(minutes)} of "
                f"{_fmt(canary.max_minutes)} minutes")
    enough = stats.requests >= canary.min_requests
    timed_out = stats.elapsed_s >= limit_s

    drift = _canary_drift(canary, stats)
    drift_waiting = drift is not None and stats.drift_status not in ("ok", "drifted")
    if not enough:
        drifted = drift if stats.drift_status == "drifted" else None  # certain already; waiting is not
        certain = [result for result in (drifted, _early_error_check(canary, stats)) if result and not result.passed]
        if certain:
            return CanaryVerdict("fail", certain, figures)
        if not timed_out:
            waiting = GateResult("canary.evidence", False, f"waiting for evidence: {progress}",
                                 {"requests": stats.requests, "elapsed_s": stats.elapsed_s})
            return CanaryVerdict("pending", [waiting], figures)
        if stats.requests and canary.insufficient_evidence == "extend":
            waiting = GateResult("canary.evidence", False, f"max_minutes passed, extended until min_requests "
                                                           f"(insufficient_evidence: extend): {progress}",
                                 {"requests": stats.requests, "elapsed_s": stats.elapsed_s})
            return CanaryVerdict("pending", [waiting], figures)
        what = (f"no request reached the challenger in {_fmt(minutes)} minutes" if stats.requests == 0 else
                f"not enough evidence: {stats.requests} of {canary.min_requests} requests after "
                f"{_fmt(minutes)} minutes")
        results = [GateResult("canary.evidence", False, what,
                              {"requests": stats.requests, "min_requests": canary.min_requests,
                               "elapsed_s": stats.elapsed_s})]
        return CanaryVerdict("fail", results + ([drift] if drift else []), figures)

    results = [GateResult("canary.evidence", True, f"judged on {stats.requests} requests after "
                                                   f"{_fmt(minutes)} minutes (min_requests reached)",
                          {"requests": stats.requests, "elapsed_s": stats.elapsed_s})]
    if canary.max_error_rate is not None:
        assert error_rate is not None
        results.append(_error_rate_check(canary.max_error_rate, stats, error_rate))
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
    if drift_waiting and all(result.passed for result in results):
        assert drift is not None
        if not timed_out or canary.insufficient_evidence == "extend":
            return CanaryVerdict("pending", [*results, drift], figures)
        results.append(GateResult("canary.drift", False, f"not enough evidence: {drift.detail} after "
                                                          f"{_fmt(minutes)} minutes", drift.figures))
    elif drift and not drift_waiting:  # a check that did not conclude is no reason for a failure
        results.append(drift)
    status: Literal["pass", "fail"] = "pass" if all(result.passed for result in results) else "fail"
    return CanaryVerdict(status, results, figures)


def _pct(share: float) -> str:
    return f"{_fmt(share * 100)}%"


def _error_rate_check(max_error_rate: float, stats: CanaryStats, error_rate: float) -> GateResult:
    """The challenger's share of non-2xx answers against the champion's over the same window."""
    text = f"error rate {_pct(error_rate)} ({stats.errors} of {stats.requests})"
    champion = stats.champion_error_rate
    evidence = {"error_rate": error_rate, "champion_error_rate": champion, "max_error_rate": max_error_rate}
    if champion is None:
        over = error_rate - max_error_rate
        return GateResult(
            "canary.error_rate", over <= _EPS,
            f"{text} > {_pct(max_error_rate)} allowed (over by {_fmt(over * 100)} points; no champion "
            "traffic to compare with)" if over > _EPS
            else f"{text} <= {_pct(max_error_rate)} allowed (no champion traffic to compare with)", evidence)
    worse = error_rate - champion
    over = worse - max_error_rate
    versus = f"{text} vs the champion's {_pct(champion)} ({stats.champion_errors} of {stats.champion_requests})"
    return GateResult(
        "canary.error_rate", over <= _EPS,
        f"{versus}: worse by {_fmt(worse * 100)} points > {_fmt(max_error_rate * 100)} allowed" if over > _EPS
        else f"{versus}: within {_fmt(max_error_rate * 100)} points", evidence)


def _canary_drift(canary: CanaryPolicy, stats: CanaryStats) -> GateResult | None:
    """The drift line: passed only for ``ok``, failed for ``drifted``; anything else is no verdict
    yet (a failed line that keeps the canary waiting, see :func:`evaluate_canary`)."""
    if not canary.require_no_drift:
        return None
    status = stats.drift_status
    on = f" ({stats.drift_detail})" if stats.drift_detail else ""
    figures = {"drift_status": status, "drift_detail": stats.drift_detail}
    if status == "ok":
        return GateResult("canary.drift", True, f"the challenger's own traffic did not drift{on}", figures)
    if status == "drifted":
        return GateResult("canary.drift", False, f"the challenger's own traffic drifted{on}", figures)
    waiting = {None: "no drift verdict on the challenger's traffic yet",
               "insufficient_data": "too few rows of the challenger's traffic for a drift verdict",
               "failed": "the drift check of the challenger's traffic failed"}.get(status, f"drift status {status!r}")
    return GateResult("canary.drift", False, f"{waiting}{on}", figures)


def _early_error_check(canary: CanaryPolicy, stats: CanaryStats) -> GateResult | None:
    if canary.max_error_rate is None:
        return None
    budget = canary.max_error_rate * canary.min_requests
    # Errors the champion's own rate would explain are not held against the challenger.
    expected = (stats.champion_error_rate or 0.0) * canary.min_requests
    if stats.errors <= expected + budget + _EPS:
        return None
    return GateResult(
        "canary.error_rate", False,
        f"{stats.errors} errors in {stats.requests} requests already exceed what the "
        f"{canary.min_requests}-request window allows ({_fmt(expected)} at the champion's rate + a budget "
        f"of {_fmt(budget)} = {_pct(canary.max_error_rate)}): failing early",
        {"errors": stats.errors, "budget": budget, "champion_expected": expected,
         "max_error_rate": canary.max_error_rate})
