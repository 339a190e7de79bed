"""The canary's `quality` check: the challenger's labelled quality against the champion's on the
same window, with known answers for the two interval methods and every branch of the verdict."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from mlflow_deploy_plugin.lifecycle.canary import CanaryQuality, CanaryStats, LabelledSide, evaluate_canary
from mlflow_deploy_plugin.lifecycle.policy import CanaryPolicy, PolicyError, parse_policy
from mlflow_deploy_plugin.quality.metrics import newcombe_difference, welch_difference

CANARY = CanaryPolicy(percent=10, min_requests=200, max_minutes=30, max_error_rate=None, max_p99_latency_ms=None,
                      quality_margin=0.02, min_labelled_rows=100)
TRAFFIC = {"requests": 200, "errors": 0, "p99_latency_ms": 50.0, "elapsed_s": 600.0}


def _classified(challenger: tuple[int, int], champion: tuple[int, int]) -> CanaryQuality:
    (ch, cn), (kh, kn) = challenger, champion
    return CanaryQuality("classification", LabelledSide(cn, ch / cn, hits=ch), LabelledSide(kn, kh / kn, hits=kh))


def test_newcombe_interval_matches_the_published_example() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, table II example (c): 56/70 - 48/80, method 10.
    diff = newcombe_difference(56, 70, 48, 80)
    assert diff.value == pytest.approx(0.2)
    assert (round(diff.low, 4), round(diff.high, 4)) == (0.0524, 0.3339)
    assert "Newcombe" in diff.test


def test_welch_interval_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    a, b = np.abs(rng.normal(0, 1.0, 150)), np.abs(rng.normal(0, 1.6, 90))
    diff = welch_difference(a.mean(), a.std(ddof=1), len(a), b.mean(), b.std(ddof=1), len(b))
    expected = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert diff.value == pytest.approx(b.mean() - a.mean())
    assert (diff.low, diff.high) == pytest.approx((expected.low, expected.high))
    assert "Welch" in diff.test


def test_without_enough_labels_the_canary_waits_and_is_never_promoted() -> None:
    # Everything else passed; 99 labelled rows of the challenger: no verdict on labels yet.
    few = CanaryStats(**TRAFFIC, quality=_classified((99, 99), (500, 500)))
    verdict = evaluate_canary(CANARY, few)
    assert verdict.status == "pending"
    assert verdict.results[-1].line("WAIT") == (
        "WAIT canary.quality: not enough labels: 99 labelled rows of the challenger, 500 of the champion "
        "(min_labelled_rows=100 each)")
    # Not looked at yet: the same.
    assert evaluate_canary(CANARY, CanaryStats(**TRAFFIC)).status == "pending"
    # At max_minutes still too few: not enough evidence, rejected ...
    late = dataclasses.replace(few, elapsed_s=1800)
    verdict = evaluate_canary(CANARY, late)
    assert verdict.status == "fail"
    assert verdict.results[-1].detail.startswith("not enough evidence: not enough labels: 99 labelled rows")
    assert verdict.results[-1].detail.endswith("after 30 minutes")
    # ... or, with insufficient_evidence: extend, the canary waits on.
    assert evaluate_canary(dataclasses.replace(CANARY, insufficient_evidence="extend"), late).status == "pending"
    # Without quality_margin labels are not waited for.
    no_check = dataclasses.replace(CANARY, quality_margin=None)
    assert evaluate_canary(no_check, CanaryStats(**TRAFFIC)).status == "pass"


def test_a_challenger_significantly_worse_by_more_than_the_margin_fails_with_the_test_named() -> None:
    # 150/200 right vs the champion's 190/200: worse by 0.2, Newcombe interval well above 0.02.
    verdict = evaluate_canary(CANARY, CanaryStats(**TRAFFIC, quality=_classified((150, 200), (190, 200))))
    assert verdict.status == "fail"
    line = verdict.results[-1]
    assert line.gate == "canary.quality" and not line.passed
    expected = newcombe_difference(190, 200, 150, 200)
    assert line.figures["worse_by"] == pytest.approx(0.2)
    assert (line.figures["ci_low"], line.figures["ci_high"]) == (expected.low, expected.high)
    assert line.figures["test"] == expected.test and line.figures["challenger"]["n"] == 200
    assert line.detail.startswith("labelled accuracy 0.75 (n = 200) vs the champion's 0.95 (n = 200): worse by 0.2")
    assert "Newcombe hybrid score interval" in line.detail
    assert line.detail.endswith("significantly more than the margin 0.02")
    assert verdict.summary().splitlines()[0] == "canary fail: canary.quality"
    assert verdict.figures["quality"]["worse_by"] == pytest.approx(0.2)


def test_a_challenger_within_the_margin_or_not_significantly_worse_passes() -> None:
    # Slightly worse on few rows: the interval reaches below the margin, so no evidence it is worse.
    verdict = evaluate_canary(CANARY, CanaryStats(**TRAFFIC, quality=_classified((180, 200), (186, 200))))
    assert verdict.status == "pass", verdict.summary()
    assert verdict.results[-1].detail.endswith("not significantly more than the margin 0.02")
    # Better than the champion: a negative difference.
    verdict = evaluate_canary(CANARY, CanaryStats(**TRAFFIC, quality=_classified((198, 200), (180, 200))))
    assert verdict.status == "pass" and verdict.results[-1].figures["worse_by"] == pytest.approx(-0.09)


def test_a_regressor_is_judged_on_its_absolute_errors() -> None:
    policy = dataclasses.replace(CANARY, quality_margin=0.5)
    worse = CanaryQuality("regression", LabelledSide(300, 3.0, sd=1.0), LabelledSide(400, 2.0, sd=1.0))
    verdict = evaluate_canary(policy, CanaryStats(**TRAFFIC, quality=worse))
    assert verdict.status == "fail"
    assert verdict.results[-1].detail.startswith("labelled mae 3 (n = 300) vs the champion's 2 (n = 400): worse by 1")
    assert "Welch's t interval on absolute errors" in verdict.results[-1].detail
    within = dataclasses.replace(worse, challenger=LabelledSide(300, 2.3, sd=1.0))
    assert evaluate_canary(policy, CanaryStats(**TRAFFIC, quality=within)).status == "pass"


def test_the_policy_keys() -> None:
    canary = parse_policy("model: m\npromotion:\n  canary: {quality_margin: 0.03, min_labelled_rows: 50}\n"
                          ).promotion.canary
    assert canary is not None and (canary.quality_margin, canary.min_labelled_rows) == (0.03, 50)
    assert parse_policy("model: m\npromotion:\n  canary: true\n").promotion.canary.quality_margin is None
    with pytest.raises(PolicyError, match="promotion.canary.quality_margin: -0.1 is out of range"):
        parse_policy("model: m\npromotion:\n  canary: {quality_margin: -0.1}\n")
    with pytest.raises(PolicyError, match="promotion.canary.min_labelled_rows: expected an integer"):
        parse_policy("model: m\npromotion:\n  canary: {min_labelled_rows: 1.5}\n")


def test_the_figures_survive_the_state_file() -> None:
    quality = _classified((150, 200), (190, 200))
    assert CanaryQuality.from_dict(quality.to_dict()) == quality
