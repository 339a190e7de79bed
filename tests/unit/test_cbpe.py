"""CBPE (mlflow_deploy_plugin.quality.cbpe) on synthetic data with a known truth.

A binary ``make_classification`` problem; production samples are drawn from a large pool of the
same generator by importance sampling on the inputs, so P(y | x) is unchanged (covariate shift,
CBPE's assumption) while the accuracy moves. The bound 0.03 on 5,000 rows: the realised accuracy of
5,000 rows has a sampling SD of about 0.006, the calibration learnt from 5,000 rows about as much
again, so 0.03 is about 3.5 combined SDs; the seeds are fixed, so a pass is not luck on a re-run
(``benchmarks/quality.py`` shows the error over many draws: mean <= 0.014 for these scenarios).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB

from mlflow_deploy_plugin.quality.cbpe import CBPE, CalibrationError, expected_auc
from mlflow_deploy_plugin.quality.metrics import auc

ROWS = 5_000
BOUND = 0.03


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    x, y = make_classification(n_samples=230_000, n_features=10, n_informative=5, n_redundant=2,
                               n_clusters_per_class=1, flip_y=0.05, class_sep=0.8, random_state=0)
    return {"x_train": x[:10_000], "y_train": y[:10_000], "x_ref": x[10_000:15_000], "y_ref": y[10_000:15_000],
            "x_pool": x[15_000:], "y_pool": y[15_000:]}


def _frame(proba: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(proba, columns=[str(c) for c in range(proba.shape[1])])


def _fitted(model, data) -> tuple[CBPE, np.ndarray]:
    model.fit(data["x_train"], data["y_train"])
    cbpe = CBPE.fit(_frame(model.predict_proba(data["x_ref"])), pd.Series(data["y_ref"].astype(str)))
    return cbpe, model.predict_proba(data["x_pool"])


def _draw(weights: np.ndarray, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).choice(len(weights), size=ROWS, replace=False, p=weights / weights.sum())


def _estimate(cbpe: CBPE, proba: np.ndarray) -> dict[str, float]:
    found = {e.name: e for e in cbpe.estimate(_frame(proba), pd.Series(proba.argmax(axis=1)))}
    return {"accuracy": found["estimated_accuracy"].value, "auc": found["estimated_roc_auc"].value,
            "low": found["estimated_accuracy"].low, "high": found["estimated_accuracy"].high}


def test_cbpe_tracks_accuracy_under_covariate_shift(data) -> None:
    cbpe, pool = _fitted(LogisticRegression(max_iter=1000), data)
    y_pool = data["y_pool"]
    margin = np.abs(np.log(pool[:, 1] / pool[:, 0]))
    scenarios = {"none": np.ones(len(y_pool)), "feature": np.exp(1.5 * data["x_pool"][:, 0]),
                 "hard": np.exp(-1.5 * margin), "easy": np.exp(1.5 * np.minimum(margin, 4))}
    realised, estimated = {}, {}
    for name, weights in scenarios.items():
        idx = _draw(weights)
        realised[name] = float((pool[idx].argmax(axis=1) == y_pool[idx]).mean())
        got = _estimate(cbpe, pool[idx])
        estimated[name] = got["accuracy"]
        assert abs(got["accuracy"] - realised[name]) <= BOUND, (name, got, realised[name])
        # The binary expected ROC AUC follows the realised one as well.
        assert abs(got["auc"] - auc(y_pool[idx] == 1, pool[idx, 1])) <= 0.05, name
    # The shifts move the accuracy by far more than the bound, and the estimate moves with them.
    assert realised["none"] - realised["hard"] > 0.15
    assert realised["easy"] - realised["none"] > 0.05
    assert estimated["none"] - estimated["hard"] > 0.15
    assert estimated["easy"] - estimated["none"] > 0.05


def test_calibration_fixes_a_badly_calibrated_model(data) -> None:
    cbpe, pool = _fitted(GaussianNB(), data)  # naive Bayes on correlated features: overconfident
    idx = _draw(np.ones(len(data["y_pool"])))
    proba, truth = pool[idx], data["y_pool"][idx]
    realised = float((proba.argmax(axis=1) == truth).mean())
    uncalibrated = float(proba.max(axis=1).mean())
    assert uncalibrated - realised > 0.05  # the model's own confidence is far off
    got = _estimate(cbpe, proba)
    assert abs(got["accuracy"] - realised) <= BOUND
    assert got["low"] <= realised <= got["high"]


def test_concept_shift_is_not_seen_and_the_gap_shows_it(data) -> None:
    """CBPE's blind spot, stated by a test: flipped labels (P(y|x) changed) leave the estimate where it was."""
    cbpe, pool = _fitted(LogisticRegression(max_iter=1000), data)
    idx = _draw(np.ones(len(data["y_pool"])))
    truth = data["y_pool"][idx].copy()
    flip = np.random.default_rng(2).random(ROWS) < 0.2
    truth[flip] = 1 - truth[flip]
    realised = float((pool[idx].argmax(axis=1) == truth).mean())
    assert _estimate(cbpe, pool[idx])["accuracy"] - realised > 0.1


