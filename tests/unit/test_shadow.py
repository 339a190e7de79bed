"""The shadow mirror in process: real models, the real service build, real capture files.

A shadow version sees copies of answered requests after their answers are built; these tests check
that the pairs join exactly (same request id, roles primary/shadow) and that a shadow that hangs or
raises changes nothing the client gets.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for
from unit_helpers import TestClient, controlled, gate_closed, id_frame, iris_data, split_body

from mlflow_deploy_plugin.capture import read_capture
from mlflow_deploy_plugin.monitoring.shadow_compare import compare_pairs, mcnemar_exact
from mlflow_deploy_plugin.serving.app import AppSettings, build_app
from mlflow_deploy_plugin.serving.model_slot import ModelSlot
from mlflow_deploy_plugin.serving.service import build_service
from mlflow_deploy_plugin.serving.shadow import ShadowAnswer, ShadowMirror
from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef

WAIT_S = 10.0


@pytest.fixture
def no_multiprocess_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def test_service_mirrors_every_captured_request_and_pairs_join(
        tmp_path: Path, classifier_path: Path, rotated_classifier_path: Path, rotated_slot: ModelSlot,
        no_multiprocess_metrics: None) -> None:
    paths = {"1": classifier_path, "2": rotated_classifier_path}
    spec = DeploymentSpec(name="unit", model=ModelRef("models:/iris/1", "iris", "1"),
                          shadow=ModelRef("models:/iris_challenger/2", "iris_challenger", "2"),
                          config=DeploymentConfig(shadow="models:/iris_challenger/2"))
    service = build_service(spec, lambda model: paths[model.model_version], str(tmp_path / "capture"),
                            tmp_path / "capture.key")
    features, _ = iris_data()
    ids = [f"req-{i}" for i in range(12)]
    try:
        with TestClient(service.app) as client:
            service.state.ready = True
            for i, request_id in enumerate(ids):
                rows = features.iloc[[i * 12, i * 12 + 1]]
                response = client.post("/invocations", json=split_body(rows),
                                       headers={"Content-Type": "application/json", "X-Request-Id": request_id})
                assert response.status_code == 200, response.text
                assert response.headers["x-model-version"] == "1"  # never the shadow
            info = client.get("/deployment").json()
        assert info["shadow"]["model_version"] == "2"
        wait_for(service.shadow.idle, WAIT_S, "the shadow to predict every copy")
    finally:
        service.capture.close(timeout_s=10)
    both = read_capture(str(tmp_path / "capture"), shadow=True)
    primary = both[both["_role"] == "primary"]
    shadow = both[both["_role"] == "shadow"]
    assert sorted(set(primary["_request_id"])) == sorted(ids) == sorted(set(shadow["_request_id"]))
    assert set(shadow["_model_version"]) == {"2"} and set(shadow["_status"]) == {200}
    # Each row names the registered model that answered: the shadow may be another model.
    assert set(primary["_model_name"]) == {"iris"} and set(shadow["_model_name"]) == {"iris_challenger"}
    pairs = primary.merge(shadow, on=["_request_id", "_row"], suffixes=("", "_shadow"))
    assert len(pairs) == 2 * len(ids)
    inputs = pairs[list(features.columns)]
    np.testing.assert_array_equal(pairs["_prediction_shadow"].to_numpy(), rotated_slot.predict(inputs))
    # Drift, quality and `capture show` read what clients got: the primary rows only.
    served = read_capture(str(tmp_path / "capture"))
    assert len(served) == len(primary) and set(served["_role"]) == {"primary"}

    # The comparison agrees with the pairs counted by hand, and the labels' paired test sees the
    # rotated shadow is worse (it is wrong wherever the primary is right).
    _, target = iris_data()
    labels = pairs[["_request_id", "_row"]].assign(
        _label=[int(target.iloc[int(rid.split("-")[1]) * 12 + row]) for rid, row in zip(
            pairs["_request_id"], pairs["_row"], strict=True)])
    comparison = compare_pairs(both, labels=labels)
    by_hand = float((pairs["_prediction"].to_numpy() == pairs["_prediction_shadow"].to_numpy()).mean())
    assert comparison.task == "classification" and comparison.requests == len(ids)
    assert comparison.agreement == by_hand < 0.5
    assert sum(sum(row.values()) for row in comparison.confusion.values()) == len(pairs)
    assert comparison.primary_error_rate == comparison.shadow_error_rate == 0.0
    lab = comparison.labelled
    assert lab is not None and lab.rows == len(pairs) and lab.primary > lab.shadow
    assert lab.test == "mcnemar_exact" and lab.shadow_worse and lab.p_value < 0.05


@contextlib.contextmanager
def _mirrored_app(primary: ModelSlot, mirror: ShadowMirror) -> Iterator[TestClient]:
    settings = AppSettings(deployment="unit", max_body_bytes=1 << 20, timeout_s=10.0)
    app = build_app(settings, primary, on_answer=mirror.submit)
    with TestClient(app) as client:
        yield client


def test_hung_shadow_leaves_primary_answers_alone_and_is_counted(
        classifier_slot: ModelSlot, controlled_slot: ModelSlot) -> None:
    recorded: list[ShadowAnswer] = []
    drops: list[str] = []
    model = controlled(controlled_slot)
    # The controlled model takes ids: it predicts one per row of the copy (and hangs on its gate).
    mirror = ShadowMirror(lambda data, _params: controlled_slot.predict(id_frame(range(len(data)))), "7", recorded.append,
                          max_queue=2, timeout_s=0.2, on_drop=lambda reason, count: drops.extend([reason] * count))
    features, _ = iris_data()
    rows = features.iloc[[0, 50, 100]]
    expected = classifier_slot.predict(rows).tolist()
    try:
        with gate_closed(model), _mirrored_app(classifier_slot, mirror) as client:
            for _ in range(8):
                response = client.post("/invocations", json=split_body(rows))
                assert response.status_code == 200 and response.json()["predictions"] == expected
                assert response.headers["x-model-version"] == "1"
            wait_for(lambda: any(answer.status == 504 for answer in recorded), WAIT_S,
                     "the hung shadow call to time out")
            wait_for(mirror.idle, WAIT_S, "the mirror to get through its queue")
    finally:
        mirror.close(timeout_s=2)
    assert recorded[0].status == 504 and recorded[0].predictions is None
    assert mirror.outcomes.get("timeout", 0) >= 1
    # Every copy is accounted for: predicted (and timed out), or dropped with a reason.
    assert mirror.submitted + drops.count("queue_full") == 8
    assert len(recorded) + drops.count("busy") == mirror.submitted
    assert "busy" in drops or "queue_full" in drops


def test_raising_shadow_is_captured_as_an_error(controlled_slot: ModelSlot) -> None:
    recorded: list[ShadowAnswer] = []
    controlled(controlled_slot).poison = frozenset({3})
    mirror = ShadowMirror(controlled_slot.predict, "7", recorded.append, rng=random.Random(0))
    try:
        for i, ids in enumerate(([1, 2], [3, 4], [5])):
            assert mirror.submit(ShadowAnswer(f"r{i}", 1.7e9, "1", 200, 1.0, id_frame(ids), None))
        wait_for(lambda: len(recorded) == 3, WAIT_S, "three shadow answers")
    finally:
        mirror.close()
    assert [a.status for a in recorded] == [200, 500, 200]
    assert [a.request_id for a in recorded] == ["r0", "r1", "r2"]
    assert recorded[0].predictions.tolist() == [2, 4] and recorded[1].predictions is None
    assert mirror.outcomes == {"ok": 2, "error": 1}
    assert json.dumps(sorted(mirror.dropped)) == "[]"


def test_paired_tests_without_statsmodels_reduce_to_the_exact_binomial(monkeypatch: pytest.MonkeyPatch) -> None:
    from scipy.stats import binomtest

    with_statsmodels, name = mcnemar_exact(9, 2)
    assert name == "mcnemar_exact"
    monkeypatch.setitem(__import__("sys").modules, "statsmodels.stats.contingency_tables", None)
    without, fallback = mcnemar_exact(9, 2)
    assert fallback == "binomial_exact"
    assert with_statsmodels == pytest.approx(without) == pytest.approx(binomtest(9, 11, 0.5).pvalue)


def test_shadow_stage_waits_for_evidence_then_judges_agreement_and_labels() -> None:
    from mlflow_deploy_plugin.lifecycle.policy import parse_policy
    from mlflow_deploy_plugin.lifecycle.shadow_stage import evaluate_shadow
    from mlflow_deploy_plugin.monitoring.shadow_compare import LabelledComparison, ShadowComparison

    policy = parse_policy("model: m\npromotion:\n  shadow: {min_requests: 50, min_agreement: 0.9, "
                          "min_labelled_rows: 20, max_minutes: 5}\n").promotion.shadow
    assert policy is not None

    def pairs(requests: int, agreement: float, labelled: LabelledComparison | None = None) -> ShadowComparison:
        return ShadowComparison(["1"], "2", "classification", requests, requests, requests, 0.0, 0.0, {}, {},
                                agreement=agreement, labelled=labelled)

    assert evaluate_shadow(policy, pairs(10, 0.5), elapsed_s=60).pending  # too few pairs, time left
    assert evaluate_shadow(policy, pairs(10, 1.0), elapsed_s=301).status == "fail"  # not enough evidence
    differing = evaluate_shadow(policy, pairs(60, 0.8), elapsed_s=60)
    assert differing.status == "fail" and "shadow.agreement" in differing.summary().splitlines()[0]
    worse = LabelledComparison(30, "accuracy", 0.9, 0.6, "mcnemar_exact", 0.001, shadow_worse=True)
    assert evaluate_shadow(policy, pairs(60, 0.95, worse), elapsed_s=60).status == "fail"
    few = LabelledComparison(5, "accuracy", 0.9, 0.6, "mcnemar_exact", 0.2, shadow_worse=False)
    passed = evaluate_shadow(policy, pairs(60, 0.95, few), elapsed_s=60)
    assert passed.passed and "not judged on labels" in passed.summary()


def test_copies_waiting_together_are_predicted_in_one_call_and_a_bad_one_fails_alone(
        controlled_slot: ModelSlot) -> None:
    from unit_helpers import wait_started

    model = controlled(controlled_slot)
    model.poison = frozenset({13})
    recorded: list[ShadowAnswer] = []
    mirror = ShadowMirror(controlled_slot.predict, "7", recorded.append, batching=True)
    try:
        with gate_closed(model):
            mirror.submit(ShadowAnswer("first", 1.7e9, "1", 200, 1.0, id_frame([1]), None))
            wait_started(model)  # the first copy's call holds the mirror: the next ones wait together
            for request_id, ids in (("a", [2, 3]), ("b", [4]), ("c", [5, 6])):
                mirror.submit(ShadowAnswer(request_id, 1.7e9, "1", 200, 1.0, id_frame(ids), None))
        wait_for(lambda: len(recorded) == 4, WAIT_S, "four shadow answers")
        assert model.calls[-1] == [2, 3, 4, 5, 6]  # one call for the three copies that waited
        with gate_closed(model):
            mirror.submit(ShadowAnswer("hold", 1.7e9, "1", 200, 1.0, id_frame([7]), None))
            wait_started(model)
            mirror.submit(ShadowAnswer("good", 1.7e9, "1", 200, 1.0, id_frame([8]), None))
            mirror.submit(ShadowAnswer("bad", 1.7e9, "1", 200, 1.0, id_frame([13]), None))
        wait_for(lambda: len(recorded) == 7, WAIT_S, "seven shadow answers")
    finally:
        mirror.close()
    by_id = {answer.request_id: answer for answer in recorded}
    assert by_id["c"].predictions.tolist() == [10, 12] and by_id["a"].predictions.tolist() == [4, 6]
    assert by_id["bad"].status == 500 and by_id["good"].status == 200  # the failed batch, retried one by one
    assert by_id["good"].predictions.tolist() == [16]


def test_the_shadow_predicts_with_the_requests_params_and_never_batches_them(controlled_slot: ModelSlot) -> None:
    from unit_helpers import wait_started

    from mlflow_deploy_plugin.serving.app import Answer

    model = controlled(controlled_slot)
    recorded: list[ShadowAnswer] = []
    mirror = ShadowMirror(controlled_slot.predict, "7", recorded.append, batching=True)
    try:
        with gate_closed(model):
            mirror.submit(Answer("hold", 1.7e9, "1", 200, 1.0, id_frame([1]), None))
            wait_started(model)  # the next copies wait together behind this call
            mirror.submit(Answer("tripled", 1.7e9, "1", 200, 1.0, id_frame([2, 3]), None, params={"factor": 3}))
            mirror.submit(Answer("plain", 1.7e9, "1", 200, 1.0, id_frame([4]), None))
        wait_for(lambda: len(recorded) == 3, WAIT_S, "three shadow answers")
    finally:
        mirror.close()
    by_id = {answer.request_id: answer for answer in recorded}
    assert by_id["tripled"].predictions.tolist() == [6, 9]  # the primary's params, not the default factor 2
    assert by_id["plain"].predictions.tolist() == [8]
    assert [2, 3, 4] not in model.calls  # params apply to a whole call: never stacked with another copy


def test_a_shadow_model_writing_into_its_input_or_reusing_its_output_leaves_captured_rows_alone() -> None:
    """Capture holds a request's raw rows and predictions until its writer thread encodes them (a
    quarter second later), and the copy's DataFrame was built on those rows without copying: a
    shadow model that changed its input in place rewrote the primary's captured inputs, and one
    that hands back one output buffer call after call rewrote the shadow's earlier predictions."""
    from types import SimpleNamespace

    from mlflow_deploy_plugin.serving.shadow import frame_of_raw

    columns = ("a", "b")
    buffer = np.zeros(2)

    def scribbler(data, _params):  # noqa: ANN001, ANN202
        buffer[:] = data["a"].to_numpy()  # its one output buffer, reused
        data.iloc[:, 0] = -1.0  # and its input, rewritten in place
        return buffer

    recorded: list[ShadowAnswer] = []
    mirror = ShadowMirror(scribbler, "7", recorded.append)
    primaries = [np.array([[1.0, 2.0], [3.0, 4.0]]) + 10 * i for i in range(3)]
    try:
        for i, values in enumerate(primaries):  # as the parser's fast path hands them over
            answer = SimpleNamespace(request_id=f"r{i}", timestamp=float(i), inputs=frame_of_raw(columns, values),
                                     params=None, raw_inputs=(columns, values))
            assert mirror.submit(answer)
            wait_for(lambda i=i: len(recorded) == i + 1, WAIT_S, "the shadow to answer the copy")
    finally:
        mirror.close(timeout_s=2)
    for i, values in enumerate(primaries):
        original = np.array([[1.0, 2.0], [3.0, 4.0]]) + 10 * i
        assert np.array_equal(values, original), "the primary's captured rows were rewritten"
        assert np.array_equal(recorded[i].raw_inputs[1], original)
        assert recorded[i].status == 200 and recorded[i].predictions.tolist() == original[:, 0].tolist()


