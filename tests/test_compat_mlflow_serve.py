"""Side by side with the real `mlflow models serve`: the same requests to it and to our deployment.

Existing clients must switch without change, so statuses, predictions and error codes must match.
Where we deliberately answer differently, the difference is listed in KNOWN_DIFFERENCES with the
reason, and asserted exactly (both sides), so a change on either side shows up here.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from conftest import Env, Registry, free_port, split_payload
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec
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


# Bound for a server to come up: seconds when idle, but the kinds' servers start together on two busy cores.
START_S = 240


def _start_serve(env: Env, model_uri: str) -> tuple[subprocess.Popen, str, Path]:
    """Start the real `mlflow models serve` of ``model_uri`` on a port of its own (not waiting for it)."""
    port = free_port()
    log_path = env.root / f"mlflow-models-serve-{port}.log"
    # `mlflow models serve` execs `uvicorn` from PATH: put the venv's bin first.
    environ = env.environ(PATH=f"{_bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(_bin_dir() / "mlflow"), "models", "serve", "-m", model_uri,
             "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
            env=environ, cwd=env.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log_path


def _wait_serve(proc: subprocess.Popen, urls: str | list[str], log_path: Path, deadline: float) -> None:
    """Until every server of ``proc`` at ``urls`` answers /ping."""
    waiting = [urls] if isinstance(urls, str) else list(urls)
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            while waiting and requests.get(f"{waiting[0]}/ping", timeout=2).status_code == 200:
                waiting.pop(0)
            if not waiting:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"mlflow models serve not up after {START_S}s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


_PORT_ATTEMPTS = 3


def _up(started: list, restart: Callable[[], tuple], deadline: float) -> None:
    """Wait for the peer server in ``started`` (``[proc, urls, log_path]``, updated in place so the
    caller's cleanup stops whichever runs last). ``free_port()`` finds a port free but cannot hold
    it: on a busy machine another process may bind it first, and the peer exits with "address
    already in use". Such a peer is started again on other ports (``restart()``), twice at most."""
    for attempt in range(_PORT_ATTEMPTS):
        proc, urls, log_path = started
        try:
            _wait_serve(proc, list(urls.values()) if isinstance(urls, dict) else urls, log_path, deadline)
            return
        except AssertionError:
            taken = proc.poll() is not None and "address already in use" in log_path.read_text(errors="replace")
            if not taken or attempt + 1 == _PORT_ATTEMPTS:
                raise
        _stop(proc)
        started[:] = restart()


@pytest.fixture(scope="module")
def mlflow_serve(env: Env, registry: Registry) -> Iterator[str]:
    """The real `mlflow models serve` of the same model version, on its own port."""
    model_uri = f"models:/{registry.model}/1"
    started = list(_start_serve(env, model_uri))
    try:
        _up(started, lambda: _start_serve(env, model_uri), time.monotonic() + START_S)
        yield started[1]
    finally:
        _stop(started[0])


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


# -- More model kinds, as MLflow's own scoring-server tests use them ---------------------------------
# Each kind is one registered model (tests/assets/<kind>_model.py), served by MLflow's scoring server (the
# app `mlflow models serve` runs, under uvicorn; the three in one process) and by a deployment, all
# started together. Answers must be identical: every 200 body byte for byte as
# JSON, every error with the same status, error_code, error_class and sqlstate. The one intentional
# difference for these kinds is the error text: MLflow quotes the input ("Failed to predict data
# '<the whole frame>'"), ours never does (asserted in test_kind_same_request_same_answer).

def _typed_frame() -> pd.DataFrame:
    """MLflow's all-types test frame (one column of each MLflow type); its string column is `prompt`."""
    return pd.DataFrame({
        "boolean": [True, False, True],
        "integer": np.array([1, 2, 3], np.int32),
        "long": np.array([1, 2, 3], np.int64),
        "float": np.array([math.pi, 2 * math.pi, 3 * math.pi], np.float32),
        "double": [math.pi, 2 * math.pi, 3 * math.pi],
        "binary": [b"\x01\x02\x03", b"\x04\x05\x06", b"\x07\x08\x09"],
        "datetime": pd.to_datetime(["2021-01-01 00:00:00", "2021-02-02 00:00:00", "2021-03-03 12:00:00"]),
        "prompt": ["a", "b", "c"],
    })


TYPED_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(type_, name) for name, type_ in (
        ("boolean", "boolean"), ("integer", "integer"), ("long", "long"), ("float", "float"), ("double", "double"),
        ("binary", "binary"), ("datetime", "datetime"), ("prompt", "string"))]),
    params=ParamSchema([ParamSpec("output", DataType.string, "dtypes"), ParamSpec("scale", DataType.double, 1.0),
                        ParamSpec("as_of", DataType.datetime, np.datetime64("2023-07-01"))]))
