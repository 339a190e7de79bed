"""Side by side with the real `mlflow models serve`: the same requests to it and to our deployment.

Existing clients must switch without change, so statuses, predictions and error codes must match.
Where we deliberately answer differently, the difference is listed in KNOWN_DIFFERENCES with the
reason, and asserted exactly (both sides), so a change on either side shows up here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import requests
from conftest import Env, Registry, free_port, split_payload
from train import load_data

JSON = "application/json"
CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
MAX_ERROR_BODY = 2048


@dataclass(frozen=True)
class Case:
    content_type: str | None
    body: bytes | str | None = None
    method: str = "POST"
    path: str = "/invocations"


ROWS = load_data()[0].iloc[200:210]  # both classes


def _cases() -> dict[str, Case]:
    rows = ROWS
    split = json.dumps(split_payload(rows))
    records = rows.to_dict(orient="records")
    wrong_type = rows.astype({"worst_radius": object})
    wrong_type.loc[wrong_type.index[3], "worst_radius"] = "large"
    parquet = io.BytesIO()
    rows.to_parquet(parquet, index=False)
    return {
        # Accepted inputs: same 200 and the same predictions.
        "dataframe_split": Case(JSON, split),
        "dataframe_records": Case(JSON, json.dumps({"dataframe_records": records})),
        "records_with_extra_column": Case(JSON, json.dumps({"dataframe_records": [
            {**record, "patient_id": index} for index, record in enumerate(records)]})),
        "instances": Case(JSON, json.dumps({"instances": records})),
        "inputs": Case(JSON, json.dumps({"inputs": rows.to_dict(orient="list")})),
        "split_with_params": Case(JSON, json.dumps({**split_payload(rows), "params": {"top_k": 3}})),
        "split_with_index": Case(JSON, json.dumps({"dataframe_split": json.loads(rows.to_json(orient="split"))})),
        "utf8_charset": Case(f"{JSON}; charset=UTF-8", split),
        "csv": Case(CSV, rows.to_csv(index=False)),
        "parquet": Case(PARQUET, parquet.getvalue()),
        # Rejected inputs: same status and error_code.
        "malformed_json": Case(JSON, '{"dataframe_split": '),
        "json_list": Case(JSON, json.dumps(records)),
        "no_format_key": Case(JSON, json.dumps({"rows": records})),
        "missing_column": Case(JSON, json.dumps(split_payload(rows.drop(columns=["mean_area"])))),
        "wrong_type": Case(JSON, json.dumps(split_payload(wrong_type))),
        "empty_body": Case(JSON, b""),
        "bad_csv": Case(CSV, 'mean_radius,mean_area\n1.0,"open quote\n'),
        "bad_parquet": Case(PARQUET, b"not parquet at all"),
        "unsupported_content_type": Case("application/xml", "<rows/>"),
        "no_content_type": Case(None, split),
        "latin1_charset": Case(f"{JSON}; charset=latin-1", split),
        "mixed_case_content_type": Case("Application/JSON", split),
        "deeply_nested_json": Case(JSON, '{"inputs": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        "huge_malformed_json": Case(JSON, '{"dataframe_split": {"columns": ["' + "z" * 900_000),
        "unknown_path": Case(None, method="GET", path="/no/such/path"),
        "get_invocations": Case(None, method="GET"),
        # The other routes.
        "ping": Case(None, method="GET", path="/ping"),
        "health": Case(None, method="GET", path="/health"),
        "version": Case(None, method="GET", path="/version"),
    }


CASES = _cases()


@dataclass(frozen=True)
class Expect:
    """What one side answers: status, media type, and optionally the error code or a body check."""

    status: int
    media_type: str
    error_code: str | None = None
    contains: str | None = None
    min_bytes: int = 0
    max_bytes: int | None = None


@dataclass(frozen=True)
class Difference:
    reason: str
    theirs: Expect
    ours: Expect


_OUR_ERROR = {"max_bytes": MAX_ERROR_BODY}

KNOWN_DIFFERENCES: dict[str, Difference] = {
    "no_content_type": Difference(
        "MLflow calls .split() on the missing header and crashes (500, plain text); we say what is missing.",
        theirs=Expect(500, "text/plain", contains="Internal Server Error"),
        ours=Expect(415, JSON, error_code="BAD_REQUEST", contains="Missing Content-Type", **_OUR_ERROR)),
    "deeply_nested_json": Difference(
        "json.loads raises RecursionError, which MLflow does not catch (500); it is the client's bad input.",
        theirs=Expect(500, "text/plain", contains="Internal Server Error"),
        ours=Expect(400, JSON, error_code="BAD_REQUEST", contains="nested too deeply", **_OUR_ERROR)),
    "mixed_case_content_type": Difference(
        "Media types are case-insensitive (RFC 9110 8.3.1); MLflow compares them case-sensitively.",
        theirs=Expect(415, "text/plain", contains="Application/JSON"),
        ours=Expect(200, JSON, contains='"predictions"')),
    "unsupported_content_type": Difference(
        "MLflow answers its 415s as text/plain; ours are JSON errors like every other error.",
        theirs=Expect(415, "text/plain", contains="application/xml"),
        ours=Expect(415, JSON, error_code="BAD_REQUEST", contains="application/xml", **_OUR_ERROR)),
    "latin1_charset": Difference(
        "Same 415, but MLflow answers it as text/plain; ours is a JSON error.",
        theirs=Expect(415, "text/plain", contains="UTF-8"),
        ours=Expect(415, JSON, error_code="BAD_REQUEST", contains="UTF-8", **_OUR_ERROR)),
    "huge_malformed_json": Difference(
        "MLflow echoes the whole request back in the error; ours cuts the message to a snippet.",
        theirs=Expect(400, JSON, error_code="BAD_REQUEST", min_bytes=900_000),
        ours=Expect(400, JSON, error_code="BAD_REQUEST", contains="valid JSON", **_OUR_ERROR)),
    "bad_csv": Difference(
        "MLflow puts the Python stack trace in the error body; ours never does.",
        theirs=Expect(400, JSON, error_code="BAD_REQUEST", contains="Traceback"),
        ours=Expect(400, JSON, error_code="BAD_REQUEST", contains="CSV", **_OUR_ERROR)),
    "unknown_path": Difference(
        "Same 404; MLflow answers FastAPI's {'detail': ...}, ours is the scoring error shape.",
        theirs=Expect(404, JSON, contains='"detail"'),
        ours=Expect(404, JSON, error_code="ENDPOINT_NOT_FOUND", **_OUR_ERROR)),
    "get_invocations": Difference(
        "Same 405; MLflow answers FastAPI's {'detail': ...}, ours is the scoring error shape.",
        theirs=Expect(405, JSON, contains='"detail"'),
        ours=Expect(405, JSON, error_code="BAD_REQUEST", **_OUR_ERROR)),
    "health": Difference(
        "MLflow's /health is /ping (a newline); ours says which model version is live.",
        theirs=Expect(200, JSON),
        ours=Expect(200, JSON, contains='"model_version": "1"')),
}


def _bin_dir() -> Path:
    return Path(sys.executable).parent


@pytest.fixture(scope="module")
def mlflow_serve(env: Env, registry: Registry) -> Iterator[str]:
    """The real `mlflow models serve` of the same model version, on its own port."""
    port = free_port()
    log_path = env.root / f"mlflow-models-serve-{port}.log"
    # `mlflow models serve` execs `uvicorn` from PATH: put the venv's bin first.
    environ = env.environ(PATH=f"{_bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(_bin_dir() / "mlflow"), "models", "serve", "-m", f"models:/{registry.model}/1",
             "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
            env=environ, cwd=env.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow models serve exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow models serve not up after 90s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the serve CLI and the uvicorn it started (its whole process group)."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # uvicorn (the leader's child) may outlive it
        os.killpg(proc.pid, signal.SIGKILL)


def _send(url: str, case: Case) -> requests.Response:
    headers = {"Content-Type": case.content_type} if case.content_type else {}
    return requests.request(case.method, f"{url}{case.path}", data=case.body, headers=headers, timeout=60)


def _check(side: str, response: requests.Response, expect: Expect) -> None:
    where = f"{side}: {response.status_code} {response.text[:300]!r}"
    assert response.status_code == expect.status, where
    assert response.headers.get("content-type", "").startswith(expect.media_type), (
        side, response.headers.get("content-type"))
    if expect.error_code is not None:
        assert response.json()["error_code"] == expect.error_code, where
    if expect.contains is not None:
        assert expect.contains in response.text, where
    assert len(response.content) >= expect.min_bytes, (side, len(response.content))
    if expect.max_bytes is not None:
        assert len(response.content) <= expect.max_bytes, (side, len(response.content))


def _check_our_error_shape(response: requests.Response) -> None:
    """Every error of ours: short JSON {"error_code", "message"[, "sqlstate", "error_class"]}, no stack trace."""
    body = response.json()
    assert set(body) - {"sqlstate", "error_class"} == {"error_code", "message"}, body
    assert len(response.content) < MAX_ERROR_BODY and "Traceback" not in response.text


@pytest.fixture(scope="module")
def expected_predictions(registry: Registry) -> list:
    return mlflow.pyfunc.load_model(f"models:/{registry.model}/1").predict(ROWS).tolist()


def test_known_differences_name_real_cases() -> None:
    assert set(KNOWN_DIFFERENCES) <= set(CASES)


@pytest.mark.parametrize("case_id", list(CASES))
def test_same_request_same_answer(case_id: str, mlflow_serve: str, shared_deployment: dict,
                                  expected_predictions: list) -> None:
    case = CASES[case_id]
    theirs = _send(mlflow_serve, case)
    ours = _send(shared_deployment["url"], case)
    if ours.status_code >= 400:
        _check_our_error_shape(ours)
    if case_id in KNOWN_DIFFERENCES:
        difference = KNOWN_DIFFERENCES[case_id]
        _check("mlflow models serve", theirs, difference.theirs)
        _check("ours", ours, difference.ours)
        if difference.theirs.error_code is not None and difference.ours.error_code is not None:
            classification = ("error_class", "sqlstate")  # same classification even where the text differs
            assert ({key: ours.json().get(key) for key in classification}
                    == {key: theirs.json().get(key) for key in classification}), (theirs.text[:300], ours.text[:300])
        return

    assert ours.status_code == theirs.status_code, (
        f"status differs: theirs {theirs.status_code} {theirs.text[:300]!r}, ours {ours.status_code} "
        f"{ours.text[:300]!r}")
    if case.path != "/invocations":
        assert ours.content == theirs.content
    elif theirs.status_code == 200:
        assert ours.json() == theirs.json()
        assert ours.json() == {"predictions": expected_predictions}
    else:
        assert theirs.headers["content-type"].startswith(JSON), theirs.headers["content-type"]
        classification = ("error_code", "error_class", "sqlstate")
        assert ({key: ours.json().get(key) for key in classification}
                == {key: theirs.json().get(key) for key in classification}), (theirs.text[:300], ours.text[:300])
