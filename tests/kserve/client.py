"""The KServe Python SDK's REST client against a deployment; run by tests/test_v2_clients.py with the
python of .venv-kserve (the SDK cannot live in our venv: see requirements.txt beside this file).

Reads {"url", "model", "columns", "rows"} as JSON on stdin, makes the calls a KServe user makes, and
prints what each answered as one JSON object on stdout; the test compares it with `/invocations`.
Metadata has no call in the SDK's REST client: it is fetched with httpx and parsed by the SDK's own
V2 data models, as a KServe server's answers would be.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse, ServerMetadataResponse

OUTPUT = "output-1"


def _one_matrix(model: str, matrix: np.ndarray, binary: bool, request_id: str) -> InferRequest:
    tensor = InferInput("input-1", list(matrix.shape), "FP64")
    tensor.set_data_from_numpy(matrix, binary_data=binary)
    return InferRequest(model, [tensor], request_id=request_id,
                        request_outputs=[RequestedOutput(OUTPUT, parameters={"binary_data": binary})])


def _columns(model: str, columns: list[str], matrix: np.ndarray) -> InferRequest:
    tensors = []
    for index, column in enumerate(columns):
        tensor = InferInput(column, [matrix.shape[0]], "FP64")
        # Both encodings in one request: every other column binary.
        tensor.set_data_from_numpy(np.ascontiguousarray(matrix[:, index]), binary_data=index % 2 == 0)
        tensors.append(tensor)
    return InferRequest(model, tensors, parameters={"binary_data_output": True})


def _predictions(response: Any) -> dict[str, Any]:
    output = next(o for o in response.outputs if o.name == OUTPUT)
    return {"id": response.id, "model_name": response.model_name, "shape": list(output.shape),
            "datatype": output.datatype, "predictions": output.as_numpy().reshape(-1).tolist()}


async def main(request: dict[str, Any]) -> dict[str, Any]:
    url, model = request["url"], request["model"]
    matrix = np.asarray(request["rows"], dtype=np.float64)
    answers: dict[str, Any] = {}
    async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=60)) as client:
        answers["live"] = await client.is_server_live(url)
        answers["ready"] = await client.is_server_ready(url)
        answers["model_ready"] = await client.is_model_ready(url, model)
        answers["unknown_model_ready"] = await client.is_model_ready(url, "no-such-model")
        headers: dict[str, str] = {}
        answers["json"] = _predictions(await client.infer(
            url, _one_matrix(model, matrix, False, "kserve-json"), model_name=model, response_headers=headers))
        answers["json"]["x-model-version"] = headers.get("x-model-version")
        # The REST client builds `v2/models/{model_name}/infer`: a versioned name pins the version.
        answers["binary_pinned"] = _predictions(await client.infer(
            url, _one_matrix(model, matrix, True, "kserve-binary"), model_name=f"{model}/versions/1"))
        answers["columns"] = _predictions(await client.infer(
            url, _columns(model, request["columns"], matrix), model_name=model))
        try:
            await client.infer(url, _one_matrix(model, matrix[:, :3], True, "kserve-bad"), model_name=model)
            answers["wrong_width"] = None
        except httpx.HTTPStatusError as error:
            answers["wrong_width"] = {"status": error.response.status_code, "message": str(error)}
    async with httpx.AsyncClient(timeout=60) as http:
        server = (await http.get(f"{url}/v2")).raise_for_status().json()
        answers["server_metadata"] = ServerMetadataResponse.model_validate(server).model_dump()
        metadata = (await http.get(f"{url}/v2/models/{model}")).raise_for_status().json()
        answers["model_metadata"] = ModelMetadataResponse.model_validate(metadata).model_dump()
    return answers


if __name__ == "__main__":
    json.dump(asyncio.run(main(json.load(sys.stdin))), sys.stdout)
