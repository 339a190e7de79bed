"""Join and quality report (mlflow_deploy_plugin.quality.join / report) on a real MLflow store (SQLite, temp).

Captured traffic is written by the real CaptureWriter and labels stored by store_labels; the
report's accuracy must equal the one computed by hand on the same rows, and land in MLflow as the
module docstring says (runs, interval metrics, the series run, version tags, re-runs marked).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from mlflow_deploy_plugin.capture import CapturedRequest, CaptureWriter, read_capture
from mlflow_deploy_plugin.quality.join import join_labels
from mlflow_deploy_plugin.quality.labels import LabelTarget, labels_root, read_labels, store_labels
from mlflow_deploy_plugin.quality.report import run_quality_report, training_figures

MODEL = "quality-unit"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> mlflow.MlflowClient:
    root = tmp_path_factory.mktemp("mlflow")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    experiment = client.create_experiment("train", artifact_location=str(root / "artifacts"))
    client.create_registered_model(MODEL)
    for version, accuracy in (("1", 0.95), ("2", 0.9)):
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "accuracy", accuracy)
        client.log_metric(run.info.run_id, "training_accuracy_score", 0.99)
        client.set_terminated(run.info.run_id)
        made = client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id)
        assert str(made.version) == version
    return client


@pytest.fixture
def traffic(tmp_path: Path) -> tuple[LabelTarget, pd.DataFrame]:
    """300 rows answered by v1 and 120 by v2 in the last hour; v1's labels flip 60 of its answers."""
    rng = np.random.default_rng(7)
    writer = CaptureWriter(str(tmp_path / "capture"), "unit", flush_interval_s=60)
    now = time.time()
    truth = []
    for i in range(420):
        version = "1" if i < 300 else "2"
        prediction = int(rng.integers(0, 2))
        writer.record(CapturedRequest(f"q{i}", now - 1800 + i, version, 200, 1.0,
                                      pd.DataFrame({"x": [float(i)]}), np.array([prediction])))
        label = 1 - prediction if (version == "1" and i % 5 == 0) else prediction
        truth.append({"request_id": f"q{i}", "label": label, "version": version, "prediction": prediction})
    writer.flush()
    writer.close()
    target = LabelTarget(str(tmp_path / "capture"), tmp_path / "labels.lock", task="classification")
    return target, pd.DataFrame(truth)


def _window() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(hours=2), now + timedelta(minutes=1)


def test_join_counts_answered_and_labelled_rows_per_version(traffic) -> None:
    target, truth = traffic
    store_labels(truth.iloc[:200][["request_id", "label"]], target)  # v1 only, 200 of its 300
    joined = {j.version: j for j in join_labels(read_capture(target.capture_root), read_labels(labels_root(target.capture_root)))}
    assert (joined["1"].answered, joined["1"].n, joined["2"].answered, joined["2"].n) == (300, 200, 120, 0)
    assert joined["1"].coverage == pytest.approx(200 / 300)


