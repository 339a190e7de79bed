"""The HTTP service of a running deployment, over real sockets: the MLflow scoring protocol in every
input format, clear and short errors, the body limit, metrics, and correct answers under concurrency.

Uses the session's ``shared_deployment`` (``models:/<model>/1`` with ``-C max_body_mb=1``) read-only.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from conftest import Env, Registry, post_json, split_payload, wait_for
from prometheus_client.parser import text_string_to_metric_families
from train import load_data

import mlflow_deploy_plugin

JSON = "application/json"
CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
MAX_BODY = 1024 * 1024  # the shared deployment runs with -C max_body_mb=1
MAX_ERROR_BODY = 2048


@pytest.fixture(scope="module")
def url(shared_deployment: dict) -> str:
    return shared_deployment["url"]


@pytest.fixture(scope="module")
def reference(registry: Registry) -> mlflow.pyfunc.PyFuncModel:
    """The same model version loaded in-process: what every answer must equal."""
    return mlflow.pyfunc.load_model(f"models:/{registry.model}/1")


def post(url: str, body: bytes | str | None, content_type: str | None, **kwargs) -> requests.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return requests.post(f"{url}/invocations", data=body, headers=headers, timeout=30, **kwargs)


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def assert_still_healthy(url: str) -> None:
    health = requests.get(f"{url}/health", timeout=10)
    assert health.status_code == 200, f"service unhealthy after a bad request: {health.text}"


def assert_error(response: requests.Response, status: int, error_code: str | None = None) -> dict:
    """A clear, short JSON error: ``{"error_code", "message"}``, no stack trace, no echo of the input."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text[:500]}"
    assert response.headers["content-type"].startswith(JSON), response.headers["content-type"]
    assert len(response.content) < MAX_ERROR_BODY, f"error body of {len(response.content)} bytes"
    assert "Traceback" not in response.text
    body = response.json()
    assert set(body) - {"sqlstate", "error_class"} == {"error_code", "message"}, body
    assert body["message"].strip(), body
    if error_code is not None:
        assert body["error_code"] == error_code, body
    return body