# MLflow's Keras test model: two named (-1, 2) tensors.
TENSOR_SIGNATURE = ModelSignature(inputs=Schema([TensorSpec(np.dtype("float64"), (-1, 2), "a"),
                                                 TensorSpec(np.dtype("float64"), (-1, 2), "b")]))


def _typed_wire() -> pd.DataFrame:
    """The frame as JSON clients send it: bytes in base64, datetimes in ISO 8601 (the schema parses both)."""
    frame = _typed_frame()
    return frame.assign(binary=[base64.b64encode(value).decode() for value in frame["binary"]],
                        datetime=[stamp.isoformat() for stamp in frame["datetime"]])


def _typed_cases() -> dict[str, Case]:
    frame, wire = _typed_frame(), _typed_wire()
    split = {"dataframe_split": {"columns": list(wire.columns), "data": wire.to_numpy().tolist()}}
    reversed_columns = wire[list(reversed(wire.columns))]
    records = wire.to_dict(orient="records")
    parquet = io.BytesIO()
    frame.to_parquet(parquet, index=False)
    cases = {
        # The same frame in every shape: the answer is the dtypes the model received (MLflow's own check).
        "split": Case(JSON, json.dumps(split)),
        "split_columns_reordered": Case(JSON, json.dumps({"dataframe_split": {
            "columns": list(reversed_columns.columns), "data": reversed_columns.to_numpy().tolist()}})),
        "records": Case(JSON, json.dumps({"dataframe_records": records})),
        "instances": Case(JSON, json.dumps({"instances": records})),
        "inputs": Case(JSON, json.dumps({"inputs": wire.to_dict(orient="list")})),
        "parquet": Case(PARQUET, parquet.getvalue()),
        "csv_with_datetime": Case(CSV, wire.to_csv(index=False)),  # both: pandas cannot read datetimes so
        # Params: every output kind a scoring server must serialize, and MLflow's param checks.
        **{f"output_{kind}": Case(JSON, json.dumps({**split, "params": {"output": kind, "scale": 2.5,
                                                                         "as_of": "2024-02-29T12:00:00"}}))
           for kind in ("dtypes", "labels", "series", "dict", "frame", "matrix", "scalar")},
        "param_not_in_schema": Case(JSON, json.dumps({**split, "params": {"temperature": 0.2, "output": "labels"}})),
        "param_wrong_type": Case(JSON, json.dumps({**split, "params": {"scale": "big"}})),
        "param_bad_datetime": Case(JSON, json.dumps({**split, "params": {"as_of": "not a date"}})),
        "model_raises": Case(JSON, json.dumps({**split, "params": {"output": "no such output"}})),
        # Schema enforcement.
        "missing_column": Case(JSON, json.dumps({"dataframe_records": [
            {key: value for key, value in record.items() if key != "double"} for record in records]})),
        "wrong_type": Case(JSON, json.dumps({"dataframe_records": [{**record, "long": "many"} for record in records]})),
        # LLM-style bodies (no format key): MLflow's unified LLM input, not parsed by the schema.
        "llm_style_columns": Case(JSON, json.dumps({**wire.to_dict(orient="list"), "output": "labels"})),
        "llm_style_messages": Case(JSON, json.dumps({"messages": [{"role": "user", "content": "hi"}]})),
    }
    return cases


def _tensor_cases() -> dict[str, Case]:
    a = [[1.0, 2.0], [3.0, 4.0], [5.5, -1.0]]
    b = [[0.5, 0.5], [1.0, 2.0], [-2.0, 3.0]]
    return {
        "inputs_named": Case(JSON, json.dumps({"inputs": {"a": a, "b": b}})),
        "instances_named": Case(JSON, json.dumps({"instances": [{"a": x, "b": y} for x, y in zip(a, b, strict=True)]})),
        "inputs_integers": Case(JSON, json.dumps({"inputs": {"a": [[1, 2], [3, 4]], "b": [[5, 6], [7, 8]]}})),
        "split_of_tensors": Case(JSON, json.dumps({"dataframe_split": {
            "columns": ["a", "b"], "data": [[x, y] for x, y in zip(a, b, strict=True)]}})),
        "params_without_schema": Case(JSON, json.dumps({"inputs": {"a": a, "b": b}, "params": {"k": 1}})),
        "wrong_shape": Case(JSON, json.dumps({"inputs": {"a": [[1.0, 2.0, 3.0]], "b": [[1.0, 2.0, 3.0]]}})),
        "missing_tensor": Case(JSON, json.dumps({"inputs": {"a": a}})),
        "ragged": Case(JSON, json.dumps({"inputs": {"a": [[1.0], [2.0, 3.0]], "b": b[:2]}})),
        "strings": Case(JSON, json.dumps({"inputs": {"a": [["x", "y"]], "b": [["z", "w"]]}})),
        "unnamed_tensor": Case(JSON, json.dumps({"inputs": a})),
        "csv": Case(CSV, "a,b\n1,2\n"),  # no CSV for tensors: a 400 on both (ours was a 500)
    }


