"""Exact drift statistics: calibration under no drift, power on injected shifts, agreement with scipy,
column kinds, missing values, method specs. Seeded RNGs: the outcomes are deterministic."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.spatial import distance

from mlflow_deploy_plugin.monitoring.drift_methods import ColumnMethod, methods_to_spec, parse_methods
from mlflow_deploy_plugin.monitoring.drift_stats import column_kind, compute_drift

ALPHA = 0.05
N_WINDOWS = 400
WINDOW_ROWS = 500
CATEGORIES = {  # levels and probabilities of the categorical columns of the calibration windows
    "binary": (["yes", "no"], [0.7, 0.3]),
    "five": (list("abcde"), [0.3, 0.25, 0.2, 0.15, 0.1]),
    "skewed": (list("pqrstuvw"), [0.5, 0.2, 0.1, 0.08, 0.06, 0.04, 0.015, 0.005]),  # rare levels pooled
    "wide": ([f"k{i}" for i in range(20)], [1 / 20] * 20),
}


def _calibration_window(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """25 columns (13 numeric, 12 categorical) of one fixed distribution."""
    cols: dict[str, object] = {}
    for i in range(13):
        kind = i % 4
        if kind == 0:
            cols[f"num{i}"] = rng.normal(10, 2, n)
        elif kind == 1:
            cols[f"num{i}"] = rng.lognormal(0, 1, n)
        elif kind == 2:
            cols[f"num{i}"] = rng.uniform(-1, 1, n)
        else:
            cols[f"num{i}"] = rng.poisson(30, n)  # integers, many levels: numeric with ties
    names = list(CATEGORIES)
    for i in range(12):
        levels, p = CATEGORIES[names[i % len(names)]]
        cols[f"cat{i}_{names[i % len(names)]}"] = rng.choice(np.array(levels, dtype=object), n, p=p)
    return pd.DataFrame(cols)


@pytest.fixture(scope="module")
def calibration() -> dict[str, np.ndarray]:
    """Flags of N_WINDOWS independent no-drift windows (fresh reference and current each time)."""
    rng = np.random.default_rng(20240611)
    numeric, categorical, gof = [], [], []
    from evidently.legacy.calculations.stattests import chi_stat_test
    from evidently.legacy.core import ColumnType

    for _ in range(N_WINDOWS):
        ref, cur = _calibration_window(rng, WINDOW_ROWS), _calibration_window(rng, WINDOW_ROWS)
        result = compute_drift(ref, cur, alpha=ALPHA)
        for col in result.columns:
            assert col.skipped_reason is None
            (numeric if col.kind == "numeric" else categorical).append(col.drifted)
            if col.name.endswith("_five"):
                # Evidently's default for categorical columns of references <= 1000 rows: a one-sample
                # goodness-of-fit test taking the reference proportions as exact.
                gof.append(bool(chi_stat_test(ref[col.name], cur[col.name], ColumnType.Categorical, ALPHA).drifted))
    return {"numeric": np.array(numeric), "categorical": np.array(categorical), "gof": np.array(gof)}


def test_false_positive_rate_is_nominal_for_numeric_and_categorical(calibration):
    # 400 windows x 13 numeric = 5,200 KS tests and 400 x 12 = 4,800 chi-square tests under no drift.
    numeric_rate = calibration["numeric"].mean()
    categorical_rate = calibration["categorical"].mean()
    assert len(calibration["numeric"]) == N_WINDOWS * 13
    assert len(calibration["categorical"]) == N_WINDOWS * 12
    assert numeric_rate <= ALPHA + 0.01, numeric_rate
    assert categorical_rate <= ALPHA + 0.01, categorical_rate
    # ... and not absurdly conservative either (the tests keep their power).
    assert numeric_rate >= ALPHA - 0.02 and categorical_rate >= ALPHA - 0.02, (numeric_rate, categorical_rate)


def test_one_sample_goodness_of_fit_would_fail_the_same_windows(calibration):
    # Same windows, Evidently's `chisquare`: treating the 500-row reference as the truth roughly
    # doubles the statistic's variance, so it flags ~30 % of no-drift windows (6x alpha).
    gof_rate = calibration["gof"].mean()
    assert len(calibration["gof"]) == N_WINDOWS * 3
    assert gof_rate > 0.15, gof_rate


def _benchmark_like(rng: np.random.Generator, n: int, shifted: bool) -> pd.DataFrame:
    frame = _calibration_window(rng, n)
    if shifted:
        frame["num0"] = frame["num0"] + 0.5  # mean shift of 0.25 sd
        frame["num5"] = frame["num5"] * 1.3  # scale change of a lognormal
        levels, _ = CATEGORIES["five"]
        frame["cat1_five"] = rng.choice(np.array(levels, dtype=object), n, p=[0.2, 0.25, 0.2, 0.15, 0.2])
    return frame


def test_injected_shift_flags_exactly_the_shifted_columns():
    rng = np.random.default_rng(7)
    ref, cur = _benchmark_like(rng, 5000, False), _benchmark_like(rng, 5000, True)
    result = compute_drift(ref, cur, alpha=0.001)
    assert result.drifted_columns == ["num0", "num5", "cat1_five"]
    assert result.n_drifted == 3 and result.n_tested == 25
    assert result.drift_share == pytest.approx(3 / 25)
    assert not result.dataset_drifted
    assert compute_drift(ref, cur, alpha=0.001, drift_share_threshold=0.1).dataset_drifted


def test_effect_size_methods_flag_the_shift_and_not_the_rest():
    rng = np.random.default_rng(11)
    ref, cur = _benchmark_like(rng, 20_000, False), _benchmark_like(rng, 20_000, True)
    methods = {"num0": "wasserstein:0.1", "num5": "psi:0.05", "cat1_five": "jensenshannon:0.05",
               "num1": "wasserstein", "num2": "psi", "cat0_binary": "jensenshannon", "cat2_skewed": "psi"}
    result = compute_drift(ref, cur, methods=methods, alpha=0.001)
    assert result.drifted_columns == ["num0", "num5", "cat1_five"]
    by_name = {c.name: c for c in result.columns}
    assert by_name["num0"].score_type == "distance" and by_name["num0"].threshold == 0.1
    assert by_name["num2"].threshold == 0.2  # psi default
    # Definitions match scipy on the same inputs.
    expected_w = stats.wasserstein_distance(ref["num0"], cur["num0"]) / np.std(ref["num0"])
    assert by_name["num0"].score == pytest.approx(expected_w, rel=1e-9)
    levels = ref["cat1_five"].value_counts().index
    p = ref["cat1_five"].value_counts().reindex(levels).to_numpy() / len(ref)
    q = cur["cat1_five"].value_counts().reindex(levels).to_numpy() / len(cur)
    assert by_name["cat1_five"].score == pytest.approx(distance.jensenshannon(p, q), rel=1e-9)


@pytest.mark.parametrize("n_ref,n_cur", [(800, 300), (30_000, 12_000)])  # exact and asymptotic KS paths
def test_scores_equal_scipy_on_all_rows(n_ref, n_cur):
    rng = np.random.default_rng(3)
    ref = pd.DataFrame({"x": rng.normal(size=n_ref), "ties": rng.poisson(40, n_ref).astype(float),
                        "c": rng.choice(np.array(list("abcdef"), dtype=object), n_ref)})
    cur = pd.DataFrame({"x": rng.normal(0.05, 1, n_cur), "ties": rng.poisson(40.5, n_cur).astype(float),
                        "c": rng.choice(np.array(list("abcdef"), dtype=object), n_cur,
                                        p=[0.2, 0.2, 0.15, 0.15, 0.15, 0.15])})
    result = compute_drift(ref, cur)
    for name in ("x", "ties"):
        expected = stats.ks_2samp(ref[name], cur[name])
        col = result.column(name)
        assert col.method == "ks" and col.kind == "numeric"
        assert col.statistic == pytest.approx(expected.statistic, rel=1e-12)
        assert col.score == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)
        assert col.drifted == (expected.pvalue < ALPHA)
    table = pd.crosstab(np.r_[np.zeros(n_ref), np.ones(n_cur)], np.r_[ref["c"].to_numpy(), cur["c"].to_numpy()])
    expected = stats.chi2_contingency(table.to_numpy(), correction=False)
    col = result.column("c")
    assert col.method == "chi2" and col.details["categories_pooled"] == 0
    assert col.statistic == pytest.approx(expected.statistic, rel=1e-9)
    assert col.score == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)


def test_column_kinds():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "float": rng.normal(size=100),
        "few_floats": rng.choice([0.5, 1.5, 2.25], 100),  # non-integer values stay numeric
        "rating": rng.integers(1, 6, 100),  # <= 10 integer levels: categorical
        "rating_as_float": rng.integers(1, 6, 100).astype(float),
        "count": rng.poisson(50, 100),  # many integer levels: numeric
        "flag": rng.random(100) > 0.5,
        "text": rng.choice(np.array(["a", "b"], dtype=object), 100),
        "cat": pd.Categorical(rng.choice(["x", "y"], 100)),
        "when": pd.date_range("2024-01-01", periods=100, freq="h"),
    })
    kinds = {name: column_kind(frame[name]) for name in frame.columns}
    assert kinds == {"float": "numeric", "few_floats": "numeric", "rating": "categorical",
                     "rating_as_float": "categorical", "count": "numeric", "flag": "categorical",
                     "text": "categorical", "cat": "categorical", "when": "numeric"}
    result = compute_drift(frame, frame.sample(frac=1.0, random_state=1))
    assert {c.name: c.kind for c in result.columns} == kinds
    assert {c.name: c.method for c in result.columns}["rating"] == "chi2"
    assert result.n_drifted == 0
    # A requested method decides the treatment where the dtype allows it.
    forced = compute_drift(frame, frame, methods={"rating": "ks", "count": "chi2"})
    assert forced.column("rating").kind == "numeric" and forced.column("count").kind == "categorical"


def test_missing_values_are_dropped_and_counted_and_empty_columns_skipped():
    rng = np.random.default_rng(5)
    ref = pd.DataFrame({"x": rng.normal(size=1000), "c": rng.choice(np.array(["a", "b"], dtype=object), 1000),
                        "gone": rng.normal(size=1000)})
    cur = ref.copy()
    cur.loc[:99, "x"] = np.nan
    cur.loc[100:101, "x"] = np.inf
    cur.loc[:49, "c"] = None
    cur["gone"] = np.nan
    result = compute_drift(ref, cur)
    x, c, gone = result.column("x"), result.column("c"), result.column("gone")
    assert (x.n_ref, x.n_cur, x.n_cur_missing) == (1000, 898, 102)
    assert (c.n_cur, c.n_cur_missing) == (950, 50)
    assert gone.skipped_reason == "no non-missing values in the current data" and not gone.drifted
    assert result.n_tested == 2 and result.drift_share == 0.0
    json.dumps(result.to_dict(), allow_nan=False)  # JSON-serialisable, no NaN


def test_columns_absent_from_current_are_listed_and_new_categories_reported():
    ref = pd.DataFrame({"c": ["a", "b"] * 500, "target": [0, 1] * 500})
    cur = pd.DataFrame({"c": ["a", "b", "zzz", "a"] * 250})
    result = compute_drift(ref, cur)
    assert result.missing_in_current == ["target"]
    col = result.column("c")
    assert col.drifted and col.details["new_categories"] == 1
    assert col.details["new_category_counts"] == {"zzz": 250}


def test_parse_methods_accepts_spec_strings_mappings_and_files(tmp_path):
    expected = {"age": ColumnMethod("ks", 0.01), "city": ColumnMethod("psi", 0.2),
                "income": ColumnMethod("wasserstein")}
    assert parse_methods("age=ks:0.01, city = psi:0.2,income=wasserstein") == expected
    assert parse_methods({"age": "ks:0.01", "city": {"method": "psi", "threshold": 0.2},
                          "income": "wasserstein"}) == expected
    (tmp_path / "m.yaml").write_text("age: ks:0.01\ncity: {method: psi, threshold: 0.2}\nincome: wasserstein\n")
    (tmp_path / "m.json").write_text(json.dumps({"age": "ks:0.01", "city": "psi:0.2", "income": "wasserstein"}))
    assert parse_methods(str(tmp_path / "m.yaml")) == expected
    assert parse_methods(str(tmp_path / "m.json")) == expected
    assert parse_methods(methods_to_spec(expected)) == expected
    assert parse_methods("x=js,y=chi2_contingency") == {"x": ColumnMethod("jensenshannon"), "y": ColumnMethod("chi2")}
    assert parse_methods(None) == {} and parse_methods("") == {}


@pytest.mark.parametrize("spec,fragments", [
    ("age=kss", ["'age'", "'kss'", "ks, chi2, psi, wasserstein, jensenshannon"]),
    ("age=ks:1.5", ["'age'", "'ks'", "(0, 1)"]),
    ("age=psi:-1", ["'age'", "'psi'", "> 0"]),
    ("age=ks:abc", ["'age'", "'ks'", "not a number"]),
    ("age", ["'age'", "column=method"]),
    ({"age": {"method": "ks", "level": 0.1}}, ["'age'", "allowed methods"]),
])
def test_parse_methods_errors_name_column_method_and_allowed(spec, fragments):
    with pytest.raises(ValueError) as info:
        parse_methods(spec)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_incompatible_or_unknown_columns_are_clear_errors():
    frame = pd.DataFrame({"city": ["a", "b"] * 50, "x": np.arange(100.0)})
    with pytest.raises(ValueError, match=r"column 'city': method 'ks' needs numeric values.*allowed for it: chi2"):
        compute_drift(frame, frame, methods="city=ks")
    with pytest.raises(ValueError, match=r"unknown columns \['nope'\]"):
        compute_drift(frame, frame, methods="nope=ks")
    with pytest.raises(ValueError, match="cat_method 'ks' does not apply to categorical columns; allowed: chi2"):
        compute_drift(frame, frame, cat_method="ks")
