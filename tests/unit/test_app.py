"""The serving app in process: the real ``build_app`` over real models behind Starlette's TestClient.

What `mlflow models serve` would answer comes from MLflow's own scoring app
(``mlflow.pyfunc.scoring_server.init``), also in process, over the same saved model.
"""

from __future__ import annotations

import io
import json
import math
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
from mlflow.pyfunc import scoring_server
from starlette.types import Message
from unit_helpers import (
    JSON,
    Served,
    ServeFactory,
    TestClient,
    asgi_call,
    assert_error,
    controlled,
    gate_closed,
    id_frame,
    iris_data,
    metric,
    split_body,
)

import mlflow_deploy_plugin
from mlflow_deploy_plugin.serving.app import AppSettings, build_app
from mlflow_deploy_plugin.serving.model_slot import ModelSlot

CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
TOKEN = "s3cret-token"
DEPLOYMENT = "unit"  # as conftest's serve() names it


def _rows() -> pd.DataFrame:
    features, target = iris_data()
    picks = [0, 1, 2, 50, 51, 52, 100, 101, 102, 120]
    assert set(target.iloc[picks]) == {0, 1, 2}, "rows of every class, so a wrong answer shows"
    return features.iloc[picks]


ROWS = _rows()


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _accepted() -> dict[str, tuple[str, bytes | str]]:
    """Bodies `mlflow models serve` answers with predictions: id -> (content type, body)."""
    records = ROWS.to_dict(orient="records")
    split = json.dumps(split_body(ROWS))
    return {
        "dataframe_split": (JSON, split),
        "dataframe_records": (JSON, json.dumps({"dataframe_records": records})),
        "records_with_extra_column": (JSON, json.dumps({"dataframe_records": [
            {**record, "patient_id": index} for index, record in enumerate(records)]})),
        "integers_in_double_columns": (JSON, json.dumps(split_body(ROWS.round().astype(int)))),
        "instances": (JSON, json.dumps({"instances": records})),
        "inputs_columns": (JSON, json.dumps({"inputs": ROWS.to_dict(orient="list")})),
        "inputs_records": (JSON, json.dumps({"inputs": records})),
        "split_with_params": (JSON, json.dumps(split_body(ROWS, params={"top_k": 3}))),
        "split_with_index": (JSON, json.dumps({"dataframe_split": json.loads(ROWS.to_json(orient="split"))})),
        "utf8_charset": (f"{JSON}; charset=UTF-8", split),
        "csv": (CSV, ROWS.to_csv(index=False)),
        "parquet": (PARQUET, _parquet(ROWS)),
    }


def _rejected() -> dict[str, tuple[str, bytes | str]]:
    """Bodies `mlflow models serve` refuses with a JSON error: ours must give the same status and code."""
    records = ROWS.to_dict(orient="records")
    wrong_type = ROWS.astype({"sepal_length": object})
    wrong_type.loc[wrong_type.index[3], "sepal_length"] = "long"
    return {
        "malformed_json": (JSON, '{"dataframe_split": '),
        "json_list": (JSON, json.dumps(records)),
        "json_string": (JSON, '"sepal_length"'),
        "no_format_key": (JSON, json.dumps({"rows": records})),
        "two_format_keys": (JSON, json.dumps({**split_body(ROWS), "inputs": ROWS.to_dict(orient="list")})),
        "missing_column": (JSON, json.dumps(split_body(ROWS.drop(columns=["petal_width"])))),
        "wrong_type": (JSON, json.dumps(split_body(wrong_type))),
        "empty_body": (JSON, b""),
        "bad_parquet": (PARQUET, b"not parquet at all"),
    }


ACCEPTED = _accepted()
REJECTED = _rejected()

