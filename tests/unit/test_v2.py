"""The Open Inference Protocol (V2) routes and codec, in process against real models.

Every infer answer is checked against `/invocations` on the same data: V2 is another way in to the
same predictions, through the same slots, limits, metrics and capture.
"""

from __future__ import annotations

import json
import random
import re
import struct
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec
from starlette.routing import Route
from unit_helpers import JSON, Served, ServeFactory, TestClient, iris_data, load_slot, metric, split_body

from mlflow_deploy_plugin.serving import docs, v2
from mlflow_deploy_plugin.serving.decode_limits import DecodeLimits
from mlflow_deploy_plugin.serving.model_slot import ModelSlot

ROWS = iris_data()[0].iloc[[0, 1, 50, 51, 100, 101, 120]]  # every class, so a wrong answer shows
TOKEN = "v2-secret"
INFER = "/v2/models/iris/infer"


def columns_body(frame: pd.DataFrame, shape_2d: bool = False, **extra: Any) -> dict[str, Any]:
    """MLServer's pandas codec: one input per column."""
    shape = [len(frame), 1] if shape_2d else [len(frame)]
    return {"inputs": [{"name": str(column), "shape": shape, "datatype": "FP64", "data": frame[column].tolist()}
                       for column in frame.columns], **extra}


def matrix_body(frame: pd.DataFrame, name: str = "input-1") -> dict[str, Any]:
    """A single [N, k] input."""
    return {"inputs": [{"name": name, "shape": list(frame.shape), "datatype": "FP64", "data": frame.values.tolist()}]}


def binary_request(head: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(head).encode()
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}


def assert_v2_error(response: Any, status: int, mentions: str | None = None) -> str:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith(JSON)
    body = response.json()
    assert set(body) == {"error"} and body["error"].strip(), body
    assert "Traceback" not in response.text and len(response.content) < 2048
    if mentions is not None:
        assert mentions in body["error"], body
    return body["error"]


@pytest.fixture
def served(serve: ServeFactory, classifier_slot: ModelSlot) -> Served:
    return serve(classifier_slot)


def invocations(client: TestClient, frame: pd.DataFrame) -> list[Any]:
    response = client.post("/invocations", content=json.dumps(split_body(frame)), headers={"content-type": JSON})
    assert response.status_code == 200, response.text[:300]
    return response.json()["predictions"]


# -- server and model metadata ------------------------------------------------------------------