def test_report_matches_a_hand_computation_and_tags_the_version(traffic, client: mlflow.MlflowClient) -> None:
    target, truth = traffic
    store_labels(truth[["request_id", "label"]], target)
    start, end = _window()
    outcomes = run_quality_report(deployment="unit", model_name=MODEL, captured=read_capture(target.capture_root),
                                  labels=read_labels(labels_root(target.capture_root)), task="classification",
                                  window_start=start, window_end=end, min_labelled_rows=150, client=client,
                                  experiment_name="quality-unit-1")
    v1, v2 = outcomes
    by_hand = float((truth.iloc[:300]["label"] == truth.iloc[:300]["prediction"]).mean())
    assert by_hand == pytest.approx(0.8)  # every fifth label flipped
    assert v1.status == "ok" and v1.figures["accuracy"].value == pytest.approx(by_hand)
    assert v1.figures["accuracy"].n == 300
    assert v1.figures["accuracy"].low < by_hand < v1.figures["accuracy"].high
    assert v2.status == "not_enough_labels" and v2.rows_labelled == 120 and not v2.figures
    assert v1.training["accuracy"] == ("accuracy", 0.95)  # the held-out figure, not training_accuracy_score
    assert v1.summary.startswith("accuracy 0.95 → production accuracy 0.8 (n = 300, 95% CI ")

    run = client.get_run(v1.run_id)
    assert run.data.metrics["accuracy"] == pytest.approx(by_hand)
    assert run.data.metrics["label_coverage"] == 1.0 and run.data.metrics["training.accuracy"] == 0.95
    assert run.data.metrics["accuracy.ci_low"] == pytest.approx(v1.figures["accuracy"].low)
    assert run.data.tags["quality.status"] == "ok"
    artifacts = {a.path for a in client.list_artifacts(v1.run_id)}
    assert artifacts == {"quality_report.html", "quality_summary.json"}
    tags = client.get_model_version(MODEL, "1").tags
    assert tags["quality.accuracy"] == f"{by_hand:.4f}" and tags["quality.report_run_id"] == v1.run_id
    assert client.get_model_version(MODEL, "2").tags["quality.status"] == "not_enough_labels"
    assert client.get_run(v2.run_id).data.tags["quality.status"] == "not_enough_labels"
    assert "accuracy" not in client.get_run(v2.run_id).data.metrics  # never a figure on too few labels

    # Late labels for the same window: a re-run, marked as such, and the series run gets a second point.
    store_labels(truth.iloc[:10].assign(label=1 - truth.iloc[:10]["label"])[["request_id", "label"]], target)
    again = run_quality_report(deployment="unit", model_name=MODEL, captured=read_capture(target.capture_root),
                               labels=read_labels(labels_root(target.capture_root)), task="classification",
                               window_start=start, window_end=end, min_labelled_rows=150, client=client,
                               experiment_name="quality-unit-1")[0]
    assert again.rerun_of == v1.run_id
    assert client.get_run(again.run_id).data.tags["quality.rerun"] == "true"
    changed = truth.iloc[:300].copy()
    changed.loc[:9, "label"] = 1 - changed.loc[:9, "label"]
    assert again.figures["accuracy"].value == pytest.approx(float((changed["label"] == changed["prediction"]).mean()))
    series = client.search_runs([run.info.experiment_id], "tags.`quality.series` = 'unit/v1'")
    assert len(series) == 1
    history = client.get_metric_history(series[0].info.run_id, "accuracy")
    # Same window, same step: both points stay (the history is the record of what each report said).
    assert sorted(m.value for m in history) == pytest.approx(sorted([by_hand, again.figures["accuracy"].value]))


def test_training_figures_prefer_held_out_names(client: mlflow.MlflowClient) -> None:
    assert training_figures(client, MODEL, "2") == {"accuracy": ("accuracy", 0.9)}
    assert training_figures(client, MODEL, "99") == {}


def test_due_days_are_prediction_days_with_labels_newer_than_their_last_report() -> None:
    from mlflow_deploy_plugin.quality.due import due_days

    stamp = pd.Timestamp
    labels = pd.DataFrame({
        "_timestamp": [stamp("2026-11-01T10:00Z"), stamp("2026-11-01T23:00Z"), stamp("2026-11-02T01:00Z"),
                       stamp("2026-11-03T05:00Z")],
        "_labelled_at": [stamp("2026-11-05T00:00Z"), stamp("2026-11-07T00:00Z"), stamp("2026-11-05T00:00Z"),
                         stamp("2026-11-05T00:00Z")],
    })
    reported = {"2026-11-01": "2026-11-06T00:00:00+00:00", "2026-11-02": "2026-11-06T00:00:00+00:00"}
    # Nov 1 got a late label after its report; Nov 2 did not; Nov 3 was never reported.
    assert [d.date().isoformat() for d in due_days(labels, reported)] == ["2026-11-01", "2026-11-03"]
    assert due_days(labels.iloc[:0], {}) == []


def _window_report(client: mlflow.MlflowClient, day: int, hits: int, n: int, experiment: str) -> str:
    """A real quality report of v1 over one day window: n labelled rows, ``hits`` of them right."""
    from mlflow_deploy_plugin.quality.join import Labelled
    from mlflow_deploy_plugin.quality.report import _ensure_experiment, report_version

    start = datetime(2026, 11, day, tzinfo=UTC)
    labelled = Labelled("1", n, pd.Series([1] * n), pd.Series(["1"] * hits + ["0"] * (n - hits)), None,
                        pd.Series([pd.Timestamp(start)] * n))
    return report_version(deployment="drop", model_name=MODEL, labelled=labelled, task="classification",
                          window_start=start, window_end=start + timedelta(days=1), min_labelled_rows=50,
                          client=client, experiment_id=_ensure_experiment(client, experiment)).run_id


