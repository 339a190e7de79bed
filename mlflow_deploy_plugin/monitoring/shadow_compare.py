"""Compare a shadow version's answers with the primary's on the very same requests.

Serving captures both answers of a mirrored request under one ``_request_id`` (``_role`` primary /
shadow, see ``serving/shadow.py``), so the comparison is an exact merge on (request id, row), never
a comparison of two populations. From the pairs:

- every task: how many requests were paired, each side's error rate (non-2xx: for the shadow, its
  calls that raised or timed out, among the copies it predicted) and latency
  (p50/p95/p99 of the per-request ``_latency_ms``). Beside them, the copies the shadow **dropped**
  (busy behind a hung call, crashed, queue_full, no_shadow): they leave no row, so they are counted
  as the copies mirrored (the primary's 2xx requests from the shadow's first row on, times the
  sample rate) minus the copies it answered: exact at ``shadow_sample_rate`` 1, else a lower
  bound (three standard deviations of the sampling below the estimate: sampling alone never shows
  as drops). The policy's ``max_error_rate`` judges the shadow's failures *and* drops among the
  copies sent to it (:attr:`ShadowComparison.shadow_failure_rate`): a shadow that dropped most
  copies and answered the rest well does not pass on those few. They measure different things, and the summary
  says so: the primary's is the time to answer the request; the shadow's is the call that predicted
  its copy, a batch of copies gathered up to 200 ms, in a process at low CPU priority beside the
  worker (local engine) or the replica (Ray). Two versions of equal cost show a far higher shadow
  p99 under load (a busy machine gives the primary the CPU first): a regression shows as a change
  between shadow reports, not as the gap to the primary;
- classification: the **agreement** (share of answered rows where both predicted the same class,
  compared as text like labels are: 1, 1.0 and "1" agree) and the confusion table primary × shadow;
- regression: the distribution of the differences shadow − primary (mean, sd, quantiles of the
  absolute difference, largest);
- with labels (issue 15's store, joined on the same keys): each side's accuracy or MAE on the same
  labelled rows and a *paired* test: McNemar's exact test on the discordant pairs for
  classification (statsmodels when installed, else the exact binomial test it reduces to),
  Wilcoxon's signed-rank test on the paired absolute errors for regression. Paired tests use the
  fact that both versions answered the same rows: far more power than two independent samples.

Pure data work (pandas, numpy, scipy): the report job (:mod:`.shadow_report`) logs it, the policy's
shadow gates (``lifecycle/gates.py``) judge it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mlflow_deploy_plugin.capture.layout import PREDICTION_PREFIX, ROLE_COLUMN

SHADOW = "shadow"


@dataclass
class LabelledComparison:
    """Both versions' quality on the same labelled rows, and the paired test between them."""

    rows: int
    metric: str  # accuracy (classification) or mae (regression)
    primary: float
    shadow: float
    test: str  # mcnemar_exact, binomial_exact or wilcoxon
    p_value: float
    shadow_worse: bool  # significantly worse at alpha (the policy's "not worse on labels" gate)
    discordant: dict[str, int] = field(default_factory=dict)  # classification: only_primary_right, only_shadow_right


