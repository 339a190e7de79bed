"""Lifecycle policies and promotion gates, against a real MLflow store with real registered versions.

The store is this module's own SQLite file (not conftest's session store, which starts services):
versions of one model differ in accuracy, input columns and in whether they can predict at all.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.models import infer_signature
from mlflow.types.schema import ColSpec, Schema
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mlflow_deploy_plugin.lifecycle.canary import CanaryStats, evaluate_canary
from mlflow_deploy_plugin.lifecycle.gates import evaluate_gates, role_version
from mlflow_deploy_plugin.lifecycle.policy import (
    CanaryPolicy,
    DriftPolicy,
    GatesPolicy,
    Policy,
    PolicyError,
    PromotionPolicy,
    RegressionLimit,
    load_policy,
    parse_policy,
)
from mlflow_deploy_plugin.lifecycle.schema_compat import compare_input_schemas

MODEL = "churn"
FAILING_MODEL_CODE = Path(__file__).parent / "assets" / "failing_model.py"


def _fmt(value: float) -> str:
    return f"{round(value, 12):.6g}"


# --- the store ------------------------------------------------------------------------------------


@dataclass
class Store:
    client: MlflowClient
    accuracy: dict[str, float]  # version -> logged accuracy
    good: str  # a better-or-equal successor of the champion
    weak: str  # clearly less accurate
    other_columns: str  # trained on different input columns
    failing: str  # loads, but cannot predict its own input example
    champion: str = "1"


def _log_sklearn(experiment_id: str, x_train, y_train, x_test, y_test, **metrics: float) -> tuple[str, float]:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)).fit(x_train, y_train)
    accuracy = float(model.score(x_test, y_test))
    with mlflow.start_run(experiment_id=experiment_id):
        mlflow.log_metrics({"accuracy": accuracy, **metrics})
        # Explicit requirements skip MLflow's requirement inference (a subprocess, ~3 s per model).
        info = mlflow.sklearn.log_model(model, name="model", registered_model_name=MODEL,
                                        signature=infer_signature(x_train, model.predict(x_train)),
                                        input_example=x_train.head(2), pip_requirements=["scikit-learn"])
    return str(info.registered_model_version), accuracy


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("policy_gates")
    previous_uri, previous_cwd = mlflow.get_tracking_uri(), os.getcwd()
    # Client-side stores write some files relative to the working directory: keep them in tmp.
    os.chdir(root)
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    try:
        client = MlflowClient()
        experiment_id = client.create_experiment("policy-gates", artifact_location=(root / "artifacts").as_uri())
        bunch = load_breast_cancer(as_frame=True)
        features = bunch.data.rename(columns=lambda c: c.replace(" ", "_"))
        x_train, x_test, y_train, y_test = train_test_split(features, bunch.target, test_size=0.25,
                                                            random_state=0)
        accuracy: dict[str, float] = {}

        v, accuracy[v] = _log_sklearn(experiment_id, x_train, y_train, x_test, y_test, latency_ms=10.0)
        client.set_registered_model_alias(MODEL, "champion", v)
        good, accuracy[good] = _log_sklearn(experiment_id, x_train, y_train, x_test, y_test, latency_ms=12.0)
        # Shuffled labels: same columns, same estimator, much worse accuracy.
        shuffled = y_train.sample(frac=1.0, random_state=1).to_numpy()
        weak, accuracy[weak] = _log_sklearn(experiment_id, x_train, shuffled, x_test, y_test, latency_ms=9.0)
        # Different inputs: a subset of the columns plus one the live version never sees.
        extra_train = x_train.iloc[:, :5].assign(patient_age=np.arange(len(x_train), dtype="int64") % 90)
        extra_test = x_test.iloc[:, :5].assign(patient_age=np.arange(len(x_test), dtype="int64") % 90)
        other, accuracy[other] = _log_sklearn(experiment_id, extra_train, y_train, extra_test, y_test)
        with mlflow.start_run(experiment_id=experiment_id):
            # Good metrics on paper: only the smoke test can stop this one.
            mlflow.log_metric("accuracy", 0.99)
            info = mlflow.pyfunc.log_model(name="model", python_model=str(FAILING_MODEL_CODE),
                                           registered_model_name=MODEL, input_example=x_train.head(2),
                                           signature=infer_signature(x_train.head(2)),
                                           pip_requirements=["mlflow"])
        failing = str(info.registered_model_version)
        accuracy[failing] = 0.99

        # The assumptions the tests below rest on.
        assert v == "1"
        assert abs(accuracy[good] - accuracy["1"]) < 0.005, accuracy
        assert accuracy[weak] < accuracy["1"] - 0.1, accuracy
        yield Store(client, accuracy, good, weak, other, failing)
    finally:
        mlflow.set_tracking_uri(previous_uri)
        os.chdir(previous_cwd)


def _policy(gates: str = "", registry: str = "") -> Policy:
    text = f"model: {MODEL}\n{registry}promotion:\n  gates:\n" + textwrap.indent(textwrap.dedent(gates), "    ")
    return parse_policy(text, source="test.yaml")


ALL_GATES = """\
metrics: ["accuracy >= 0.9"]
max_regression: {accuracy: 0.01}
signature_compatible: true
smoke_test: true
"""


# --- policy files ---------------------------------------------------------------------------------


def test_minimal_policy_gets_defaults() -> None:
    policy = parse_policy("model: churn\n")
    assert policy == Policy(model="churn", source="<string>")
    assert (policy.registry, policy.champion, policy.challenger) == ("alias", "champion", "challenger")
    assert policy.promotion == PromotionPolicy(enabled=True, gates=GatesPolicy(), canary=None)
    assert policy.promotion.gates.signature_compatible and policy.promotion.gates.smoke_test
    assert policy.drift == DriftPolicy(consecutive_reports=3, action="tag")
    assert policy.role_uri("champion") == "models:/churn@champion"


def test_stage_policy_defaults_and_canonical_stage_names() -> None:
    policy = parse_policy("model: churn\nregistry: stage\n")
    assert (policy.champion, policy.challenger) == ("Production", "Staging")
    policy = parse_policy("model: churn\nregistry: stage\nchampion: PRODUCTION\nchallenger: staging\n")
    assert (policy.champion, policy.challenger) == ("Production", "Staging")
    assert policy.role_uri("challenger") == "models:/churn/Staging"


def test_full_policy_parses(tmp_path: Path) -> None:
    path = tmp_path / "churn.yaml"
    path.write_text(textwrap.dedent("""\
        model: churn
        registry: alias
        champion: prod
        challenger: candidate
        promotion:
          enabled: false
          gates:
            metrics: ["accuracy >= 0.9", "f1 > 0.8", "log_loss<0.3"]
            max_regression:
              accuracy: 0.01
              latency_ms: {margin: 5, lower_is_better: true}
            signature_compatible: false
            smoke_test: true
          canary:
            percent: 2.5
            min_requests: 50
            max_minutes: 10
            max_error_rate: 0
            max_p99_latency_ms: null
            require_no_drift: true
        drift:
          consecutive_reports: 2
          action: Rollback
        """))
    policy = load_policy(path)
    assert policy.source == str(path)
    assert (policy.champion, policy.challenger, policy.promotion.enabled) == ("prod", "candidate", False)
    gates = policy.promotion.gates
    assert [(m.metric, m.op, m.threshold) for m in gates.metrics] == [
        ("accuracy", ">=", 0.9), ("f1", ">", 0.8), ("log_loss", "<", 0.3)]
    assert gates.max_regression == (RegressionLimit("accuracy", 0.01), RegressionLimit("latency_ms", 5.0, True))
    assert (gates.signature_compatible, gates.smoke_test) == (False, True)
    assert policy.promotion.canary == CanaryPolicy(percent=2.5, min_requests=50, max_minutes=10.0,
                                                   max_error_rate=0.0, max_p99_latency_ms=None,
                                                   require_no_drift=True)
    assert policy.drift == DriftPolicy(consecutive_reports=2, action="rollback")


def test_canary_switch_forms() -> None:
    assert parse_policy("model: m\npromotion: {canary: true}\n").promotion.canary == CanaryPolicy()
    assert parse_policy("model: m\npromotion: {canary: false}\n").promotion.canary is None


BAD_POLICIES = [
    # (yaml, line, key, message fragment)
    ("registry: alias\n", 1, "model", "required key is missing"),
    ("model: churn\nchampoin: champion\n", 2, "champoin", "did you mean 'champion'"),
    ("model: churn\npromotion:\n  gates:\n    smoke_tets: true\n", 4, "promotion.gates.smoke_tets",
     "did you mean 'smoke_test'"),
    ("model: churn\npromotion:\n  gates:\n    metrics:\n      - accuracy >= 0.9\n      - f1 => 0.8\n", 6,
     "promotion.gates.metrics[1]", "did you mean '>='"),
    ("model: churn\npromotion:\n  gates:\n    metrics: ['accuracy >= high']\n", 4,
     "promotion.gates.metrics[0]", "'high' is not a number"),
    ("model: churn\npromotion:\n  gates:\n    metrics: accuracy >= 0.9\n", 4, "promotion.gates.metrics",
     "expected a list"),
    ("model: churn\npromotion:\n  canary:\n    percent: 100\n", 4, "promotion.canary.percent", "out of range"),
    ("model: churn\npromotion:\n  canary:\n    min_requests: 2.5\n", 4, "promotion.canary.min_requests",
     "expected an integer"),
    ("model: churn\npromotion:\n  canary:\n    max_error_rate: 5\n", 4, "promotion.canary.max_error_rate",
     "between 0 and 1"),
    ("model: churn\npromotion:\n  canary:\n    insufficient_evidence: wait\n", 4,
     "promotion.canary.insufficient_evidence", "must be one of reject, extend"),
    ("model: churn\npromotion:\n  enabled: 'sometimes'\n", 3, "promotion.enabled", "expected true or false"),
    ("model: churn\nregistry: stage\nchampion: Prod\n", 3, "champion", "is not a stage name"),
    ("model: churn\nregistry: stage\nchallenger: archived\n", 3, "challenger", "not served"),
    ("model: churn\nchampion: Production\n", 2, "champion", "set `registry: stage`"),
    ("model: churn\nchallenger: v2\n", 2, "challenger", "reserved"),
    ("model: churn\nchallenger: champion\n", 2, "challenger", "must differ"),
    ("model: churn\nregistry: stages\n", 2, "registry", "must be 'alias' or 'stage'"),
    ("model: churn\ndrift:\n  action: rollbak\n", 3, "drift.action", "did you mean 'rollback'"),
    ("model: churn\ndrift:\n  consecutive_reports: 0\n", 3, "drift.consecutive_reports", ">= 1"),
    ("model: churn\npromotion:\n  gates:\n    max_regression:\n      accuracy: {margin: -0.1}\n", 5,
     "promotion.gates.max_regression.accuracy.margin", ">= 0"),
    ("model: churn\npromotion:\n  gates:\n    max_regression:\n      f1: {margn: 1}\n", 5,
     "promotion.gates.max_regression.f1.margn", "did you mean 'margin'"),
    ("model: churn\nmodel: other\n", 2, "model", "duplicate key (first set on line 1)"),
    ("model: churn\npromotion: [1, 2]\n", 2, "promotion", "expected a mapping"),
    ("model: churn\npromotion:\n  gates: {metrics: [\n", 4, None, "invalid YAML"),
]


@pytest.mark.parametrize(("text", "line", "key", "fragment"), BAD_POLICIES,
                         ids=[f"{case[2]}-{case[1]}" for case in BAD_POLICIES])
def test_policy_errors_name_line_and_key(text: str, line: int, key: str | None, fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source="churn.yaml")
    err = info.value
    assert (err.line, err.key) == (line, key), str(err)
    assert fragment in str(err)
    assert str(err).startswith(f"churn.yaml:{line}: ")
    assert isinstance(err, ValueError)


def test_load_policy_reports_the_file(tmp_path: Path) -> None:
    path = tmp_path / "churn.yaml"
    path.write_text("model: churn\npromotion:\n  canary:\n    max_minutes: -1\n")
    with pytest.raises(PolicyError, match=rf"^{path}:4: promotion\.canary\.max_minutes: -1 is out of range"):
        load_policy(path)
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")
    with pytest.raises(PolicyError, match="policy is empty"):
        parse_policy("# nothing but a comment\n")


# --- promotion gates ------------------------------------------------------------------------------


def test_all_gates_pass_for_a_good_successor(store: Store, tmp_path: Path) -> None:
    report = evaluate_gates(_policy(ALL_GATES), store.client.get_model_version(MODEL, store.good),
                            client=store.client, champion_version=store.champion, cache_dir=tmp_path)
    assert report.passed, report.summary()
    assert [r.gate for r in report.results] == ["metric[accuracy >= 0.9]", "max_regression[accuracy]",
                                                "signature_compatible", "smoke_test"]
    lines = report.summary().splitlines()
    assert lines[0] == "gates passed (4)" and len(lines) == 5
    assert "input example predicted" in lines[-1]
    assert report.results[0].figures["value"] == pytest.approx(store.accuracy[store.good])
    # The smoke gate left a copy in the serving workers' layout.
    assert (tmp_path / MODEL / store.good / "MLmodel").exists()


def test_metric_threshold_failure_says_by_how_much(store: Store, tmp_path: Path) -> None:
    policy = _policy('metrics: ["accuracy >= 0.9", "f1 > 0.8", "accuracy <= 0.5"]\nsmoke_test: false\n')
    report = evaluate_gates(policy, (MODEL, store.weak), client=store.client, champion_version=None,
                            cache_dir=tmp_path)
    accuracy = store.accuracy[store.weak]
    assert not report.passed
    threshold, missing, upper = report.results[:3]
    assert not threshold.passed
    assert threshold.detail == (f"metric accuracy = {_fmt(accuracy)}, but >= 0.9 required "
                                f"(short by {_fmt(0.9 - accuracy)})")
    assert threshold.figures["shortfall"] == pytest.approx(0.9 - accuracy)
    # A metric the run never logged fails with a detail that says so (and what the run has).
    assert not missing.passed and "has no metric 'f1'" in missing.detail and "accuracy" in missing.detail
    assert not upper.passed and f"over by {_fmt(accuracy - 0.5)}" in upper.detail
    # Every gate was evaluated and reported, failures first in the summary's verdict line.
    assert report.summary().splitlines()[0] == (
        "gates failed: 3 of 5 (metric[accuracy >= 0.9], metric[f1 > 0.8], metric[accuracy <= 0.5])")
    assert [r.gate for r in report.results][3:] == ["signature_compatible", "smoke_test"]
    assert report.results[4].skipped and report.results[4].line().startswith("SKIP smoke_test")


def test_regression_against_the_champion(store: Store, tmp_path: Path) -> None:
    policy = _policy("max_regression:\n  accuracy: 0.01\n  latency_ms: {margin: 1, lower_is_better: true}\n"
                     "signature_compatible: false\nsmoke_test: false\n")
    champion, weak = store.accuracy["1"], store.accuracy[store.weak]
    report = evaluate_gates(policy, (MODEL, store.weak), client=store.client, champion_version="1",
                            cache_dir=tmp_path)
    accuracy_gate, latency_gate = report.results[:2]
    assert not accuracy_gate.passed
    assert accuracy_gate.detail.startswith(
        f"accuracy regressed by {_fmt(champion - weak)} vs champion v1 ({_fmt(champion)} -> {_fmt(weak)}), "
        f"margin 0.01 (exceeded by {_fmt(champion - weak - 0.01)}")
    # Lower is better: 9 ms against the champion's 10 ms is an improvement.
    assert latency_gate.passed and "improved by 1" in latency_gate.detail

    report = evaluate_gates(policy, (MODEL, store.good), client=store.client, champion_version="1",
                            cache_dir=tmp_path)
    assert report.results[0].passed
    latency_gate = report.results[1]
    assert not latency_gate.passed
    assert latency_gate.detail.startswith("latency_ms regressed by 2 vs champion v1 (10 -> 12), margin 1")
    assert latency_gate.figures["regression"] == pytest.approx(2.0)

    # No champion yet: nothing to regress from.
    report = evaluate_gates(policy, (MODEL, store.weak), client=store.client, champion_version=None,
                            cache_dir=tmp_path)
    assert report.passed and "no champion yet" in report.results[0].detail


def test_regression_fails_closed_when_the_champion_metric_cannot_be_read(store: Store, tmp_path: Path) -> None:
    # The "failing" version's run logged accuracy only: as champion, its latency_ms cannot be read.
    gates = "max_regression:\n  latency_ms: {margin: 1, lower_is_better: true}\nsignature_compatible: false\n" \
            "smoke_test: false\n"
    report = evaluate_gates(_policy(gates), (MODEL, store.good), client=store.client,
                            champion_version=store.failing, cache_dir=tmp_path)
    assert not report.passed
    detail = report.results[0].detail
    assert detail.startswith(f"cannot compare: champion v{store.failing} source run") and "'latency_ms'" in detail
    assert "allow_missing_champion_metrics: true" in detail
    allowed = _policy(gates + "allow_missing_champion_metrics: true\n")
    assert allowed.promotion.gates.allow_missing_champion_metrics
    report = evaluate_gates(allowed, (MODEL, store.good), client=store.client, champion_version=store.failing,
                            cache_dir=tmp_path)
    assert report.passed and report.results[0].detail.startswith("not compared:")


def test_incompatible_signature_fails(store: Store, tmp_path: Path) -> None:
    policy = _policy("smoke_test: false\n")
    report = evaluate_gates(policy, (MODEL, store.other_columns), client=store.client, champion_version="1",
                            cache_dir=tmp_path)
    assert not report.passed
    gate = report.results[0]
    assert gate.gate == "signature_compatible" and not gate.passed
    assert "requires 1 column(s) the live version does not: patient_age" in gate.detail
    assert gate.figures["newly_required"] == ["patient_age"]
    assert len(gate.figures["ignored_live_columns"]) == 25
    assert evaluate_gates(policy, (MODEL, store.other_columns), client=store.client, champion_version=None,
                          cache_dir=tmp_path).passed


def test_schema_comparison_rules() -> None:
    live = Schema([ColSpec("long", "a"), ColSpec("integer", "b"), ColSpec("double", "c"),
                   ColSpec("string", "d", required=False)])
    widened = Schema([ColSpec("long", "a"), ColSpec("double", "b"), ColSpec("double", "c")])
    assert compare_input_schemas(widened, live)[0]
    narrowed = Schema([ColSpec("long", "a"), ColSpec("integer", "b"), ColSpec("long", "c")])
    ok, detail, figures = compare_input_schemas(narrowed, live)
    assert not ok and "c (live double, candidate long)" in detail
    # A column the live version only accepts optionally may not become required.
    ok, detail, _ = compare_input_schemas(Schema([*widened.inputs, ColSpec("string", "d")]), live)
    assert not ok and "requires 1 column(s) the live version does not: d" in detail
    assert compare_input_schemas(Schema([*widened.inputs, ColSpec("string", "e", required=False)]), live)[0]


def test_smoke_test_failure_fails_the_gate(store: Store, tmp_path: Path) -> None:
    report = evaluate_gates(_policy(ALL_GATES), (MODEL, store.failing), client=store.client,
                            champion_version="1", cache_dir=tmp_path)
    by_gate = {r.gate: r for r in report.results}
    assert not report.passed
    assert [r.gate for r in report.failures] == ["smoke_test"], report.summary()
    assert "could not predict its own input example" in by_gate["smoke_test"].detail
    assert "broken on purpose" in by_gate["smoke_test"].detail
    assert report.summary().splitlines()[-1].startswith("FAIL smoke_test: Smoke test failed")


def test_role_versions(store: Store) -> None:
    client = store.client
    assert role_version(parse_policy(f"model: {MODEL}"), "champion", client) == "1"
    assert role_version(parse_policy(f"model: {MODEL}"), "challenger", client) is None
    with pytest.warns(FutureWarning):  # stages are deprecated; the plugin supports them anyway
        client.transition_model_version_stage(MODEL, store.good, "Staging")
    stage_policy = parse_policy(f"model: {MODEL}\nregistry: stage\n")
    assert role_version(stage_policy, "challenger", client) == store.good
    assert role_version(stage_policy, "champion", client) is None


# --- canary ---------------------------------------------------------------------------------------

CANARY = CanaryPolicy(percent=10, min_requests=200, max_minutes=30, max_error_rate=0.01,
                      max_p99_latency_ms=250, require_no_drift=True)


def test_canary_pending_until_enough_evidence() -> None:
    verdict = evaluate_canary(CANARY, CanaryStats(requests=57, errors=1, p99_latency_ms=900, elapsed_s=240))
    assert verdict.status == "pending" and verdict.pending and not verdict.passed
    assert verdict.summary() == "canary pending\nWAIT canary.evidence: waiting for evidence: 57 of 200 " \
                                "requests, 4 of 30 minutes"


def test_canary_passes() -> None:
    verdict = evaluate_canary(CANARY, CanaryStats(requests=200, errors=2, p99_latency_ms=120.5, elapsed_s=600,
                                                  drift_status="ok"))
    assert verdict.status == "pass", verdict.summary()
    assert [r.gate for r in verdict.results] == ["canary.evidence", "canary.error_rate", "canary.p99_latency",
                                                 "canary.drift"]
    assert verdict.figures["error_rate"] == pytest.approx(0.01)


def test_canary_with_too_little_evidence_is_never_promoted() -> None:
    # max_minutes with 3 requests: not enough evidence, rejected (the default) ...
    verdict = evaluate_canary(CANARY, CanaryStats(requests=3, errors=0, p99_latency_ms=80, elapsed_s=1800))
    assert verdict.status == "fail"
    assert verdict.results[0].detail == "not enough evidence: 3 of 200 requests after 30 minutes"
    # ... or, as the policy says, the canary goes on until min_requests arrive.
    extend = dataclasses.replace(CANARY, insufficient_evidence="extend")
    verdict = evaluate_canary(extend, CanaryStats(requests=3, errors=0, p99_latency_ms=80, elapsed_s=1800))
    assert verdict.status == "pending" and "extended until min_requests" in verdict.results[0].detail
    verdict = evaluate_canary(extend, CanaryStats(requests=200, errors=0, p99_latency_ms=80, elapsed_s=5400,
                                                  drift_status="ok"))
    assert verdict.status == "pass"
    assert parse_policy("model: m\npromotion:\n  canary: {insufficient_evidence: Extend}\n"
                        ).promotion.canary.insufficient_evidence == "extend"


def test_canary_errors_are_judged_against_the_champion_over_the_same_window() -> None:
    # Both versions refuse the same bad requests (5%): not the challenger's fault.
    verdict = evaluate_canary(CANARY, CanaryStats(requests=200, errors=11, p99_latency_ms=100, elapsed_s=600,
                                                  champion_requests=1800, champion_errors=90, drift_status="ok"))
    assert verdict.status == "pass", verdict.summary()
    assert verdict.results[1].detail == ("error rate 5.5% (11 of 200) vs the champion's 5% (90 of 1800): "
                                         "within 1 points")
    # A challenger that refuses what the champion accepts (say, a changed input schema) is worse.
    verdict = evaluate_canary(CANARY, CanaryStats(requests=200, errors=80, p99_latency_ms=100, elapsed_s=600,
                                                  champion_requests=1800, champion_errors=9))
    assert verdict.status == "fail"
    assert [r.gate for r in verdict.results if not r.passed] == ["canary.error_rate"]
    assert "worse by 39.5 points > 1 allowed" in verdict.results[1].detail
    # Early: errors beyond what the champion's rate explains already exceed the window's budget.
    verdict = evaluate_canary(CANARY, CanaryStats(requests=40, errors=15, p99_latency_ms=100, elapsed_s=60,
                                                  champion_requests=360, champion_errors=18))
    assert verdict.status == "fail" and "failing early" in verdict.results[0].detail
    verdict = evaluate_canary(CANARY, CanaryStats(requests=40, errors=3, p99_latency_ms=100, elapsed_s=60,
                                                  champion_requests=360, champion_errors=18))
    assert verdict.status == "pending"  # 3 errors are what a 5% champion rate gives: no verdict yet


def test_canary_fails_with_figures() -> None:
    verdict = evaluate_canary(CANARY, CanaryStats(requests=400, errors=10, p99_latency_ms=310, elapsed_s=900))
    assert verdict.status == "fail"
    failed = {r.gate: r.detail for r in verdict.results if not r.passed}
    assert failed == {
        "canary.error_rate": "error rate 2.5% (10 of 400) > 1% allowed (over by 1.5 points; no champion "
                             "traffic to compare with)",
        "canary.p99_latency": "p99 latency 310 ms > 250 ms allowed (over by 60 ms)",
    }
    assert verdict.summary().splitlines()[0] == "canary fail: canary.error_rate, canary.p99_latency"


def test_canary_without_traffic_fails_at_the_deadline() -> None:
    verdict = evaluate_canary(CANARY, CanaryStats(requests=0, errors=0, p99_latency_ms=None, elapsed_s=1800))
    assert verdict.status == "fail"
    assert verdict.results[0].detail == "no request reached the challenger in 30 minutes"


def test_canary_fails_early_when_the_outcome_is_certain() -> None:
    # 3 errors already exceed 1% of the 200-request window, whatever the next requests do.
    verdict = evaluate_canary(CANARY, CanaryStats(requests=40, errors=3, p99_latency_ms=100, elapsed_s=60))
    assert verdict.status == "fail" and verdict.results[0].gate == "canary.error_rate"
    assert "already exceed what the 200-request window allows" in verdict.results[0].detail
    # Reported drifted while the policy requires no drift.
    verdict = evaluate_canary(CANARY, CanaryStats(requests=10, errors=0, p99_latency_ms=100, elapsed_s=60,
                                                  drift_status="drifted"))
    assert verdict.status == "fail" and verdict.results[0].gate == "canary.drift"
    with pytest.raises(ValueError, match="inconsistent"):
        evaluate_canary(CANARY, CanaryStats(requests=1, errors=2, p99_latency_ms=1, elapsed_s=1))


def test_canary_drift_is_judged_on_the_challengers_own_rows_before_any_promotion() -> None:
    enough = {"requests": 200, "errors": 0, "p99_latency_ms": 80.0}
    # Enough traffic, but no drift verdict on the challenger's rows yet: wait, never promote.
    verdict = evaluate_canary(CANARY, CanaryStats(**enough, elapsed_s=600))
    assert verdict.status == "pending"
    assert verdict.results[-1].line("WAIT") == "WAIT canary.drift: no drift verdict on the challenger's traffic yet"
    # Too few of its rows for a verdict: the same, until max_minutes; then not enough evidence ...
    few = CanaryStats(**enough, elapsed_s=600, drift_status="insufficient_data", drift_detail="120 rows")
    assert evaluate_canary(CANARY, few).status == "pending"
    late = dataclasses.replace(few, elapsed_s=1800)
    verdict = evaluate_canary(CANARY, late)
    assert verdict.status == "fail"
    assert verdict.results[-1].detail == ("not enough evidence: too few rows of the challenger's traffic for a drift "
                                          "verdict (120 rows) after 30 minutes")
    # ... or, with insufficient_evidence: extend, more waiting.
    assert evaluate_canary(dataclasses.replace(CANARY, insufficient_evidence="extend"), late).status == "pending"
    # Its own rows drifted: rejected, saying on what.
    verdict = evaluate_canary(CANARY, dataclasses.replace(few, drift_status="drifted", drift_detail="400 rows, run r1"))
    assert verdict.status == "fail"
    assert verdict.results[-1].line() == "FAIL canary.drift: the challenger's own traffic drifted (400 rows, run r1)"
    # A failed latency check fails at once: no need to wait for the drift check.
    slow = CanaryStats(requests=200, errors=0, p99_latency_ms=900, elapsed_s=600)
    assert evaluate_canary(CANARY, slow).status == "fail"
    # Without require_no_drift nothing waits for drift.
    assert evaluate_canary(dataclasses.replace(CANARY, require_no_drift=False),
                           CanaryStats(**enough, elapsed_s=600)).status == "pass"