# Where ours answers differently from `mlflow models serve` on purpose (see test_compat_mlflow_serve):
# id -> (content type, body, our status, error code or None for a 200, words our message must hold).
OURS_ONLY: dict[str, tuple[str | None, bytes | str, int, str | None, str]] = {
    "no_content_type": (None, json.dumps(split_body(ROWS)), 415, "BAD_REQUEST", "Missing Content-Type"),
    "unsupported_content_type": ("application/xml", "<rows/>", 415, "BAD_REQUEST", "application/json"),
    "latin1_charset": (f"{JSON}; charset=latin-1", json.dumps(split_body(ROWS)), 415, "BAD_REQUEST", "UTF-8"),
    "unknown_content_type_parameter": (f"{JSON}; format=pandas-split", json.dumps(split_body(ROWS)), 415,
                                       "BAD_REQUEST", "format"),
    "deeply_nested_json": (JSON, '{"inputs": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "BAD_REQUEST",
                           "nested too deeply"),
    "bad_csv": (CSV, 'sepal_length,sepal_width\n1.0,"open quote\n', 400, "BAD_REQUEST", "CSV"),
    "csv_not_utf8": (CSV, b"\xff\xfe\x00\x01", 400, "BAD_REQUEST", "UTF-8"),
    "mixed_case_content_type": ("Application/JSON", json.dumps(split_body(ROWS)), 200, None, ""),
}


def post(client: TestClient, body: bytes | str | dict[str, Any], content_type: str | None = JSON,
         **headers: str) -> Any:
    if isinstance(body, dict):
        body = json.dumps(body)
    if content_type is not None:
        headers["content-type"] = content_type
    return client.post("/invocations", content=body, headers=headers)


@pytest.fixture(scope="module")
def mlflow_serve(classifier_path: Path) -> Iterator[TestClient]:
    """`mlflow models serve`'s own app over the same saved model, in process."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, raising=False)  # init() sets it: undone after
        app = scoring_server.init(mlflow.pyfunc.load_model(str(classifier_path)))
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client


@pytest.fixture
def served(serve: ServeFactory, classifier_slot: ModelSlot) -> Served:
    return serve(classifier_slot)


# -- the scoring protocol ---------------------------------------------------------------------


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_bodies_get_the_predictions_mlflow_serve_gives(case: str, served: Served, mlflow_serve: TestClient,
                                                               classifier_slot: ModelSlot) -> None:
    content_type, body = ACCEPTED[case]
    theirs = post(mlflow_serve, body, content_type)
    ours = post(served.client, body, content_type)
    assert theirs.status_code == 200, theirs.text[:300]
    assert ours.status_code == 200, ours.text[:300]
    assert ours.headers["content-type"].startswith(JSON)
    expected = classifier_slot.predict(ROWS.round() if case == "integers_in_double_columns" else ROWS).tolist()
    assert ours.json() == theirs.json() == {"predictions": expected}
    assert ours.headers["x-model-version"] == "1"


@pytest.mark.parametrize("case", list(REJECTED))
def test_rejected_bodies_get_mlflows_status_and_error_code(case: str, served: Served, mlflow_serve: TestClient) -> None:
    content_type, body = REJECTED[case]
    theirs = post(mlflow_serve, body, content_type)
    ours = post(served.client, body, content_type)
    assert 400 <= theirs.status_code < 500, theirs.text[:300]
    assert_error(ours, theirs.status_code, theirs.json()["error_code"])
    assert served.client.get("/health").status_code == 200


@pytest.mark.parametrize("case", list(OURS_ONLY))
def test_where_mlflow_serve_errs_ours_answers_clearly(case: str, served: Served, classifier_slot: ModelSlot) -> None:
    content_type, body, status, error_code, mentions = OURS_ONLY[case]
    response = post(served.client, body, content_type)
    if error_code is None:
        assert response.status_code == status, response.text[:300]
        assert response.json() == {"predictions": classifier_slot.predict(ROWS).tolist()}
    else:
        assert_error(response, status, error_code, mentions)


def test_error_messages_stay_short_and_never_echo_the_input(served: Served) -> None:
    features, _ = iris_data()
    many = features.sample(3000, replace=True, random_state=0)
    wrong_type = features.iloc[:2].astype({"sepal_width": object})
    wrong_type.loc[wrong_type.index[0], "sepal_width"] = "y" * 200_000
    cases = {
        # MLflow appends the whole body to JSON errors: none of it may come back.
        "malformed": ('{"dataframe_split": {"columns": ["' + "x" * 200_000, "BAD_REQUEST", "valid JSON", "x" * 50),
        # The bad value is quoted, cut to a snippet.
        "wrong_type": (json.dumps(split_body(wrong_type)), "BAD_REQUEST", "sepal_width", "y" * 400),
        # MLflow puts the reason (the missing column) after the input: it must survive the cut.
        "missing_column": (json.dumps(split_body(many.drop(columns=["petal_width"]))), "INVALID_PARAMETER_VALUE",
                           "missing inputs ['petal_width']", None),
    }
    for case, (body, error_code, mentions, never) in cases.items():
        assert len(body) > 20 * 2048, case  # far longer than an error may be
        error = assert_error(post(served.client, body), 400, error_code, mentions)
        assert len(error["message"]) < 600, (case, len(error["message"]))
        assert never is None or never not in error["message"], (case, error["message"])


def test_error_classification_matches_mlflow_models_serve(serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    """error_code, error_class and sqlstate as MLflow's own scoring server answers them."""
    client = serve(classifier_slot).client
    wrong_type = ROWS.iloc[:2].astype({"sepal_width": object})
    wrong_type.loc[wrong_type.index[0], "sepal_width"] = "wide"
    bodies = {
        "missing_column": json.dumps(split_body(ROWS.iloc[:2].drop(columns=["petal_width"]))),
        "wrong_type": json.dumps(split_body(wrong_type)),
        "malformed": '{"dataframe_split": ',
        "no_format_key": json.dumps({"rows": []}),
        "json_list": json.dumps([1, 2]),
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, raising=False)
        with TestClient(scoring_server.init(classifier_slot.model), raise_server_exceptions=False) as theirs:
            expected = {case: post(theirs, body) for case, body in bodies.items()}
    keys = ("error_code", "error_class", "sqlstate")
    for case, body in bodies.items():
        ours = post(client, body)
        assert ours.status_code == expected[case].status_code, (case, ours.text[:300])
        assert {k: ours.json().get(k) for k in keys} == {k: expected[case].json().get(k) for k in keys}, case
    missing = assert_error(post(client, bodies["missing_column"]), 400, "INVALID_PARAMETER_VALUE")
    assert (missing["error_class"], missing["sqlstate"]) == ("SCHEMA_ENFORCEMENT_FAILED", "KAM01")


