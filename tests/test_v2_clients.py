"""Real Open Inference Protocol (V2) clients against a real deployment: Triton's `tritonclient.http`,
and the KServe Python SDK's REST client (in its own venv, .venv-kserve: `make kserve-venv`).

Clients of MLServer, KServe and Triton switch to a deployment by changing the URL: the same calls,
JSON and binary tensors, get the predictions `/invocations` gives for the same rows.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from conftest import Registry, post_json, split_payload

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402  (after the importorskip)

OUTPUT = "output-1"  # the name of a model's single unnamed output, as MLServer names it
KSERVE_DIR = Path(__file__).parent / "kserve"
# The KServe SDK pins pandas<3 and protobuf<7 and pulls kubernetes and grpcio: it lives in a venv of
# its own, which `make kserve-venv` (a prerequisite of `make test`) creates.
KSERVE_PYTHON = Path(os.environ.get("MLFLOW_TEST_KSERVE_PYTHON")
                     or Path(__file__).resolve().parents[1] / ".venv-kserve" / "bin" / "python")


@pytest.fixture(scope="module")
def client(shared_deployment: dict) -> Iterator[tritonhttp.InferenceServerClient]:
    triton = tritonhttp.InferenceServerClient(url=urlparse(shared_deployment["url"]).netloc, network_timeout=60.0)
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def rows(registry: Registry):
    return registry.features.iloc[100:140]


@pytest.fixture(scope="module")
def expected(shared_deployment: dict, rows) -> list:
    response = post_json(shared_deployment["url"], split_payload(rows))
    assert response.status_code == 200, response.text[:300]
    return response.json()["predictions"]


def test_health_and_metadata(client, registry: Registry, shared_deployment: dict) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(registry.model) and client.is_model_ready(registry.model, "1")
    assert not client.is_model_ready(registry.model, "9")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata(registry.model)
    assert metadata["name"] == registry.model and metadata["versions"] == ["1"]
    assert [i["name"] for i in metadata["inputs"]] == list(registry.features.columns)
    assert {i["datatype"] for i in metadata["inputs"]} == {"FP64"}
    assert [o["name"] for o in metadata["outputs"]] == [OUTPUT]
    # The deployment's name is an alias of the model's.
    assert client.get_model_metadata(shared_deployment["name"])["name"] == registry.model


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_one_2d_input_answers_as_invocations(client, registry: Registry, rows, expected: list, binary: bool) -> None:
    matrix = rows.to_numpy(dtype=np.float64)
    tensor = tritonhttp.InferInput("input-1", list(matrix.shape), "FP64")
    tensor.set_data_from_numpy(matrix, binary_data=binary)
    result = client.infer(registry.model, [tensor], model_version="1", request_id="triton-1",
                          outputs=[tritonhttp.InferRequestedOutput(OUTPUT, binary_data=binary)])
    answer = result.get_response()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == (registry.model, "1", "triton-1")
    assert result.as_numpy(OUTPUT).reshape(-1).tolist() == expected


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_column_per_input_answers_as_invocations(client, registry: Registry, rows, expected: list,
                                                 binary: bool) -> None:
    tensors = []
    for index, column in enumerate(rows.columns):
        tensor = tritonhttp.InferInput(column, [len(rows)], "FP64")
        # Mixed: binary for every other column when binary, so both encodings meet in one request.
        tensor.set_data_from_numpy(rows[column].to_numpy(dtype=np.float64), binary_data=binary and index % 2 == 0)
        tensors.append(tensor)
    result = client.infer(registry.model, tensors)  # no output named: every output, JSON
    assert result.as_numpy(OUTPUT).reshape(-1).tolist() == expected


def test_errors_reach_the_client_as_v2_errors(client, registry: Registry, rows) -> None:
    matrix = rows.to_numpy(dtype=np.float64)[:, :3]
    tensor = tritonhttp.InferInput("input-1", list(matrix.shape), "FP64")
    tensor.set_data_from_numpy(matrix, binary_data=True)
    with pytest.raises(InferenceServerException) as wrong_width:
        client.infer(registry.model, [tensor])
    assert "the model takes" in wrong_width.value.message() and wrong_width.value.status() == "400"
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("no-such-model", [tensor])
    assert "Unknown model" in unknown.value.message() and unknown.value.status() == "404"
    big = np.zeros((20_000, len(rows.columns)), dtype=np.float64)  # 4.8 MB: over the deployment's 1 MB
    tensor = tritonhttp.InferInput("input-1", list(big.shape), "FP64")
    tensor.set_data_from_numpy(big, binary_data=True)
    with pytest.raises(InferenceServerException) as too_big:
        client.infer(registry.model, [tensor])
    assert too_big.value.status() == "413" and "max_body_mb" in too_big.value.message()


@pytest.fixture(scope="session")  # session: asked first, it skips before the deployment is made
def kserve_python() -> Path:
    """The python of the KServe SDK's venv; skip without it, except under CI=true (`make test` makes it)."""
    if KSERVE_PYTHON.exists():
        return KSERVE_PYTHON
    message = (f"the KServe SDK's venv is missing ({KSERVE_PYTHON}): `make kserve-venv` creates it "
               "(or point MLFLOW_TEST_KSERVE_PYTHON at a python that has tests/kserve/requirements.txt)")
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI=true, but {message}", pytrace=False)
    pytest.skip(message)


def test_kserve_rest_client_answers_as_invocations(kserve_python: Path, registry: Registry,
                                                   shared_deployment: dict, rows, expected: list) -> None:
    """KServe's `InferenceRESTClient` (health, readiness, infer with JSON, binary and mixed tensors, a
    pinned version, an error) and its V2 data models (metadata), run by the SDK's own venv."""
    request = {"url": shared_deployment["url"], "model": registry.model, "columns": list(rows.columns),
               "rows": rows.to_numpy(dtype=np.float64).tolist()}
    proc = subprocess.run([str(kserve_python), str(KSERVE_DIR / "client.py")], input=json.dumps(request),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"KServe client failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    answers = json.loads(proc.stdout)
    assert (answers["live"], answers["ready"], answers["model_ready"]) == (True, True, True)
    assert answers["unknown_model_ready"] is False
    for call in ("json", "binary_pinned", "columns"):
        assert answers[call]["predictions"] == expected, call
        assert (answers[call]["model_name"], answers[call]["shape"]) == (registry.model, [len(rows), 1]), call
    assert (answers["json"]["id"], answers["json"]["x-model-version"]) == ("kserve-json", "1")
    assert answers["binary_pinned"]["id"] == "kserve-binary"
    assert answers["wrong_width"]["status"] == 400 and "the model takes" in answers["wrong_width"]["message"]
    assert "binary_tensor_data" in answers["server_metadata"]["extensions"]
    metadata = answers["model_metadata"]
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == (registry.model, ["1"], "mlflow")
    assert [i["name"] for i in metadata["inputs"]] == list(rows.columns)
    assert [o["name"] for o in metadata["outputs"]] == [OUTPUT]
