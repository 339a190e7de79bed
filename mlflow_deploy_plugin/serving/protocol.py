"""The MLflow scoring protocol: request bodies in, predictions and errors out.

Parsing is MLflow's own (``mlflow.pyfunc.scoring_server``) so every body `mlflow models serve`
accepts is accepted here and parsed the same way. What differs is the error path: messages are
cut to a short snippet (MLflow echoes the whole request back) and never carry a stack trace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from io import BytesIO, StringIO
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server as mlflow_scoring
from mlflow.utils.proto_json_utils import NumpyEncoder, _get_jsonable_obj

MAX_MESSAGE_CHARS = 500

CONTENT_TYPE_JSON = mlflow_scoring.CONTENT_TYPE_JSON
CONTENT_TYPE_CSV = mlflow_scoring.CONTENT_TYPE_CSV
CONTENT_TYPE_PARQUET = mlflow_scoring.CONTENT_TYPE_PARQUET
SUPPORTED_CONTENT_TYPES = (CONTENT_TYPE_JSON, CONTENT_TYPE_CSV, CONTENT_TYPE_PARQUET)


class ServingError(Exception):
    """An error answered to the client as ``{"error_code", "message"}`` with an HTTP status."""

    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = shorten(message)

    def body(self) -> bytes:
        return json.dumps({"error_code": self.error_code, "message": self.message}).encode()


def shorten(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Keep error messages short: a snippet of what was wrong, never the whole request."""
    message = str(message)
    if len(message) <= limit:
        return message
    # MLflow puts the input first and the reason (e.g. missing columns) last: keep both ends.
    head, tail = limit * 2 // 5, limit * 3 // 5
    return f"{message[:head]} ...[{len(message) - head - tail} characters cut]... {message[-tail:]}"


def from_mlflow_exception(exc: MlflowException) -> ServingError:
    """Map an MlflowException to the status and error code `mlflow models serve` would use."""
    return ServingError(exc.get_http_status_code(), exc.error_code, exc.message)


@dataclass
class ParsedRequest:
    """A decoded `/invocations` body."""

    data: Any  # usually a pandas DataFrame; a dict/ndarray for tensor inputs
    params: dict[str, Any] | None
    unwrapped_output: bool  # unified LLM inputs are answered without the "predictions" wrapper


def parse_request(body: bytes, content_type: str | None, metadata: Any, input_schema: Any) -> ParsedRequest:
    """Decode a request body the way `mlflow models serve` does, raising :class:`ServingError`."""
    if not content_type:
        raise ServingError(
            415, "BAD_REQUEST",
            f"Missing Content-Type header. Supported: {', '.join(SUPPORTED_CONTENT_TYPES)}.",
        )
    mime_type, _, raw_params = content_type.partition(";")
    mime_type = mime_type.strip().lower()
    parameters = dict(
        (key.strip().lower(), value.strip()) for key, _, value in
        (part.partition("=") for part in raw_params.split(";") if part.strip())
    )
    if parameters.get("charset", "utf-8").lower() != "utf-8":
        raise ServingError(415, "BAD_REQUEST", "The scoring server only supports UTF-8.")
    if unknown := set(parameters) - {"charset"}:
        raise ServingError(
            415, "BAD_REQUEST", f"Unrecognized content type parameters: {', '.join(sorted(unknown))}."
        )
    if not body:
        raise ServingError(400, "BAD_REQUEST", "Empty request body: send the input data to predict on.")
    try:
        if mime_type == CONTENT_TYPE_JSON:
            parsed = mlflow_scoring._parse_json_data(body, metadata, input_schema)
            return ParsedRequest(parsed.data, parsed.params, parsed.is_unified_llm_input)
        if mime_type == CONTENT_TYPE_CSV:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ServingError(400, "BAD_REQUEST", f"CSV body is not valid UTF-8: {exc}") from None
            return ParsedRequest(mlflow_scoring.parse_csv_input(StringIO(text), schema=input_schema), None, False)
        if mime_type == CONTENT_TYPE_PARQUET:
            return ParsedRequest(mlflow_scoring.parse_parquet_input(BytesIO(body)), None, False)
    except MlflowException as exc:
        raise _input_error(exc) from None
    except RecursionError:
        # json.loads raises RecursionError (not JSONDecodeError) on deeply nested input: MLflow answers 500.
        raise ServingError(400, "BAD_REQUEST", "Invalid input. The JSON body is nested too deeply.") from None
    raise ServingError(
        415, "BAD_REQUEST",
        f"Unsupported Content-Type {content_type!r}. Supported: {', '.join(SUPPORTED_CONTENT_TYPES)}.",
    )


def _input_error(exc: MlflowException) -> ServingError:
    message = exc.message
    # MLflow appends the whole input to JSON decode errors; keep only what went wrong.
    message = message.split("\nInput:", 1)[0]
    return ServingError(exc.get_http_status_code(), exc.error_code, message)


def predictions_body(raw_predictions: Any, unwrapped: bool = False) -> bytes:
    """Serialise predictions exactly as `mlflow models serve` does."""
    predictions = _get_jsonable_obj(raw_predictions, pandas_orient="records")
    payload = predictions if unwrapped else {"predictions": predictions}
    return json.dumps(payload, cls=NumpyEncoder).encode()


def prediction_error(exc: BaseException, data: Any) -> ServingError:
    """The answer to a failed ``predict``: schema errors are the client's, 400 like MLflow's."""
    if isinstance(exc, MlflowException):
        return ServingError(exc.get_http_status_code(), exc.error_code,
                            f"Failed to predict: {exc.message}")
    return ServingError(
        400, "BAD_REQUEST",
        "Encountered an unexpected error while evaluating the model. Verify that the input is "
        f"compatible with the model for inference. Error: {type(exc).__name__}: {exc}",
    )