def test_unknown_paths_and_methods_get_json_errors(served: Served) -> None:
    assert_error(served.client.get("/no/such/path"), 404, "ENDPOINT_NOT_FOUND")
    assert_error(served.client.post("/predict", json={}), 404, "ENDPOINT_NOT_FOUND")
    assert_error(served.client.get("/invocations"), 405, "BAD_REQUEST")


def test_params_reach_a_model_that_declares_them(serve: ServeFactory, controlled_slot: ModelSlot,
                                                 controlled_path: Path) -> None:
    client = serve(controlled_slot).client
    frame = id_frame([4, 5, 6])
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, raising=False)
        with TestClient(scoring_server.init(mlflow.pyfunc.load_model(str(controlled_path))),
                        raise_server_exceptions=False) as theirs:
            for params in ({"factor": 3}, {"factor": 7}, {}, {"unknown": 1}):
                body = split_body(frame, params=params)
                ours = post(client, body)
                assert ours.status_code == 200, ours.text[:300]
                assert ours.json() == post(theirs, body).json() == {
                    "predictions": [i * params.get("factor", 2) for i in (4, 5, 6)]}
            bad = split_body(frame, params={"factor": "many"})
            mlflow_error = post(theirs, bad).json()
    error = assert_error(post(client, bad), 400, mlflow_error["error_code"], "factor")
    assert error["error_code"] == "INVALID_PARAMETER_VALUE"


def test_a_failing_model_is_a_400_without_a_stack_trace(serve: ServeFactory, controlled_slot: ModelSlot) -> None:
    controlled(controlled_slot).poison = frozenset({13})
    client = serve(controlled_slot).client
    assert_error(post(client, split_body(id_frame([12, 13]))), 400, "BAD_REQUEST", "poisoned ids [13]")
    assert post(client, split_body(id_frame([12]))).json() == {"predictions": [24]}


