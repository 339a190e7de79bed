"""The Open Inference Protocol (V2, "KServe v2"), as MLServer, KServe and Triton speak it over REST.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``
(metadata from the MLflow signature), ``.../ready`` and ``POST .../infer``. ``{name}`` is the
registered model's name; the deployment's name is accepted as an alias. ``/versions/{v}`` pins a
served version (a canary's too); without it the traffic split chooses, as for ``/invocations``.

Infer requests are decoded here into what MLflow's pyfunc takes (the codec rules are MLServer's):
- a model with a tensor signature gets an ndarray (one input) or a dict of ndarrays by input name;
- otherwise each input is a column (shape ``[N]`` or ``[N, 1]``, MLServer's pandas codec), or a
  single ``[N, k]`` input is a table whose columns are the signature's inputs, in their order.
Predictions go back as outputs: a DataFrame one output per column (shape ``[N, 1]``), a dict one
per key, anything else one output named after the signature's single output (else ``output-1``).
Unnamed signature tensors are ``input-N``/``output-N`` counted from 1 in the metadata: the names
MLServer's codecs put in requests and answers (its metadata counts from 0, which no answer matches).
The binary tensor data extension (``Inference-Header-Content-Length``, ``binary_data``,
``binary_data_size``) is read and written both ways. Everything else (slots, batching, limits,
metrics, capture, auth) is the app's shared request path; errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import Response
from mlflow.types import DataType
from mlflow.types.schema import ColSpec, TensorSpec
from starlette.datastructures import Headers

from mlflow_deploy_plugin import __version__
from mlflow_deploy_plugin.serving.decode_limits import DecodeLimits, json_values_bound
from mlflow_deploy_plugin.serving.errors import ServingError
from mlflow_deploy_plugin.serving.model_slot import ModelSlot
from mlflow_deploy_plugin.serving.protocol import ParsedRequest

JSON = "application/json"
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]
_MAX_ID_CHARS = 128
# Request parameters the protocol itself uses: never handed to the model as params.
_PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "content_type", "headers"})

_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_COLUMN_TYPES = {DataType.boolean: "BOOL", DataType.integer: "INT32", DataType.long: "INT64",
                 DataType.float: "FP32", DataType.double: "FP64"}  # others (string, binary, ...): BYTES


def is_v2_path(path: str) -> bool:
    """Whether a request path belongs to this protocol (its errors then take the V2 shape)."""
    return path == "/v2" or path.startswith("/v2/")


def error_response(error: ServingError) -> Response:
    """A V2 error: ``{"error": "..."}`` with the error's status and headers."""
    return Response(json.dumps({"error": error.message}).encode(), status_code=error.status, media_type=JSON,
                    headers=error.headers)


# ---- metadata --------------------------------------------------------------------------------


def datatype_of(dtype: np.dtype) -> str:
    """The V2 datatype of a numpy dtype (strings and objects are BYTES)."""
    dtype = np.dtype(dtype)
    for name, candidate in _DTYPES.items():
        if dtype == candidate:
            return name
    if dtype.kind in "biuf":  # big-endian or platform-specific spellings of the same kinds
        return datatype_of(dtype.newbyteorder("<"))
    return "BYTES"


def _spec_metadata(spec: Any, index: int, prefix: str) -> dict[str, Any]:
    name = spec.name or f"{prefix}{index + 1}"
    if isinstance(spec, TensorSpec):
        # A 1-D tensor is answered as [N, 1] (MLServer's batch dimension): say so here too.
        shape = [int(d) for d in spec.shape]
        return {"name": name, "datatype": datatype_of(spec.type), "shape": shape if len(shape) > 1 else [*shape, 1]}
    datatype = _COLUMN_TYPES.get(spec.type, "BYTES") if isinstance(spec, ColSpec) and isinstance(
        spec.type, DataType) else "BYTES"
    return {"name": name, "datatype": datatype, "shape": [-1, 1]}


def tensor_metadata(schema: Any, prefix: str) -> list[dict[str, Any]]:
    """V2 metadata tensors of an MLflow schema (MLServer's mapping; unnamed specs are ``prefix + n``)."""
    if schema is None:
        return []
    return [_spec_metadata(spec, index, prefix) for index, spec in enumerate(schema.inputs)]


def model_metadata(name: str, versions: list[str], slot: ModelSlot) -> dict[str, Any]:
    """``GET /v2/models/{name}[/versions/{v}]``: the served versions and the signature's tensors."""
    signature = slot.metadata.signature
    return {"name": name, "versions": versions, "platform": "mlflow",
            "inputs": tensor_metadata(slot.input_schema, "input-"),
            "outputs": tensor_metadata(signature.outputs if signature is not None else None, "output-")}