def _chat_cases() -> dict[str, Case]:
    messages = [{"role": "system", "content": "be loud"}, {"role": "user", "content": "hello there general kenobi"}]
    return {
        # Unified LLM input: answered without the "predictions" wrapper.
        "chat": Case(JSON, json.dumps({"messages": messages})),
        "chat_with_params": Case(JSON, json.dumps({"messages": messages, "max_tokens": 2, "temperature": 0.1})),
        "chat_beside_format_key": Case(JSON, json.dumps({"messages": messages, "inputs": [1]})),
        # The scoring formats: wrapped in "predictions".
        "split": Case(JSON, json.dumps({"dataframe_split": {"columns": ["messages"], "data": [[messages]]}})),
        "records_with_params": Case(JSON, json.dumps({"dataframe_records": [{"messages": messages, "max_tokens": 3}]})),
        "inputs_wrong_nesting": Case(JSON, json.dumps({"inputs": {"messages": [messages]}})),
        "message_without_role": Case(JSON, json.dumps({"messages": [{"content": "no role"}]})),
        "param_wrong_type": Case(JSON, json.dumps({"messages": messages, "max_tokens": "many"})),
        "no_messages": Case(JSON, json.dumps({"messages": []})),
        "completions_style": Case(JSON, json.dumps({"prompt": "hello"})),
        "embeddings_style": Case(JSON, json.dumps({"input": ["hello"]})),
    }


@dataclass(frozen=True)
class Kind:
    source: str  # a models-from-code file in tests/assets
    signature: ModelSignature | None  # None: the model sets its own (ChatModel)
    cases: dict[str, Case]


KINDS = {
    "typed": Kind("typed_model.py", TYPED_SIGNATURE, _typed_cases()),
    "tensor": Kind("tensor_model.py", TENSOR_SIGNATURE, _tensor_cases()),
    "chat": Kind("chat_model.py", None, _chat_cases()),
}
KIND_CASES = [f"{kind}/{case_id}" for kind, spec in KINDS.items() for case_id in spec.cases]
ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class Pair:
    theirs: str
    ours: str
    model_uri: str


def _start_peers(env: Env, model_uris: dict[str, str]) -> tuple[subprocess.Popen, dict[str, str], Path]:
    """MLflow's scoring server (the app `mlflow models serve` runs, under uvicorn) for each model, all
    in one process (tests/mlflow_scoring_peers.py; not waiting for them): one interpreter instead of
    two per model. The breast-cancer peer above stays a real `mlflow models serve`."""
    ports = {kind: free_port() for kind in model_uris}
    log_path = env.root / f"mlflow-scoring-peers-{min(ports.values())}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "mlflow_scoring_peers.py"),
             *(f"{ports[kind]}={uri}" for kind, uri in model_uris.items())],
            env=env.environ(), cwd=env.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, {kind: f"http://127.0.0.1:{port}" for kind, port in ports.items()}, log_path


