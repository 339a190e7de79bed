"""Exact drift statistics: calibration under no drift, power on injected shifts, agreement with scipy,
the effect-size floor, missing values, column kinds, method specs. Seeded RNGs: the outcomes are deterministic."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.spatial import distance

from mlflow_deploy_plugin.monitoring.drift_methods import (
    ColumnMethod,
    Floors,
    Judgement,
    method_for_column,
    methods_to_spec,
    parse_defaults,
    parse_floors,
    parse_methods,
)
from mlflow_deploy_plugin.monitoring.drift_stats import (
    column_kind,
    compute_drift,
    missing_rate_test,
    wasserstein_sorted,
)

ALPHA = 0.05
N_WINDOWS = 400
# Evidently's one-sample test flags ~30 % of these windows, 6x alpha: the first 100 windows (300
# tests, standard error ~0.027) put that rate ~6 standard errors above the bound its test checks
# (0.15), at a quarter of the cost of all 400.
GOF_WINDOWS = 100
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
    numeric, categorical, gof, verdicts = [], [], [], []
    from evidently.legacy.calculations.stattests import chi_stat_test
    from evidently.legacy.core import ColumnType

    for window in range(N_WINDOWS):
        ref, cur = _calibration_window(rng, WINDOW_ROWS), _calibration_window(rng, WINDOW_ROWS)
        result = compute_drift(ref, cur, alpha=ALPHA)
        for col in result.columns:
            assert col.skipped_reason is None
            # The tests' own calibration: significance alone (the effect floor only lowers the rate).
            (numeric if col.kind == "numeric" else categorical).append(col.significant)
            verdicts.append(col.drifted)
            if col.name.endswith("_five") and window < GOF_WINDOWS:
                # Evidently's default for categorical columns of references <= 1000 rows: a one-sample
                # goodness-of-fit test taking the reference proportions as exact.
                gof.append(bool(chi_stat_test(ref[col.name], cur[col.name], ColumnType.Categorical, ALPHA).drifted))
    return {"numeric": np.array(numeric), "categorical": np.array(categorical), "gof": np.array(gof),
            "verdicts": np.array(verdicts)}


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
    # Verdicts need the effect floor too: fewer alarms than the tests alone, never more.
    verdict_rate = calibration["verdicts"].mean()
    assert verdict_rate <= min(numeric_rate, categorical_rate) + 0.01 and verdict_rate < ALPHA, verdict_rate


def test_one_sample_goodness_of_fit_would_fail_the_same_windows(calibration):
    # Same windows (the first GOF_WINDOWS), Evidently's `chisquare`: treating the 500-row reference as
    # the truth roughly doubles the statistic's variance, so it flags ~30 % of no-drift windows (6x alpha).
    gof_rate = calibration["gof"].mean()
    assert len(calibration["gof"]) == GOF_WINDOWS * 3
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
    # An effect-size method names the effect and its floor; the test stays the kind's default.
    assert by_name["num0"].effect_method == "wasserstein" and by_name["num0"].effect_floor == 0.1
    assert by_name["num0"].method == "ks" and by_name["num0"].threshold == 0.001
    assert by_name["num2"].effect_method == "psi" and by_name["num2"].effect_floor == 0.2  # psi default
    assert by_name["cat2_skewed"].method == "chi2" and by_name["cat2_skewed"].effect_method == "psi"
    # Definitions match scipy on the same inputs.
    expected_w = stats.wasserstein_distance(ref["num0"], cur["num0"]) / np.std(ref["num0"])
    assert by_name["num0"].effect_size == pytest.approx(expected_w, rel=1e-9)
    levels = ref["cat1_five"].value_counts().index
    p = ref["cat1_five"].value_counts().reindex(levels).to_numpy() / len(ref)
    q = cur["cat1_five"].value_counts().reindex(levels).to_numpy() / len(cur)
    assert by_name["cat1_five"].effect_size == pytest.approx(distance.jensenshannon(p, q), rel=1e-9)


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
        assert col.significant == (expected.pvalue < ALPHA)
        expected_w = stats.wasserstein_distance(ref[name], cur[name]) / np.std(ref[name])
        assert col.effect_method == "wasserstein"
        assert col.effect_size == pytest.approx(expected_w, rel=1e-9)
        assert col.drifted == (expected.pvalue < ALPHA and expected_w >= 0.1)
    table = pd.crosstab(np.r_[np.zeros(n_ref), np.ones(n_cur)], np.r_[ref["c"].to_numpy(), cur["c"].to_numpy()])
    expected = stats.chi2_contingency(table.to_numpy(), correction=False)
    col = result.column("c")
    assert col.method == "chi2" and col.details["categories_pooled"] == 0
    assert col.statistic == pytest.approx(expected.statistic, rel=1e-9)
    assert col.score == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)
    p = table.to_numpy()[0] / n_ref
    q = table.to_numpy()[1] / n_cur
    assert col.effect_method == "jensenshannon"
    assert col.effect_size == pytest.approx(distance.jensenshannon(p, q), rel=1e-9)


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


def test_missing_values_are_counted_and_their_rate_judged_and_vanished_columns_drift():
    rng = np.random.default_rng(5)
    ref = pd.DataFrame({"x": rng.normal(size=1000), "c": rng.choice(np.array(["a", "b"], dtype=object), 1000),
                        "gone": rng.normal(size=1000), "steady": rng.normal(size=1000),
                        "never": np.full(1000, np.nan)})
    ref.loc[:99, "steady"] = np.nan  # 10 % missing on both sides: no change
    cur = ref.copy()
    cur.loc[:99, "x"] = np.nan
    cur.loc[100:101, "x"] = np.inf
    cur.loc[:29, "c"] = None  # 3 %: significant, but under the 0.05 floor
    cur["gone"] = np.nan
    result = compute_drift(ref, cur)
    x, c, gone, steady, never = (result.column(n) for n in ("x", "c", "gone", "steady", "never"))
    assert (x.n_ref, x.n_cur, x.n_cur_missing) == (1000, 898, 102)
    # Values unchanged, missing rate 0 -> 10.2 %: drifted because of the missing values.
    assert not x.values_drifted and x.missing_drifted and x.drifted
    assert (x.missing_rate_ref, x.missing_rate_cur) == (0.0, 0.102)
    assert x.reason.startswith("drifted: missing 0.0% -> 10.2% (z-test p=")
    assert (c.n_cur, c.n_cur_missing) == (970, 30)
    assert c.missing_p_value < 0.05 and not c.missing_drifted and not c.drifted
    assert "change 0.03 < 0.05" in c.reason
    assert gone.drifted and gone.vanished and gone.skipped_reason is None
    assert gone.reason == "drifted: all 1,000 values missing in the current data (reference: 0.0% missing)"
    assert not steady.drifted and steady.missing_p_value == 1.0
    assert never.skipped_reason == "no non-missing values in the reference or the current data"
    assert result.n_tested == 4 and result.drifted_columns == ["x", "gone"] and result.drift_share == 0.5
    json.dumps(result.to_dict(), allow_nan=False)  # JSON-serialisable, no NaN
    # Per-column and global missing floors move the line.
    assert compute_drift(ref, cur, methods="c=missing:0.02").column("c").drifted
    assert not compute_drift(ref, cur, floors="missing=0.2").column("x").drifted


def test_missing_rate_test_is_the_two_proportion_z_test():
    # z^2 is the 2 x 2 chi-square statistic without continuity correction: same p-value.
    for m_ref, n_ref, m_cur, n_cur in [(10, 1000, 25, 800), (0, 500, 40, 500), (300, 3000, 290, 3100)]:
        z, p = missing_rate_test(m_ref, n_ref, m_cur, n_cur)
        expected = stats.chi2_contingency([[m_ref, n_ref - m_ref], [m_cur, n_cur - m_cur]], correction=False)
        assert z ** 2 == pytest.approx(expected.statistic, rel=1e-9)
        assert p == pytest.approx(expected.pvalue, rel=1e-9)
        assert (z > 0) == (m_cur / n_cur > m_ref / n_ref)
    assert missing_rate_test(0, 100, 0, 50) == (0.0, 1.0)


def test_columns_absent_from_current_drift_and_new_columns_and_categories_are_reported():
    ref = pd.DataFrame({"c": ["a", "b"] * 500, "target": [0, 1] * 500})
    cur = pd.DataFrame({"c": ["a", "b", "zzz", "a"] * 250, "fresh": 1.0, "_prediction": 0})
    result = compute_drift(ref, cur, ignore_columns=["_prediction"])
    assert result.missing_in_current == ["target"] and result.new_in_current == ["fresh"]
    target = result.column("target")
    assert target.drifted and target.vanished and target.missing_rate_cur == 1.0
    assert target.reason == "drifted: absent from the current data (reference: 0.0% missing)"
    assert result.n_tested == 2 and result.drift_share == 1.0  # an absent column is judged (and drifted)
    col = result.column("c")
    assert col.drifted and col.details["new_categories"] == 1
    assert col.details["new_category_counts"] == {"zzz": 250}
    assert compute_drift(ref, cur).new_in_current == ["fresh", "_prediction"]
    assert result.to_dict()["new_in_current"] == ["fresh"]


def test_a_tiny_shift_on_large_samples_is_significant_but_not_drift():
    rng = np.random.default_rng(21)
    n = 200_000
    ref = pd.DataFrame({"x": rng.normal(size=n), "y": rng.normal(size=n),
                        "c": rng.choice(np.array(list("abcde"), dtype=object), n)})
    cur = pd.DataFrame({"x": rng.normal(0.03, 1, n), "y": rng.normal(0.5, 1, n),
                        "c": rng.choice(np.array(list("abcde"), dtype=object), n,
                                        p=[0.21, 0.2, 0.2, 0.2, 0.19])})
    result = compute_drift(ref, cur)
    x, y, c = result.column("x"), result.column("y"), result.column("c")
    assert x.significant and x.effect_size < 0.05 and not x.drifted
    assert "a real but small difference" in x.reason
    assert c.significant and c.effect_size < 0.05 and not c.drifted
    assert y.significant and y.effect_size == pytest.approx(0.5, abs=0.02) and y.drifted
    assert result.drifted_columns == ["y"] and not result.dataset_drifted
    # Floor 0 (per column or globally) leaves the test alone to decide: the old behaviour.
    assert compute_drift(ref, cur, methods="x=ks+wasserstein:0").column("x").drifted
    assert compute_drift(ref, cur, floors=0).drifted_columns == ["x", "y", "c"]
    # A higher floor makes the real shift small too.
    assert not compute_drift(ref, cur, floors="numeric=0.6").column("y").drifted


@pytest.mark.parametrize("n,m", [(1, 1), (5, 7), (800, 300), (30_000, 12_000)])
def test_wasserstein_on_sorted_samples_equals_scipy(n, m):
    rng = np.random.default_rng(n + m)
    for a, b in [(rng.normal(size=n), rng.lognormal(size=m)),
                 (rng.poisson(3, n).astype(float), rng.poisson(3.2, m).astype(float))]:  # ties
        a, b = np.sort(a), np.sort(b)
        assert wasserstein_sorted(a, b) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-9, abs=1e-12)


def test_parse_methods_combines_test_effect_and_missing_floor_and_parse_floors():
    spec = parse_methods("age=ks:0.01+wasserstein:0.2+missing:0.1,city=chi2+psi,income=js:0")
    assert spec == {"age": ColumnMethod("ks", 0.01, "wasserstein", 0.2, 0.1),
                    "city": ColumnMethod("chi2", None, "psi"),
                    "income": ColumnMethod(effect="jensenshannon", floor=0.0)}
    assert parse_methods(methods_to_spec(spec)) == spec
    assert parse_methods({"age": {"method": "ks", "threshold": 0.01, "effect": "wasserstein", "floor": 0.2,
                                  "missing_floor": 0.1}})["age"] == spec["age"]
    assert parse_floors(None) == Floors(0.1, 0.1, 0.05)
    assert parse_floors("0.2") == Floors(0.2, 0.2, 0.05)
    assert parse_floors("num=0.3, missing=0.1") == Floors(0.3, 0.1, 0.1)
    for bad, fragment in [("speed=0.1", "expected 'numeric=<floor>'"), ("numeric=x", "is not a number"),
                          ("missing=2", "<= 1"), ("-1", ">= 0")]:
        with pytest.raises(ValueError, match=fragment):
            parse_floors(bad)


def test_the_judgement_of_a_column_takes_each_part_from_the_closest_place():
    floors = Floors(0.3, 0.2, 0.07)
    num, cat = parse_defaults("ks", "chi2+psi:0.25")
    judge = partial(method_for_column, "x", alpha=0.05, floors=floors, num_method=num, cat_method=cat)
    assert judge(kind="numeric", numeric_dtype=True, dtype="float64", requested=None) == Judgement(
        "numeric", "ks", 0.05, "wasserstein", 0.3, 0.07)  # global numeric floor
    assert judge(kind="categorical", numeric_dtype=False, dtype="object", requested=None) == Judgement(
        "categorical", "chi2", 0.05, "psi", 0.25, 0.07)  # the kind's default method and its floor
    assert judge(kind="numeric", numeric_dtype=True, dtype="float64",
                 requested=ColumnMethod(effect="psi")) == Judgement("numeric", "ks", 0.05, "psi", 0.2, 0.07)
    assert judge(kind="numeric", numeric_dtype=True, dtype="int64", requested=ColumnMethod("chi2", 0.01)) \
        == Judgement("categorical", "chi2", 0.01, "psi", 0.25, 0.07)  # chi2 treats the values as categories
    with pytest.raises(ValueError, match="'wasserstein' does not apply to categorical columns"):
        judge(kind="numeric", numeric_dtype=True, dtype="int64", requested=ColumnMethod("chi2", None, "wasserstein"))


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
    ("age=psi:-1", ["'age'", "'psi'", ">= 0"]),
    ("age=ks+chi2", ["'age'", "more than one method"]),
    ("age=missing", ["'age'", "'missing' needs a floor"]),
    ("age=psi+js", ["'age'", "more than one effect"]),
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