# ---- requests --------------------------------------------------------------------------------


@dataclass
class V2Request(ParsedRequest):
    """A decoded infer request: the model input plus what the answer must look like."""

    request_id: str | None = None
    outputs: list[dict[str, Any]] | None = None  # the outputs asked for, None for all
    binary_output: bool = False  # request-level default of each output's binary_data
    meta: dict[str, Any] = field(default_factory=dict)


def _bad(message: str) -> ServingError:
    return ServingError(400, "BAD_REQUEST", message)


def _split_binary(body: bytes, headers: Headers) -> tuple[bytes, memoryview]:
    declared = headers.get(HEADER_LENGTH)
    if declared is None:
        return body, memoryview(b"")
    try:
        length = int(declared)
    except ValueError:
        raise _bad(f"Invalid Inference-Header-Content-Length {declared[:40]!r}.") from None
    if not 0 <= length <= len(body):
        raise _bad(f"Inference-Header-Content-Length {length} is outside the body's {len(body)} bytes.")
    return body[:length], memoryview(body)[length:]


def _flatten(data: Any) -> list[Any]:
    """Row-major values of (possibly nested) JSON lists."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item))
    return flat


def _bytes_elements(raw: memoryview, count: int, name: str) -> list[str]:
    values, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise _bad(f"Input {name!r}: its BYTES binary data ends before {count} elements.")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise _bad(f"Input {name!r}: a BYTES element runs past its binary data.")
        values.append(_text(bytes(raw[offset:offset + size])))
        offset += size
    if offset != len(raw):
        raise _bad(f"Input {name!r}: {len(raw) - offset} bytes of binary data left over after {count} elements.")
    return values


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def _tensor(spec: Any, binary: memoryview, offset: int, limits: DecodeLimits) -> tuple[str, np.ndarray, int]:
    """One request input as an ndarray of its shape; returns (name, array, binary bytes consumed)."""
    if not isinstance(spec, dict):
        raise _bad("Each entry of 'inputs' must be an object with name, shape, datatype and data.")
    name, shape, datatype = spec.get("name"), spec.get("shape"), spec.get("datatype")
    if not isinstance(name, str) or not name:
        raise _bad("Each input needs a 'name' (a string).")
    if (not isinstance(shape, list) or
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise _bad(f"Input {name!r}: 'shape' must be a list of non-negative integers.")
    if datatype != "BYTES" and datatype not in _DTYPES:
        raise _bad(f"Input {name!r}: unsupported datatype {str(datatype)[:20]!r}; one of "
                   f"{', '.join([*_DTYPES, 'BYTES'])}.")
    rows = shape[0] if shape else 1
    count = math.prod(shape)
    limits.check(rows, count // rows if rows else 0, f"Input {name!r}")
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise _bad(f"Input {name!r}: binary_data_size {size!r} does not fit the binary data sent.")
        raw = binary[offset:offset + size]
        if datatype == "BYTES":
            array = np.array(_bytes_elements(raw, count, name), dtype=object)
        else:
            dtype = _DTYPES[datatype]
            if size != count * dtype.itemsize:
                raise _bad(f"Input {name!r}: {size} bytes of binary data for shape {shape} of {datatype} "
                           f"({count * dtype.itemsize} bytes expected).")
            array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
        return name, array.reshape(shape), size
    if "data" not in spec:
        raise _bad(f"Input {name!r} has no 'data' (nor binary_data_size).")
    values = _flatten(spec["data"])
    if len(values) != count:
        raise _bad(f"Input {name!r}: {len(values)} values for shape {shape} ({count} expected).")
    try:
        if datatype == "BYTES":
            array = np.array([_text(v) for v in values], dtype=object)
        else:
            if any(isinstance(v, (str, dict, list)) for v in values):
                raise TypeError("a value is not a number")
            array = np.array(values, dtype=_DTYPES[datatype])
    except (TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"Input {name!r}: its data does not fit datatype {datatype}: {exc}") from None
    return name, array.reshape(shape), 0


def _model_input(tensors: list[tuple[str, np.ndarray]], slot: ModelSlot) -> Any:
    schema = slot.input_schema
    if schema is not None and schema.is_tensor_spec():
        if len(tensors) == 1 and not schema.has_input_names():
            return tensors[0][1]
        return dict(tensors)
    names = schema.input_names() if schema is not None else None
    if len(tensors) == 1 and tensors[0][1].ndim == 2 and (names is None or tensors[0][0] not in names):
        # One [N, k] input: a table, its columns the signature's inputs in order.
        array = tensors[0][1]
        if names is None:
            return pd.DataFrame(array)
        if array.shape[1] != len(names):
            raise _bad(f"Input {tensors[0][0]!r} has {array.shape[1]} columns; the model takes {len(names)}: "
                       f"{', '.join(map(str, names))}.")
        return pd.DataFrame(array, columns=names)
    columns: dict[str, np.ndarray] = {}
    for name, array in tensors:
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1:
            raise _bad(f"Input {name!r} has shape {list(array.shape)}: as a column it must be [N] or [N, 1] "
                       "(or send a single [N, k] input holding every column).")
        columns[name] = array
    if len({len(column) for column in columns.values()}) > 1:
        raise _bad("Inputs sent as columns must all have the same number of rows.")
    return pd.DataFrame(columns)


def decode_infer(body: bytes, headers: Headers, slot: ModelSlot, limits: DecodeLimits) -> V2Request:
    """Decode a V2 infer request (JSON, or JSON plus binary tensor data) into the model's input."""
    if not body:
        raise _bad("Empty request body: send {\"inputs\": [...]}.")
    head, binary = _split_binary(body, headers)
    # As for /invocations: a body of millions of tiny values is refused before it is decoded.
    limits.check_values(json_values_bound(head, limits.max_values), "The JSON body")
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _bad(f"The request is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise _bad("The request must be a JSON object with a non-empty 'inputs' list.")
    tensors, offset = [], 0
    for spec in request["inputs"]:
        name, array, used = _tensor(spec, binary, offset, limits)
        tensors.append((name, array))
        offset += used
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} bytes of binary data are not claimed by any input's binary_data_size.")
    if len({name for name, _ in tensors}) != len(tensors):
        raise _bad("Input names must be unique.")
    parameters = request.get("parameters") or {}
    outputs = request.get("outputs")
    if not isinstance(parameters, dict) or (outputs is not None and (
            not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                     for o in outputs))):
        raise _bad("'parameters' must be an object and 'outputs' a list of objects with a 'name'.")
    params = {k: v for k, v in parameters.items() if k not in _PROTOCOL_PARAMETERS} or None
    request_id = request.get("id")
    return V2Request(_model_input(tensors, slot), params, False,
                     request_id=str(request_id)[:_MAX_ID_CHARS] if request_id is not None else None,
                     outputs=outputs, binary_output=bool(parameters.get("binary_data_output", False)))