def test_the_report_says_the_two_latencies_time_different_things() -> None:
    """The shadow's latency is its batched call off the request path, the primary's the answer: a user
    read 'p99 latency primary 2.1 ms / shadow 65.9 ms' of two versions of equal cost as a 30x slower
    challenger. The summary (CLI, history, Slack) and the HTML say which is which."""
    from datetime import UTC, datetime

    import pandas as pd

    from mlflow_deploy_plugin.monitoring.shadow_compare import compare_pairs
    from mlflow_deploy_plugin.monitoring.shadow_report import LATENCY_NOTE, render_html

    ids = ["a", "b"]
    captured = pd.concat([pd.DataFrame({"_request_id": ids, "_row": 0, "_status": 200, "_latency_ms": latency,
                                        "_model_version": version, "_role": role, "_prediction": [1, 0]})
                          for version, role, latency in (("1", "primary", 2.0), ("2", "shadow", 60.0))])
    comparison = compare_pairs(captured)
    assert "p99 latency primary 2.0 ms (answer) / shadow 60.0 ms (batched call off the request path)" \
        in comparison.summary()
    now = datetime.now(UTC)
    assert LATENCY_NOTE in render_html("svc", comparison, now, now).replace("&#x27;", "'")


def test_the_report_counts_the_requests_the_shadow_never_answered() -> None:
    """A hung or crashing shadow drops copies (busy, crashed): they make no pair, so beside the pairs the
    report gives the requests the primary answered, and the summary says it when they differ."""
    import pandas as pd

    from mlflow_deploy_plugin.monitoring.shadow_compare import compare_pairs

    primary = pd.DataFrame({"_request_id": [f"r{i}" for i in range(10)], "_row": 0, "_status": 200,
                            "_latency_ms": 1.0, "_model_version": "1", "_role": "primary", "_prediction": 1})
    shadow = primary.head(4).assign(_model_version="2", _role="shadow")
    comparison = compare_pairs(pd.concat([primary, shadow]))
    assert (comparison.requests, comparison.primary_requests) == (4, 10)
    assert comparison.summary().startswith("4 paired requests (of 10 the primary answered), agreement 1.000")
    assert comparison.figures()["primary_requests"] == 10
    assert compare_pairs(pd.concat([primary.head(4), shadow])).summary().startswith("4 paired requests, agreement")