@dataclass
class ShadowComparison:
    """What the pairs of one window say (see the module docstring); JSON-ready through :meth:`to_dict`."""

    primary_versions: list[str]
    shadow_version: str | None
    task: str
    requests: int  # paired requests (each side's row of the same request id)
    rows: int  # paired input rows
    answered_rows: int  # rows both answered (2xx, a prediction): what agreement counts over
    primary_error_rate: float
    shadow_error_rate: float
    primary_latency_ms: dict[str, float]
    shadow_latency_ms: dict[str, float]
    agreement: float | None = None  # classification
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # primary class -> shadow class -> rows
    difference: dict[str, float] = field(default_factory=dict)  # regression: shadow - primary
    labelled: LabelledComparison | None = None
    # Requests the primary answered in the window, mirrored or not: beside ``requests`` it shows the copies
    # the shadow never answered (dropped: busy behind a hung call, crashed, queue_full; or not sampled).
    primary_requests: int = 0
    # Copies mirrored to the shadow it never answered (see the module docstring); None: not known (the
    # sample rate of a past shadow).
    shadow_dropped: int | None = None

    @property
    def shadow_dropped_rate(self) -> float | None:
        """The share of the copies sent to the shadow (answered, failed or dropped) it dropped."""
        if self.shadow_dropped is None:
            return None
        sent = self.requests + self.shadow_dropped
        return self.shadow_dropped / sent if sent else 0.0

    @property
    def shadow_failure_rate(self) -> float:
        """The share of the copies sent to the shadow that it failed (raised, timed out) or dropped:
        what the policy's ``max_error_rate`` judges."""
        dropped = self.shadow_dropped or 0
        sent = self.requests + dropped
        return (self.shadow_error_rate * self.requests + dropped) / sent if sent else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shadow_dropped_rate": self.shadow_dropped_rate,
                "shadow_failure_rate": self.shadow_failure_rate}

    def figures(self) -> dict[str, float]:
        """Flat numeric figures (MLflow metrics, verdict gauges)."""
        out: dict[str, float | None] = {"requests": self.requests, "rows": self.rows, "answered_rows": self.answered_rows,
                                 "primary_requests": self.primary_requests,
                                 "primary_error_rate": self.primary_error_rate,
                                 "shadow_error_rate": self.shadow_error_rate,
                                 "shadow_dropped": self.shadow_dropped, "shadow_dropped_rate": self.shadow_dropped_rate,
                                 "shadow_failure_rate": self.shadow_failure_rate}
        for side, latency in (("primary", self.primary_latency_ms), ("shadow", self.shadow_latency_ms)):
            out.update({f"{side}_latency_{k}_ms": v for k, v in latency.items()})
        if self.agreement is not None:
            out["agreement"] = self.agreement
        out.update({f"difference_{k}": v for k, v in self.difference.items()})
        if self.labelled is not None:
            out.update({"labelled_rows": self.labelled.rows, f"primary_{self.labelled.metric}": self.labelled.primary,
                        f"shadow_{self.labelled.metric}": self.labelled.shadow, "paired_p_value": self.labelled.p_value})
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}

    def summary(self) -> str:
        """One line for people: the CLI, the history, the MLflow tag."""
        head = f"{self.requests:,} paired requests"
        if self.primary_requests > self.requests:
            head += f" (of {self.primary_requests:,} the primary answered)"
        if self.agreement is not None:
            head += f", agreement {self.agreement:.3f}"
        if self.difference:
            head += f", mean |difference| {self.difference.get('mean_abs', float('nan')):.4g}"
        head += f"; errors primary {self.primary_error_rate:.3f} / shadow {self.shadow_error_rate:.3f}"
        if self.shadow_dropped:
            head += (f", and the shadow dropped {self.shadow_dropped:,} of the {self.requests + self.shadow_dropped:,} "
                     f"copies sent to it ({self.shadow_dropped_rate:.3f}: busy, crashed, queue_full or no_shadow)")
        head += (f"; "
                 f"p99 latency primary {self.primary_latency_ms.get('p99', float('nan')):.1f} ms (answer) / shadow "
                 f"{self.shadow_latency_ms.get('p99', float('nan')):.1f} ms (batched call off the request path)")
        if self.labelled is not None:
            lab = self.labelled
            head += (f"; on {lab.rows:,} labelled rows {lab.metric} primary {lab.primary:.3f} / shadow "
                     f"{lab.shadow:.3f} ({lab.test} p={lab.p_value:.3g})")
        return head


def _prediction_column(frame: pd.DataFrame) -> str | None:
    from mlflow_deploy_plugin.quality.join import prediction_column

    present = [str(c) for c in frame.columns if str(c).startswith(PREDICTION_PREFIX) and frame[c].notna().any()]
    return prediction_column(present)


def _latency(per_request: pd.Series) -> dict[str, float]:
    values = per_request.dropna().to_numpy(dtype=float)
    if len(values) == 0:
        return {}
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
            "p99": float(np.percentile(values, 99)), "mean": float(values.mean())}


def _error_rate(statuses: pd.Series) -> float:
    if len(statuses) == 0:
        return 0.0
    return float((~statuses.fillna(200).astype(int).between(200, 299)).mean())


def infer_task(configured: str | None, predictions: pd.Series) -> str:
    """``-C task``, else from the primary's predictions (integral or text: classification)."""
    from mlflow_deploy_plugin.quality.report import infer_task as infer

    return infer(configured, None, predictions)