def test_the_captured_prediction_is_the_answer_scored() -> None:
    """With a threshold other than 0.5 the captured class, not the arg-max, is what is right or wrong."""
    rng = np.random.default_rng(3)
    score = rng.random(4_000)
    label = pd.Series(np.where(rng.random(4_000) < score, "yes", "no"))  # calibrated by construction
    cbpe = CBPE.fit(pd.DataFrame({"yes": score}), label)
    probabilities = pd.DataFrame({"yes": np.full(1_000, 0.3)})
    by_argmax = {e.name: e.value for e in cbpe.estimate(probabilities)}["estimated_accuracy"]
    always_yes = {e.name: e.value for e in cbpe.estimate(probabilities, pd.Series(["yes"] * 1_000))}
    assert by_argmax == pytest.approx(0.7, abs=0.05)
    assert always_yes["estimated_accuracy"] == pytest.approx(0.3, abs=0.05)


def test_multiclass_estimate_is_close_without_shift() -> None:
    x, y = make_classification(n_samples=40_000, n_features=8, n_informative=5, n_classes=3,
                               n_clusters_per_class=1, random_state=1)
    model = LogisticRegression(max_iter=1000).fit(x[:10_000], y[:10_000])
    cbpe = CBPE.fit(_frame(model.predict_proba(x[10_000:25_000])), pd.Series(y[10_000:25_000]))
    proba = model.predict_proba(x[25_000:30_000])
    realised = float((proba.argmax(axis=1) == y[25_000:30_000]).mean())
    got = {e.name: e.value for e in cbpe.estimate(_frame(proba), pd.Series(proba.argmax(axis=1)))}
    assert abs(got["estimated_accuracy"] - realised) <= BOUND
    assert 0.5 < got["estimated_roc_auc"] <= 1.0


