"""Data-quality checks of captured columns against the reference, on data with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlflow_deploy_plugin.capture.columns import open_parquet
from mlflow_deploy_plugin.monitoring.data_quality import (
    Limits,
    check_column,
    check_data_quality,
    html_table,
    metrics,
)


def _frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    reference = pd.DataFrame({
        "age": np.arange(18, 118, dtype=float),                  # range [18, 117], no missing value
        "plan": ["basic", "pro"] * 50,                           # two categories
        "score": [np.nan] * 10 + list(np.linspace(0, 1, 90)),     # 10 % missing in the reference
        "rating": [1, 2, 3] * 33 + [1],                          # few integer levels: categorical
    })
    current = pd.DataFrame({
        "age": [10.0] * 3 + [200.0] * 2 + [40.0] * 195,          # 5 of 200 outside [18, 117]
        "plan": ["basic"] * 150 + ["gold"] * 30 + ["trial"] * 10 + [None] * 10,  # 40 of 190 unseen
        "score": [np.nan] * 20 + ["oops"] * 10 + [0.5] * 170,   # 30 of 200 missing (text is missing)
        "rating": [1, 2, 3, 4] * 50,                             # 50 of 200 never seen
    })
    return reference, current


def test_known_shares_and_verdicts() -> None:
    reference, current = _frames()
    result = check_data_quality(reference, current)
    by = {col.name: col for col in result.columns}
    age, plan, score, rating = by["age"], by["plan"], by["score"], by["rating"]
    assert (age.kind, plan.kind, score.kind, rating.kind) == ("numeric", "categorical", "numeric", "categorical")

    assert age.check("out_of_range").value == 5 / 200 and age.check("out_of_range").issue
    assert age.check("out_of_range").figures == {"below": 3, "above": 2, "reference_min": 18.0,
                                                  "reference_max": 117.0, "values": 200}
    assert age.check("missing").value == 0 and not age.check("missing").issue
    assert age.check("new_categories") is None

    assert plan.check("missing").value == 10 / 200 and not plan.check("missing").issue  # 5 % <= 0 % + 5 %
    assert plan.check("new_categories").value == 40 / 190 and plan.check("new_categories").issue
    assert plan.check("new_categories").detail.endswith("never seen in the reference: 'gold' (30), 'trial' (10) "
                                                        "> 1% allowed")

    # 20 NaN + 10 texts that are not numbers = 15 %, against the reference's 10 % + 5 %: at the limit.
    assert score.check("missing").value == pytest.approx(0.15) and score.check("missing").limit == pytest.approx(0.15)
    assert not score.check("missing").issue
    assert score.check("out_of_range").value == 0

    assert rating.check("new_categories").value == 50 / 200
    assert result.issues == ["age", "plan", "rating"] and result.status == "issues"


def test_a_column_the_capture_lacks_is_missing_everywhere_and_limits_apply() -> None:
    reference, current = _frames()
    result = check_data_quality(reference, current.drop(columns=["age"]), Limits(max_out_of_range=0.5,
                                                                                   max_new_categories=0.5))
    age = next(col for col in result.columns if col.name == "age")
    assert age.check("missing").value == 1.0 and age.check("missing").issue and len(age.checks) == 1
    assert result.issues == ["age"]  # the other shares are within the looser limits


def test_clean_data_has_no_issue_and_one_metric_per_check() -> None:
    reference, _ = _frames()
    result = check_data_quality(reference, reference.sample(60, random_state=0))
    assert result.status == "ok" and result.issues == []
    names = {c: c for c in reference.columns}
    found = metrics(result, names)
    assert found == {
        "data_quality.columns_with_issues": 0.0,
        "data_quality.missing.age": 0.0, "data_quality.out_of_range.age": 0.0,
        "data_quality.missing.plan": 0.0, "data_quality.new_categories.plan": 0.0,
        "data_quality.missing.score": found["data_quality.missing.score"], "data_quality.out_of_range.score": 0.0,
        "data_quality.missing.rating": 0.0, "data_quality.new_categories.rating": 0.0,
    }


def test_the_html_table_shows_the_same_verdicts() -> None:
    reference, current = _frames()
    result = check_data_quality(reference, current)
    page = html_table(result)
    assert 'id="mlflow-deploy-data-quality"' in page
    assert "3 of 4 columns with issues" in page
    assert page.count("ISSUE ") == 3 and page.count("<td>issue</td>") == 3 and page.count("<td>ok</td>") == 1


def test_infinite_numbers_are_missing_not_out_of_range() -> None:
    ref = pd.Series([-np.inf, 1.0, 2.0, np.nan, 3.0, np.inf])
    cur = pd.Series([np.inf, -np.inf, 0.5, 2.0, 9.0, np.nan, 3.0])
    quality = check_column("x", ref, cur, len(cur), Limits(max_missing_increase=1.0, max_out_of_range=1.0),
                           kind="numeric")  # (by its values, three integer levels, it would be categorical)
    missing, out_of_range = quality.check("missing"), quality.check("out_of_range")
    assert missing is not None and missing.figures["missing_current"] == 3  # inf, -inf, NaN
    assert out_of_range is not None and out_of_range.figures == {
        "below": 1, "above": 1, "reference_min": 1.0, "reference_max": 3.0, "values": 4}


def test_integer_categories_are_listed_alike_whether_read_whole_or_streamed(tmp_path: Path) -> None:
    """The drift job reads integer columns streamed as float64 (numbers_as_float64): the categories
    it lists as never seen are the integers the whole-frame read lists ('6', not '6.0')."""
    rng = np.random.default_rng(3)
    reference = pd.DataFrame({"plan": rng.integers(0, 4, 2000),
                              "rating": pd.array(rng.integers(1, 4, 2000), dtype="Int64")})
    current = pd.DataFrame({"plan": np.r_[np.full(60, 6), np.full(15, 7), rng.integers(0, 4, 1925)],
                            "rating": pd.array([*[5] * 40, None, *rng.integers(1, 4, 1959)], dtype="Int64")})
    reference.to_parquet(tmp_path / "reference.parquet", index=False)
    current.to_parquet(tmp_path / "current.parquet", index=False)
    whole_ref, whole_cur = pd.read_parquet(tmp_path / "reference.parquet"), pd.read_parquet(tmp_path / "current.parquet")
    streamed_ref, streamed_cur = open_parquet(str(tmp_path / "reference.parquet")), open_parquet(str(tmp_path / "current.parquet"))
    streamed_ref.numbers_as_float64()
    streamed_cur.numbers_as_float64()
    for name, listed in (("plan", "'6' (60), '7' (15)"), ("rating", "'5' (40)")):
        whole = check_column(name, whole_ref[name], whole_cur[name], len(current), Limits())
        streamed = check_column(name, streamed_ref[name], streamed_cur[name], len(current), Limits())
        assert streamed_cur[name].dtype == np.float64 and whole.kind == "categorical"
        assert streamed == whole
        check = whole.check("new_categories")
        assert check is not None and check.issue and check.detail.endswith(f"reference: {listed} > 1% allowed")
    # A category that is no integer keeps its decimals.
    fractional = check_column("x", pd.Series([0.5, 1.0] * 50), pd.Series([0.5, 2.5, 3.0] * 10), 30, Limits(),
                              kind="categorical")
    assert fractional.check("new_categories").figures["top"] == {"2.5": 10, "3": 10}  # type: ignore[union-attr]


def test_an_integer_column_with_a_missing_value_has_the_categories_of_the_integers() -> None:
    """A captured integer column with one missing value comes as float64 (read whole): its 0.0-3.0
    are the reference's 0-3, not new categories; a 6.0 is new and listed as the 6 it is."""
    rng = np.random.default_rng(5)
    reference = pd.Series(rng.integers(0, 4, 1000))
    current = pd.Series(np.r_[np.nan, np.full(20, 6.0), rng.integers(0, 4, 979).astype(np.float64)])
    check = check_column("plan", reference, current, len(current), Limits()).check("new_categories")
    assert check is not None and check.figures["unseen_values"] == 20 and check.figures["top"] == {"6": 20}