def test_quality_drop_needs_k_significant_windows_in_a_row(client: mlflow.MlflowClient) -> None:
    from mlflow_deploy_plugin.lifecycle.policy import parse_policy
    from mlflow_deploy_plugin.lifecycle.quality_drop import find_quality_drop

    policy = parse_policy("model: m\nquality:\n  max_drop: 0.05\n  consecutive_reports: 2\n  action: rollback\n")
    assert policy.quality is not None
    experiment = "quality-drop-unit"

    def drop() -> object:
        exp = client.get_experiment_by_name(experiment)
        return find_quality_drop(client, exp.experiment_id, "drop", "1", policy.quality)

    _window_report(client, 1, 180, 300, experiment)  # 0.60, far below training 0.95 - 0.05
    assert drop() is None  # one window is not a streak
    _window_report(client, 2, 40, 40, experiment)  # too few labels: no verdict, breaks the streak
    _window_report(client, 3, 186, 300, experiment)
    assert drop() is None
    latest = _window_report(client, 4, 174, 300, experiment)
    found = drop()
    assert found is not None and found.latest_run_id == latest
    assert "fell short in 2 consecutive windows" in found.reason and "below training 0.95 - 0.05" in found.reason
    assert [w["n"] for w in found.evidence["windows"]] == [300, 300]
    assert found.evidence["windows"][0]["accuracy"] == pytest.approx(174 / 300)
    # Late labels re-run day 4 and lift it to 0.88: its CI now reaches 0.90, no longer significant.
    _window_report(client, 4, 264, 300, experiment)
    assert drop() is None


def _estimate_report(client: mlflow.MlflowClient, day: int, value: float, half: float, experiment: str) -> str:
    """A real estimate-only report of v1 over one day window (no labels): CBPE's accuracy ``value`` ± ``half``."""
    from mlflow_deploy_plugin.quality.cbpe import Estimate
    from mlflow_deploy_plugin.quality.join import Labelled
    from mlflow_deploy_plugin.quality.report import Estimated, _ensure_experiment, report_version

    start = datetime(2026, 11, day, tzinfo=UTC)
    estimated = Estimated({"estimated_accuracy": Estimate("estimated_accuracy", value, value - half, value + half, 300)},
                          1000, "before the window")
    labelled = Labelled("1", 300, pd.Series([], dtype=object), pd.Series([], dtype=object), None)
    return report_version(deployment="drop", model_name=MODEL, labelled=labelled, task="classification",
                          window_start=start, window_end=start + timedelta(days=1), min_labelled_rows=50,
                          client=client, experiment_id=_ensure_experiment(client, experiment), estimated=estimated,
                          estimate_only=True).run_id


def test_quality_drop_skips_estimates_unless_the_policy_uses_them(client: mlflow.MlflowClient) -> None:
    from mlflow_deploy_plugin.lifecycle.policy import PolicyError, parse_policy
    from mlflow_deploy_plugin.lifecycle.quality_drop import find_quality_drop

    text = "model: m\nquality:\n  max_drop: 0.05\n  consecutive_reports: 2\n  action: rollback\n"
    measured_only = parse_policy(text).quality
    with_estimates = parse_policy(text + "  use_estimates: true\n").quality
    assert measured_only is not None and with_estimates is not None and with_estimates.use_estimates
    with pytest.raises(PolicyError, match="use_estimates needs figure: accuracy"):
        parse_policy(text + "  use_estimates: true\n  figure: f1_macro\n")
    experiment = "quality-estimates-unit"

    def drop(policy) -> object:
        return find_quality_drop(client, client.get_experiment_by_name(experiment).experiment_id, "drop", "1", policy)

    _window_report(client, 11, 180, 300, experiment)  # measured 0.60: short of training 0.95 - 0.05
    measured = _window_report(client, 12, 180, 300, experiment)
    latest_estimate = _estimate_report(client, 13, 0.6, 0.03, experiment)  # today: no labels, estimated 0.60
    found = drop(measured_only)  # the estimate-only window is not one this policy judges
    assert found is not None and found.latest_run_id == measured
    assert "labelled accuracy fell short in 2 consecutive windows" in found.reason
    found = drop(with_estimates)  # judged on the estimate: days 13 (estimated) and 12 (measured)
    assert found is not None and found.latest_run_id == latest_estimate
    assert "labelled or estimated accuracy fell short" in found.reason and "estimated_accuracy 0.6 " in found.reason
    assert [w["estimated"] for w in found.evidence["windows"]] == [True, False]
    assert found.evidence["windows"][0]["n"] == 300 and found.evidence["windows"][0]["training"] == 0.95
    # An estimate whose interval reaches the limit is no shortfall: no streak.
    _estimate_report(client, 14, 0.88, 0.03, experiment)
    assert drop(with_estimates) is None
    assert drop(measured_only) is not None