@pytest.fixture(scope="module")
def kind_servers(env: Env) -> Iterator[dict[str, Pair]]:
    """Per kind: a registered version, MLflow's scoring server of it and a deployment of it, all started
    at once. The deployments are created in process, through the deployment core the CLI's `create`
    calls (the CLI verb has its own tests; a CLI subprocess costs seconds of CPU in imports), and
    without a warm standby (nothing swaps here)."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow_deploy_plugin.deployments import Deployments
    from mlflow_deploy_plugin.state import StateStore

    suffix = str(int(time.time() * 1000))[-8:]  # unique names on a shared PostgreSQL store
    uris = {}
    for kind, spec in KINDS.items():
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="model", python_model=str(ASSETS / spec.source), signature=spec.signature,
                                           registered_model_name=f"compat_{kind}_{suffix}", pip_requirements=["pandas"])
        uris[kind] = f"models:/compat_{kind}_{suffix}/{info.registered_model_version}"

    def create(kind: str) -> str:
        deployments = Deployments(store=StateStore(env.home))
        return deployments.create(f"compat-{kind}", uris[kind], {"warm_standby": "false",
                                                                   "startup_timeout_s": str(START_S)})["url"]

    started = list(_start_peers(env, uris))
    try:
        with ThreadPoolExecutor(len(uris)) as pool:  # all at once, as the peers start meanwhile
            ours = dict(zip(uris, pool.map(create, uris), strict=True))
        _up(started, lambda: _start_peers(env, uris), time.monotonic() + START_S)
        theirs = started[1]
        yield {kind: Pair(theirs[kind], ours[kind], uris[kind]) for kind in KINDS}
    finally:
        _stop(started[0])
        with ThreadPoolExecutor(len(uris)) as pool:
            list(pool.map(env.delete, [f"compat-{kind}" for kind in uris]))


@pytest.mark.parametrize("kind_case", KIND_CASES)
def test_kind_same_request_same_answer(kind_case: str, kind_servers: dict[str, Pair]) -> None:
    kind, case_id = kind_case.split("/")
    case, pair = KINDS[kind].cases[case_id], kind_servers[kind]
    theirs, ours = _send(pair.theirs, case), _send(pair.ours, case)
    assert ours.status_code == theirs.status_code, (
        f"status differs: theirs {theirs.status_code} {theirs.text[:300]!r}, ours {ours.status_code} "
        f"{ours.text[:300]!r}")
    assert theirs.headers["content-type"].startswith(JSON) and ours.headers["content-type"].startswith(JSON)
    if theirs.status_code == 200:
        assert ours.json() == theirs.json()
        return
    _check_our_error_shape(ours)
    classification = ("error_code", "error_class", "sqlstate")
    assert ({key: ours.json().get(key) for key in classification}
            == {key: theirs.json().get(key) for key in classification}), (theirs.text[:300], ours.text[:300])
    if "Failed to predict data '" in theirs.json()["message"]:  # the intentional difference: no echo
        assert "Failed to predict data" not in ours.json()["message"], ours.text[:300]


def test_kind_answers_are_the_models(kind_servers: dict[str, Pair]) -> None:
    """The compared answers are real predictions, not two equal errors: a few checked against the model."""
    typed = json.loads(KINDS["typed"].cases["split"].body or "")
    answer = requests.post(f"{kind_servers['typed'].ours}/invocations", json=typed, timeout=60).json()
    # MLflow's own check: the model got every column in its schema's dtype (strings and bytes as object).
    assert answer == {"predictions": [[name, str(dtype)] for name, dtype in _typed_frame().dtypes.items()]}
    chat = requests.post(f"{kind_servers['chat'].ours}/invocations", data=KINDS["chat"].cases["chat"].body,
                         headers={"Content-Type": JSON}, timeout=60).json()
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "HELLO THERE GENERAL KENOBI"}
    tensor = requests.post(f"{kind_servers['tensor'].ours}/invocations",
                           data=KINDS["tensor"].cases["inputs_named"].body, headers={"Content-Type": JSON}, timeout=60)
    assert tensor.json() == {"predictions": [[3.0, 1.5], [7.0, 11.0], [4.5, -14.0]]}


def test_mlflow_scoring_client_reads_ours_as_theirs(mlflow_serve: str, shared_deployment: dict,
                                                    kind_servers: dict[str, Pair]) -> None:
    """MLflow's own client (`ScoringServerClient`, what MLflow's tests drive `mlflow models serve` with)
    gets the same answers from a deployment: readiness, version, and predictions with and without params.
    (Not tensors: its `dump_input_data` cannot send a dict of arrays, to either server.)"""
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    def client(url: str) -> ScoringServerClient:
        parts = urlparse(url)
        return ScoringServerClient(parts.hostname, parts.port)

    calls = [
        (mlflow_serve, shared_deployment["url"], ROWS, None),
        (kind_servers["typed"].theirs, kind_servers["typed"].ours, _typed_wire(), {"output": "frame", "scale": 2.0}),
    ]
    for theirs_url, ours_url, data, params in calls:
        theirs, ours = client(theirs_url), client(ours_url)
        ours.wait_server_ready(timeout=30)
        assert ours.get_version() == theirs.get_version() == mlflow.__version__
        expected = theirs.invoke(data, params)
        assert ours.invoke(data, params) == expected and expected["predictions"], (theirs_url, ours_url)
