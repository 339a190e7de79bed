"""What the prediction routes take and answer, for ``/openapi.json``.

The routes read their bodies raw (one decoder per protocol and content type, with limits checked
before parsing), so FastAPI cannot infer request schemas from them. These are written out here and
attached to the routes by path, so schema-driven tools and fuzzers get the request and error shapes:
MLflow's scoring formats for ``/invocations`` (its JSON orientations, CSV, Parquet), and the Open
Inference Protocol's infer request and response (JSON, or JSON header + binary tensors).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

_ANY_PARAMS = {"type": "object", "description": "Inference params (the model signature's params schema)."}
_MLFLOW_ERROR = {
    "type": "object", "required": ["error_code", "message"],
    "properties": {"error_code": {"type": "string"}, "message": {"type": "string"},
                   "error_class": {"type": "string"}, "sqlstate": {"type": "string"}},
}
_V2_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_V2_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                 "FP16", "FP32", "FP64", "BYTES"]
_V2_PARAMETERS = {"type": "object", "description": "e.g. binary_data_size, binary_data, binary_data_output."}


def _format(key: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"title": key, "description": description, "type": "object", "required": [key],
            "properties": {key: schema, "params": _ANY_PARAMS}}


def invocations_extra(example: dict[str, Any] | None) -> dict[str, Any]:
    """``openapi_extra`` of ``POST /invocations``; ``example`` is a body for the served model, if known."""
    json_body: dict[str, Any] = {"schema": {"oneOf": [
        _format("dataframe_split", {"type": "object", "required": ["data"], "properties": {
            "columns": {"type": "array", "items": {"type": "string"}}, "index": {"type": "array"},
            "data": {"type": "array", "items": {"type": "array", "items": {}}}}},
            "pandas 'split' orientation"),
        _format("dataframe_records", {"type": "array", "items": {"type": "object"}}, "pandas 'records' orientation"),
        _format("instances", {"type": "array"}, "TF Serving rows (tensors, or records)"),
        _format("inputs", {}, "TF Serving columns: a tensor, or a dict of named tensors/columns"),
        {"title": "LLM-style", "type": "object", "description": "MLflow's unified LLM input (chat, "
         "completions, embeddings): answered without the 'predictions' wrapper",
         "properties": {"messages": {"type": "array", "items": {"type": "object"}}, "prompt": {}, "input": {}}},
    ]}}
    if example is not None:
        json_body["example"] = example
    errors = {"content": {"application/json": {"schema": _MLFLOW_ERROR}}}
    return {
        "requestBody": {"required": True, "content": {
            "application/json": json_body,
            "text/csv": {"schema": {"type": "string"}},
            "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
        }},
        "responses": {
            "200": {"description": "Predictions: {\"predictions\": ...} (LLM-style inputs: the model's output)",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
            "400": {"description": "Malformed input or schema enforcement failure", **errors},
            "413": {"description": "Over max_body_mb, max_rows or max_cells", **errors},
            "415": {"description": "Unsupported Content-Type", **errors},
            "503": {"description": "Queue full or not ready (Retry-After)", **errors},
            "504": {"description": "Prediction over timeout_s", **errors},
        },
    }


def v2_infer_extra() -> dict[str, Any]:
    """``openapi_extra`` of the V2 infer routes (the Open Inference Protocol's REST infer)."""
    tensor = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
        "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string", "enum": _V2_DATATYPES}, "parameters": _V2_PARAMETERS,
        "data": {"description": "Row-major values (flat or nested); absent when sent as binary"}}}
    request = {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": _V2_PARAMETERS,
        "inputs": {"type": "array", "items": tensor},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "parameters": _V2_PARAMETERS}}}}}
    response = {"type": "object", "required": ["model_name", "outputs"], "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
        "parameters": {"type": "object"}, "outputs": {"type": "array", "items": tensor}}}
    errors = {"content": {"application/json": {"schema": _V2_ERROR}}}
    return {
        "parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                        "schema": {"type": "integer"},
                        "description": "Binary tensor data extension: length of the JSON header that "
                                       "precedes the binary tensors"}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": request, "example": {"inputs": [
                {"name": "input-1", "shape": [1, 2], "datatype": "FP64", "data": [[1.0, 2.0]]}]}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        }},
        "responses": {
            "200": {"description": "Inference response (JSON, or JSON header + binary outputs)",
                    "content": {"application/json": {"schema": response}}},
            "400": {"description": "Malformed request or input the model cannot take", **errors},
            "404": {"description": "Unknown model or version", **errors},
            "413": {"description": "Over max_body_mb, max_rows or max_cells", **errors},
            "503": {"description": "Queue full or not ready (Retry-After)", **errors},
            "504": {"description": "Prediction over timeout_s", **errors},
        },
    }


_PLACEHOLDERS = {"boolean": False, "integer": 0, "long": 0, "float": 0.0, "double": 0.0, "string": "",
                 "binary": "", "datetime": "2024-01-01T00:00:00"}


def example_body(input_schema: Any) -> dict[str, Any] | None:
    """A `dataframe_split` body of placeholder values for a column signature (never the logged input
    example: that may be real rows); None for tensor signatures, nested types or no signature."""
    try:
        if input_schema is None or input_schema.is_tensor_spec():
            return None
        specs = input_schema.inputs
        if not specs or any(spec.name is None or getattr(spec.type, "name", None) not in _PLACEHOLDERS
               for spec in specs):
            return None
        return {"dataframe_split": {"columns": [spec.name for spec in specs],
                                    "data": [[_PLACEHOLDERS[spec.type.name] for spec in specs]]}}
    except Exception:  # an unusual schema: no example rather than no app
        return None


def describe(app: FastAPI, input_schema: Any) -> None:
    """Attach the request and response shapes to the prediction routes of ``app`` (by path);
    ``input_schema`` (the primary version's) gives `/invocations` an example body."""
    invocations_example = example_body(input_schema)
    for route in app.routes:
        if not isinstance(route, APIRoute) or "POST" not in (route.methods or ()):
            continue
        if route.path == "/invocations":
            route.openapi_extra = invocations_extra(invocations_example)
        elif route.path.startswith("/v2/models/") and route.path.endswith("/infer"):
            route.openapi_extra = v2_infer_extra()