def test_server_metadata_and_health(serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    served = serve(classifier_slot, ready=False)
    client = served.client
    assert client.get("/v2").json() == {"name": "mlflow-deploy", "version": v2.__version__,
                                        "extensions": ["binary_tensor_data"]}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert_v2_error(client.get("/v2/health/ready"), 503, "not ready")
    assert_v2_error(client.get("/v2/models/iris/ready"), 503)
    served.state.ready = True
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/iris/ready").json() == {"name": "iris", "ready": True}
    assert client.get("/v2/models/iris/versions/1/ready").status_code == 200
    served.state.draining = True
    assert_v2_error(client.get("/v2/health/ready"), 503, "draining")


def test_model_metadata_comes_from_the_signature(served: Served) -> None:
    expected = {
        "name": "iris", "versions": ["1"], "platform": "mlflow",
        "inputs": [{"name": column, "datatype": "FP64", "shape": [-1, 1]} for column in ROWS.columns],
        "outputs": [{"name": "output-1", "datatype": "INT64", "shape": [-1, 1]}],
    }
    assert served.client.get("/v2/models/iris").json() == expected
    assert served.client.get("/v2/models/iris/versions/1").json() == expected
    # The deployment's name is an alias of the model's.
    assert served.client.get("/v2/models/unit").json() == expected


@pytest.mark.parametrize("path", ["/v2/models/other", "/v2/models/other/ready", "/v2/models/iris/versions/9",
                                  "/v2/models/iris/versions/9/ready"])
def test_unknown_model_or_version_is_a_404(served: Served, path: str) -> None:
    assert_v2_error(served.client.get(path), 404)


def test_unknown_v2_paths_and_methods_answer_in_the_v2_shape(served: Served) -> None:
    assert_v2_error(served.client.get("/v2/no/such/path"), 404)
    assert_v2_error(served.client.get(INFER), 405)
    assert_v2_error(served.client.post("/v2/models/other/infer", json=matrix_body(ROWS)), 404, "'other'")
    assert_v2_error(served.client.post("/v2/models/iris/versions/9/infer", json=matrix_body(ROWS)), 404, "'9'")


# -- infer: same answers as /invocations -------------------------------------------------------


@pytest.mark.parametrize("body", [
    pytest.param(lambda frame: columns_body(frame), id="column_per_input"),
    pytest.param(lambda frame: columns_body(frame, shape_2d=True), id="column_per_input_n_by_1"),
    pytest.param(lambda frame: matrix_body(frame), id="single_2d_input"),
    pytest.param(lambda frame: columns_body(frame[list(reversed(frame.columns))]), id="columns_any_order"),
])
def test_infer_answers_as_invocations(served: Served, body: Any) -> None:
    expected = invocations(served.client, ROWS)
    response = served.client.post(INFER, json=body(ROWS))
    assert response.status_code == 200, response.text[:300]
    assert response.headers["x-model-version"] == "1"
    assert response.json() == {"model_name": "iris", "model_version": "1", "outputs": [
        {"name": "output-1", "datatype": "INT64", "shape": [len(ROWS), 1], "data": expected}]}


def test_infer_shares_metrics_and_capture_with_invocations(served: Served) -> None:
    assert served.client.post(INFER, json=matrix_body(ROWS)).status_code == 200
    assert_v2_error(served.client.post(INFER, json={"inputs": []}), 400)
    text = served.client.get("/metrics").text
    assert metric(text, "mlflow_deploy_requests_total", model_version="1", status="200") == 1
    assert metric(text, "mlflow_deploy_requests_total", model_version="1", status="400") == 1
    assert metric(text, "mlflow_deploy_rows_predicted_total", model_version="1") == len(ROWS)
    assert [answer.status for answer in served.answers] == [200, 400]
    pd.testing.assert_frame_equal(served.answers[0].inputs, ROWS.reset_index(drop=True))


def test_request_id_and_outputs_are_honoured(served: Served) -> None:
    body = {**matrix_body(ROWS.iloc[:2]), "id": "req-7", "outputs": [{"name": "output-1"}]}
    answer = served.client.post(INFER, json=body).json()
    assert answer["id"] == "req-7" and [o["name"] for o in answer["outputs"]] == ["output-1"]
    assert_v2_error(served.client.post(INFER, json={**body, "outputs": [{"name": "probabilities"}]}), 400,
                    "'probabilities'")


def test_parameters_reach_the_model_as_params(serve: ServeFactory, controlled_slot: ModelSlot) -> None:
    client = serve(controlled_slot).client
    body = {"inputs": [{"name": "id", "shape": [3], "datatype": "INT64", "data": [4, 5, 6]},
                       {"name": "x", "shape": [3], "datatype": "FP64", "data": [0.4, 0.5, 0.6]}],
            "parameters": {"factor": 3}}
    answer = client.post("/v2/models/controlled/infer", json=body).json()
    assert "outputs" in answer, answer
    assert answer["outputs"][0]["data"] == [12, 15, 18]


def test_version_in_the_path_pins_it_and_the_split_holds_otherwise(
        serve: ServeFactory, classifier_slot: ModelSlot, rotated_slot: ModelSlot) -> None:
    served = serve([(classifier_slot, 50.0), (rotated_slot, 50.0)], rng=random.Random(3))
    client = served.client
    pinned = client.post("/v2/models/iris/versions/2/infer", json=matrix_body(ROWS))
    assert pinned.headers["x-model-version"] == "2" and pinned.json()["model_version"] == "2"
    assert pinned.json()["outputs"][0]["data"] == rotated_slot.predict(ROWS).tolist()
    served_versions = {client.post(INFER, json=matrix_body(ROWS.iloc[:1])).json()["model_version"]
                       for _ in range(40)}
    assert served_versions == {"1", "2"}
    assert client.get("/v2/models/iris").json()["versions"] == ["1", "2"]


# -- bad requests -----------------------------------------------------------------------------


BAD = {
    "not_json": (b"{", "not valid JSON"),
    "no_inputs": (json.dumps({"inputs": []}).encode(), "non-empty 'inputs'"),
    "bad_datatype": (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "COMPLEX",
                                             "data": [1, 2, 3, 4]}]}).encode(), "unsupported datatype"),
    "count_mismatch": (json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64",
                                               "data": [1, 2, 3]}]}).encode(), "3 values for shape [2, 4]"),
    "wrong_width": (json.dumps(matrix_body(ROWS.iloc[:, :3])).encode(), "the model takes 4"),
    "missing_column": (json.dumps(columns_body(ROWS.iloc[:, :3])).encode(), "missing inputs ['petal_width']"),
    "text_in_fp64": (json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP64",
                                             "data": ["tall"]}]}).encode(), "datatype FP64"),
    "negative_shape": (json.dumps({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP64",
                                               "data": [1.0]}]}).encode(), "non-negative"),
    "ragged_columns": (json.dumps({"inputs": [
        {"name": "sepal_length", "shape": [2], "datatype": "FP64", "data": [1.0, 2.0]},
        {"name": "sepal_width", "shape": [1], "datatype": "FP64", "data": [1.0]}]}).encode(), "same number of rows"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_infer_requests_are_400_in_the_v2_shape(served: Served, case: str) -> None:
    body, mentions = BAD[case]
    response = served.client.post(INFER, content=body, headers={"content-type": JSON})
    assert_v2_error(response, 400, mentions)
    assert response.headers["x-model-version"] == "1"


def test_limits_hold_for_v2(serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    client = serve(classifier_slot, max_rows=5, max_body_bytes=4096).client
    assert_v2_error(client.post(INFER, json=matrix_body(ROWS.iloc[:6])), 413, "max_rows=5")
    assert_v2_error(client.post(INFER, content=b"[" * 5000), 413, "max_body_mb")
    # Many tiny values are refused before they are decoded (max_values from max_rows and max_cells).
    many = json.dumps({"inputs": [{"name": "x", "shape": [1000], "datatype": "FP64", "data": [0] * 1000}]})
    tight = serve(classifier_slot, max_rows=5, max_cells=20).client
    assert_v2_error(tight.post(INFER, content=many), 413, "values")


def test_auth_guards_v2_except_its_health_probes(serve: ServeFactory, classifier_slot: ModelSlot) -> None:
    client = serve(classifier_slot, auth_token=TOKEN).client
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert_v2_error(client.post(INFER, json=matrix_body(ROWS)), 401, "bearer token")
    assert_v2_error(client.get("/v2/models/iris"), 401)
    ok = client.post(INFER, json=matrix_body(ROWS), headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


# -- binary tensor data extension ----------------------------------------------------------------


def test_binary_inputs_and_outputs(served: Served) -> None:
    expected = invocations(served.client, ROWS)
    matrix = ROWS.to_numpy(dtype="<f8")
    body, headers = binary_request(
        {"inputs": [{"name": "x", "shape": list(matrix.shape), "datatype": "FP64",
                     "parameters": {"binary_data_size": matrix.nbytes}}],
         "outputs": [{"name": "output-1", "parameters": {"binary_data": True}}]}, [matrix.tobytes()])
    response = served.client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text[:300]
    length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:length])
    assert head["outputs"] == [{"name": "output-1", "datatype": "INT64", "shape": [len(ROWS), 1],
                                "parameters": {"binary_data_size": 8 * len(ROWS)}}]
    assert np.frombuffer(response.content[length:], dtype="<i8").tolist() == expected
    # binary_data_output: every output binary without naming them.
    body, headers = binary_request({**columns_body(ROWS), "parameters": {"binary_data_output": True}}, [])
    answer = served.client.post(INFER, content=body, headers=headers)
    assert int(answer.headers["inference-header-content-length"]) < len(answer.content)


@pytest.mark.parametrize("size, blob, mentions", [
    (32, b"\x00" * 16, "does not fit"),
    (16, b"\x00" * 16, "16 bytes of binary data for shape [1, 4]"),
    (32, b"\x00" * 40, "8 bytes of binary data are not claimed"),
])
def test_binary_data_that_does_not_add_up_is_a_400(served: Served, size: int, blob: bytes, mentions: str) -> None:
    body, headers = binary_request({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64",
                                                "parameters": {"binary_data_size": size}}]}, [blob])
    assert_v2_error(served.client.post(INFER, content=body, headers=headers), 400, mentions)


