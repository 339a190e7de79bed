"""Shadow judgement: turn the pairs of a challenger's shadow stage into pending / pass / fail.

The shadow stage comes after the gates and before the canary: the challenger is loaded beside the
champion as ``-C shadow`` and answers a copy of the live requests; nobody receives its answers.
It is judged on the pairs captured since the stage started (:mod:`..monitoring.shadow_compare`),
so a challenger whose answers differ is rejected before any user sees one of them.

Checks (``shadow.*`` lines, :class:`.gates.GateResult` like the gates and the canary):

- ``shadow.evidence``: judged once ``min_requests`` requests were answered by both; at
  ``max_minutes`` with fewer, not enough evidence: rejected, or (``insufficient_evidence: extend``)
  the stage goes on.
- ``shadow.agreement`` (classification, ``min_agreement``): the share of rows where both predicted
  the same class.
- ``shadow.difference`` (regression, ``max_mean_abs_difference``): mean |shadow − primary|. It has no
  default (it is in the target's units): unset, the line is a SKIP that gives the figure, so the
  record says the answers were not judged.
- ``shadow.error_rate`` (``max_error_rate``): the share of the copies sent to the shadow that it
  failed (raised, timed out) *or dropped* (busy behind a hung call, crashed, queue_full, no_shadow:
  ``ShadowComparison.shadow_failure_rate``) beyond the primary's error rate on the same requests.
  Judged on the pairs alone, a shadow that hung or crashed on most copies and answered the few
  others well passed: the dropped copies leave no pair.
- ``shadow.labels`` (``not_worse_on_labels``): with at least ``min_labelled_rows`` labelled pairs,
  the challenger must not be significantly worse than the champion on them (paired test at
  alpha 0.05); with fewer, the line says so and does not hold the stage back (labels often come
  later than a shadow stage lasts).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

from mlflow_deploy_plugin.lifecycle.gates import _EPS, GateResult, StageVerdict, _fmt
from mlflow_deploy_plugin.lifecycle.policy import ShadowPolicy
from mlflow_deploy_plugin.monitoring.shadow_compare import ShadowComparison


class ShadowVerdict(StageVerdict):
    """``pending`` (keep mirroring), ``pass`` (on to the canary or promotion) or ``fail`` (reject)."""

    stage = "shadow"


def evaluate_shadow(policy: ShadowPolicy, comparison: ShadowComparison, elapsed_s: float) -> ShadowVerdict:
    """Judge a shadow stage on its pairs so far (see the module docstring)."""
    figures = {"elapsed_s": elapsed_s, "min_requests": policy.min_requests, **comparison.figures()}
    minutes = elapsed_s / 60
    progress = (f"{comparison.requests} of {policy.min_requests} paired requests, {_fmt(minutes)} of "
                f"{_fmt(policy.max_minutes)} minutes")
    if comparison.requests < policy.min_requests:
        if elapsed_s < policy.max_minutes * 60 or (comparison.requests and policy.insufficient_evidence == "extend"):
            return ShadowVerdict("pending", [GateResult("shadow.evidence", False, f"waiting for evidence: {progress}",
                                                        {"requests": comparison.requests})], figures)
        return ShadowVerdict("fail", [GateResult(
            "shadow.evidence", False, f"not enough evidence: {progress}",
            {"requests": comparison.requests, "min_requests": policy.min_requests})], figures)
    results = [GateResult("shadow.evidence", True, f"judged on {comparison.requests} paired requests "
                                                   f"({comparison.answered_rows} rows both answered) after "
                                                   f"{_fmt(minutes)} minutes", {"requests": comparison.requests})]
    if comparison.task == "classification" and policy.min_agreement is not None:
        agreement = comparison.agreement
        if agreement is None:
            results.append(GateResult("shadow.agreement", False, "no row was answered by both versions",
                                      {"min_agreement": policy.min_agreement}))
        else:
            short = policy.min_agreement - agreement
            results.append(GateResult(
                "shadow.agreement", short <= _EPS,
                f"agreement {_fmt(agreement)} < {_fmt(policy.min_agreement)} required (the challenger answered "
                f"differently on {_fmt((1 - agreement) * 100)}% of {comparison.answered_rows} rows)" if short > _EPS
                else f"agreement {_fmt(agreement)} >= {_fmt(policy.min_agreement)} required",
                {"agreement": agreement, "min_agreement": policy.min_agreement, "confusion": comparison.confusion}))
    unjudged = _unjudged_answers(policy, comparison)
    if unjudged is not None:
        results.append(unjudged)
    if comparison.task == "regression" and policy.max_mean_abs_difference is not None:
        mean_abs = comparison.difference.get("mean_abs")
        if mean_abs is None:
            results.append(GateResult("shadow.difference", False, "no row was answered by both versions",
                                      {"max_mean_abs_difference": policy.max_mean_abs_difference}))
        else:
            over = mean_abs - policy.max_mean_abs_difference
            results.append(GateResult(
                "shadow.difference", over <= _EPS,
                f"mean |difference| {_fmt(mean_abs)} {'>' if over > _EPS else '<='} "
                f"{_fmt(policy.max_mean_abs_difference)} allowed",
                {**comparison.difference, "max_mean_abs_difference": policy.max_mean_abs_difference}))
    if policy.max_error_rate is not None:
        failed = comparison.shadow_failure_rate
        worse = failed - comparison.primary_error_rate
        over = worse - policy.max_error_rate
        dropped = comparison.shadow_dropped or 0
        what = (f"failed or dropped {_fmt(failed * 100)}% of the {comparison.requests + dropped} copies sent to it "
                f"(errors {_fmt(comparison.shadow_error_rate * 100)}% of the {comparison.requests} it predicted, "
                f"{dropped} dropped)" if dropped else f"error rate {_fmt(failed * 100)}%")
        results.append(GateResult(
            "shadow.error_rate", over <= _EPS,
            f"{what} vs the champion's {_fmt(comparison.primary_error_rate * 100)}% on the same requests: "
            + (f"worse by {_fmt(worse * 100)} points > {_fmt(policy.max_error_rate * 100)} allowed" if over > _EPS
               else f"within {_fmt(policy.max_error_rate * 100)} points"),
            {"shadow_failure_rate": failed, "shadow_error_rate": comparison.shadow_error_rate,
             "shadow_dropped": comparison.shadow_dropped, "primary_error_rate": comparison.primary_error_rate,
             "max_error_rate": policy.max_error_rate}))
    if policy.not_worse_on_labels:
        lab = comparison.labelled
        rows = lab.rows if lab is not None else 0
        if lab is None or rows < policy.min_labelled_rows:
            results.append(GateResult("shadow.labels", True, f"{rows} labelled pairs < min_labelled_rows="
                                                             f"{policy.min_labelled_rows}: not judged on labels",
                                      {"labelled_rows": rows}, skipped=True))
        else:
            results.append(GateResult(
                "shadow.labels", not lab.shadow_worse,
                f"on {rows} labelled pairs {lab.metric} {_fmt(lab.shadow)} vs the champion's {_fmt(lab.primary)}: "
                + (f"significantly worse ({lab.test} p={lab.p_value:.3g})" if lab.shadow_worse
                   else f"not significantly worse ({lab.test} p={lab.p_value:.3g})"), asdict(lab)))
    status: Literal["pass", "fail"] = "pass" if all(r.passed for r in results) else "fail"
    return ShadowVerdict(status, results, figures)


def _unjudged_answers(policy: ShadowPolicy, comparison: ShadowComparison) -> GateResult | None:
    """A SKIP line when the task's answer check is not set (``max_mean_abs_difference`` has no default:
    it is in the target's units): the record then says the answers were not judged, and how they
    differed, instead of passing a regression challenger without a word on its answers."""
    if comparison.task == "regression" and policy.max_mean_abs_difference is None:
        mean_abs = comparison.difference.get("mean_abs")
        shown = f"mean |difference| {_fmt(mean_abs)}" if mean_abs is not None else "no row answered by both"
        return GateResult("shadow.difference", True, f"{shown}: not judged (set promotion.shadow."
                                                     "max_mean_abs_difference, in the target's units, to gate on it)",
                          dict(comparison.difference), skipped=True)
    if comparison.task == "classification" and policy.min_agreement is None:
        shown = f"agreement {_fmt(comparison.agreement)}" if comparison.agreement is not None else "no row answered by both"
        return GateResult("shadow.agreement", True, f"{shown}: not judged (promotion.shadow.min_agreement is null)",
                          {"agreement": comparison.agreement}, skipped=True)
    return None
