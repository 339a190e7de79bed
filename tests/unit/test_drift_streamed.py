"""The drift job's column-by-column read path gives exactly the figures of the in-memory path.

Capture-layout Parquet files (several files and days, noise rows the job must leave out: failed
requests, another version, shadow answers, rows outside the window) and a reference file are judged
twice: read whole into DataFrames (``read_capture`` + ``pd.read_parquet``), and opened as
``ParquetColumns`` (``open_capture`` + ``open_parquet``: one column in memory at a time). Verdicts,
figures, data quality and prediction drift must be equal, not close. Also: the large-array steps cut
into slices and threads give the figures of the one-slice computation.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from mlflow_deploy_plugin.capture import open_capture, read_capture
from mlflow_deploy_plugin.capture.columns import RELEASE_AFTER_BYTES, ParquetColumns, open_parquet
from mlflow_deploy_plugin.capture.redaction import CaptureRedaction
from mlflow_deploy_plugin.monitoring import drift_stats
from mlflow_deploy_plugin.monitoring.evidently_report import _sample
from mlflow_deploy_plugin.monitoring.reference import open_table, read_table
from mlflow_deploy_plugin.monitoring.report_job import DriftSettings, judge_window, select_current

T0 = datetime(2026, 1, 1, 23, 0, tzinfo=UTC)  # the window crosses midnight: two date= partitions
T1 = T0 + timedelta(hours=2)
ROWS = 50_000


def _features(rng: np.random.Generator, n: int, shifted: bool) -> pd.DataFrame:
    age = rng.normal(42 if shifted else 40, 10, n)
    age[rng.random(n) < (0.08 if shifted else 0.02)] = np.nan  # missing rate moves too
    city_p = [0.1, 0.2, 0.6, 0.05, 0.05] if shifted else [0.4, 0.3, 0.2, 0.05, 0.05]
    city = rng.choice(np.array(["north", "south", "east", "west", None], dtype=object), n, p=city_p)
    if shifted:
        city[:1500] = "atlantis"  # a category the reference never has
    return pd.DataFrame({
        "age": age,
        "income": rng.lognormal(10, 0.5, n),
        "visits": rng.poisson(20, n).astype(np.int64),  # integers, many levels: numeric
        "plan": rng.integers(0, 4, n),  # four integer levels: categorical
        "city": city,
        "member": rng.random(n) < (0.4 if shifted else 0.3),
        "empty": np.full(n, np.nan),  # no value on either side: listed, not judged
    })


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pd.Series]:
    """A capture folder of 6 files over 2 days, a reference file, and the reference predictions."""
    root = tmp_path_factory.mktemp("streamed")
    rng = np.random.default_rng(7)
    features = _features(rng, ROWS, shifted=True).drop(columns=["member"])  # a column the capture lacks
    stamps = pd.Series(T0 + pd.to_timedelta(rng.uniform(-1800, 9000, ROWS), unit="s"))  # some outside
    captured = pd.concat([pd.DataFrame({
        "_request_id": [f"r{i}" for i in range(ROWS)], "_timestamp": stamps, "_deployment": "d",
        "_model_version": rng.choice(np.array(["1", "2"], dtype=object), ROWS, p=[0.9, 0.1]),
        "_status": rng.choice(np.array([200, 500], dtype=np.int16), ROWS, p=[0.95, 0.05]),
        "_latency_ms": np.float32(1.0), "_row": np.int32(0),
        "_role": rng.choice(np.array(["primary", "shadow", None], dtype=object), ROWS, p=[0.8, 0.1, 0.1]),
        "_model_name": "m",
    }), features], axis=1)
    captured["_prediction"] = rng.choice(np.array(["churn", "stay"], dtype=object), ROWS, p=[0.55, 0.45])
    noise = captured["_status"].to_numpy() != 200
    captured.loc[noise, "age"] = 1e9  # leaks would show as massive drift
    capture = root / "capture"
    for k, part in enumerate(np.array_split(np.arange(ROWS), 6)):
        frame = captured.iloc[part]
        for day, rows in frame.groupby(frame["_timestamp"].dt.date):
            folder = capture / f"date={day.isoformat()}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), folder / f"part-{k}.parquet")
    reference = _features(rng, 60_000, shifted=False)
    path = root / "reference.parquet"
    reference.to_parquet(path, index=False, row_group_size=7_000)
    predictions = pd.Series(rng.choice(np.array(["churn", "stay"], dtype=object), len(reference), p=[0.3, 0.7]))
    return capture, path, predictions


def _judged(reference: object, captured: object, predictions: pd.Series, settings: DriftSettings) -> tuple:
    current, counts = select_current(captured, "1", T0, T1)  # type: ignore[arg-type]
    drift, prediction, prediction_summary, quality = judge_window(reference, current, settings,  # type: ignore[arg-type]
                                                                  predictions)
    assert prediction is not None
    return counts, drift.to_dict(), prediction.to_dict(), prediction_summary, quality.to_dict()


@pytest.mark.parametrize("numbers_as_float64", [False, True])
def test_streamed_figures_equal_in_memory_figures(files: tuple[Path, Path, pd.Series], numbers_as_float64: bool) -> None:
    capture, reference_path, predictions = files
    settings = DriftSettings(methods={"income": "wasserstein:0.1", "visits": "ks+psi:0.2"})
    in_memory = _judged(read_table(reference_path), read_capture(str(capture), T0, T1), predictions, settings)
    lazy_capture = open_capture(str(capture), T0, T1)
    lazy_reference = open_table(reference_path)
    assert isinstance(lazy_capture, ParquetColumns) and isinstance(lazy_reference, ParquetColumns)
    if numbers_as_float64:  # as the job reads them: "visits" and "plan" come as float64
        lazy_capture.numbers_as_float64()
        lazy_reference.numbers_as_float64()
        plan, visits = lazy_reference["plan"], lazy_capture["visits"]
        assert plan.dtype == np.float64 and visits.dtype == np.float64
        assert np.array_equal(plan.to_numpy(), read_table(reference_path)["plan"].to_numpy(float))
    streamed = _judged(lazy_reference, lazy_capture, predictions, settings)

    counts, drift, prediction, _, quality = in_memory
    # The data has what the comparison must cover: noise rows excluded, nulls, categories, a new
    # category, a vanished column, an empty one, prediction drift, data-quality issues.
    assert counts["excluded_status"] > 0 and counts["excluded_other_versions"] > 0 and counts["current"] > 20_000
    assert drift["drifted_columns"] == ["age", "city", "member"] and drift["missing_in_current"] == ["member"]
    assert drift["columns"]["plan"]["kind"] == "categorical" and drift["columns"]["empty"]["skipped_reason"]
    assert list(drift["columns"]["city"]["details"]["new_category_counts"]) == ["atlantis"]
    assert drift["columns"]["age"]["missing_drifted"] is True
    assert prediction["columns"]["prediction"]["drifted"] is True
    assert quality["columns_with_issues"] == ["age", "city", "member"]
    assert streamed == in_memory  # equal, not close: every figure, verdict, reason and count


@pytest.mark.parametrize("numbers_as_float64", [False, True])
def test_the_sample_is_the_in_memory_draw_kept_while_columns_stream(files: tuple[Path, Path, pd.Series],
                                                                    numbers_as_float64: bool) -> None:
    _, reference_path, _ = files
    frame = read_table(reference_path)
    table = open_table(reference_path)
    assert isinstance(table, ParquetColumns)
    table.keep_sample(1000, 3)
    if numbers_as_float64:  # the columns come as float64 arrays, the sample as read
        table.numbers_as_float64()
    for name in ["age", "city"]:
        table[name]  # the drift statistics read them
    expected, sampled = _sample(frame, ["age", "city", "plan"], 1000, 3)
    got, got_sampled = _sample(table, ["age", "city", "plan"], 1000, 3)  # plan read now, for the sample
    assert sampled and got_sampled
    pd.testing.assert_frame_equal(got, expected)


def test_the_sample_keeps_integers_read_as_float_and_is_not_reordered_by_the_statistics(
        files: tuple[Path, Path, pd.Series]) -> None:
    _, reference_path, _ = files
    frame = read_table(reference_path)
    table = open_table(reference_path)
    assert isinstance(table, ParquetColumns)
    table.keep_sample(len(frame), 3)  # every row: the sample is the whole column, as read
    table.numbers_as_float64()
    drift_stats.compute_drift(table, table, columns=["age", "plan"])  # sorts its own reads in place
    got, sampled = table.sample(["age", "plan"], len(frame), 3)
    assert not sampled
    pd.testing.assert_frame_equal(got, frame[["age", "plan"]])  # row order and integer dtype as read


@pytest.mark.parametrize("numbers_as_float64", [False, True])
def test_memory_is_handed_back_after_large_reads_not_after_each_small_column(tmp_path: Path,
                                                                             numbers_as_float64: bool) -> None:
    """malloc_trim walks the whole heap: a short, wide window (kB per column) must not pay it per
    column; a column of RELEASE_AFTER_BYTES or more (any column at 10M rows) still hands its memory
    back at once, as the drift job's 1 GB bound needs."""
    rows = 200
    wide = pd.DataFrame({f"n{i}": np.arange(rows, dtype=np.int64) for i in range(40)}
                        | {f"t{i}": [f"v{r % 7}" for r in range(rows)] for i in range(10)})
    wide.to_parquet(tmp_path / "wide.parquet", index=False)
    table = open_parquet(str(tmp_path / "wide.parquet"))
    masked = table[np.arange(rows) % 3 == 0]  # the window's rows, read batch by batch
    for side in (table, masked):
        if numbers_as_float64:
            side.numbers_as_float64()
        assert all(len(side[name]) == len(side) for name in side.columns)
        assert side.releases == 0
    big = RELEASE_AFTER_BYTES // 8 + 1
    pd.DataFrame({"x": np.arange(big, dtype=np.float64)}).to_parquet(tmp_path / "long.parquet", index=False)
    long = open_parquet(str(tmp_path / "long.parquet"))
    if numbers_as_float64:
        long.numbers_as_float64()
    assert len(long["x"]) == big and long.releases == 1