def test_a_regression_shadow_stage_without_a_difference_bound_says_its_answers_were_not_judged() -> None:
    """max_mean_abs_difference has no default (target units): the verdict used to pass a regression
    challenger with no line at all on its answers; now a SKIP line with the figure says so."""
    from mlflow_deploy_plugin.lifecycle.policy import parse_policy
    from mlflow_deploy_plugin.lifecycle.shadow_stage import evaluate_shadow
    from mlflow_deploy_plugin.monitoring.shadow_compare import ShadowComparison

    policy = parse_policy("model: m\npromotion:\n  shadow: {min_requests: 50}\n").promotion.shadow
    assert policy is not None and policy.max_mean_abs_difference is None
    far = ShadowComparison(["1"], "2", "regression", 60, 60, 60, 0.0, 0.0, {}, {},
                           difference={"mean": 40.0, "mean_abs": 40.0})
    verdict = evaluate_shadow(policy, far, elapsed_s=60)
    line = next(r for r in verdict.results if r.gate == "shadow.difference")
    assert verdict.passed and line.skipped and "mean |difference| 40: not judged" in line.detail
    bounded = parse_policy("model: m\npromotion:\n  shadow: {min_requests: 50, max_mean_abs_difference: 1.0}\n")
    assert bounded.promotion.shadow is not None
    assert evaluate_shadow(bounded.promotion.shadow, far, elapsed_s=60).status == "fail"