# ---- answers ---------------------------------------------------------------------------------


def _output_arrays(predictions: Any, slot: ModelSlot) -> list[tuple[str, np.ndarray]]:
    if isinstance(predictions, pd.DataFrame):
        return [(str(column), predictions[column].to_numpy()) for column in predictions.columns]
    if isinstance(predictions, dict):
        return [(str(key), np.asarray(value)) for key, value in predictions.items()]
    signature = slot.metadata.signature
    specs = signature.outputs.inputs if signature is not None and signature.outputs is not None else []
    name = specs[0].name if len(specs) == 1 and specs[0].name else "output-1"
    if isinstance(predictions, pd.Series):
        predictions = predictions.to_numpy()
    return [(name, np.asarray(predictions))]


def _encode_output(name: str, array: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    datatype = datatype_of(array.dtype)
    shape = list(array.shape) if array.ndim > 1 else [len(array) if array.ndim else 1, 1]
    return {"name": name, "datatype": datatype, "shape": shape}, array


def _json_values(array: np.ndarray, datatype: str) -> list[Any]:
    values = array.reshape(-1).tolist()
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v if isinstance(v, str) else
                json.dumps(v, default=str) for v in values]
    if datatype in ("FP16", "FP32", "FP64"):
        return [None if isinstance(v, float) and math.isnan(v) else v for v in values]
    return values