def dropped_copies(primary: pd.DataFrame, shadow: pd.DataFrame, answered: int, sample_rate: float | None,
                   open_end: bool = True) -> int | None:
    """The copies mirrored to the shadow that it never answered (see the module docstring).

    ``primary``/``shadow``: the window's rows of each role (the shadow's of one version); ``answered``:
    the requests paired; ``sample_rate``: the shadow's ``shadow_sample_rate`` (None: unknown, so no
    count); ``open_end``: the shadow is still set, so requests after its last row were mirrored too
    (else only those up to its last row count: it was removed or replaced then).
    """
    if sample_rate is None or not len(shadow):
        return None if sample_rate is None else 0
    requests = primary.drop_duplicates("_request_id")
    requests = requests[requests["_status"].fillna(200).astype(int).between(200, 299)]
    if "_timestamp" in requests and "_timestamp" in shadow:
        # Before the shadow's first row it may not have been set; a primary failure may not be mirrored.
        requests = requests[requests["_timestamp"] >= shadow["_timestamp"].min()]
        if not open_end:
            requests = requests[requests["_timestamp"] <= shadow["_timestamp"].max()]
    expected = len(requests) * sample_rate
    spread = 3.0 * math.sqrt(len(requests) * sample_rate * (1.0 - sample_rate))
    return max(0, int(math.floor(expected - spread + 1e-9)) - answered)


def compare_pairs(captured: pd.DataFrame, *, task: str | None = None, labels: pd.DataFrame | None = None,
                  alpha: float = 0.05, sample_rate: float | None = 1.0, open_end: bool = True) -> ShadowComparison:
    """The comparison of the (request id, row) pairs in ``captured`` (read with ``shadow=True``);
    ``sample_rate`` and ``open_end``: how the copies the shadow dropped are counted (:func:`dropped_copies`)."""
    role = captured[ROLE_COLUMN].fillna("primary") if ROLE_COLUMN in captured else pd.Series(
        "primary", index=captured.index)
    primary_all = captured[role != SHADOW]
    shadow_all = captured[role == SHADOW]
    ids = set(shadow_all["_request_id"]) & set(primary_all["_request_id"])
    primary = primary_all[primary_all["_request_id"].isin(ids)]
    shadow = shadow_all[shadow_all["_request_id"].isin(ids)]
    p_col, s_col = _prediction_column(primary), _prediction_column(shadow)
    keep = ["_request_id", "_row", "_status", "_latency_ms", "_model_version"]
    left = primary[keep + ([p_col] if p_col else [])].rename(columns={p_col: "_p"} if p_col else {})
    right = shadow[keep + ([s_col] if s_col else [])].rename(columns={s_col: "_s"} if s_col else {})
    left = left.assign(_row=left["_row"].fillna(0).astype("int64"))
    right = right.assign(_row=right["_row"].fillna(0).astype("int64"))
    pairs = left.merge(right, on=["_request_id", "_row"], suffixes=("", "_shadow"))
    if "_p" not in pairs:
        pairs["_p"] = None
    if "_s" not in pairs:
        pairs["_s"] = None
    per_request = pairs.drop_duplicates("_request_id")
    answered = pairs[pairs["_status"].fillna(200).astype(int).between(200, 299)
                     & pairs["_status_shadow"].fillna(200).astype(int).between(200, 299)
                     & pairs["_p"].notna() & pairs["_s"].notna()]
    task = infer_task(task, answered["_p"])
    result = ShadowComparison(
        primary_versions=sorted(set(pairs["_model_version"].astype(str))),
        shadow_version=str(pairs["_model_version_shadow"].iloc[0]) if len(pairs) else None,
        task=task, requests=len(per_request), rows=len(pairs), answered_rows=len(answered),
        primary_error_rate=_error_rate(per_request["_status"]),
        shadow_error_rate=_error_rate(per_request["_status_shadow"]),
        primary_latency_ms=_latency(per_request["_latency_ms"]),
        shadow_latency_ms=_latency(per_request["_latency_ms_shadow"]),
        primary_requests=int(primary_all["_request_id"].nunique()),
        shadow_dropped=dropped_copies(primary_all, shadow_all, len(per_request), sample_rate, open_end))
    if task == "classification":
        from mlflow_deploy_plugin.quality.labels import canonical

        p, s = canonical(answered["_p"]), canonical(answered["_s"])
        if len(answered):
            result.agreement = float((p.to_numpy() == s.to_numpy()).mean())
            table = pd.crosstab(p.rename("primary"), s.rename("shadow"))
            result.confusion = {str(i): {str(c): int(table.loc[i, c]) for c in table.columns} for i in table.index}
    else:
        p_num = pd.to_numeric(answered["_p"], errors="coerce").to_numpy(dtype=float)
        s_num = pd.to_numeric(answered["_s"], errors="coerce").to_numpy(dtype=float)
        diff = (s_num - p_num)[np.isfinite(s_num - p_num)]
        if len(diff):
            absolute = np.abs(diff)
            result.difference = {"mean": float(diff.mean()), "sd": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                                 "mean_abs": float(absolute.mean()), "p50_abs": float(np.percentile(absolute, 50)),
                                 "p90_abs": float(np.percentile(absolute, 90)),
                                 "p99_abs": float(np.percentile(absolute, 99)), "max_abs": float(absolute.max())}
    if labels is not None and len(labels) and len(answered):
        result.labelled = _labelled(answered, labels, task, alpha)
    return result


