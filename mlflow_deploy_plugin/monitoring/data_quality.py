"""Data quality on the way in: each captured input column checked against the version's reference data.

The drift report (:mod:`.report_job`) runs these checks beside the drift statistics, on the same
rows: drift asks "did the distribution move?", these ask "is the data broken?". Three checks, each a
share of rows with a limit (:class:`Limits`); :func:`_judge` is the one place a check's verdict is
made, and the run's metrics, its ``data_quality.*`` tags, the JSON summary and the HTML table
(:func:`html_table`) all read the verdicts from :class:`ColumnQuality`:

- ``missing``: the share of current rows without a usable value (null, NaN, ±inf, text that is not a
  number in a numeric column), an issue when it exceeds the reference's own share by more than
  ``max_missing_increase`` (a column the capture lacks altogether is missing in every row);
- ``out_of_range`` (numeric columns): the share of current values outside the reference's
  [min, max], an issue above ``max_out_of_range``;
- ``new_categories`` (categorical columns): the share of current values the reference never has,
  an issue above ``max_new_categories``; the most frequent ones are listed.

Column kinds are the drift statistics' (:func:`.drift_stats.column_kind`: an integer column of a
few levels is categorical). Shares are of all current rows for ``missing`` and of the rows with a
value for the other two. Exact, on every row: plain pandas/numpy, no sampling.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mlflow_deploy_plugin.categories import category_text

from .drift_stats import _counts_by_text, _numeric_values, _value_counts, column_kind

#: How many never-seen categories a column's check lists (the share counts all of them).
MAX_LISTED = 10
CHECKS = ("missing", "out_of_range", "new_categories")
_FIND: Any = object()  # check_column's kind not given: find it


@dataclass(frozen=True)
class Limits:
    """How large each share may be before it is an issue (shares, 0..1)."""

    max_missing_increase: float = 0.05
    max_out_of_range: float = 0.01
    max_new_categories: float = 0.01


@dataclass(frozen=True)
class Check:
    """One check of one column: the share found, the limit, the verdict and why, in words."""

    name: str  # one of CHECKS
    value: float  # the share of rows (missing: of all current rows; else of the rows with a value)
    limit: float  # the share above which it is an issue (missing: the reference's share + the increase)
    issue: bool
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ColumnQuality:
    """The checks of one column."""

    name: str
    kind: str | None  # numeric | categorical | None (a dtype the checks of values do not cover)
    rows: int
    checks: tuple[Check, ...]

    @property
    def issue(self) -> bool:
        return any(check.issue for check in self.checks)

    def check(self, name: str) -> Check | None:
        return next((check for check in self.checks if check.name == name), None)


@dataclass(frozen=True)
class DataQualityResult:
    """Every compared column's checks, and the limits they were judged by."""

    columns: tuple[ColumnQuality, ...]
    limits: Limits
    rows_current: int
    rows_reference: int

    @property
    def issues(self) -> list[str]:
        """Columns with at least one issue, in column order."""
        return [col.name for col in self.columns if col.issue]

    @property
    def status(self) -> str:
        return "issues" if self.issues else "ok"

    def issue_lines(self) -> list[str]:
        """``column: detail`` for each check that is an issue."""
        return [f"{col.name}: {check.detail}" for col in self.columns for check in col.checks if check.issue]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (no NaN: shares are always defined)."""
        return {"status": self.status, "limits": asdict(self.limits), "rows_current": self.rows_current,
                "rows_reference": self.rows_reference, "columns_with_issues": self.issues,
                "columns": {col.name: {"kind": col.kind, "rows": col.rows, "issue": col.issue,
                                       "checks": {c.name: asdict(c) for c in col.checks}} for col in self.columns}}


def _pct(share: float) -> str:
    return f"{share * 100:.3g}%"


def _judge(name: str, value: float, limit: float, counted: str, figures: dict[str, Any]) -> Check:
    """The verdict of one check: an issue when its share exceeds the limit (the only place)."""
    issue = value > limit + 1e-12
    return Check(name, value, limit, issue, f"{name.replace('_', ' ')} {_pct(value)} {counted} "
                                            f"{'>' if issue else '<='} {_pct(limit)} allowed", figures)


def _missing(ref: pd.Series, cur: pd.Series | None, kind: str | None, rows: int) -> tuple[int, int]:
    """Missing values of the reference and the current column (None: the capture lacks it)."""
    def count(series: pd.Series) -> int:
        if kind == "numeric":
            return len(series) - _finite_numbers(series)[2]
        return int(series.isna().sum())
    return count(ref), rows if cur is None else count(cur)


def _finite_numbers(series: pd.Series) -> tuple[np.ndarray, np.ndarray | None, int]:
    """``(numbers, where they are finite or None when everywhere, how many are)``: a float64
    column's own memory and a mask, not a copy of its finite values (80 MB at 10M rows); other
    dtypes as :func:`.drift_stats._numeric_values` converts them (finite only)."""
    if isinstance(series.dtype, np.dtype) and series.dtype == np.float64:
        values = series.to_numpy()
        finite = np.isfinite(values)
        n_finite = int(np.count_nonzero(finite))
        return values, (None if n_finite == len(values) else finite), n_finite
    values, _ = _numeric_values(series)
    return values, None, len(values)


def _categories(ref: pd.Series, cur: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Both sides' non-missing values: as float64 when both are numbers of different dtypes (an
    integer column with a missing value comes as float64), else as text when their kinds differ
    (bool vs "true" in JSON)."""
    ref, cur = ref.dropna(), cur.dropna()
    ref_kind, cur_kind = getattr(ref.dtype, "kind", "O"), getattr(cur.dtype, "kind", "O")
    if ref_kind != cur_kind and {ref_kind, cur_kind} <= set("iuf"):
        ref, cur = ref.astype(np.float64), cur.astype(np.float64)  # 6 and 6.0 are one category
    elif ref_kind != cur_kind:
        ref, cur = _as_text(ref), _as_text(cur)  # category texts, as drift compares them
    return ref, cur