def test_bad_header_length_is_a_400(served: Served) -> None:
    body = json.dumps(matrix_body(ROWS)).encode()
    for value in ("many", str(len(body) + 1)):
        response = served.client.post(INFER, content=body, headers={"Inference-Header-Content-Length": value})
        assert_v2_error(response, 400, "Inference-Header-Content-Length")


# -- codec pieces --------------------------------------------------------------------------------


def test_bytes_tensors_decode_from_json_and_binary(classifier_slot: ModelSlot) -> None:
    words = ["a", "ünï", ""]
    blob = b"".join(struct.pack("<I", len(w.encode())) + w.encode() for w in words)
    limits = DecodeLimits()
    _, from_binary, used = v2._tensor({"name": "w", "shape": [3], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": len(blob)}}, memoryview(blob), 0, limits)
    _, from_json, _ = v2._tensor({"name": "w", "shape": [3], "datatype": "BYTES", "data": words},
                                 memoryview(b""), 0, limits)
    assert used == len(blob) and from_binary.tolist() == from_json.tolist() == words
    assert v2._binary_values(np.array(words, dtype=object), "BYTES") == blob


def test_outputs_follow_mlservers_codecs(classifier_slot: ModelSlot) -> None:
    parsed = v2.V2Request(None, None, False)
    frame = pd.DataFrame({"label": ["a", "b"], "score": [0.5, np.nan]})
    answer = json.loads(v2.encode_infer(frame, parsed, classifier_slot, "iris").body)
    assert answer["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [2, 1], "data": ["a", "b"]},
        {"name": "score", "datatype": "FP64", "shape": [2, 1], "data": [0.5, None]}]
    tensors = {"a": np.zeros((2, 3), dtype=np.float32), "b": np.array([True, False])}
    answer = json.loads(v2.encode_infer(tensors, parsed, classifier_slot, "iris").body)
    assert [(o["name"], o["datatype"], o["shape"]) for o in answer["outputs"]] == [
        ("a", "FP32", [2, 3]), ("b", "BOOL", [2, 1])]
    assert v2.datatype_of(np.dtype(">i4")) == "INT32"


class RowSums(mlflow.pyfunc.PythonModel):
    """A tensor model: one float32 [N, 2] tensor in, its row sums out (a dict of tensors, by name, sums each)."""

    def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
        if isinstance(model_input, dict):
            return {name: tensor.sum(axis=1) for name, tensor in model_input.items()}
        return model_input.sum(axis=1)


def _tensor_slot(path: Path, names: list[str | None]) -> ModelSlot:
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, 2), name) for name in names])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1,))])
    example = np.ones((1, 2), dtype=np.float32)
    mlflow.pyfunc.save_model(str(path), python_model=RowSums(), signature=ModelSignature(inputs, outputs),
                             input_example=example if names == [None] else dict.fromkeys(names, example),
                             pip_requirements=["mlflow"])
    return load_slot(path, "1", name="sums")


