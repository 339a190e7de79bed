"""The drift job end to end on a real MLflow store (SQLite in a temp folder, or PostgreSQL) with real Evidently:
reference resolution, the logged run (params, metrics, artifacts), model version tags, too few rows,
no reference, and a failure mid-way."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import Stores
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from mlflow_deploy_plugin.monitoring import (
    DriftSettings,
    predict_reference,
    resolve_reference_data,
    run_drift_report,
)
from mlflow_deploy_plugin.monitoring.drift_methods import ColumnMethod
from mlflow_deploy_plugin.monitoring.report_job import metric_names

FEATURES = ["age", "income($)", "plan", "region"]
WINDOW_START = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW_END = WINDOW_START + timedelta(hours=1)
pytestmark = pytest.mark.store  # `make test` runs these on SQLite and on PostgreSQL


def _features(rng: np.random.Generator, n: int, shifted: bool = False) -> pd.DataFrame:
    region_p = [0.2, 0.3, 0.5] if shifted else [0.5, 0.3, 0.2]
    return pd.DataFrame({
        "age": rng.normal(45 if shifted else 40, 10, n),
        "income($)": rng.lognormal(10.3 if shifted else 10, 0.5, n),
        "plan": rng.integers(0, 4, n),  # 4 integer levels: tested as categorical (chi2)
        "region": rng.choice(np.array(["north", "south", "east"], dtype=object), n, p=region_p),
    })


class Store:
    """The temp tracking store and the registered models the tests use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.client = MlflowClient()
        self.rng = np.random.default_rng(42)
        self.train = _features(self.rng, 3000)
        self.train["label"] = (self.train["age"] > 40).astype(int)
        self.models: dict[str, str] = {}

    def register(self, name: str, *, dataset_input: bool = False, model_artifact: bool = False,
                 code_source_input: bool = False) -> str:
        from sklearn.compose import ColumnTransformer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        x, y = self.train[FEATURES], self.train["label"]
        model = make_pipeline(
            ColumnTransformer([("num", StandardScaler(), ["age", "income($)", "plan"]),
                               ("cat", OneHotEncoder(handle_unknown="ignore"), ["region"])]),
            LogisticRegression(max_iter=200),
        ).fit(x, y)
        with mlflow.start_run() as run:
            if dataset_input:
                # The recommended training-script pattern: the data as a run artifact, and a dataset input
                # whose source is that artifact (here with the label, which the job must drop).
                path = self.root / f"{name}-train.parquet"
                self.train.to_parquet(path, index=False)
                mlflow.log_artifact(str(path), artifact_path="data")
                source = f"{run.info.artifact_uri}/data/{path.name}"
                mlflow.log_input(mlflow.data.from_pandas(self.train, source=source, name="training",
                                                         targets="label"), context="training")
            if code_source_input:  # no source: MLflow records only the code, which cannot be loaded
                mlflow.log_input(mlflow.data.from_pandas(self.train, name="in-memory"), context="training")
            info = mlflow.sklearn.log_model(model, name="model", signature=infer_signature(x, model.predict(x)),
                                            registered_model_name=name, pip_requirements=["scikit-learn"])
        if model_artifact:
            path = self.root / "reference_data.parquet"
            x.to_parquet(path, index=False)
            self.client.log_model_artifact(info.model_id, str(path))
        return str(info.registered_model_version)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, stores: Stores) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("drift-store")
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # client-side stores put default artifact roots under the working directory
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(stores.new_uri(root, "drift"))
        mlflow.set_experiment("drift-tests")
        store = Store(root)
        store.models["dataset"] = "churn_dataset"
        store.register("churn_dataset", dataset_input=True)
        store.models["artifact"] = "churn_artifact"
        store.register("churn_artifact", model_artifact=True, code_source_input=True)
        store.models["none"] = "churn_none"
        store.register("churn_none")
        try:
            yield store
        finally:
            mlflow.set_tracking_uri(previous)