def test_drift_and_data_quality_spell_and_compare_a_category_alike() -> None:
    """One category, one text (categories.category_text), in both reports: drift listed an integer
    level as '6.0' (its levels are float64) where data quality listed '6'; and an object reference of
    ints compared as text with captured floats ('6' vs '6.0') made every captured value new in drift."""
    from mlflow_deploy_plugin.monitoring.drift_stats import compute_drift

    rng = np.random.default_rng(8)
    reference = pd.DataFrame({"plan": rng.integers(0, 4, 1000)})
    current = pd.DataFrame({"plan": np.r_[np.full(40, 6), rng.integers(0, 4, 960)]})
    for cur in (current, current.astype(np.float64)):  # as read whole, and as streamed (float64)
        drift = compute_drift(reference, cur).column("plan")
        quality = check_column("plan", reference["plan"], cur["plan"], len(cur), Limits()).check("new_categories")
        assert drift.kind == "categorical" and drift.details["new_category_counts"] == {"6": 40}
        assert quality is not None and quality.figures["top"] == {"6": 40}

    # An object column of integers (mixed with text, so not numeric) beside captured float64 values.
    mixed = pd.Series([0, 1, 2, "x"] * 250, dtype=object)
    captured = pd.Series(np.r_[np.full(10, 6.0), rng.integers(0, 3, 990).astype(np.float64)])
    drift = compute_drift(pd.DataFrame({"c": mixed}), pd.DataFrame({"c": captured})).column("c")
    assert drift.details["new_categories"] == 1 and drift.details["new_category_counts"] == {"6": 10}
    quality = check_column("c", mixed, captured, len(captured), Limits(), kind="categorical").check("new_categories")
    assert quality is not None and quality.figures["top"] == {"6": 10} and quality.figures["unseen_values"] == 10


def test_drift_counts_new_categories_by_their_text_as_it_lists_them() -> None:
    """1 and '1' in an object column are two keys with one text: drift counted two new categories
    but listed one entry; the count and the list must say the same."""
    from mlflow_deploy_plugin.monitoring.drift_stats import compute_drift

    reference = pd.DataFrame({"c": pd.Series(["a", "b"] * 500, dtype=object)})
    current = pd.DataFrame({"c": pd.Series(["a", "b"] * 450 + [1] * 30 + ["1"] * 20 + ["zz"] * 50, dtype=object)})
    drift = compute_drift(reference, current).column("c")
    assert drift.details["new_category_counts"] == {"1": 50, "zz": 50}
    assert drift.details["new_categories"] == 2