def test_in_place_sort_gives_the_finite_values_of_the_copying_sort_without_a_copy() -> None:
    rng = np.random.default_rng(5)
    values = rng.normal(0, 1, 10_000)
    values[rng.random(10_000) < 0.1] = np.nan
    values[:5], values[5:8] = np.inf, -np.inf
    series = pd.Series(values.copy())
    expected, expected_missing = drift_stats._sorted_values(pd.Series(values))
    got, missing = drift_stats._sorted_values(series, in_place=True)
    assert missing == expected_missing and np.array_equal(got, expected)
    assert np.shares_memory(got, series.to_numpy())  # sorted in the Series' own memory
    integers = pd.Series(rng.integers(0, 5, 1_000))  # not float64: sorted in a copy, the Series untouched
    got, _ = drift_stats._sorted_values(integers.copy(), in_place=True)
    assert np.array_equal(got, np.sort(integers.to_numpy().astype(float)))


def test_counts_of_integer_levels_from_sorted_runs_equal_np_unique() -> None:
    rng = np.random.default_rng(6)
    ref, cur = np.sort(rng.integers(0, 6, 5_000).astype(float)), np.sort(rng.integers(2, 9, 3_000).astype(float))
    levels, inverse = np.unique(np.concatenate([ref, cur]), return_inverse=True)
    got = np.union1d(drift_stats._levels_sorted(ref), drift_stats._levels_sorted(cur))
    assert np.array_equal(got, levels)
    assert np.array_equal(drift_stats._run_lengths(ref, got), np.bincount(inverse[:len(ref)], minlength=len(got)))
    assert np.array_equal(drift_stats._run_lengths(cur, got), np.bincount(inverse[len(ref):], minlength=len(got)))
    assert len(drift_stats._levels_sorted(ref[:0])) == 0