def _labelled(answered: pd.DataFrame, labels: pd.DataFrame, task: str, alpha: float) -> LabelledComparison | None:
    from mlflow_deploy_plugin.quality.labels import LABEL, canonical

    keyed = labels[["_request_id", "_row", LABEL]].assign(_row=labels["_row"].astype("int64"))
    rows = answered.merge(keyed, on=["_request_id", "_row"], how="inner")
    if rows.empty:
        return None
    if task == "classification":
        label = canonical(rows[LABEL]).to_numpy()
        p_right = canonical(rows["_p"]).to_numpy() == label
        s_right = canonical(rows["_s"]).to_numpy() == label
        only_p, only_s = int((p_right & ~s_right).sum()), int((~p_right & s_right).sum())
        p_value, test = mcnemar_exact(only_p, only_s)
        return LabelledComparison(len(rows), "accuracy", float(p_right.mean()), float(s_right.mean()), test,
                                  p_value, shadow_worse=only_p > only_s and p_value < alpha,
                                  discordant={"only_primary_right": only_p, "only_shadow_right": only_s})
    truth = pd.to_numeric(rows[LABEL], errors="coerce").to_numpy(dtype=float)
    p_err = np.abs(pd.to_numeric(rows["_p"], errors="coerce").to_numpy(dtype=float) - truth)
    s_err = np.abs(pd.to_numeric(rows["_s"], errors="coerce").to_numpy(dtype=float) - truth)
    ok = np.isfinite(p_err) & np.isfinite(s_err)
    p_err, s_err = p_err[ok], s_err[ok]
    if len(p_err) == 0:
        return None
    p_value = wilcoxon_paired(p_err, s_err)
    return LabelledComparison(int(len(p_err)), "mae", float(p_err.mean()), float(s_err.mean()), "wilcoxon", p_value,
                              shadow_worse=float(s_err.mean()) > float(p_err.mean()) and p_value < alpha)


def mcnemar_exact(only_primary_right: int, only_shadow_right: int) -> tuple[float, str]:
    """Two-sided exact McNemar p-value on the discordant pairs, and the name of the test used."""
    if only_primary_right + only_shadow_right == 0:
        return 1.0, "mcnemar_exact"
    try:
        from statsmodels.stats.contingency_tables import mcnemar
    except ImportError:
        from scipy.stats import binomtest

        # McNemar's exact test is the binomial test of the discordant pairs against 1/2.
        n = only_primary_right + only_shadow_right
        return float(binomtest(only_primary_right, n, 0.5).pvalue), "binomial_exact"
    table = [[0, only_primary_right], [only_shadow_right, 0]]
    return float(mcnemar(table, exact=True).pvalue), "mcnemar_exact"


def wilcoxon_paired(primary_errors: np.ndarray, shadow_errors: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired absolute errors (1 when they never differ)."""
    from scipy.stats import wilcoxon

    if not np.any(primary_errors != shadow_errors):
        return 1.0
    return float(wilcoxon(shadow_errors, primary_errors, zero_method="wilcox").pvalue)