def _captured(rng: np.random.Generator, n: int, *, version: str, shifted: bool, model=None) -> pd.DataFrame:
    """A capture table as read back from Parquet, plus rows the job must ignore."""
    features = _features(rng, n, shifted)
    stamps = WINDOW_START + pd.to_timedelta(rng.uniform(0, 3600, n), unit="s")
    frame = pd.DataFrame({
        "_request_id": [f"r{i}" for i in range(n)], "_timestamp": stamps, "_deployment": "churn",
        "_model_version": version, "_status": np.int16(200), "_latency_ms": np.float32(3.0),
        "_row": np.int32(0),
    })
    frame = pd.concat([frame, features], axis=1)
    if model is not None:
        frame["_prediction"] = model.predict(features)
    noise = frame.head(40).copy()
    noise.loc[:19, "_status"] = 500  # failed requests
    noise.loc[20:, "_model_version"] = "999"  # another version (a canary)
    noise[["age"]] = 1e6  # would look like massive drift if they were used
    late = frame.head(10).copy()
    late["_timestamp"] = WINDOW_END + timedelta(minutes=5)  # outside the window
    late[["age"]] = -1e6
    return pd.concat([frame, noise, late], ignore_index=True)


def _download(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(dst)))


def test_reference_from_logged_dataset_input(store: Store):
    frame, source = resolve_reference_data(store.client, store.models["dataset"], "1")
    assert list(frame.columns) == FEATURES  # the label is not a model input: dropped
    assert len(frame) == len(store.train)
    pd.testing.assert_frame_equal(frame.reset_index(drop=True), store.train[FEATURES])
    assert source.startswith("dataset input 'training'") and "dropped non-input columns ['label']" in source


def test_reference_from_model_artifact_skips_unloadable_dataset_sources(store: Store):
    frame, source = resolve_reference_data(store.client, store.models["artifact"], "1")
    assert list(frame.columns) == FEATURES and len(frame) == len(store.train)
    assert source.startswith(f"models:/{store.models['artifact']}/1/reference_data.parquet")


def test_no_reference_names_every_place_tried(store: Store):
    name = store.models["none"]
    with pytest.raises(MlflowException) as info:
        resolve_reference_data(store.client, name, "1")
    exc = info.value
    assert exc.error_code == "RESOURCE_DOES_NOT_EXIST"
    run_id = store.client.get_model_version(name, "1").run_id
    for fragment in ["override (-C reference_data=...): not given", f"dataset inputs of run {run_id}: none logged",
                     f"models:/{name}/1/reference_data.parquet: not found",
                     f"models:/{name}/1/artifacts/reference_data.parquet: not found",
                     f"runs:/{run_id}/reference_data.parquet: not found", "-C reference_data=<path or URI"]:
        assert fragment in exc.message, (fragment, exc.message)


def test_reference_override_path_and_bad_override(store: Store, tmp_path: Path):
    csv = tmp_path / "ref.csv"
    store.train.head(500).to_csv(csv, index=False)
    frame, source = resolve_reference_data(store.client, store.models["none"], "1", override=str(csv))
    assert list(frame.columns) == FEATURES and len(frame) == 500
    assert source.startswith(f"override {csv}")
    with pytest.raises(MlflowException, match="Cannot read the reference data override") as info:
        resolve_reference_data(store.client, store.models["none"], "1", override=str(tmp_path / "nope.parquet"))
    assert info.value.error_code == "RESOURCE_DOES_NOT_EXIST"