def _binary_values(array: np.ndarray, datatype: str) -> bytes:
    if datatype != "BYTES":
        return np.ascontiguousarray(array, dtype=_DTYPES[datatype]).tobytes()
    parts = []
    for value in array.reshape(-1).tolist():
        raw = value if isinstance(value, bytes) else (value if isinstance(value, str) else str(value)).encode()
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def encode_infer(predictions: Any, parsed: V2Request, slot: ModelSlot, model_name: str) -> Response:
    """The V2 answer to ``parsed``: JSON, or JSON plus binary tensor data where asked."""
    arrays = _output_arrays(predictions, slot)
    by_name = dict(arrays)
    wanted = parsed.outputs
    if wanted is not None:
        missing = [o["name"] for o in wanted if o["name"] not in by_name]
        if missing:
            raise _bad(f"Unknown output(s) {', '.join(repr(m[:64]) for m in missing)}; the model answers "
                       f"{', '.join(by_name)}.")
        chosen = [(o["name"], by_name[o["name"]], (o.get("parameters") or {}).get("binary_data",
                                                                                  parsed.binary_output))
                  for o in wanted]
    else:
        chosen = [(name, array, parsed.binary_output) for name, array in arrays]
    outputs, blobs = [], []
    for name, array, binary in chosen:
        output, array = _encode_output(name, array)
        if binary:
            blob = _binary_values(array, output["datatype"])
            output["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            output["data"] = _json_values(array, output["datatype"])
        outputs.append(output)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": slot.identity.model_version}
    if parsed.request_id is not None:
        answer["id"] = parsed.request_id
    answer["outputs"] = outputs
    head = json.dumps(answer, default=_json_default).encode()
    if not blobs:
        return Response(head, media_type=JSON)
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# ---- routes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class V2Service:
    """What the V2 routes need to know about the deployment."""

    deployment: str
    model_name: str
    default_version: str  # the version metadata describes when none is named (the most traffic)
    slots: dict[str, ModelSlot]  # by served version
    state: Any  # ServiceState: ready / draining
    limits: DecodeLimits


Answer = Callable[..., Awaitable[Response]]


def add_routes(app: FastAPI, service: V2Service, answer: Answer) -> None:
    """Add the V2 routes to ``app``; ``answer`` is the app's shared prediction path."""

    def ready() -> bool:
        return bool(service.state.ready and not service.state.draining)

    def model(name: str, version: str | None = None) -> ModelSlot:
        if name not in (service.model_name, service.deployment):
            raise ServingError(404, "RESOURCE_DOES_NOT_EXIST",
                               f"Unknown model {name[:128]!r}; this server serves {service.model_name!r}.")
        slot = service.slots.get(version if version is not None else service.default_version)
        if slot is None:
            raise ServingError(404, "RESOURCE_DOES_NOT_EXIST",
                               f"Version {str(version)[:64]!r} of {service.model_name!r} is not served here; "
                               f"served: {', '.join(service.slots)}.")
        return slot

    def decode(body: bytes, headers: Headers, slot: ModelSlot, _: Any) -> V2Request:
        return decode_infer(body, headers, slot, service.limits)

    def encode(predictions: Any, parsed: ParsedRequest, slot: ModelSlot) -> Response:
        assert isinstance(parsed, V2Request)
        return encode_infer(predictions, parsed, slot, service.model_name)

    def as_json(payload: Any) -> Response:
        return Response(json.dumps(payload).encode(), media_type=JSON)

    @app.get("/v2")
    async def server_metadata() -> Response:
        return as_json({"name": "mlflow-deploy", "version": __version__, "extensions": EXTENSIONS})

    @app.get("/v2/health/live")
    async def live() -> Response:
        return as_json({"live": True})

    @app.get("/v2/health/ready")
    async def server_ready() -> Response:
        return as_json({"ready": True}) if ready() else error_response(
            ServingError(503, "TEMPORARILY_UNAVAILABLE", "draining" if service.state.draining else "not ready"))

    async def metadata(name: str, version: str | None) -> Response:
        try:
            slot = model(name, version)
        except ServingError as exc:
            return error_response(exc)
        versions = list(service.slots) if version is None else [version]
        return as_json(model_metadata(service.model_name, versions, slot))

    async def model_ready(name: str, version: str | None) -> Response:
        try:
            model(name, version)
        except ServingError as exc:
            return error_response(exc)
        if not ready():
            return error_response(ServingError(503, "TEMPORARILY_UNAVAILABLE", "not ready"))
        return as_json({"name": service.model_name, "ready": True})

    async def infer(request: Request, name: str, version: str | None) -> Response:
        try:
            model(name, version)
        except ServingError as exc:
            return error_response(exc)
        return await answer(request, decode, encode, error_response, version)

    @app.get("/v2/models/{name}")
    async def get_model(name: str) -> Response:
        return await metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}")
    async def get_model_version(name: str, version: str) -> Response:
        return await metadata(name, version)

    @app.get("/v2/models/{name}/ready")
    async def get_model_ready(name: str) -> Response:
        return await model_ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def get_model_version_ready(name: str, version: str) -> Response:
        return await model_ready(name, version)

    @app.post("/v2/models/{name}/infer")
    async def post_infer(request: Request, name: str) -> Response:
        return await infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def post_infer_version(request: Request, name: str, version: str) -> Response:
        return await infer(request, name, version)
