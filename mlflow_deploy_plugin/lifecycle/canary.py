"""Canary judgement: turn a challenger's live figures into pending / pass / fail.

Kept apart from the promotion gates because it judges something else at another time: the gates
read the registry once, before any traffic; the canary is judged again and again on what serving
measured while the challenger takes its share (:mod:`.traffic_stats` collects the figures), from
those figures alone: no registry, no model. Its results are :class:`.gates.GateResult` lines, so
reports and audit records read the same.

Canary checks in reports: ``canary.evidence``, ``canary.error_rate``, ``canary.p99_latency``,
``canary.drift`` and ``canary.quality``.

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
- **Quality** (``quality_margin``): the labelled rows each version answered since the canary
  started (labels joined by :mod:`.canary_quality`) compare the challenger with the champion on the
  same window: accuracy for classifiers, MAE for regressors. It fails when the challenger is worse
  by more than ``quality_margin`` *significantly*: the whole 95 % interval of the difference lies
  beyond the margin (a one-sided test at alpha 0.025), with Newcombe's hybrid score interval for
  the difference of two accuracies (the versions answered different rows: independent samples)
  or Welch's t interval on the absolute errors. Below ``min_labelled_rows`` labelled rows on either
  side there are not enough labels: no verdict, the canary waits, and at ``max_minutes`` that is
  not enough evidence, handled as above. A challenger is never promoted without that verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    # Both versions' labelled rows since the canary started (quality_margin); None: not looked yet.
    quality: CanaryQuality | None = None

    @property
    def champion_error_rate(self) -> float | None:
        return self.champion_errors / self.champion_requests if self.champion_requests else None


@dataclass(frozen=True)
class LabelledSide:
    """One version's labelled rows over the canary window, summed up for the comparison."""

    n: int
    value: float  # accuracy (classification) or MAE (regression)
    hits: int = 0  # classification: rows answered right
    sd: float = 0.0  # regression: sample standard deviation of the absolute errors


@dataclass(frozen=True)
class CanaryQuality:
    """The challenger's and the champion's labelled rows over the same window."""

    task: Literal["classification", "regression"]
    challenger: LabelledSide
    champion: LabelledSide
    detail: str = ""  # on what it rests, for the verdict line (window, labels read)

    @property
    def metric(self) -> str:
        return "accuracy" if self.task == "classification" else "mae"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CanaryQuality:
        return cls(data["task"], LabelledSide(**data["challenger"]), LabelledSide(**data["champion"]),
                   data.get("detail", ""))


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
    quality, quality_waiting = _canary_quality(canary, stats)
    if quality is not None:
        figures["quality"] = quality.figures
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
        return CanaryVerdict("fail", results + [check for check in (drift, quality) if check], figures)

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
    # The checks on what the challenger served (drift, labels): a check that did not conclude yet is
    # no reason for a failure, but keeps a canary that passed everything else waiting.
    live = [(check, waiting) for check, waiting in ((drift, drift_waiting), (quality, quality_waiting)) if check]
    results.extend(check for check, waiting in live if not waiting)
    waiting_checks = [check for check, waiting in live if waiting]
    if waiting_checks and all(result.passed for result in results):
        if not timed_out or canary.insufficient_evidence == "extend":
            return CanaryVerdict("pending", [*results, *waiting_checks], figures)
        results.extend(GateResult(check.gate, False, f"not enough evidence: {check.detail} after "
                                                     f"{_fmt(minutes)} minutes", check.figures)
                       for check in waiting_checks)
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


def _canary_quality(canary: CanaryPolicy, stats: CanaryStats) -> tuple[GateResult | None, bool]:
    """The labelled-quality line (``quality_margin``) and whether it is still waiting for labels."""
    margin = canary.quality_margin
    if margin is None:
        return None, False
    need = canary.min_labelled_rows
    q = stats.quality
    on = f"; {q.detail}" if q is not None and q.detail else ""
    if q is None or q.challenger.n < need or q.champion.n < need:
        counts = ("no labels looked at yet" if q is None else
                  f"{q.challenger.n} labelled rows of the challenger, {q.champion.n} of the champion")
        figures = {"min_labelled_rows": need, "quality_margin": margin,
                   **({} if q is None else q.to_dict())}
        return GateResult("canary.quality", False, f"not enough labels: {counts} (min_labelled_rows={need} "
                                                   f"each){on}", figures), True
    # Imported here: numpy/scipy are loaded only where labels are judged (the controller's CLI verbs
    # do not need them).
    from mlflow_deploy_plugin.quality.metrics import newcombe_difference, welch_difference

    chal, champ = q.challenger, q.champion
    if q.task == "classification":
        diff = newcombe_difference(champ.hits, champ.n, chal.hits, chal.n)  # champion - challenger
    else:
        diff = welch_difference(champ.value, champ.sd, champ.n, chal.value, chal.sd, chal.n)  # challenger - champion
    worse = diff.low > margin + _EPS
    figures = {**q.to_dict(), "metric": q.metric, "worse_by": diff.value, "ci_low": diff.low, "ci_high": diff.high,
               "test": diff.test, "quality_margin": margin, "min_labelled_rows": need}
    text = (f"labelled {q.metric} {_fmt(chal.value)} (n = {chal.n}) vs the champion's {_fmt(champ.value)} "
            f"(n = {champ.n}): worse by {_fmt(diff.value)} (95% CI {_fmt(diff.low)} to {_fmt(diff.high)}, "
            f"{diff.test})")
    verdict = (f"significantly more than the margin {_fmt(margin)}" if worse
               else f"not significantly more than the margin {_fmt(margin)}")
    return GateResult("canary.quality", not worse, f"{text}: {verdict}{on}", figures), False