def _as_text(series: pd.Series) -> pd.Series:
    """Each value's :func:`.category_text` (made once per distinct value): an object column's 6
    and a float column's 6.0 are both '6', where ``astype(str)`` made '6' and '6.0'."""
    codes, uniques = pd.factorize(series)
    texts = np.array([category_text(value) for value in uniques], dtype=object)
    return pd.Series(texts[codes], index=series.index, dtype=object)


def _unseen(ref: pd.Series, cur: pd.Series) -> tuple[int, pd.Series, int]:
    """(current values, counts of the current values the reference never has by their category
    text, how many distinct texts there are).

    Two pandas categoricals (how a column read from disk comes) are counted, not listed: their
    rows are never copied (dropping missing values copies them with a new index, ~17 bytes a row
    for each side: 340 MB at 10M rows). Other columns are compared row by row. Either way the
    values are listed as :func:`.category_text` spells them, as drift lists them: an integer level
    the streamed read gave as float64 (numbers_as_float64) is '6', as the whole-frame read has it.
    """
    if isinstance(ref.dtype, pd.CategoricalDtype) and isinstance(cur.dtype, pd.CategoricalDtype):
        ref_counts, cur_counts = _value_counts(ref), _value_counts(cur)  # categories are distinct values
        unseen_counts = _counts_by_text(cur_counts[~cur_counts.index.isin(ref_counts.index)])
        return int(cur_counts.sum()), unseen_counts, len(unseen_counts)
    ref_values, cur_values = _categories(ref, cur)
    unseen = cur_values[~cur_values.isin(pd.unique(ref_values))]
    counts = _counts_by_text(unseen.value_counts())  # one text per distinct value, not per row
    return len(cur_values), counts, len(counts)