@pytest.mark.parametrize("names", [[None], ["a", "b"]], ids=["one_tensor", "named_tensors"])
def test_a_tensor_signature_gets_its_tensors(serve: ServeFactory, tmp_path: Path, names: list[str | None]) -> None:
    client = serve(_tensor_slot(tmp_path / "sums", names)).client
    matrix = [[1.0, 2.0], [3.0, 4.5]]
    tensors = [name or "input-1" for name in names]
    body = {"inputs": [{"name": name, "shape": [2, 2], "datatype": "FP32", "data": matrix} for name in tensors]}
    answer = client.post("/v2/models/sums/infer", json=body)
    assert answer.status_code == 200, answer.text[:300]
    invocations_body = {"inputs": matrix if names == [None] else {name: matrix for name in tensors}}
    expected = client.post("/invocations", json=invocations_body).json()["predictions"]
    outputs = answer.json()["outputs"]
    if names == [None]:
        assert outputs == [{"name": "output-1", "datatype": "FP32", "shape": [2, 1], "data": expected}]
    else:  # a dict of tensors: one output per key, as MLServer's TensorDictCodec answers
        assert [(o["name"], o["data"]) for o in outputs] == [(name, expected[name]) for name in tensors]
    metadata = client.get("/v2/models/sums").json()
    assert metadata["inputs"] == [{"name": name, "datatype": "FP32", "shape": [-1, 2]} for name in tensors]
    assert metadata["outputs"] == [{"name": "output-1", "datatype": "FP32", "shape": [-1, 1]}]