def test_a_prediction_slower_than_timeout_s_is_a_504(serve: ServeFactory, controlled_slot: ModelSlot) -> None:
    model = controlled(controlled_slot)
    served = serve(controlled_slot, timeout_s=0.2)
    with gate_closed(model):
        assert_error(post(served.client, split_body(id_frame([1]))), 504, "DEADLINE_EXCEEDED", "timeout_s=0.2")
    assert post(served.client, split_body(id_frame([2]))).json() == {"predictions": [4]}
    assert [answer.status for answer in served.answers] == [504, 200]


def test_concurrent_requests_each_get_their_own_predictions(served: Served, classifier_slot: ModelSlot) -> None:
    features, _ = iris_data()
    threads, per_thread = 8, 12
    spans = [[(t * 17 + j) % 140 for j in range(per_thread)] for t in range(threads)]
    expected = classifier_slot.predict(features).tolist()
    barrier = threading.Barrier(threads)

    def client(starts: list[int]) -> list[tuple[int, Any]]:
        barrier.wait(timeout=10)
        return [(start, post(served.client, split_body(features.iloc[start:start + 3]))) for start in starts]

    with ThreadPoolExecutor(threads) as pool:
        results = [item for batch in pool.map(client, spans) for item in batch]
    for start, response in results:
        assert response.status_code == 200, response.text[:300]
        assert response.json() == {"predictions": expected[start:start + 3]}, start


# -- body size limit --------------------------------------------------------------------------


def test_a_body_of_exactly_max_body_bytes_is_accepted_one_more_byte_is_413(serve: ServeFactory,
                                                                         classifier_slot: ModelSlot) -> None:
    limit = 4096
    client = serve(classifier_slot, max_body_bytes=limit).client
    body = json.dumps(split_body(ROWS.iloc[:2]))
    padded = body + " " * (limit - len(body))
    assert len(padded) == limit
    assert post(client, padded).status_code == 200
    assert_error(post(client, padded + " "), 413, "REQUEST_LIMIT_EXCEEDED", f"({limit} bytes)")