def check_column(name: str, ref: pd.Series, cur: pd.Series | None, rows_current: int, limits: Limits,
                 kind: Any = _FIND) -> ColumnQuality:
    """The checks of one column (``cur`` None: the captured rows lack it). ``kind``: the column's
    :func:`.drift_stats.column_kind` when the caller has it already (it sorts a numeric column)."""
    if kind is _FIND:
        kind = column_kind(ref)
    ref_missing, cur_missing = _missing(ref, cur, kind, rows_current)
    ref_share = ref_missing / len(ref) if len(ref) else 0.0
    cur_share = cur_missing / rows_current if rows_current else 0.0
    checks = [_judge("missing", cur_share, min(1.0, ref_share + limits.max_missing_increase),
                     f"of {rows_current:,} rows (reference {_pct(ref_share)})",
                     {"missing_current": cur_missing, "missing_share_reference": ref_share})]
    if cur is not None and kind == "numeric":
        ref_values, ref_finite, n_ref = _finite_numbers(ref)
        cur_values, cur_finite, n_cur = _finite_numbers(cur)
        if n_ref and n_cur:
            low = float(np.min(ref_values, where=ref_finite, initial=np.inf) if ref_finite is not None
                        else ref_values.min())
            high = float(np.max(ref_values, where=ref_finite, initial=-np.inf) if ref_finite is not None
                         else ref_values.max())
            below, above = (np.less(cur_values, low), np.greater(cur_values, high))
            if cur_finite is not None:  # -inf is below and +inf above anything, but missing
                below &= cur_finite
                above &= cur_finite
            below, above = int(np.count_nonzero(below)), int(np.count_nonzero(above))
            checks.append(_judge("out_of_range", (below + above) / n_cur, limits.max_out_of_range,
                                 f"of {n_cur:,} values outside the reference's [{low:.6g}, {high:.6g}]",
                                 {"below": below, "above": above, "reference_min": low, "reference_max": high,
                                  "values": n_cur}))
    elif cur is not None and kind == "categorical":
        values, unseen, distinct = _unseen(ref, cur)
        if values:
            unseen_values = int(unseen.sum())
            # Most frequent first, ties by text: the same list whatever the order of the rows.
            top = (unseen.groupby(unseen.index.astype(str), sort=False).sum().sort_index(kind="stable")
                   .sort_values(ascending=False, kind="stable").head(MAX_LISTED))
            listed = ", ".join(f"{value!r} ({count})" for value, count in top.items())
            checks.append(_judge("new_categories", unseen_values / values, limits.max_new_categories,
                                 f"of {values:,} values never seen in the reference"
                                 + (f": {listed}" if listed else ""),
                                 {"unseen_values": unseen_values, "distinct_unseen": distinct,
                                  "top": {str(k): int(v) for k, v in top.items()}, "values": values}))
    return ColumnQuality(name, kind, rows_current, tuple(checks))


def check_data_quality(reference: pd.DataFrame, current: pd.DataFrame, limits: Limits | None = None
                       ) -> DataQualityResult:
    """Check every column of ``reference`` in ``current`` (see the module docstring)."""
    limits = limits or Limits()
    rows = len(current)
    columns = tuple(check_column(str(name), reference[name], current[name] if name in current.columns else None,
                                 rows, limits) for name in reference.columns)
    return DataQualityResult(columns, limits, rows, len(reference))


def metrics(result: DataQualityResult, names: dict[str, str]) -> dict[str, float]:
    """One metric per check: ``data_quality.<check>.<column>`` (``names``: column -> MLflow-safe
    suffix), plus ``data_quality.columns_with_issues``."""
    out: dict[str, float] = {"data_quality.columns_with_issues": float(len(result.issues))}
    for col in result.columns:
        for check in col.checks:
            out[f"data_quality.{check.name}.{names[col.name]}"] = float(check.value)
    return out


def html_table(result: DataQualityResult) -> str:
    """An HTML block: one row per column, one cell per check (share, limit; issues marked)."""
    def cell(col: ColumnQuality, name: str) -> str:
        check = col.check(name)
        if check is None:
            return "<td>–</td>"
        style = " style='background:#fdd'" if check.issue else ""
        return (f"<td{style} title='{html.escape(check.detail, quote=True)}'>{'ISSUE ' if check.issue else ''}"
                f"{_pct(check.value)} (limit {_pct(check.limit)})</td>")
    rows = "".join(f"<tr><td>{html.escape(col.name)}</td><td>{col.kind or 'other'}</td>"
                   + "".join(cell(col, name) for name in CHECKS)
                   + f"<td>{'issue' if col.issue else 'ok'}</td></tr>" for col in result.columns)
    head = "".join(f"<th>{h}</th>" for h in ("column", "kind", "missing values", "outside the reference range",
                                            "categories never seen", "verdict"))
    issues = result.issue_lines()
    summary = (f"{len(result.issues)} of {len(result.columns)} columns with issues: "
               + "; ".join(issues) if issues else f"no issue in {len(result.columns)} columns")
    return (f'<div id="mlflow-deploy-data-quality" style="padding:8px 16px;font-family:sans-serif;'
            f'background:#f7fff5;border-bottom:1px solid #9b9">'
            f"<h2>Data quality ({result.rows_current:,} captured rows vs {result.rows_reference:,} reference rows)</h2>"
            f"<p>{html.escape(summary)}</p>"
            f"<table border='1' cellpadding='4' style='border-collapse:collapse'><tr>{head}</tr>{rows}</table></div>")


def insert_into_page(path: str, block: str) -> None:
    """Put ``block`` at the top of the HTML page at ``path`` (right after ``<body>``)."""
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8")
    start = text.lower().find("<body")
    end = text.find(">", start) + 1 if start >= 0 else 0
    Path(path).write_text(text[:end] + block + text[end:], encoding="utf-8")
