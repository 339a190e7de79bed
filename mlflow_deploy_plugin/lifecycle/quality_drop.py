"""The policy's ``quality`` trigger: has the served version's labelled quality fallen short K windows in a row?

Reads the quality report runs (:mod:`mlflow_deploy_plugin.quality.report`) of the version in the
deployment's monitoring experiment. Windows are by prediction time and a window may be reported
several times as labels come in: only the latest report of each window counts. A window falls short
when its figure is *significantly* worse than the policy's ``floor``, or than the version's own
training figure by more than ``max_drop``: the whole 95 % interval lies beyond the limit (one-sided,
alpha = 0.025). A window with ``not_enough_labels`` is no verdict, and so breaks a streak: the
policy never acts on too little.

Windows whose labels have not come yet are reported by the schedule with CBPE's estimate only (tag
``quality.estimate_only``, :mod:`mlflow_deploy_plugin.quality.due`). They are skipped (as if not
reported: the latest *labelled* windows decide), unless the policy says ``use_estimates: true``:
then such a window, and a ``not_enough_labels`` one with an estimate, is judged on the estimated
figure's interval instead, and its evidence says ``estimated``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlflow_deploy_plugin.lifecycle.policy import QualityPolicy
from mlflow_deploy_plugin.quality.report import ESTIMATE_ONLY_TAG


@dataclass(frozen=True)
class QualityDrop:
    """K windows in a row that fell short: why, the evidence, and the latest run (decided once)."""

    reason: str
    evidence: dict[str, Any]
    latest_run_id: str


def _short_of(policy: QualityPolicy, metrics: dict[str, float], prefix: str = "") -> str | None:
    """How this window's figure (``prefix``: ``estimated_`` for CBPE's) falls short of the policy, or None."""
    figure = policy.figure
    name = f"{prefix}{figure}"
    if name not in metrics:
        return None
    value, low, high = metrics[name], metrics.get(f"{name}.ci_low"), metrics.get(f"{name}.ci_high")
    worse_bound = low if policy.lower_is_better else high  # the interval's end nearest to "good"
    if worse_bound is None:
        return None
    limits = []
    if policy.floor is not None:
        limits.append(("floor", policy.floor))
    training = metrics.get(f"training.{figure}")
    if policy.max_drop is not None and training is not None:
        limits.append(("training", training + policy.max_drop if policy.lower_is_better
                       else training - policy.max_drop))
    word = "above" if policy.lower_is_better else "below"
    for kind, limit in limits:
        if (worse_bound > limit) if policy.lower_is_better else (worse_bound < limit):
            what = f"the floor {limit:.4g}" if kind == "floor" else (
                f"training {training:.4g} {'+' if policy.lower_is_better else '-'} {policy.max_drop:g}")
            return f"{name} {value:.4g} (95% CI {low:.4g}–{high:.4g}) is {word} {what}"
    return None


def find_quality_drop(client: Any, experiment_id: str, deployment: str, version: str,
                      policy: QualityPolicy) -> QualityDrop | None:
    """The streak of ``policy.consecutive_reports`` windows that fell short, or None."""
    k = policy.consecutive_reports
    runs = client.search_runs(
        [experiment_id],
        filter_string=(f"tags.`quality.deployment` = '{deployment}' and tags.`quality.model_version` = '{version}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=max(100, 8 * k))
    latest_per_window: dict[str, Any] = {}
    for run in runs:  # newest first: the first report of a window seen is its latest
        end = run.data.params.get("window_end")
        if run.data.tags.get(ESTIMATE_ONLY_TAG) == "true" and not policy.use_estimates:
            continue  # no labels yet: not a window this policy judges
        if end and "quality.status" in run.data.tags and end not in latest_per_window:
            latest_per_window[end] = run
    windows = [latest_per_window[end] for end in sorted(latest_per_window, reverse=True)][:k]
    if len(windows) < k:
        return None
    shortfalls, prefixes = [], []
    name = policy.figure
    for run in windows:
        if run.data.tags.get("quality.status") == "ok":
            prefix = ""
        elif policy.use_estimates and f"estimated_{name}" in run.data.metrics:
            prefix = "estimated_"
        else:
            return None
        short = _short_of(policy, run.data.metrics, prefix)
        if short is None:
            return None
        shortfalls.append(short)
        prefixes.append(prefix)
    evidence = {"report_run_ids": [r.info.run_id for r in windows],
                "windows": [{"start": r.data.params.get("window_start"), "end": r.data.params.get("window_end"),
                             name: r.data.metrics.get(f"{p}{name}"), "ci_low": r.data.metrics.get(f"{p}{name}.ci_low"),
                             "ci_high": r.data.metrics.get(f"{p}{name}.ci_high"),
                             "n": r.data.metrics.get("rows_answered" if p else "rows_labelled"),
                             "training": r.data.metrics.get(f"training.{name}"), "estimated": bool(p)}
                            for r, p in zip(windows, prefixes, strict=True)]}
    what = "labelled" if not any(prefixes) else "estimated" if all(prefixes) else "labelled or estimated"
    reason = (f"v{version}'s {what} {name} fell short in {k} consecutive windows: " + "; ".join(shortfalls))
    return QualityDrop(reason, evidence, windows[0].info.run_id)