def test_unreadable_mlmodel_keeps_every_column_and_says_so(store: Store, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture):
    name = "churn_bad_mlmodel"
    store.register(name, dataset_input=True)
    model_id = store.client.get_model_version(name, "1").source.removeprefix("models:/")
    location = Path(mlflow.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    (location / "MLmodel").write_text("flavors: [this is: not, an MLmodel\n")
    skipped: list[str] = []
    with caplog.at_level("WARNING", logger="mlflow_deploy_plugin.monitoring.reference"):
        frame, source = resolve_reference_data(store.client, name, "1", skipped=skipped)
    assert "label" in frame.columns  # the signature could not say it is not an input
    assert "MLmodel unreadable: all columns kept" in source
    assert len(skipped) == 1 and f"the MLmodel of models:/{name}/1 could not be read" in skipped[0]
    assert skipped[0] in caplog.text
    outcome = run_drift_report(
        deployment="churn-bad-mlmodel", model_name=name, model_version="1",
        captured=_captured(np.random.default_rng(6), 300, version="1", shifted=False), reference=frame,
        reference_source=source, window_start=WINDOW_START, window_end=WINDOW_END, skipped=skipped,
        reference_predictions_skipped="the model's predictions on the reference data failed: test")
    assert outcome.summary["skipped"] == [skipped[0], "prediction drift: the model's predictions on the "
                                                      "reference data failed: test"]
    tags = store.client.get_run(outcome.run_id).data.tags
    assert tags["drift.skipped"] == "; ".join(outcome.summary["skipped"])


def test_reference_predictions_follow_the_capture_layout_or_say_why_not(store: Store, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture):
    from mlflow_deploy_plugin.monitoring.deployment_drift import _reference_predictions

    name = store.models["dataset"]
    reference, _ = resolve_reference_data(store.client, name, "1")
    predictions, why_not = _reference_predictions(tmp_path, name, "1", reference)  # no local copy: registry
    expected = mlflow.pyfunc.load_model(f"models:/{name}/1").predict(reference)
    assert why_not is None and isinstance(predictions, pd.Series)  # compared with the captured `_prediction`
    assert predictions.tolist() == list(expected)
    gap = reference.copy()
    gap.loc[gap.index[0], "age"] = np.nan  # the model cannot predict a missing age
    with caplog.at_level("WARNING", logger="mlflow_deploy_plugin.monitoring.deployment_drift"):
        predictions, why_not = _reference_predictions(tmp_path, name, "1", gap)
    assert predictions is None and "NaN" in why_not
    assert f"Prediction drift of {name} v1 skipped: {why_not}" in caplog.text


def test_report_job_end_to_end_on_drifted_window(store: Store, tmp_path: Path):
    name = store.models["dataset"]
    reference, source = resolve_reference_data(store.client, name, "1")
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    captured = _captured(np.random.default_rng(1), 1500, version="1", shifted=True, model=model)
    messages: list[str] = []
    settings = DriftSettings(evidently_sample_rows=1000, methods={"income($)": "wasserstein:0.1"})
    outcome = run_drift_report(
        deployment="churn", model_name=name, model_version="1", captured=captured, reference=reference,
        reference_source=source, window_start=WINDOW_START, window_end=WINDOW_END, settings=settings,
        experiment_name="drift/churn-e2e", progress=messages.append,
        reference_predictions=predict_reference(f"models:/{name}/1", reference),
    )
    # Verdicts: age, income and region shifted, plan not; 3 of 4 columns >= 0.5 -> drifted.
    assert outcome.status == "drifted"
    assert outcome.result is not None and outcome.result.drifted_columns == ["age", "income($)", "region"]
    assert outcome.rows_current == 1500  # failed, other-version and out-of-window rows excluded
    assert outcome.prediction_drift is not None and outcome.prediction_drift.columns[0].drifted
    assert [m.split(" ")[0] for m in messages] == ["reading", "computing", "rendering", "logging", "done:"]

    client = store.client
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    # Filed with model training in MLflow 3's UI, not under GenAI "Evaluation runs".
    assert client.get_experiment(outcome.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(run.info.experiment_id).name == "drift/churn-e2e"
    params = run.data.params
    assert {k: params[k] for k in ["deployment", "model_name", "model_version", "rows_current", "rows_reference"]} \
        == {"deployment": "churn", "model_name": name, "model_version": "1", "rows_current": "1500",
            "rows_reference": "3000"}
    assert params["window_start"] == "2026-01-01T00:00:00Z" and params["window_end"] == "2026-01-01T01:00:00Z"
    assert params["reference_source"] == source
    assert params["methods"] == ("num=ks,cat=chi2,alpha=0.05,floors=numeric=0.1,categorical=0.1,missing=0.05; "
                                 "income($)=wasserstein:0.1")
    metrics = run.data.metrics
    assert metrics["drift_share"] == 0.75 and metrics["drifted_columns"] == 3
    assert set(metrics) >= {"drift_score.age", "drift_score.income___", "drift_score.plan", "drift_score.region",
                            "drift_effect.age", "drift_effect.region", "missing_rate.age", "drifted.age",
                            "prediction_drift_score", "prediction_drift_effect", "prediction_drifted",
                            "rows_current", "rows_reference", "dataset_drifted"}
    # Both figures per column: the test's p-value and the effect size that must reach the floor.
    income = outcome.result.column("income($)")
    assert metrics["drift_score.income___"] == pytest.approx(income.score)
    assert metrics["drift_effect.income___"] == pytest.approx(income.effect_size) and income.effect_size >= 0.1
    assert metrics["drifted.age"] == 1 and metrics["drifted.plan"] == 0 and metrics["missing_rate.age"] == 0
    assert run.data.tags["drift.status"] == "drifted"

    assert {a.path for a in client.list_artifacts(outcome.run_id)} == {"drift_report.html", "drift_summary.json"}
    html = _download(client, outcome.run_id, "drift_report.html", tmp_path).read_text()
    assert "evidently" in html.lower() and "window.drawDashboard" in html  # Evidently rendered it
    assert len(html) > 100_000  # a self-contained Evidently page, not a fallback
    assert "the Evidently HTML is rendered from a random sample of 1,000 reference rows (of 3,000)" in html
    _assert_page_shows_our_verdicts(html, outcome.result)
    summary = json.loads(_download(client, outcome.run_id, "drift_summary.json", tmp_path).read_text())
    assert summary["status"] == "drifted"
    assert summary["window"] == {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T01:00:00Z"}
    assert summary["rows"] == {"captured": 1550, "excluded_status": 20, "excluded_other_versions": 20,
                               "excluded_outside_window": 10, "current": 1500, "reference": 3000,
                               "compared_columns": 4}
    assert summary["dataset"]["drift_share"] == 0.75 and summary["dataset"]["n_drifted"] == 3
    assert summary["dataset"]["rows_compared"] == {"reference": 3000, "current": 1500}
    assert summary["columns"]["income($)"]["method"] == "ks"  # the test; the method named is its effect
    assert summary["columns"]["income($)"]["effect_method"] == "wasserstein"
    assert summary["columns"]["plan"]["method"] == "chi2" and summary["columns"]["plan"]["kind"] == "categorical"
    for column in summary["columns"].values():
        assert {"method", "threshold", "score", "drifted", "effect_method", "effect_floor", "effect_size",
                "missing_rate_ref", "missing_rate_cur", "missing_p_value", "reason"} <= set(column)
    assert summary["settings"]["floors"] == {"numeric": 0.1, "categorical": 0.1, "missing": 0.05}
    assert summary["evidently"]["rendered_from_sample"] is True
    assert summary["evidently"]["sample_rows_reference"] == 1000
    assert "verdicts computed exactly on all rows" in summary["evidently"]["note"]
    assert summary["prediction_drift"]["columns"]["prediction"]["drifted"] is True

    tags = client.get_model_version(name, "1").tags
    assert tags["drift.status"] == "drifted" and tags["drift.share"] == "0.7500"
    assert tags["drift.report_run_id"] == outcome.run_id
    checked = datetime.fromisoformat(tags["drift.checked_at"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - checked).total_seconds()) < 300


def test_report_job_no_drift_window_is_ok_without_prediction_drift(store: Store):
    name = store.models["artifact"]
    reference, source = resolve_reference_data(store.client, name, "1")
    captured = _captured(np.random.default_rng(2), 800, version="1", shifted=False)
    outcome = run_drift_report(
        deployment="churn-ok", model_name=name, model_version="1", captured=captured, reference=reference,
        reference_source=source, window_start=WINDOW_START, window_end=WINDOW_END,
    )
    # One column may flag by chance (alpha = 0.05 per column); the dataset verdict stays ok.
    assert outcome.status == "ok" and outcome.result is not None and outcome.result.n_drifted <= 1
    assert outcome.summary["prediction_drift"]["skipped"].startswith("no reference predictions")
    assert outcome.summary["evidently"]["rendered_from_sample"] is False
    assert store.client.get_experiment(outcome.experiment_id).name == "drift/churn-ok"  # default name
    assert store.client.get_model_version(name, "1").tags["drift.status"] == "ok"


def test_insufficient_rows_log_a_run_without_a_verdict(store: Store, tmp_path: Path):
    name = store.models["artifact"]
    client = store.client
    client.set_model_version_tag(name, "1", "drift.share", "0.9")  # a stale share from an earlier check
    reference, source = resolve_reference_data(client, name, "1")
    captured = _captured(np.random.default_rng(3), 150, version="1", shifted=True)
    outcome = run_drift_report(
        deployment="churn-small", model_name=name, model_version="1", captured=captured, reference=reference,
        reference_source=source, window_start=WINDOW_START, window_end=WINDOW_END, settings=DriftSettings(),
    )
    assert outcome.status == "insufficient_data" and outcome.result is None and outcome.rows_current == 150
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["drift.status"] == "insufficient_data"
    assert run.data.params["rows_current"] == "150" and run.data.metrics["rows_current"] == 150
    assert "drift_share" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(outcome.run_id)} == {"drift_summary.json"}
    summary = json.loads(_download(client, outcome.run_id, "drift_summary.json", tmp_path).read_text())
    assert summary["status"] == "insufficient_data" and summary["rows"]["current"] == 150
    tags = client.get_model_version(name, "1").tags
    assert tags["drift.status"] == "insufficient_data" and "drift.share" not in tags
    assert tags["drift.report_run_id"] == outcome.run_id


def test_window_whose_inputs_are_all_null_is_drifted_and_says_why(store: Store, tmp_path: Path):
    # Upstream stopped sending every feature: each one vanished, which is drift (it used to be
    # "insufficient_data", a silent no-verdict), with the reason per column.
    name = store.models["none"]
    captured = _captured(np.random.default_rng(5), 300, version="1", shifted=False)
    captured[FEATURES] = None
    outcome = run_drift_report(
        deployment="churn-null", model_name=name, model_version="1", captured=captured,
        reference=store.train[FEATURES], reference_source="test", window_start=WINDOW_START,
        window_end=WINDOW_END,
    )
    assert outcome.status == "drifted" and outcome.result is not None and outcome.result.n_tested == 4
    assert outcome.result.drifted_columns == FEATURES
    assert outcome.summary["columns"]["age"]["reason"] == ("drifted: all 300 values missing in the current "
                                                           "data (reference: 0.0% missing)")
    run = store.client.get_run(outcome.run_id)
    assert run.data.metrics["drift_share"] == 1 and run.data.tags["drift.status"] == "drifted"
    assert run.data.metrics["missing_rate.age"] == 1 and run.data.metrics["drifted.age"] == 1
    assert store.client.get_model_version(name, "1").tags["drift.status"] == "drifted"
    # Nothing to plot: the page is our verdict table, saying why.
    html = _download(store.client, outcome.run_id, "drift_report.html", tmp_path).read_text()
    assert "no column has values on both sides to plot" in html and "all 300 values missing" in html
    assert outcome.summary["evidently"]["plotted_columns"] == []


def test_vanished_feature_and_missing_rate_change_are_flagged_end_to_end(store: Store, tmp_path: Path):
    name = store.models["artifact"]
    reference, source = resolve_reference_data(store.client, name, "1")
    captured = _captured(np.random.default_rng(8), 2000, version="1", shifted=False)
    window = captured["_model_version"] == "1"
    captured.loc[window, "region"] = None  # upstream stopped sending it
    captured.loc[captured.index[window][:400], "income($)"] = np.nan  # 0 % -> ~20 % missing
    captured["new_feature"] = 1.0  # only the current data has it: shown, not judged
    captured["age"] = captured["age"].astype(str)  # numbers that arrived as text: judged and drawn as numbers
    outcome = run_drift_report(
        deployment="churn-missing", model_name=name, model_version="1", captured=captured, reference=reference,
        reference_source=source, window_start=WINDOW_START, window_end=WINDOW_END,
        settings=DriftSettings(evidently_sample_rows=1000),
    )
    result = outcome.result
    assert result is not None and result.drifted_columns == ["income($)", "region"]
    assert outcome.status == "drifted"  # 2 of 4 columns >= 0.5
    income, region = result.column("income($)"), result.column("region")
    assert income.missing_drifted and not income.values_drifted and income.missing_rate_ref == 0.0
    assert income.missing_rate_cur == pytest.approx(400 / 2000)
    assert region.vanished and region.reason.startswith("drifted: all 2,000 values missing in the current data")
    summary = outcome.summary
    assert summary["dataset"]["new_in_current"] == ["new_feature"]
    assert summary["columns"]["income($)"]["reason"].startswith("drifted: missing 0.0% -> 20.0% (z-test p=")
    metrics = store.client.get_run(outcome.run_id).data.metrics
    assert metrics["missing_rate.income___"] == pytest.approx(0.2) and metrics["drifted.income___"] == 1
    assert metrics["drifted.region"] == 1 and metrics["drift_share"] == 0.5
    html = _download(store.client, outcome.run_id, "drift_report.html", tmp_path).read_text()
    _assert_page_shows_our_verdicts(html, result)
    assert "only in the current data (not in the reference)" in html  # new_feature, in our verdict table
    # Data quality on the same rows: the missing values are issues, in the metrics, tags, summary and page.
    checks = summary["data_quality"]["columns"]
    assert checks["income($)"]["checks"]["missing"]["value"] == pytest.approx(0.2)
    assert checks["income($)"]["issue"] and checks["region"]["checks"]["missing"]["value"] == 1.0
    assert {"income($)", "region"} <= set(summary["data_quality"]["columns_with_issues"])
    assert metrics["data_quality.missing.income___"] == pytest.approx(0.2) and metrics["data_quality.missing.region"] == 1
    tags = store.client.get_run(outcome.run_id).data.tags
    assert tags["data_quality.status"] == "issues" and "income($): missing 20%" in tags["data_quality.issues"]
    assert 'id="mlflow-deploy-data-quality"' in html
    assert summary["evidently"]["plotted_columns"] == ["age", "income($)", "plan"]  # region cannot be drawn


def test_a_tiny_shift_on_large_samples_is_no_alarm_while_a_real_shift_is(store: Store):
    # The case: 200k reference and 200k current rows, every feature shifted by 0.03 sd (KS and
    # chi-square call that significant) must not be drift; a 0.5-sd shift must.
    name = store.models["none"]
    rng = np.random.default_rng(9)
    n = 200_000
    sd = {"age": 10.0, "income($)": 0.5}

    def frame(shift_sd: float) -> pd.DataFrame:
        region_p = np.array([0.5, 0.3, 0.2]) + np.array([-1, 0.5, 0.5]) * shift_sd * 0.5
        return pd.DataFrame({
            "age": rng.normal(40 + shift_sd * sd["age"], sd["age"], n),
            "income($)": rng.lognormal(10 + shift_sd * sd["income($)"], sd["income($)"], n),
            "plan": rng.integers(0, 4, n),
            "region": pd.Series(rng.choice(np.array(["north", "south", "east"], dtype=object), n, p=region_p)),
        })

    reference = frame(0.0)
    meta = pd.DataFrame({"_timestamp": pd.Timestamp(WINDOW_START) + pd.to_timedelta(np.arange(n) % 3600, "s"),
                         "_model_version": "1", "_status": np.int16(200)})
    settings = DriftSettings(evidently_sample_rows=2000)
    outcomes = {}
    for label, shift in (("tiny", 0.03), ("real", 0.5)):
        captured = pd.concat([meta, frame(shift)], axis=1)
        outcomes[label] = run_drift_report(
            deployment=f"churn-{label}", model_name=name, model_version="1", captured=captured,
            reference=reference, reference_source="test", window_start=WINDOW_START, window_end=WINDOW_END,
            settings=settings)
    tiny, real = outcomes["tiny"], outcomes["real"]
    assert tiny.result is not None and real.result is not None
    for column in ("age", "income($)", "region"):
        col = tiny.result.column(column)
        assert col.significant and not col.drifted, col.reason  # real but small: no alarm
    assert tiny.status == "ok" and tiny.result.n_drifted == 0
    assert real.status == "drifted" and real.result.drifted_columns == ["age", "income($)", "region"]
    tags = store.client.get_model_version(name, "1").tags  # the last report's verdict
    assert tags["drift.status"] == "drifted" and tags["drift.report_run_id"] == real.run_id
    tiny_run = store.client.get_run(tiny.run_id)
    assert tiny_run.data.tags["drift.status"] == "ok" and tiny_run.data.metrics["drift_share"] == 0
    assert tiny_run.data.metrics["drift_score.age"] < 0.05 and tiny_run.data.metrics["drift_effect.age"] < 0.1


class TwoOutputs(mlflow.pyfunc.PythonModel):
    """A model with two outputs per row (a 2-D array): capture writes ``_prediction_0``/``_prediction_1``."""

    def predict(self, context, model_input, params=None):
        return np.column_stack([model_input["age"].to_numpy() / 100.0, model_input["plan"].to_numpy() * 1.0])


def test_prediction_drift_of_a_model_with_several_outputs(store: Store, tmp_path: Path):
    from mlflow_deploy_plugin.capture import prediction_columns
    from mlflow_deploy_plugin.monitoring.deployment_drift import _reference_predictions

    name = "churn_two_outputs"
    x = store.train[FEATURES]
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=TwoOutputs(), registered_model_name=name,
                                input_example=x.head(3), pip_requirements=["numpy"])
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    captured = _captured(np.random.default_rng(10), 1500, version="1", shifted=True)
    for column, values in prediction_columns(model.predict(captured[FEATURES]), len(captured)).items():
        captured[column] = values  # exactly as the capture lays the outputs out
    predictions, why_not = _reference_predictions(tmp_path, name, "1", x)
    assert why_not is None and list(predictions.columns) == ["0", "1"]
    outcome = run_drift_report(
        deployment="churn-two", model_name=name, model_version="1", captured=captured, reference=x,
        reference_source="test", window_start=WINDOW_START, window_end=WINDOW_END,
        reference_predictions=predictions, settings=DriftSettings(evidently_sample_rows=500))
    prediction = outcome.prediction_drift
    assert prediction is not None and [c.name for c in prediction.columns] == ["0", "1"]
    assert prediction.drifted_columns == ["0"]  # age shifted by 0.5 sd; plan did not move
    assert outcome.summary["prediction_drift"]["captured_columns"] == {"0": "_prediction_0", "1": "_prediction_1"}
    metrics = store.client.get_run(outcome.run_id).data.metrics
    assert metrics["prediction_drifted.0"] == 1 and metrics["prediction_drifted.1"] == 0
    assert metrics["prediction_drift_effect.0"] == pytest.approx(prediction.column("0").effect_size)
    assert metrics["prediction_drift_score.1"] == pytest.approx(prediction.column("1").score)
    assert "prediction_drift_score" not in metrics  # that name is for single-output models
    # An output the capture lacks while another is there: the output changed shape, which is drift.
    outcome = run_drift_report(
        deployment="churn-two", model_name=name, model_version="1", captured=captured.drop(columns="_prediction_1"),
        reference=x, reference_source="test", window_start=WINDOW_START, window_end=WINDOW_END,
        reference_predictions=predictions, settings=DriftSettings(evidently_sample_rows=500))
    assert outcome.prediction_drift is not None and outcome.prediction_drift.column("1").vanished


def _assert_page_shows_our_verdicts(html: str, result) -> None:
    """The Evidently page's headline and tables carry our verdicts, not Evidently's own."""
    headline = "Dataset drift is DETECTED" if result.dataset_drifted else "Dataset drift is NOT detected"
    assert headline in html
    assert f"{result.n_drifted} of {result.n_tested} judged columns overall" in html
    for col in result.columns:
        if col.effect_size is not None:  # plotted: the table's verdict cell is ours, in words
            assert json.dumps(col.reason.split(": ", 1)[1])[1:-1] in html, col.reason
    assert "K-S p_value" not in html and "chi-square p_value" not in html  # no Evidently verdicts


def test_failure_mid_way_ends_the_run_failed_and_keeps_version_tags(store: Store):
    name = store.models["none"]
    client = store.client
    reference = store.train[FEATURES]
    captured = _captured(np.random.default_rng(4), 400, version="1", shifted=False)
    before = client.get_model_version(name, "1").tags
    with pytest.raises(ValueError, match="column 'region': method 'ks' needs numeric values"):
        run_drift_report(
            deployment="churn-fail", model_name=name, model_version="1", captured=captured, reference=reference,
            reference_source="test", window_start=WINDOW_START, window_end=WINDOW_END,
            settings=DriftSettings(methods={"region": "ks"}), experiment_name="drift/churn-fail",
        )
    experiment = client.get_experiment_by_name("drift/churn-fail")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].data.tags["drift.error"].startswith("ValueError: column 'region': method 'ks'")
    assert client.get_model_version(name, "1").tags == before