@pytest.mark.parametrize(("labels", "rows", "reason"), [
    (["1"], 500, "one class only ('1')"),
    (["0", "1"], 40, "40 labelled rows with probabilities to calibrate on, fewer than 100"),
])
def test_calibration_refuses_with_a_reason(labels: list[str], rows: int, reason: str) -> None:
    rng = np.random.default_rng(4)
    p = rng.random(rows)
    frame = pd.DataFrame({"0": 1 - p, "1": p})
    with pytest.raises(CalibrationError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        CBPE.fit(frame, pd.Series(rng.choice(labels, size=rows)))


def test_rows_without_probabilities_do_not_count() -> None:
    rng = np.random.default_rng(5)
    p = rng.random(1_000)
    cbpe = CBPE.fit(pd.DataFrame({"0": 1 - p, "1": p}), pd.Series(np.where(rng.random(1_000) < p, "1", "0")))
    frame = pd.DataFrame({"0": [0.1, np.nan, 0.8], "1": [0.9, np.nan, 0.2]})
    (accuracy, *_rest) = cbpe.estimate(frame)
    assert accuracy.n == 2


def test_expected_auc_of_certain_labels_is_the_realised_auc() -> None:
    """With probabilities 0/1 the expected curve is the realised one, ties included."""
    rng = np.random.default_rng(6)
    score = rng.integers(0, 20, 2_000).astype(float)  # many ties
    y = rng.random(2_000) < score / 20
    assert expected_auc(score, y.astype(float)) == pytest.approx(auc(y, score), abs=1e-12)


# --- Wired into the quality report: real capture files, stored labels, a real MLflow store (SQLite). ---

MODEL = "cbpe-unit"


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import mlflow

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)  # what the report's own MlflowClient() uses
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", tracking)
    # A URI set in process (the session `env` fixture sets one when it ran first on this xdist worker)
    # wins over the variables: point it here too, and put back the raw globals afterwards (restoring
    # what get_*_uri() resolves would pin a concrete URI that outlives this test and hides the
    # MLFLOW_TRACKING_URI the later tests set).
    from mlflow.tracking import _model_registry, _tracking_service

    monkeypatch.setattr(_tracking_service.utils, "_tracking_uri", tracking)
    monkeypatch.setattr(_model_registry.utils, "_registry_uri", tracking)
    client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    for name in ("cbpe-before", "cbpe-after"):
        client.create_experiment(name, artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model(MODEL)
    for _ in range(2):
        client.create_model_version(MODEL, "file:///nowhere/model")
    return client


def test_report_logs_the_estimate_before_and_beside_the_labels(tmp_path, client) -> None:
    """v1: 600 labelled answers 3 h ago calibrate; its 600 answers of the last hour get an estimate,
    first with no labels, then beside the realised accuracy. v2 has no earlier labels: told why.
    Through run_deployment_quality: the calibration rows are found by the report itself."""
    import dataclasses
    import json
    import time
    from datetime import UTC, datetime, timedelta

    from mlflow_deploy_plugin.capture import CapturedRequest, CaptureWriter
    from mlflow_deploy_plugin.quality.labels import LabelTarget, store_labels
    from mlflow_deploy_plugin.quality.report import run_deployment_quality
    from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore

    store = StateStore(tmp_path / "home")
    spec = DeploymentSpec("unit", ModelRef(f"models:/{MODEL}/1", MODEL, "1"),
                          DeploymentConfig(task="classification", drift_experiment="cbpe-before"))
    store.write_spec(spec)
    rng = np.random.default_rng(8)
    capture = str(store.paths("unit").capture)
    writer = CaptureWriter(capture, "unit", flush_interval_s=60)
    now = time.time()
    rows = []
    for i in range(1_500):
        version, moment = ("1", now - 3 * 3600 + i) if i < 600 else ("1", now - 1800 + i) if i < 1_200 \
            else ("2", now - 1800 + i)
        p = float(rng.random())
        answer = pd.DataFrame({"label": [int(p >= 0.5)], "proba_0": [1 - p], "proba_1": [p]})
        writer.record(CapturedRequest(f"c{i}", moment, version, 200, 1.0, pd.DataFrame({"x": [p]}), answer))
        rows.append({"request_id": f"c{i}", "label": int(rng.random() < p), "p": p, "version": version})
    writer.flush()
    writer.close()
    truth = pd.DataFrame(rows)
    target = LabelTarget(capture, tmp_path / "labels.lock", task="classification")
    store_labels(truth.iloc[:600][["request_id", "label"]], target)  # the calibration period only

    moment = datetime.fromtimestamp(now, UTC)
    start, end = moment - timedelta(hours=1), moment + timedelta(minutes=1)

    def report(experiment: str):
        store.write_spec(dataclasses.replace(spec, config=dataclasses.replace(spec.config, drift_experiment=experiment)))
        return run_deployment_quality("unit", start, end, store=store)

    window = truth.iloc[600:1_200]
    by_hand = CBPE.fit(pd.DataFrame({"0": 1 - truth.p[:600], "1": truth.p[:600]}),
                       truth.label[:600].astype(str)).estimate(
        pd.DataFrame({"0": 1 - window.p, "1": window.p}).reset_index(drop=True),
        pd.Series((window.p >= 0.5).astype(int).to_numpy()))[0]

    v1, v2 = report("cbpe-before")
    assert v1.status == "not_enough_labels" and v1.estimated is not None
    assert v1.estimated.estimates["estimated_accuracy"].value == pytest.approx(by_hand.value)
    assert v1.estimated.calibration_rows == 600
    assert f"estimated accuracy {by_hand.value:.3f} (no labels yet;" in v1.line()
    run = client.get_run(v1.run_id)
    assert run.data.metrics["estimated_accuracy"] == pytest.approx(by_hand.value)
    assert run.data.metrics["estimated_accuracy.ci_low"] < by_hand.value < run.data.metrics["estimated_accuracy.ci_high"]
    assert run.data.metrics["cbpe.calibration_rows"] == 600
    assert "accuracy" not in run.data.metrics  # still no realised figure on no labels
    assert run.data.tags["quality.cbpe"].startswith(f"estimated accuracy {by_hand.value:.3f} (no labels yet;")
    html_file = client.download_artifacts(v1.run_id, "quality_report.html", str(tmp_path))
    assert "Before labels (CBPE):" in Path(html_file).read_text(encoding="utf-8")
    # v2 has probabilities but no labelled rows before the window: no estimate, and the reason.
    assert v2.estimated is not None and not v2.estimated.estimates
    assert "no accuracy estimate: no labelled rows of v2 predicted " in v2.line()
    assert f" – {start:%Y-%m-%d %H:%M} UTC to calibrate on" in v2.line()
    assert "estimated_accuracy" not in client.get_run(v2.run_id).data.metrics

    # The labels of the window come in: the estimate stands beside the realised accuracy.
    store_labels(window[["request_id", "label"]], target)
    v1_after = report("cbpe-after")[0]
    realised = float(((window.p >= 0.5).astype(int) == window.label).mean())
    assert v1_after.status == "ok" and v1_after.figures["accuracy"].value == pytest.approx(realised)
    assert f"estimated accuracy {by_hand.value:.3f} (realised {realised:.3f}, n = 600;" in v1_after.line()
    # Labels drawn from the probabilities themselves: the estimate is right within its interval.
    assert by_hand.low <= realised <= by_hand.high
    summary = json.loads(Path(client.download_artifacts(v1_after.run_id, "quality_summary.json",
                                                        str(tmp_path))).read_text(encoding="utf-8"))
    assert summary["estimates"]["figures"]["estimated_accuracy"]["value"] == pytest.approx(by_hand.value)


def test_estimate_versions_says_why_it_cannot_calibrate() -> None:
    from mlflow_deploy_plugin.quality.join import Labelled
    from mlflow_deploy_plugin.quality.report import estimate_versions

    p = np.linspace(0.01, 0.99, 300)
    captured = pd.DataFrame({"_request_id": [f"r{i}" for i in range(300)], "_row": 0, "_model_version": "3",
                             "_status": 200, "_prediction_label": (p >= 0.5).astype(int),
                             "_prediction_proba_0": 1 - p, "_prediction_proba_1": p})
    one_class = Labelled("3", 300, pd.Series(["1"] * 300), pd.Series(["1"] * 300),
                         pd.DataFrame({"0": 1 - p, "1": p}), pd.Series(dtype="datetime64[ns, UTC]"))
    got = estimate_versions(captured, [one_class], "before the window", 100)["3"]
    assert not got.estimates
    assert got.skipped == ("cannot calibrate on the labelled rows of v3 before the window: the calibration "
                           "labels hold one class only ('1'): no probability can be calibrated against them")
    few = Labelled("3", 300, pd.Series(["1", "0"] * 20), pd.Series(["1", "0"] * 20),
                   pd.DataFrame({"0": [0.2, 0.8] * 20, "1": [0.8, 0.2] * 20}), pd.Series(dtype="datetime64[ns, UTC]"))
    assert "40 labelled rows with probabilities to calibrate on, fewer than 100" in \
        estimate_versions(captured, [few], "before the window", 100)["3"].skipped


# --- Scheduled: days without labels yet get the estimate, apart from the measured figures. ---


def test_estimate_days_are_unlabelled_days_until_estimated_after_their_end() -> None:
    from datetime import UTC, date, datetime

    from mlflow_deploy_plugin.quality.due import estimate_days

    now = datetime(2026, 11, 10, 12, tzinfo=UTC)
    captured = [date(2026, 10, 1), date(2026, 11, 6), date(2026, 11, 7), date(2026, 11, 8), date(2026, 11, 9),
                date(2026, 11, 10)]
    estimated = {"2026-11-08": "2026-11-09T00:05:00+00:00",  # after its end + settle: done
                 "2026-11-09": "2026-11-09T23:00:00+00:00",  # while it ran: once more
                 "2026-11-10": "2026-11-10T11:30:00+00:00"}  # today: every run
    days = estimate_days(captured, {date(2026, 11, 7)}, estimated, now, first=date(2026, 10, 11))
    assert [d.date().isoformat() for d in days] == ["2026-11-06", "2026-11-09", "2026-11-10"]


def _stamps_today(now: float, n: int) -> list[float]:
    """``n`` times of today (UTC) before ``now``."""
    from datetime import UTC, datetime

    midnight = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    span = max(now - 1 - midnight, (now - midnight) / 2)  # a test run in the first second of the day too
    return [midnight + span * (i + 0.5) / n for i in range(n)]


def test_scheduled_run_estimates_the_day_without_labels_apart_from_measured_figures(tmp_path, client) -> None:
    """v1 answered 600 rows two days ago (labelled: the measured window, and CBPE's calibration)
    and 500 today (no label yet). One scheduled run reports the labelled day as measured, and
    today for the estimate only: own metrics, run tag, version tags, verdicts and gauges; the
    measured ones stay those of the labelled day. Today is estimated again on the next run while
    it lasts, once more after it ended, then no more."""
    import time
    from datetime import UTC, datetime, timedelta

    from prometheus_client.parser import text_string_to_metric_families

    from mlflow_deploy_plugin.capture import CapturedRequest, CaptureWriter
    from mlflow_deploy_plugin.quality.due import run_due_quality
    from mlflow_deploy_plugin.quality.labels import LabelTarget, store_labels
    from mlflow_deploy_plugin.serving.metrics import ServingMetrics
    from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore
    from mlflow_deploy_plugin.verdicts import read_verdicts

    store = StateStore(tmp_path / "home")
    spec = DeploymentSpec("sched", ModelRef(f"models:/{MODEL}/1", MODEL, "1"),
                          DeploymentConfig(task="classification", drift_experiment="cbpe-before",
                                           quality_min_labelled_rows=100))
    store.write_spec(spec)
    paths = store.paths("sched")
    rng = np.random.default_rng(11)
    now = time.time()
    writer = CaptureWriter(str(paths.capture), "sched", flush_interval_s=60)
    rows = []
    # Two days ago at noon, so the 600 seconds stay in that one day whenever the test runs (from
    # `now - 2 days` they crossed midnight in a run at 23:55 UTC: two measured days, not one).
    noon_two_days_ago = now // 86400 * 86400 - 2 * 86400 + 12 * 3600  # epoch days are UTC days
    stamps = [noon_two_days_ago + i for i in range(600)] + _stamps_today(now, 500)
    for i, stamp in enumerate(stamps):
        p = float(rng.random())
        answer = pd.DataFrame({"label": [int(p >= 0.5)], "proba_0": [1 - p], "proba_1": [p]})
        writer.record(CapturedRequest(f"s{i}", stamp, "1", 200, 1.0, pd.DataFrame({"x": [p]}), answer))
        rows.append({"request_id": f"s{i}", "label": int(rng.random() < p), "p": p})
    writer.flush()
    writer.close()
    truth = pd.DataFrame(rows)
    store_labels(truth.iloc[:600][["request_id", "label"]],
                 LabelTarget(str(paths.capture), tmp_path / "labels.lock", task="classification"))
    today = truth.iloc[600:]
    by_hand = CBPE.fit(pd.DataFrame({"0": 1 - truth.p[:600], "1": truth.p[:600]}), truth.label[:600].astype(str)
                       ).estimate(pd.DataFrame({"0": 1 - today.p, "1": today.p}).reset_index(drop=True),
                                  pd.Series((today.p >= 0.5).astype(int).to_numpy()))[0]
    measured_acc = float(((truth.p[:600] >= 0.5).astype(int) == truth.label[:600]).mean())

    moment = datetime.fromtimestamp(now, UTC)
    measured, estimate = run_due_quality("sched", store=store, now=moment)
    assert measured.status == "ok" and measured.figures["accuracy"].value == pytest.approx(measured_acc)
    assert estimate.status == "not_enough_labels" and estimate.rows_labelled == 0 and estimate.rows_answered == 500
    assert estimate.estimated is not None
    assert estimate.estimated.estimates["estimated_accuracy"].value == pytest.approx(by_hand.value)
    run = client.get_run(estimate.run_id)
    assert run.data.tags["quality.estimate_only"] == "true" and "quality.estimate_only" not in \
        client.get_run(measured.run_id).data.tags
    assert run.data.metrics["estimated_accuracy"] == pytest.approx(by_hand.value) and "accuracy" not in run.data.metrics
    assert run.data.params["window_end"] == f"{(moment + timedelta(days=1)):%Y-%m-%d}T00:00:00Z"
    # The version: measured tags from the labelled day, estimate tags from today.
    tags = client.get_model_version(MODEL, "1").tags
    assert tags["quality.status"] == "ok" and float(tags["quality.accuracy"]) == pytest.approx(measured_acc, abs=1e-4)
    assert float(tags["quality.estimated_accuracy"]) == pytest.approx(by_hand.value, abs=1e-4)
    assert tags["quality.estimate"].startswith(f"estimated accuracy {by_hand.value:.3f} (no labels yet;")
    # Verdicts and gauges: the estimate beside, not instead of, the measured figure.
    verdicts = read_verdicts(paths)
    assert verdicts["quality"]["1"]["figures"]["accuracy"] == pytest.approx(measured_acc)
    assert verdicts["quality_estimate"]["1"]["figures"]["estimated_accuracy"] == pytest.approx(by_hand.value)
    body, _ = ServingMetrics(paths.root).render()
    samples = {(s.name, s.labels.get("figure")): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples
               if s.labels.get("model_version") == "1"}
    assert samples[("mlflow_deploy_quality", "accuracy")] == pytest.approx(measured_acc)
    assert samples[("mlflow_deploy_quality_estimated", "estimated_accuracy")] == pytest.approx(by_hand.value)
    assert samples[("mlflow_deploy_quality_estimated", "estimated_accuracy.ci_low")] < by_hand.value
    assert samples[("mlflow_deploy_quality_estimated_rows", None)] == 500
    assert [e["event"] for e in store.read_history("sched")] == ["quality_verdict", "quality_estimate_verdict"]

    # Today is still running: estimated again, in the same run (one run per window, not per tick);
    # the labelled day is not due.
    again = run_due_quality("sched", store=store, now=moment + timedelta(minutes=1))
    assert [(o.run_id, o.rerun_of) for o in again] == [(estimate.run_id, None)]
    # After its end: once more, then no more.
    tomorrow = (moment + timedelta(days=1)).replace(hour=0, minute=5, second=0, microsecond=0)
    assert len(run_due_quality("sched", store=store, now=tomorrow)) == 1
    assert run_due_quality("sched", store=store, now=tomorrow + timedelta(minutes=30)) == []