# -- openapi ------------------------------------------------------------------------------------


def test_openapi_lists_every_route(served: Served) -> None:
    spec = served.client.get("/openapi.json").json()
    documentation = {"/openapi.json", "/docs", *(f"/docs/{asset}" for asset in docs.ASSETS)}
    app = served.app
    while not hasattr(app, "routes"):  # through the middlewares to the FastAPI app
        app = app.app  # type: ignore[attr-defined]
    served_routes = {(route.path, method.lower()) for route in app.routes if isinstance(route, Route)
                     and route.path not in documentation for method in route.methods or () if method != "HEAD"}
    documented = {(path, method) for path, methods in spec["paths"].items() for method in methods}
    assert served_routes == documented
    assert {"/invocations", "/version", "/deployment", "/v2/models/{name}/versions/{version}/infer"} <= set(
        spec["paths"])
    assert served.client.get("/docs").status_code == 200


def test_openapi_describes_prediction_bodies(served: Served) -> None:
    """The raw-body routes still tell schema-driven tools what to send: every POST has a request body,
    and the example given for /invocations is one the deployment answers."""
    spec = served.client.get("/openapi.json").json()
    posts = {path: methods["post"] for path, methods in spec["paths"].items() if "post" in methods}
    assert set(posts) == {"/invocations", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"}
    for path, operation in posts.items():
        assert operation["requestBody"]["required"] is True and operation["responses"]["400"], path
    invocations = posts["/invocations"]["requestBody"]["content"]
    assert set(invocations) == {JSON, "text/csv", "application/vnd.apache.parquet"}
    assert [f["title"] for f in invocations[JSON]["schema"]["oneOf"]] == [
        "dataframe_split", "dataframe_records", "instances", "inputs", "LLM-style"]
    example = invocations[JSON]["example"]
    assert example["dataframe_split"]["columns"] == list(ROWS.columns)
    assert served.client.post("/invocations", json=example).status_code == 200
    infer = posts["/v2/models/{name}/infer"]
    assert set(infer["requestBody"]["content"]) == {JSON, "application/octet-stream"}
    assert [p["name"] for p in infer["parameters"] if p["in"] == "header"] == ["Inference-Header-Content-Length"]


def test_docs_page_needs_no_other_host(served: Served) -> None:
    """/docs works on a closed network: every file it loads comes from the deployment itself."""
    page = served.client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.findall(r"(?:https?:)?//[\w.-]+", page.text), "the page names another host"
    loaded = re.findall(r'(?:href|src)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert sorted(loaded) == sorted(["/openapi.json", *(f"/docs/{asset}" for asset in docs.ASSETS)])
    for url in loaded:
        answer = served.client.get(url)
        assert answer.status_code == 200 and len(answer.content) > 1000, url
    bundle = served.client.get("/docs/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith("text/javascript") and b"SwaggerUIBundle" in bundle.content
    assert '"validatorUrl": null' in page.text  # Swagger UI would otherwise send the schema to swagger.io