def _streaming_receive(chunk: bytes, chunks: int, then: Message | None = None) -> tuple[Any, list[int]]:
    """An ASGI receive that sends ``chunks`` body chunks (then ``then``), counting what was read."""
    read = [0]

    async def receive() -> Message:
        read[0] += 1
        if read[0] > chunks:
            return then or {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    return receive, read


def test_a_declared_body_over_the_limit_is_413_before_any_byte_is_read(serve: ServeFactory,
                                                                     classifier_slot: ModelSlot) -> None:
    served = serve(classifier_slot)
    receive, read = _streaming_receive(b"x" * 65536, 1000)
    headers = [(b"content-type", JSON.encode()), (b"content-length", str(50 * 1024 * 1024).encode())]
    answer = asgi_call(served.app, headers=headers, receive=receive)
    assert answer is not None and answer.status == 413
    assert json.loads(answer.body)["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert read[0] == 0, f"{read[0]} body chunks read for a request refused by its Content-Length"


def test_a_streamed_body_over_the_limit_is_413_once_past_the_limit(serve: ServeFactory,
                                                                  classifier_slot: ModelSlot) -> None:
    limit, chunk = 1024 * 1024, 65536
    served = serve(classifier_slot, max_body_bytes=limit)
    receive, read = _streaming_receive(b"x" * chunk, 1000)  # 62.5 MiB offered, chunked (no Content-Length)
    answer = asgi_call(served.app, headers=[(b"content-type", JSON.encode())], receive=receive)
    assert answer is not None and answer.status == 413
    assert json.loads(answer.body)["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert read[0] == limit // chunk + 1, f"read {read[0]} chunks of {chunk} bytes for a {limit}-byte limit"


def test_an_invalid_content_length_is_a_400(serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    served = serve(classifier_slot)
    headers = [(b"content-type", JSON.encode()), (b"content-length", b"12abc")]
    answer = asgi_call(served.app, headers=headers)
    assert answer is not None and answer.status == 400
    assert "Invalid Content-Length" in json.loads(answer.body)["message"]


def test_a_client_leaving_mid_body_is_counted_as_499(serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    served = serve(classifier_slot)
    receive, _ = _streaming_receive(b'{"dataframe_split": ', 1, then={"type": "http.disconnect"})
    answer = asgi_call(served.app, headers=[(b"content-type", JSON.encode())], receive=receive)
    assert answer is not None and answer.status == 499
    text = served.client.get("/metrics").text
    assert metric(text, "mlflow_deploy_requests_total", model_version="1", status="499") == 1
    assert metric(text, "mlflow_deploy_in_flight_requests", deployment=DEPLOYMENT) == 0
    assert served.client.get("/health").status_code == 200


# -- auth ---------------------------------------------------------------------------------------


def test_with_a_token_only_ping_and_health_are_open(serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    expected = classifier_slot.predict(ROWS.iloc[:2]).tolist()
    client = serve(classifier_slot, auth_token=TOKEN).client
    body = split_body(ROWS.iloc[:2])
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}):
        response = post(client, body, **headers)
        assert_error(response, 401, "UNAUTHENTICATED")
        assert response.headers["www-authenticate"] == "Bearer"
    ok = post(client, body, authorization=f"Bearer {TOKEN}")
    assert ok.status_code == 200 and ok.json() == {"predictions": expected}
    for path in ("/version", "/deployment", "/metrics"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200, path
    assert client.get("/ping").status_code == 200
    assert client.get("/health").status_code == 200


def test_refused_requests_are_not_counted_as_answers(serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    served = serve(classifier_slot, auth_token=TOKEN)
    assert post(served.client, split_body(ROWS.iloc[:1])).status_code == 401
    assert served.answers == []
    text = served.client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"}).text
    assert metric(text, "mlflow_deploy_requests_total") is None


# -- health, version, metrics ------------------------------------------------------------------


def test_ping_health_and_version(serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    served = serve(classifier_slot, ready=False)
    client = served.client
    ping = client.get("/ping")
    assert (ping.status_code, ping.content, ping.headers["content-type"]) == (200, b"\n", JSON)
    assert_error(client.get("/health"), 503, "TEMPORARILY_UNAVAILABLE", "model not ready")
    served.state.ready = True
    assert client.get("/health").json() == {"status": "ok", "model_version": "1"}
    # /version: exactly `mlflow models serve`'s answer; /deployment: what is served.
    version = client.get("/version")
    assert (version.status_code, version.text, version.headers["content-type"]) == (200, mlflow.__version__, JSON)
    assert client.get("/deployment").json() == {
        "deployment": DEPLOYMENT, "model_name": "iris", "model_version": "1", "model_uri": "models:/iris/1",
        "requested_uri": "models:/iris@champion", "run_id": "run-1",
        "traffic": [{"model_name": "iris", "model_version": "1", "percent": 100.0}],
        "plugin_version": mlflow_deploy_plugin.__version__, "mlflow_version": mlflow.__version__,
    }


def test_metrics_count_requests_rows_latency_and_batches(served: Served) -> None:
    client = served.client
    for start in (0, 2, 4):
        assert post(client, split_body(ROWS.iloc[start:start + 2])).status_code == 200
    assert post(client, "{not json").status_code == 400
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    labels = {"deployment": DEPLOYMENT, "model_version": "1"}
    assert metric(text, "mlflow_deploy_requests_total", status="200", **labels) == 3
    assert metric(text, "mlflow_deploy_requests_total", status="400", **labels) == 1
    assert metric(text, "mlflow_deploy_rows_predicted_total", **labels) == 6
    assert metric(text, "mlflow_deploy_request_latency_seconds_count", **labels) == 4
    assert metric(text, "mlflow_deploy_request_latency_seconds_bucket", le="+Inf", **labels) == 4
    assert metric(text, "mlflow_deploy_request_latency_seconds_sum", **labels) > 0
    # The canary's p99 is judged on successful answers only: the 400 is not in this histogram.
    assert metric(text, "mlflow_deploy_success_latency_seconds_count", **labels) == 3
    assert metric(text, "mlflow_deploy_in_flight_requests", deployment=DEPLOYMENT) == 0
    assert metric(text, "mlflow_deploy_model_version_info", model_name="iris", model_uri="models:/iris/1",
                  **labels) == 1
    assert metric(text, "mlflow_deploy_predict_batch_rows_count", deployment=DEPLOYMENT) == 3
    assert metric(text, "mlflow_deploy_predict_batch_rows_sum", deployment=DEPLOYMENT) == 6


def test_each_app_counts_into_its_own_registry(serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    first, second = serve(classifier_slot), serve(classifier_slot)
    assert post(first.client, split_body(ROWS.iloc[:1])).status_code == 200
    assert metric(first.client.get("/metrics").text, "mlflow_deploy_requests_total", status="200") == 1
    assert metric(second.client.get("/metrics").text, "mlflow_deploy_requests_total") is None


def test_every_answer_reaches_on_answer_with_its_request_id(served: Served) -> None:
    client = served.client
    ok = post(client, split_body(ROWS.iloc[:3]), **{"x-request-id": "req-42"})
    bad = post(client, "{not json")
    assert ok.headers["x-request-id"] == "req-42"
    generated = bad.headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    first, second = served.answers
    assert (first.request_id, first.status, first.model_version) == ("req-42", 200, "1")
    pd.testing.assert_frame_equal(first.inputs.reset_index(drop=True), ROWS.iloc[:3].reset_index(drop=True))
    assert np.asarray(first.predictions).tolist() == ok.json()["predictions"]
    assert first.latency_ms > 0
    assert (second.request_id, second.status, second.predictions) == (generated, 400, None)


# -- draining -----------------------------------------------------------------------------------


def test_draining_tells_every_client_to_close_its_connection(served: Served) -> None:
    client, body = served.client, split_body(ROWS.iloc[:2])
    assert "connection" not in post(client, body).headers
    served.state.draining = True
    answered = post(client, body)
    assert answered.status_code == 200 and answered.headers["connection"] == "close"
    for path in ("/ping", "/version", "/deployment", "/metrics", "/no/such/path"):
        assert served.client.get(path).headers["connection"] == "close", path
    health = client.get("/health")
    assert_error(health, 503, "TEMPORARILY_UNAVAILABLE", "draining")
    assert health.headers["connection"] == "close"


def test_draining_closes_the_connections_of_refused_clients_too(serve: ServeFactory,
                                                                 classifier_slot: ModelSlot) -> None:
    """A keep-alive client with a bad token must not keep a draining worker waiting either."""
    served = serve(classifier_slot, auth_token=TOKEN)
    served.state.draining = True
    refused = post(served.client, split_body(ROWS.iloc[:1]))
    assert_error(refused, 401, "UNAUTHENTICATED")
    assert refused.headers["connection"] == "close"
    answered = post(served.client, split_body(ROWS.iloc[:1]), authorization=f"Bearer {TOKEN}")
    assert answered.status_code == 200 and answered.headers["connection"] == "close"


# -- traffic split ------------------------------------------------------------------------------


class Evenly(random.Random):
    """Draws 0, 1/n, 2/n, ..., (n-1)/n, then again: over n requests every share is hit exactly."""

    def __init__(self, n: int) -> None:
        super().__init__(0)
        self.n, self.i = n, 0

    def random(self) -> float:
        value, self.i = (self.i % self.n) / self.n, self.i + 1
        return value


def _disagreeing_row(first: ModelSlot, second: ModelSlot) -> tuple[pd.DataFrame, int, int]:
    features, _ = iris_data()
    one, two = first.predict(features), second.predict(features)
    index = int(np.flatnonzero(one != two)[0])
    return features.iloc[[index]], int(one[index]), int(two[index])


def test_traffic_split_follows_the_weights_exactly(serve: ServeFactory, classifier_slot: ModelSlot,
                                                   rotated_slot: ModelSlot) -> None:
    served = serve([(classifier_slot, 90.0), (rotated_slot, 10.0)], rng=Evenly(100))
    row, by_v1, by_v2 = _disagreeing_row(classifier_slot, rotated_slot)
    versions = []
    for _ in range(100):
        response = post(served.client, split_body(row))
        assert response.status_code == 200, response.text[:300]
        version = response.headers["x-model-version"]
        assert response.json() == {"predictions": [by_v1 if version == "1" else by_v2]}, version
        versions.append(version)
    # Draws below 0.9 go to version 1, the rest to version 2.
    assert versions == ["1"] * 90 + ["2"] * 10
    text = served.client.get("/metrics").text
    assert metric(text, "mlflow_deploy_requests_total", model_version="1", status="200") == 90
    assert metric(text, "mlflow_deploy_requests_total", model_version="2", status="200") == 10
    assert metric(text, "mlflow_deploy_model_version_info", model_version="2", model_uri="models:/iris/2") == 1
    info = served.client.get("/deployment").json()
    assert info["model_version"] == "1"  # the version with the most traffic
    assert info["traffic"] == [{"model_name": "iris", "model_version": "1", "percent": 90.0},
                               {"model_name": "iris", "model_version": "2", "percent": 10.0}]


def test_traffic_split_with_the_default_random_draw_is_within_4_sigma(serve: ServeFactory, classifier_slot: ModelSlot,
                                                                      rotated_slot: ModelSlot) -> None:
    served = serve([(classifier_slot, 70.0), (rotated_slot, 30.0)])
    requests, share = 300, 0.3
    body = split_body(ROWS.iloc[:1])
    to_v2 = sum(post(served.client, body).headers["x-model-version"] == "2" for _ in range(requests))
    sigma = math.sqrt(requests * share * (1 - share))
    assert abs(to_v2 - requests * share) <= 4 * sigma, f"{to_v2} of {requests} to version 2, expected ~{share:.0%}"


@pytest.mark.parametrize(("weights", "served_version"), [((100.0, 0.0), "1"), ((0.0, 100.0), "2")])
def test_a_version_at_zero_percent_gets_no_traffic_but_can_be_asked_for(
        serve: ServeFactory, classifier_slot: ModelSlot, rotated_slot: ModelSlot, weights: tuple[float, float],
        served_version: str) -> None:
    served = serve([(classifier_slot, weights[0]), (rotated_slot, weights[1])], rng=Evenly(20))
    body = split_body(ROWS.iloc[:1])
    assert {post(served.client, body).headers["x-model-version"] for _ in range(20)} == {served_version}
    other = "2" if served_version == "1" else "1"
    assert post(served.client, body, **{"x-model-version": other}).headers["x-model-version"] == other
    assert served.client.get("/health").json()["model_version"] == served_version


def test_x_model_version_pins_a_served_version_and_refuses_others(serve: ServeFactory, classifier_slot: ModelSlot,
                                                                  rotated_slot: ModelSlot) -> None:
    served = serve([(classifier_slot, 50.0), (rotated_slot, 50.0)], rng=Evenly(2))
    row, by_v1, by_v2 = _disagreeing_row(classifier_slot, rotated_slot)
    for version, expected in (("2", by_v2), ("1", by_v1), ("2", by_v2)):
        response = post(served.client, split_body(row), **{"x-model-version": version})
        assert response.headers["x-model-version"] == version
        assert response.json() == {"predictions": [expected]}
    assert_error(post(served.client, split_body(row), **{"x-model-version": "3"}), 400,
                 "INVALID_PARAMETER_VALUE", "served: 1, 2")


@pytest.mark.parametrize("weights", [[], [-1.0, 101.0], [0.0, 0.0]])
def test_build_app_refuses_no_slot_or_bad_weights(classifier_slot: ModelSlot, rotated_slot: ModelSlot,
                                                  weights: list[float]) -> None:
    slots = list(zip([classifier_slot, rotated_slot], weights, strict=False))
    with pytest.raises(ValueError, match="positive weights"):
        build_app(AppSettings(DEPLOYMENT, 1024, 1.0), slots)