def test_a_shadow_that_dropped_most_copies_fails_the_error_gate_and_the_report_says_so() -> None:
    """Copies a hung or crashing shadow dropped (busy, crashed) leave no pair: judged on its pairs
    alone, a shadow that answered 20 of the 90 copies sent to it, those well, passed max_error_rate
    and the report's error rate said 0. Now the drops are counted beside the pairs (the primary's
    requests from the shadow's first row on, times the sample rate: a lower bound when sampled) and
    the gate judges failures and drops among the copies sent."""
    import pandas as pd

    from mlflow_deploy_plugin.lifecycle.policy import parse_policy
    from mlflow_deploy_plugin.lifecycle.shadow_stage import evaluate_shadow

    primary = pd.DataFrame({"_request_id": [f"r{i}" for i in range(100)], "_row": 0, "_status": 200,
                            "_latency_ms": 1.0, "_model_version": "1", "_role": "primary", "_prediction": 1,
                            "_timestamp": pd.to_datetime(list(range(100)), unit="s", utc=True)})
    shadow = primary.iloc[10:30].assign(_model_version="2", _role="shadow")  # mirrored from r10 on
    captured = pd.concat([primary, shadow])
    comparison = compare_pairs(captured)
    assert (comparison.requests, comparison.shadow_dropped, comparison.shadow_error_rate) == (20, 70, 0.0)
    assert comparison.shadow_failure_rate == pytest.approx(70 / 90)
    assert "the shadow dropped 70 of the 90 copies sent to it (0.778" in comparison.summary()
    assert comparison.figures()["shadow_dropped"] == 70
    policy = parse_policy("model: m\npromotion:\n  shadow: {min_requests: 20}\n").promotion.shadow
    assert policy is not None and policy.max_error_rate == 0.01
    verdict = evaluate_shadow(policy, comparison, 60.0)
    gate = next(r for r in verdict.results if r.gate == "shadow.error_rate")
    assert verdict.status == "fail" and not gate.passed, verdict
    assert "failed or dropped 77.7778% of the 90 copies sent to it" in gate.detail and "70 dropped" in gate.detail
    # Sampled at 0.5: only what sampling cannot explain counts (45 expected, 3 sd = 14.2: 30 surely sent).
    assert compare_pairs(captured, sample_rate=0.5).shadow_dropped == 10
    # The shadow removed after r29: later requests were never mirrored; a past shadow's rate is unknown.
    assert compare_pairs(captured, open_end=False).shadow_dropped == 0
    assert compare_pairs(captured, sample_rate=None).shadow_dropped is None
    # A shadow that answered every copy it was sent passes the same gate.
    whole = compare_pairs(pd.concat([primary, primary.assign(_model_version="2", _role="shadow")]))
    assert whole.shadow_dropped == 0
    assert next(r for r in evaluate_shadow(policy, whole, 60.0).results if r.gate == "shadow.error_rate").passed
