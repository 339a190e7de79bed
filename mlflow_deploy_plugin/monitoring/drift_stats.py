"""Exact, vectorised drift statistics on all rows: the source of truth for drift verdicts.

Evidently's ``DataDriftPreset`` costs ~170 s and ~1.9 GB on 1M x 25 rows and its default categorical
test (``chisquare``) is a one-sample goodness-of-fit test that treats the reference frequencies as
exact; with a reference of similar size to the window it flags drift in 20-50 % of windows with no
drift at all. Here every column is tested once, on every non-missing row, with numpy/scipy. Which
test runs on which column, and with what threshold, is decided by :mod:`.drift_methods` (the method
table and the defaults are documented there); this module computes.

Column kinds (decided on the reference; see :func:`column_kind`):

* bool, object, string and category dtypes are categorical;
* numeric dtypes are numeric, except integer-valued columns with at most
  :data:`MAX_INTEGER_LEVELS` (10) distinct values in the reference, which are categorical (codes,
  ratings, counts of a few values: KS on them is very conservative and a chi-square test is apt);
* datetimes are numeric (their epoch nanoseconds);
* a method chosen for a column can override its kind (see :mod:`.drift_methods`).

Missing values (NaN/None/NaT, and +-inf in numeric columns) are dropped per column and counted.
If the current side of a numeric column arrives with another dtype (e.g. strings in captured JSON)
it is converted with ``pd.to_numeric(errors="coerce")``: unconvertible values count as missing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from scipy.spatial import distance

from .drift_methods import (
    METHODS,
    ColumnKind,
    ColumnMethod,
    ScoreType,
    method_for_column,
    parse_defaults,
    parse_methods,
)

#: Integer-valued numeric columns with at most this many distinct reference values are categorical.
MAX_INTEGER_LEVELS = 10
#: Below this many rows on both sides KS p-values are exact (scipy's ``method="auto"`` cut-off).
KS_EXACT_MAX_N = 10_000
#: Quantile bins of the reference used by ``psi`` and ``jensenshannon`` on numeric columns.
N_BINS = 10
#: Proportion substituted for empty bins in PSI (its log is undefined at 0).
PSI_EPSILON = 1e-4
#: Minimum expected count per cell for the chi-square approximation; rarer categories are pooled.
CHI2_MIN_EXPECTED = 5.0
#: Floor of the reference std used to norm the Wasserstein distance (as Evidently does).
WASSERSTEIN_MIN_STD = 1e-3
#: New categories listed in a column's details (the count of all of them is always given).
MAX_LISTED_NEW_CATEGORIES = 20


@dataclass
class ColumnDrift:
    """The drift verdict of one column.

    ``statistic`` is the test statistic (KS D, chi-square) or the distance; ``score`` is what is
    compared with ``threshold``: the p-value for tests (drifted when below), the distance for
    effect-size methods (drifted when at or above). Both are None when the column was skipped.
    """

    name: str
    kind: ColumnKind | None
    method: str
    threshold: float
    score_type: ScoreType
    statistic: float | None
    score: float | None
    drifted: bool
    n_ref: int
    n_cur: int
    n_ref_missing: int = 0
    n_cur_missing: int = 0
    skipped_reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return _jsonable(asdict(self))


@dataclass
class DriftResult:
    """Per-column verdicts and the dataset verdict.

    ``drift_share`` is the share of *tested* columns that drifted (skipped columns, e.g. all values
    missing on one side, are listed but not counted); the dataset drifted when the share is at
    least ``drift_share_threshold`` (Evidently's rule).
    """

    columns: list[ColumnDrift]
    drift_share: float
    n_drifted: int
    n_tested: int
    dataset_drifted: bool
    n_reference: int
    n_current: int
    alpha: float
    drift_share_threshold: float
    missing_in_current: list[str] = field(default_factory=list)

    @property
    def drifted_columns(self) -> list[str]:
        """Names of the drifted columns, in column order."""
        return [col.name for col in self.columns if col.drifted]

    def column(self, name: str) -> ColumnDrift:
        """The verdict of column ``name``."""
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (NaN/inf become None)."""
        return {
            "drift_share": _num(self.drift_share),
            "n_drifted": self.n_drifted,
            "n_tested": self.n_tested,
            "dataset_drifted": self.dataset_drifted,
            "drift_share_threshold": self.drift_share_threshold,
            "alpha": self.alpha,
            "n_reference": self.n_reference,
            "n_current": self.n_current,
            "drifted_columns": self.drifted_columns,
            "missing_in_current": list(self.missing_in_current),
            "columns": {col.name: col.to_dict() for col in self.columns},
        }


def _num(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return _num(value)


# --------------------------------------------------------------------------------------------------
# Column kinds and value extraction


def _is_categorical_dtype(dtype: Any) -> bool:
    return (pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_object_dtype(dtype)
            or pd.api.types.is_string_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype))


def _numeric_values(series: pd.Series) -> tuple[np.ndarray, int]:
    """Finite float64 values and the count of missing ones (NaN, inf, unconvertible)."""
    if pd.api.types.is_datetime64_any_dtype(series.dtype) or pd.api.types.is_timedelta64_dtype(series.dtype):
        mask = series.notna().to_numpy()
        values = series.to_numpy()[mask].astype("int64").astype(np.float64)
        return values, int(len(series) - len(values))
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    finite = np.isfinite(values)
    if finite.all():
        return values, 0
    return values[finite], int(len(values) - finite.sum())


def _distinct_sorted(sorted_values: np.ndarray) -> int:
    if len(sorted_values) == 0:
        return 0
    return int(np.count_nonzero(sorted_values[1:] != sorted_values[:-1])) + 1


def column_kind(reference: pd.Series) -> ColumnKind | None:
    """Kind of a reference column: ``numeric``, ``categorical`` or None (unsupported dtype).

    Rule: bool/object/string/category -> categorical; numeric and datetime dtypes -> numeric, unless
    all non-missing values are integers and there are at most :data:`MAX_INTEGER_LEVELS` distinct ones
    (then categorical). Requiring integer values keeps small samples of continuous data numeric.
    """
    if _is_categorical_dtype(reference.dtype):
        return "categorical"
    if pd.api.types.is_datetime64_any_dtype(reference.dtype) or pd.api.types.is_timedelta64_dtype(reference.dtype):
        return "numeric"
    if pd.api.types.is_complex_dtype(reference.dtype) or not pd.api.types.is_numeric_dtype(reference.dtype):
        return None
    values, _ = _numeric_values(reference)
    return _numeric_kind(np.sort(values))


def _numeric_kind(sorted_ref: np.ndarray) -> ColumnKind:
    if _distinct_sorted(sorted_ref) <= MAX_INTEGER_LEVELS:
        levels = np.unique(sorted_ref)
        if np.all(levels == np.floor(levels)):
            return "categorical"
    return "numeric"


# --------------------------------------------------------------------------------------------------
# Statistics


def _ks(ref_sorted: np.ndarray, cur_sorted: np.ndarray) -> tuple[float, float]:
    """Two-sample two-sided KS statistic and p-value, identical to ``scipy.stats.ks_2samp``.

    Small samples go to scipy itself (exact p-values, cheap there). Large ones use a vectorised
    evaluation of the two ECDFs at every observed value (``searchsorted`` on the sorted arrays,
    ties counted once at their last position) and scipy's asymptotic ``kstwo`` distribution, as
    ``ks_2samp(method="auto")`` does above 10,000 rows.
    """
    n, m = len(ref_sorted), len(cur_sorted)
    if max(n, m) <= KS_EXACT_MAX_N:
        res = stats.ks_2samp(ref_sorted, cur_sorted)
        return float(res.statistic), float(res.pvalue)
    last_r = np.ones(n, dtype=bool)
    np.not_equal(ref_sorted[1:], ref_sorted[:-1], out=last_r[:-1])
    last_c = np.ones(m, dtype=bool)
    np.not_equal(cur_sorted[1:], cur_sorted[:-1], out=last_c[:-1])
    idx_r = np.flatnonzero(last_r)
    idx_c = np.flatnonzero(last_c)
    # ECDF differences at the reference's and at the current's distinct values.
    d_at_r = np.abs((idx_r + 1) / n - np.searchsorted(cur_sorted, ref_sorted[idx_r], side="right") / m).max()
    d_at_c = np.abs(np.searchsorted(ref_sorted, cur_sorted[idx_c], side="right") / n - (idx_c + 1) / m).max()
    d = float(max(d_at_r, d_at_c))
    big, small = max(n, m), min(n, m)
    en = big * small / (big + small)
    p = float(np.clip(stats.distributions.kstwo.sf(d, np.round(en)), 0.0, 1.0))
    return d, p


def chi2_homogeneity(ref_counts: np.ndarray, cur_counts: np.ndarray) -> tuple[float, float, dict[str, Any]]:
    """Chi-square test of homogeneity on the 2 x k table (reference, current) x categories.

    Both samples are random, so this is the right test; Evidently's ``chisquare`` instead treats the
    reference proportions as the true ones (one-sample goodness of fit) and ignores the reference's
    own sampling noise, which inflates false alarms. Categories whose smallest expected count is
    below 5 are pooled into one cell so the chi-square approximation holds (equal to
    ``scipy.stats.chi2_contingency(table, correction=False)`` when nothing is pooled). Without
    Yates' correction: it makes 2 x 2 tables conservative (size well below alpha).
    """
    keep = (ref_counts + cur_counts) > 0
    ref_counts, cur_counts = ref_counts[keep], cur_counts[keep]
    n_r, n_c = ref_counts.sum(), cur_counts.sum()
    total = n_r + n_c
    pooled = ref_counts + cur_counts
    min_expected = pooled * (min(n_r, n_c) / total)
    rare = min_expected < CHI2_MIN_EXPECTED
    n_pooled = int(rare.sum())
    if n_pooled:
        r_rare, c_rare = ref_counts[rare].sum(), cur_counts[rare].sum()
        ref_counts, cur_counts = ref_counts[~rare], cur_counts[~rare]
        if len(ref_counts) and (r_rare + c_rare) * (min(n_r, n_c) / total) < CHI2_MIN_EXPECTED:
            # The pooled cell is still too small: merge it into the smallest remaining category.
            smallest = int(np.argmin(ref_counts + cur_counts))
            ref_counts = ref_counts.copy()
            cur_counts = cur_counts.copy()
            ref_counts[smallest] += r_rare
            cur_counts[smallest] += c_rare
        else:
            ref_counts = np.append(ref_counts, r_rare)
            cur_counts = np.append(cur_counts, c_rare)
    details: dict[str, Any] = {"categories_pooled": n_pooled}
    k = len(ref_counts)
    if k < 2:
        details["dof"] = 0
        return 0.0, 1.0, details  # one category left: the two samples cannot differ
    col_tot = ref_counts + cur_counts
    exp_r = col_tot * (n_r / total)
    exp_c = col_tot * (n_c / total)
    stat = float((((ref_counts - exp_r) ** 2) / exp_r).sum() + (((cur_counts - exp_c) ** 2) / exp_c).sum())
    details["dof"] = k - 1
    return stat, float(stats.chi2.sf(stat, k - 1)), details


def _proportions_psi(ref_p: np.ndarray, cur_p: np.ndarray) -> float:
    ref_p = np.where(ref_p == 0, PSI_EPSILON, ref_p)
    cur_p = np.where(cur_p == 0, PSI_EPSILON, cur_p)
    return float(np.sum((cur_p - ref_p) * np.log(cur_p / ref_p)))


def _binned_proportions(ref_sorted: np.ndarray, cur_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Proportions in :data:`N_BINS` reference-quantile bins (equal-mass on the reference)."""
    edges = np.unique(np.quantile(ref_sorted, np.linspace(0, 1, N_BINS + 1)[1:-1]))
    # Bins are (-inf, e1], (e1, e2], ..., (ek, inf): counts from positions in the sorted arrays.
    ref_pos = np.concatenate([[0], np.searchsorted(ref_sorted, edges, side="right"), [len(ref_sorted)]])
    cur_pos = np.concatenate([[0], np.searchsorted(cur_sorted, edges, side="right"), [len(cur_sorted)]])
    return np.diff(ref_pos) / len(ref_sorted), np.diff(cur_pos) / len(cur_sorted)


def _wasserstein_norm(ref_sorted: np.ndarray, cur_sorted: np.ndarray) -> float:
    norm = max(float(np.std(ref_sorted)), WASSERSTEIN_MIN_STD)
    return float(stats.wasserstein_distance(ref_sorted, cur_sorted)) / norm


def _category_counts(ref: pd.Series, cur: pd.Series) -> tuple[np.ndarray, np.ndarray, pd.Index, int, int]:
    """Aligned category counts of both sides (missing values dropped and counted)."""
    n_ref_rows, n_cur_rows = len(ref), len(cur)
    if ref.dtype != cur.dtype and not (isinstance(ref.dtype, pd.CategoricalDtype)
                                       and isinstance(cur.dtype, pd.CategoricalDtype)):
        # E.g. bool in the reference, strings in captured JSON: compare their text forms.
        ref_kind = "b" if pd.api.types.is_bool_dtype(ref.dtype) else getattr(ref.dtype, "kind", "O")
        cur_kind = "b" if pd.api.types.is_bool_dtype(cur.dtype) else getattr(cur.dtype, "kind", "O")
        if ref_kind != cur_kind:
            ref, cur = ref.dropna().astype(str), cur.dropna().astype(str)
    ref_vc = ref.value_counts(dropna=True, sort=False)
    cur_vc = cur.value_counts(dropna=True, sort=False)
    keys = ref_vc.index.append(cur_vc.index).unique()  # no sorting: keys may be of mixed types
    ref_counts = ref_vc.reindex(keys, fill_value=0).to_numpy(dtype=np.float64)
    cur_counts = cur_vc.reindex(keys, fill_value=0).to_numpy(dtype=np.float64)
    # value_counts drops missing values: what it did not count is missing (cheaper than isna()).
    return (ref_counts, cur_counts, keys, n_ref_rows - int(ref_counts.sum()),
            n_cur_rows - int(cur_counts.sum()))


def _new_categories(ref_counts: np.ndarray, cur_counts: np.ndarray, keys: pd.Index) -> dict[str, Any]:
    new = np.flatnonzero((ref_counts == 0) & (cur_counts > 0))
    if not len(new):
        return {}
    order = new[np.argsort(-cur_counts[new], kind="stable")][:MAX_LISTED_NEW_CATEGORIES]
    return {"new_categories": int(len(new)),
            "new_category_counts": {str(keys[i]): int(cur_counts[i]) for i in order}}


def _test_column(name: str, ref: pd.Series, cur: pd.Series, requested: ColumnMethod | None,
                 num_method: ColumnMethod, cat_method: ColumnMethod, alpha: float) -> ColumnDrift:
    categorical_dtype = _is_categorical_dtype(ref.dtype)
    numeric_dtype = not categorical_dtype and not pd.api.types.is_complex_dtype(ref.dtype) and (
        pd.api.types.is_numeric_dtype(ref.dtype) or pd.api.types.is_datetime64_any_dtype(ref.dtype)
        or pd.api.types.is_timedelta64_dtype(ref.dtype))
    if not numeric_dtype and not categorical_dtype:
        method = requested or cat_method
        return ColumnDrift(name, None, method.method, method.resolved_threshold(alpha),
                           METHODS[method.method].score_type, None, None, False, 0, 0,
                           skipped_reason=f"unsupported dtype {ref.dtype}")

    ref_sorted = cur_sorted = None
    n_ref_missing = n_cur_missing = 0
    column_kind_hint: ColumnKind = "categorical"
    if numeric_dtype:
        ref_values, n_ref_missing = _numeric_values(ref)
        cur_values, n_cur_missing = _numeric_values(cur)
        # Sorting is the main cost and serves every numeric method and the kind rule at once.
        ref_sorted, cur_sorted = np.sort(ref_values), np.sort(cur_values)
        column_kind_hint = _numeric_kind(ref_sorted)

    method, kind = method_for_column(name, column_kind_hint, numeric_dtype, ref.dtype, requested,
                                     num_method, cat_method)
    info = METHODS[method.method]
    threshold = method.resolved_threshold(alpha)

    details: dict[str, Any] = {}
    if kind == "numeric":
        assert ref_sorted is not None and cur_sorted is not None
        n_ref, n_cur = len(ref_sorted), len(cur_sorted)
    elif numeric_dtype:
        assert ref_sorted is not None and cur_sorted is not None
        n_ref, n_cur = len(ref_sorted), len(cur_sorted)
        levels, inverse = np.unique(np.concatenate([ref_sorted, cur_sorted]), return_inverse=True)
        ref_counts = np.bincount(inverse[:n_ref], minlength=len(levels)).astype(np.float64)
        cur_counts = np.bincount(inverse[n_ref:], minlength=len(levels)).astype(np.float64)
        keys = pd.Index(levels)
    else:
        ref_counts, cur_counts, keys, n_ref_missing, n_cur_missing = _category_counts(ref, cur)
        n_ref, n_cur = int(ref_counts.sum()), int(cur_counts.sum())

    verdict = partial(ColumnDrift, name=name, kind=kind, method=method.method, threshold=threshold,
                      score_type=info.score_type, n_ref=n_ref, n_cur=n_cur, n_ref_missing=n_ref_missing,
                      n_cur_missing=n_cur_missing)
    if n_ref == 0 or n_cur == 0:
        side = "reference" if n_ref == 0 else "current data"
        return verdict(statistic=None, score=None, drifted=False,
                       skipped_reason=f"no non-missing values in the {side}")

    if kind == "numeric":
        assert ref_sorted is not None and cur_sorted is not None  # numeric kind implies a numeric dtype
        if method.method == "ks":
            statistic, score = _ks(ref_sorted, cur_sorted)
        elif method.method == "wasserstein":
            statistic = score = _wasserstein_norm(ref_sorted, cur_sorted)
        else:
            ref_p, cur_p = _binned_proportions(ref_sorted, cur_sorted)
            if method.method == "psi":
                statistic = score = _proportions_psi(ref_p, cur_p)
            else:
                statistic = score = float(distance.jensenshannon(ref_p, cur_p))
            details["bins"] = len(ref_p)
    else:
        details.update(_new_categories(ref_counts, cur_counts, keys))
        if method.method == "chi2":
            statistic, score, chi_details = chi2_homogeneity(ref_counts, cur_counts)
            details.update(chi_details)
        else:
            ref_p, cur_p = ref_counts / n_ref, cur_counts / n_cur
            if method.method == "psi":
                statistic = score = _proportions_psi(ref_p, cur_p)
            else:
                statistic = score = float(distance.jensenshannon(ref_p, cur_p))
    if not math.isfinite(score):
        return verdict(statistic=statistic, score=None, drifted=False, skipped_reason="score is not finite",
                       details=details)
    drifted = score < threshold if info.score_type == "p_value" else score >= threshold
    return verdict(statistic=float(statistic), score=float(score), drifted=bool(drifted), details=details)


def compute_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    columns: list[str] | None = None,
    methods: Mapping[str, ColumnMethod | str | Mapping[str, Any]] | str | None = None,
    num_method: str | ColumnMethod = "ks",
    cat_method: str | ColumnMethod = "chi2",
    alpha: float = 0.05,
    drift_share_threshold: float = 0.5,
    workers: int | None = None,
) -> DriftResult:
    """Test every column of ``current`` against ``reference`` on all non-missing rows.

    Args:
        reference: The reference data (e.g. training features).
        current: The window to judge.
        columns: Columns to test; default: the reference's columns, those absent from ``current``
            being listed in ``missing_in_current`` (explicit columns must exist in both frames).
        methods: Per-column methods (anything :func:`.drift_methods.parse_methods` accepts); others use
            ``num_method``/``cat_method`` by kind.
        num_method: Default method of numeric columns (``"ks"``, or ``"wasserstein:0.1"``...).
        cat_method: Default method of categorical columns (``"chi2"``...).
        alpha: Significance level of p-value methods without an explicit threshold.
        drift_share_threshold: The dataset drifted when at least this share of tested columns did.
        workers: Threads testing columns in parallel (numpy sorts release the GIL); default
            ``min(4, cpu_count)``.

    Raises:
        ValueError: bad method spec, a method that does not fit a column's kind, unknown columns.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}.")
    if not 0.0 < drift_share_threshold <= 1.0:
        raise ValueError(f"drift_share_threshold must be in (0, 1], got {drift_share_threshold!r}.")
    per_column = parse_methods(methods)
    num_default, cat_default = parse_defaults(num_method, cat_method)

    missing: list[str] = []
    if columns is None:
        names = [str(c) for c in reference.columns if c in current.columns]
        missing = [str(c) for c in reference.columns if c not in current.columns]
    else:
        names = list(columns)
        absent = [c for c in names if c not in reference.columns or c not in current.columns]
        if absent:
            raise ValueError(f"columns not in both frames: {absent}.")
    unknown = sorted(set(per_column) - set(names) - set(missing))
    if unknown:
        raise ValueError(f"drift methods given for unknown columns {unknown}; columns: {names}.")

    def run(name: str) -> ColumnDrift:
        return _test_column(name, reference[name], current[name], per_column.get(name),
                            num_default, cat_default, alpha)

    n_workers = workers or min(4, os.cpu_count() or 1)
    if n_workers > 1 and len(names) > 1 and len(reference) + len(current) > 200_000:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            results = list(pool.map(run, names))
    else:
        results = [run(name) for name in names]

    tested = [r for r in results if r.skipped_reason is None]
    n_drifted = sum(r.drifted for r in tested)
    share = n_drifted / len(tested) if tested else 0.0
    return DriftResult(
        columns=results, drift_share=share, n_drifted=n_drifted, n_tested=len(tested),
        dataset_drifted=bool(tested) and share >= drift_share_threshold,
        n_reference=len(reference), n_current=len(current), alpha=alpha,
        drift_share_threshold=drift_share_threshold, missing_in_current=missing,
    )