def test_metric_names_are_mlflow_safe_and_unique():
    names = metric_names(["age", "income($)", "income(€)", "a/b:c", "ok name-1.x"])
    assert names == {"age": "drift_score.age", "income($)": "drift_score.income___",
                     "income(€)": "drift_score.income____2", "a/b:c": "drift_score.a_b_c",
                     "ok name-1.x": "drift_score.ok name-1.x"}


def test_settings_validate_methods_early():
    with pytest.raises(ValueError, match="column 'age': unknown drift method 'kss'"):
        DriftSettings(methods={"age": "kss"})

    class Config:
        drift_min_rows = 50
        drift_methods = "age=psi:0.3"

    settings = DriftSettings.from_config(Config(), evidently_sample_rows=5000)
    assert settings.min_rows == 50 and str(settings.methods["age"]) == "psi:0.3"
    assert settings.evidently_sample_rows == 5000
    assert str(settings.floors) == "numeric=0.1,categorical=0.1,missing=0.05"  # the defaults

    # -C drift_effect_floor: checked when the deployment is configured, applied by the job.
    from mlflow_deploy_plugin.config import parse_config
    from mlflow_deploy_plugin.errors import InvalidRequest

    config = parse_config({"drift_effect_floor": "numeric=0.2,missing=0.1",
                           "drift_methods": "age=ks:0.01+wasserstein:0.3"})
    settings = DriftSettings.from_config(config)
    assert str(settings.floors) == "numeric=0.2,categorical=0.1,missing=0.1"
    assert settings.column_methods["age"] == ColumnMethod("ks", 0.01, "wasserstein", 0.3)
    with pytest.raises(InvalidRequest, match=r"drift_effect_floor='speed=1'.*expected 'numeric=<floor>'"):
        parse_config({"drift_effect_floor": "speed=1"})


def test_an_existing_drift_experiment_gets_the_kind_tag_but_a_chosen_kind_is_kept(store: Store):
    from mlflow_deploy_plugin.monitoring.report_job import _ensure_experiment

    client = store.client
    untagged = client.create_experiment("drift/made-by-an-older-version")
    assert _ensure_experiment(client, "drift/made-by-an-older-version") == untagged
    assert client.get_experiment(untagged).tags["mlflow.experimentKind"] == "custom_model_development"
    chosen = client.create_experiment("drift/chosen", tags={"mlflow.experimentKind": "genai_development"})
    _ensure_experiment(client, "drift/chosen")
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"