def sample(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples called ``name`` whose labels include ``labels``; None if there is none."""
    values = [s.value for family in text_string_to_metric_families(text) for s in family.samples
              if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(values) if values else None


def worker_rss_kb(env: Env, name: str) -> int:
    total = 0
    for pid in env.status(name)["worker_pids"]:
        with open(f"/proc/{pid}/status") as status:
            total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return total


def raw_first_response(url: str, data: bytes, timeout_s: float = 10) -> bytes:
    """Send ``data`` on a raw socket, never finishing the body, and return the first response."""
    parsed = urlparse(url)
    received = b""
    with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s) as sock:
        sock.sendall(data)
        while True:  # a socket timeout fails the test: no answer while the body is unfinished
            head, _, body = received.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                return received
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without a complete response: {received[:200]!r}"
            received += chunk


# -- health, version, metrics -----------------------------------------------------------------


def test_ping_health_and_version(url: str, shared_deployment: dict, registry: Registry) -> None:
    assert requests.get(f"{url}/ping", timeout=10).status_code == 200

    health = requests.get(f"{url}/health", timeout=10)
    assert health.status_code == 200
    assert health.headers["content-type"].startswith(JSON)
    assert health.json()["model_version"] == "1"

    version = requests.get(f"{url}/version", timeout=10)
    assert (version.status_code, version.text) == (200, mlflow.__version__)  # as `mlflow models serve`
    deployment = requests.get(f"{url}/deployment", timeout=10)
    assert deployment.status_code == 200
    info = deployment.json()
    run_id = mlflow.MlflowClient().get_model_version(registry.model, "1").run_id
    assert info["deployment"] == shared_deployment["name"]
    assert info["model_name"] == registry.model
    assert info["model_version"] == "1"
    assert info["model_uri"] == f"models:/{registry.model}/1"
    assert info["run_id"] == run_id
    assert info["plugin_version"] == mlflow_deploy_plugin.__version__
    assert info["mlflow_version"] == mlflow.__version__


def test_metrics_count_requests_rows_latency_and_version(url: str, shared_deployment: dict,
                                                         registry: Registry) -> None:
    name = shared_deployment["name"]
    before = requests.get(f"{url}/metrics", timeout=10).text
    for start in (0, 2, 4):
        assert post_json(url, split_payload(registry.features.iloc[start:start + 2])).status_code == 200
    assert post_json(url, "{not json").status_code == 400
    response = requests.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text

    def moved(sample_name: str, **labels: str) -> float:
        now = sample(after, sample_name, deployment=name, **labels)
        assert now is not None, f"{sample_name}{labels} missing from /metrics:\n{after}"
        return now - (sample(before, sample_name, deployment=name, **labels) or 0.0)

    assert moved("mlflow_deploy_requests_total", model_version="1", status="200") == 3
    assert moved("mlflow_deploy_requests_total", model_version="1", status="400") == 1
    assert moved("mlflow_deploy_rows_predicted_total", model_version="1") == 6
    assert moved("mlflow_deploy_request_latency_seconds_count", model_version="1") == 4
    assert moved("mlflow_deploy_request_latency_seconds_sum", model_version="1") > 0
    assert moved("mlflow_deploy_request_latency_seconds_bucket", model_version="1", le="+Inf") == 4
    assert sample(after, "mlflow_deploy_in_flight_requests", deployment=name) == 0
    assert sample(after, "mlflow_deploy_model_version_info", deployment=name, model_name=registry.model,
                  model_version="1", model_uri=f"models:/{registry.model}/1") == 1


# -- every input format -----------------------------------------------------------------------

FORMATS: dict[str, Callable[[pd.DataFrame], tuple[str, bytes | str]]] = {
    "dataframe_split": lambda rows: (JSON, json.dumps(split_payload(rows))),
    "dataframe_records": lambda rows: (JSON, json.dumps({"dataframe_records": rows.to_dict(orient="records")})),
    "instances": lambda rows: (JSON, json.dumps({"instances": rows.to_dict(orient="records")})),
    "inputs_columns": lambda rows: (JSON, json.dumps({"inputs": rows.to_dict(orient="list")})),
    "inputs_records": lambda rows: (JSON, json.dumps({"inputs": rows.to_dict(orient="records")})),
    "split_with_params": lambda rows: (JSON, json.dumps({**split_payload(rows), "params": {"threshold": 0.3}})),
    "csv": lambda rows: (CSV, rows.to_csv(index=False)),
    "csv_utf8_charset": lambda rows: (f"{CSV}; charset=utf-8", rows.to_csv(index=False)),
    "parquet": lambda rows: (PARQUET, parquet_bytes(rows)),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_gives_the_same_predictions(url: str, registry: Registry, reference, fmt: str) -> None:
    rows = registry.features.iloc[100:140]
    expected = reference.predict(rows).tolist()
    assert len(set(expected)) == 2, "pick rows of both classes so a wrong answer shows"
    content_type, body = FORMATS[fmt](rows)
    response = post(url, body, content_type)
    assert response.status_code == 200, response.text[:500]
    assert response.json() == {"predictions": expected}
    assert response.headers["x-model-version"] == "1"


# -- bad input: clear 4xx, service stays up ---------------------------------------------------


def _bad_cases() -> dict[str, tuple[str | None, bytes | str, int, str, str]]:
    """id -> (content type, body, status, error code, words the message must contain)."""
    rows = load_data()[0].iloc[:3]
    wrong_type = rows.astype({"mean_radius": object})
    wrong_type.loc[wrong_type.index[1], "mean_radius"] = "not-a-number"
    split = json.dumps(split_payload(rows))
    return {
        "malformed_json": (JSON, '{"dataframe_split": {"columns": [', 400, "BAD_REQUEST", "valid JSON"),
        "json_list": (JSON, json.dumps(rows.to_dict(orient="records")), 400, "BAD_REQUEST", "Received a list"),
        "json_string": (JSON, '"mean_radius"', 400, "BAD_REQUEST", "JSON dictionary"),
        "no_format_key": (JSON, json.dumps({"data": rows.values.tolist()}), 400, "BAD_REQUEST", "dataframe_split"),
        "two_format_keys": (JSON, json.dumps({**split_payload(rows), "inputs": rows.to_dict(orient="list")}),
                            400, "BAD_REQUEST", "exactly one"),
        "missing_column": (JSON, json.dumps(split_payload(rows.drop(columns=["mean_radius"]))), 400,
                           "INVALID_PARAMETER_VALUE", "missing inputs ['mean_radius']"),
        "wrong_type": (JSON, json.dumps(split_payload(wrong_type)), 400, "BAD_REQUEST",
                       "column mean_radius to type 'float64'"),
        "empty_json_body": (JSON, b"", 400, "BAD_REQUEST", "Empty request body"),
        "empty_csv_body": (CSV, b"", 400, "BAD_REQUEST", "Empty request body"),
        "bad_csv": (CSV, 'mean_radius,mean_texture\n1.0,"unterminated\n', 400, "BAD_REQUEST", "CSV"),
        "csv_not_utf8": (CSV, b"\xff\xfe\x00\x01", 400, "BAD_REQUEST", "UTF-8"),
        "bad_parquet": (PARQUET, b"PAR1 definitely not parquet", 400, "BAD_REQUEST", "Parquet"),
        "deeply_nested_json": (JSON, '{"inputs": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "BAD_REQUEST",
                               "nested too deeply"),
        "unsupported_content_type": ("application/xml", "<rows/>", 415, "BAD_REQUEST", "application/json"),
        "no_content_type": (None, split, 415, "BAD_REQUEST", "Missing Content-Type"),
        "not_utf8_charset": (f"{JSON}; charset=latin-1", split, 415, "BAD_REQUEST", "UTF-8"),
        "unknown_content_type_parameter": (f"{JSON}; format=pandas-split", split, 415, "BAD_REQUEST", "format"),
    }


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_gets_a_clear_4xx(url: str, case: str) -> None:
    content_type, body, status, error_code, must_mention = BAD_CASES[case]
    response = post(url, body, content_type)
    error = assert_error(response, status, error_code)
    assert response.headers["x-model-version"] == "1"  # errors too say which version answered
    assert must_mention in error["message"], error["message"]
    assert_still_healthy(url)


def test_unknown_path_and_wrong_method_are_json(url: str) -> None:
    assert_error(requests.get(f"{url}/no/such/path", timeout=10), 404, "ENDPOINT_NOT_FOUND")
    assert_error(requests.post(f"{url}/predict", json={}, timeout=10), 404, "ENDPOINT_NOT_FOUND")
    assert_error(requests.get(f"{url}/invocations", timeout=10), 405)
    assert_still_healthy(url)


def test_error_bodies_stay_short_for_large_bad_requests(url: str, registry: Registry) -> None:
    malformed = '{"dataframe_split": {"columns": ["' + "x" * 900_000  # ~900 KB, never closed
    wrong_type = registry.features.iloc[:2].astype({"mean_radius": object})
    wrong_type.loc[wrong_type.index[0], "mean_radius"] = "y" * 900_000
    many_rows = registry.features.sample(2500, replace=True, random_state=0).drop(columns=["worst_area"])
    cases = {
        "malformed": (malformed, "BAD_REQUEST", "valid JSON"),
        "wrong_type": (json.dumps(split_payload(wrong_type)), "BAD_REQUEST", "mean_radius"),
        # The reason (the missing column) comes last in MLflow's message: it must survive the cut.
        "missing_column": (json.dumps(split_payload(many_rows)), "INVALID_PARAMETER_VALUE",
                           "missing inputs ['worst_area']"),
    }
    for case, (body, error_code, must_mention) in cases.items():
        assert 500_000 < len(body) < MAX_BODY, (case, len(body))
        error = assert_error(post(url, body, JSON), 400, error_code)
        assert must_mention in error["message"], (case, error["message"])
        assert "x" * 600 not in error["message"] and "y" * 600 not in error["message"], case
    assert_still_healthy(url)


# -- body size limit --------------------------------------------------------------------------


def test_body_over_the_limit_with_content_length_is_413(url: str) -> None:
    response = post(url, b"{" + b" " * MAX_BODY + b"}", JSON)
    assert_error(response, 413, "REQUEST_LIMIT_EXCEEDED")
    # The declared size alone is enough: the answer comes before a single body byte is sent.
    head = (f"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Type: {JSON}\r\n"
            f"Content-Length: {50 * MAX_BODY}\r\n\r\n").encode()
    first = raw_first_response(url, head)
    assert first.startswith(b"HTTP/1.1 413 "), first[:200]
    assert b"REQUEST_LIMIT_EXCEEDED" in first
    assert_still_healthy(url)


def test_chunked_body_over_the_limit_is_413_without_buffering_it(url: str, env: Env,
                                                                  shared_deployment: dict) -> None:
    # Raw chunked body of 2 MB that never ends: the 413 must come while the body is still open.
    chunk = b"x" * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(32))
    head = (f"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Type: {JSON}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    first = raw_first_response(url, head + chunks)
    assert first.startswith(b"HTTP/1.1 413 "), first[:200]

    # 50 MB streamed by requests (a generator is sent chunked, no Content-Length).
    rss_before = worker_rss_kb(env, shared_deployment["name"])
    sent = [0]

    def fifty_megabytes():
        for _ in range(800):
            sent[0] += len(chunk)
            yield chunk

    started = time.monotonic()
    response = post(url, fifty_megabytes(), JSON)
    elapsed = time.monotonic() - started
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert_error(response, 413, "REQUEST_LIMIT_EXCEEDED")
    assert elapsed < 15, f"413 took {elapsed:.1f}s"
    grown_mb = (worker_rss_kb(env, shared_deployment["name"]) - rss_before) / 1024
    assert grown_mb < 20, f"worker RSS grew by {grown_mb:.0f} MB for a refused {sent[0] >> 20} MB body"
    assert_still_healthy(url)


def test_client_disconnecting_mid_body_is_counted_not_crashed(url: str, shared_deployment: dict) -> None:
    def client_closed() -> float:
        text = requests.get(f"{url}/metrics", timeout=10).text
        return sample(text, "mlflow_deploy_requests_total", deployment=shared_deployment["name"],
                      status="499") or 0.0

    before = client_closed()
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
        sock.sendall(f"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Type: {JSON}\r\n"
                     "Content-Length: 1000\r\n\r\n{\"dataframe_split\":".encode())
    wait_for(lambda: client_closed() == before + 1, 10, "the aborted request to be counted as 499")
    assert_still_healthy(url)


# -- concurrency: coalesced requests each get their own rows' predictions ----------------------


def _distinct_rows(features: pd.DataFrame, count: int) -> pd.DataFrame:
    picks = np.arange(count)
    frame = features.iloc[picks % len(features)].reset_index(drop=True)
    frame = frame.mul(1 + 0.001 * (picks // len(features)), axis=0)  # later laps differ slightly
    assert not frame.duplicated().any()
    return frame


def _hammer(url: str, bodies: list[list[str]]) -> list[list[requests.Response]]:
    """One thread per list of bodies, all starting together, each on its own keep-alive session."""
    barrier = threading.Barrier(len(bodies))

    def client(thread: int) -> list[requests.Response]:
        with requests.Session() as session:
            barrier.wait(timeout=30)
            return [session.post(f"{url}/invocations", data=body, timeout=30,
                                 headers={"Content-Type": JSON, "X-Request-Id": f"req-{thread}-{index}"})
                    for index, body in enumerate(bodies[thread])]

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(client, range(len(bodies))))


def _predict_calls(url: str, deployment: str) -> tuple[float, float]:
    """(model predict calls, rows they were given) so far, from the service's own /metrics."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    calls = sample(text, "mlflow_deploy_predict_batch_rows_count", deployment=deployment)
    rows = sample(text, "mlflow_deploy_predict_batch_rows_sum", deployment=deployment)
    assert calls is not None and rows is not None, "mlflow_deploy_predict_batch_rows missing from /metrics"
    return calls, rows


def test_concurrent_single_row_requests_each_get_their_own_prediction(url: str, registry: Registry, reference,
                                                                       shared_deployment: dict) -> None:
    threads, per_thread = 32, 20
    frame = _distinct_rows(registry.features, threads * per_thread)
    expected = reference.predict(frame).tolist()
    bodies = [[json.dumps(split_payload(frame.iloc[[t * per_thread + j]])) for j in range(per_thread)]
              for t in range(threads)]
    calls_before, rows_before = _predict_calls(url, shared_deployment["name"])
    answers = _hammer(url, bodies)
    calls, rows = (now - before for now, before in zip(_predict_calls(url, shared_deployment["name"]),
                                                        (calls_before, rows_before), strict=True))
    wrong = []
    for t, responses in enumerate(answers):
        for j, response in enumerate(responses):
            row = t * per_thread + j
            assert response.status_code == 200, response.text[:300]
            assert response.headers["x-request-id"] == f"req-{t}-{j}"
            if response.json() != {"predictions": [expected[row]]}:
                wrong.append((row, response.json(), expected[row]))
    assert not wrong, f"{len(wrong)} of {threads * per_thread} answers were another row's: {wrong[:5]}"
    # Coalesced: fewer model calls than requests, and every row predicted exactly once.
    assert rows == threads * per_thread, rows
    assert calls < threads * per_thread, f"{calls:.0f} predict calls for {threads * per_thread} requests"
    print(f"\n{threads * per_thread} concurrent single-row requests -> {calls:.0f} predict calls")


def test_concurrent_requests_of_different_sizes_are_split_back_correctly(url: str, registry: Registry,
                                                                          reference) -> None:
    threads, per_thread = 16, 10
    frame = _distinct_rows(registry.features, 1000)
    expected = reference.predict(frame).tolist()
    rng = np.random.default_rng(7)
    plan, bodies, start = [], [], 0
    for _ in range(threads):
        mine, spans = [], []
        for _ in range(per_thread):
            size = int(rng.integers(1, 6))
            spans.append((start, start + size))
            mine.append(json.dumps(split_payload(frame.iloc[start:start + size])))
            start += size
        plan.append(spans)
        bodies.append(mine)
    for spans, responses in zip(plan, _hammer(url, bodies), strict=True):
        for (first, last), response in zip(spans, responses, strict=True):
            assert response.status_code == 200, response.text[:300]
            assert response.json() == {"predictions": expected[first:last]}, (first, last)


def test_a_bad_request_never_fails_the_requests_it_was_batched_with(url: str, registry: Registry, reference,
                                                                   shared_deployment: dict) -> None:
    threads, per_thread = 16, 10
    frame = _distinct_rows(registry.features, 1000)
    expected = reference.predict(frame).tolist()
    rng = np.random.default_rng(11)
    plan, bodies, start = [], [], 0
    for t in range(threads):
        mine, spans = [], []
        for j in range(per_thread):
            size = int(rng.integers(1, 4))
            rows = frame.iloc[start:start + size].copy()
            bad = (t + j) % 4 == 0  # every 4th request holds a row the model cannot predict
            if bad:
                rows.iloc[-1, 0] = np.nan  # passes the schema (a double), makes LogisticRegression raise
            spans.append((start, start + size, bad))
            mine.append(json.dumps(split_payload(rows)))
            start += size
        plan.append(spans)
        bodies.append(mine)
    calls_before, rows_before = _predict_calls(url, shared_deployment["name"])
    answers = _hammer(url, bodies)
    _, rows_predicted = (now - before for now, before in zip(_predict_calls(url, shared_deployment["name"]),
                                                              (calls_before, rows_before), strict=True))
    for spans, responses in zip(plan, answers, strict=True):
        for (first, last, bad), response in zip(spans, responses, strict=True):
            if bad:
                assert "NaN" in assert_error(response, 400, "BAD_REQUEST")["message"]
            else:
                assert response.status_code == 200, response.text[:300]
                assert response.json() == {"predictions": expected[first:last]}, (first, last)
    # Some bad request shared a predict call with others: that call failed and its requests were
    # predicted again one by one (so more rows went through the model than were sent).
    assert rows_predicted > start, "no bad request was ever batched with others: the test proved nothing"
    assert_still_healthy(url)