def test_redaction_and_batches_of_a_streamed_reference(files: tuple[Path, Path, pd.Series]) -> None:
    _, reference_path, _ = files
    frame = read_table(reference_path)
    table = open_parquet(str(reference_path))
    redaction = CaptureRedaction(exclude=["income"], hashed=["city"], key="k")
    redacted = redaction.apply_to_columns(table)
    expected = redaction.apply(frame)
    assert list(redacted.columns) == list(expected.columns)
    pd.testing.assert_series_equal(redacted["city"], expected["city"])
    batches = list(table.iter_frames(batch_rows=25_000))
    assert [len(b) for b in batches] == [25_000, 25_000, 10_000] or sum(map(len, batches)) == len(frame)
    pd.testing.assert_frame_equal(pd.concat(batches, ignore_index=True), frame)
    some = table[np.arange(len(frame)) % 3 == 0]
    pd.testing.assert_series_equal(some["age"], frame["age"].iloc[::3].reset_index(drop=True))


def test_reference_predictions_in_batches_equal_one_call(tmp_path: Path, classifier_path: Path,
                                                         iris: tuple[pd.DataFrame, pd.Series],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow_deploy_plugin.monitoring import deployment_drift

    features, _ = iris
    shutil.copytree(classifier_path, tmp_path / "models" / "iris" / "1")
    features.to_parquet(tmp_path / "reference.parquet", index=False)
    whole, why = deployment_drift._reference_predictions(tmp_path / "models", "iris", "1", features)
    monkeypatch.setattr(deployment_drift, "PREDICT_BATCH_ROWS", 40)  # 150 rows: four predict calls
    batched, why_batched = deployment_drift._reference_predictions(
        tmp_path / "models", "iris", "1", open_parquet(str(tmp_path / "reference.parquet")))
    assert why is None and why_batched is None
    assert isinstance(whole, pd.Series) and isinstance(batched, pd.Series)
    pd.testing.assert_series_equal(batched, whole)


@pytest.mark.parametrize(("n", "m"), [(30_001, 20_000), (25_000, 25_000)])
def test_sliced_and_threaded_steps_equal_the_one_slice_ones(monkeypatch: pytest.MonkeyPatch, n: int, m: int) -> None:
    rng = np.random.default_rng(n)
    a = np.sort(np.round(rng.normal(0, 1, n), 2))  # ties, across slice edges too
    b = np.sort(np.round(rng.normal(0.05, 1, m), 2))
    whole_ks, whole_w = drift_stats._ks(a, b), drift_stats.wasserstein_sorted(a, b)
    monkeypatch.setattr(drift_stats, "CHUNK", 4_096)
    monkeypatch.setattr(drift_stats, "KS_CHUNK", 1_024)
    monkeypatch.setattr(drift_stats, "PARALLEL_MIN_ROWS", 0)
    assert drift_stats._ks(a, b) == whole_ks  # a max: exact whatever the slicing
    assert drift_stats.wasserstein_sorted(a, b) == pytest.approx(whole_w, rel=1e-12)
    assert whole_ks[0] == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-15)
    assert whole_w == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-9)
