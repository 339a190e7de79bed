"""The MLflow scoring protocol: request bodies in, predictions and errors out.

Parsing is MLflow's own (``mlflow.pyfunc.scoring_server``) so every body `mlflow models serve`
accepts is accepted here and parsed the same way. What differs is the error path: messages are
cut to a short snippet (MLflow echoes the whole request back) and never carry a stack trace.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from io import BytesIO, StringIO
from typing import Any

import numpy as np
import orjson
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server as mlflow_scoring
from mlflow.types import DataType
from mlflow.utils.proto_json_utils import NumpyEncoder, _get_jsonable_obj

from mlflow_deploy_plugin.serving.decode_limits import (
    DecodeLimits,
    csv_columns_bound,
    csv_rows_cap,
    decode_json,
    decoded_shape,
    json_shape,
    json_values_bound,
    orjson_is_json,
    parquet_shape,
)
from mlflow_deploy_plugin.serving.errors import MAX_MESSAGE_CHARS, ServingError, shorten
from mlflow_deploy_plugin.serving.frames import mark_float64

_logger = logging.getLogger(__name__)

__all__ = ["MAX_MESSAGE_CHARS", "DecodeLimits", "ParsedRequest", "ServingError", "fast_path_columns",
           "parse_request", "prediction_error", "predictions_body", "shorten"]

CONTENT_TYPE_JSON = mlflow_scoring.CONTENT_TYPE_JSON
CONTENT_TYPE_CSV = mlflow_scoring.CONTENT_TYPE_CSV
CONTENT_TYPE_PARQUET = mlflow_scoring.CONTENT_TYPE_PARQUET
SUPPORTED_CONTENT_TYPES = (CONTENT_TYPE_JSON, CONTENT_TYPE_CSV, CONTENT_TYPE_PARQUET)
_NO_LIMITS = DecodeLimits(max_rows=2**62, max_cells=2**62)
_UNDECODED: Any = object()


def from_mlflow_exception(exc: MlflowException) -> ServingError:
    """Map an MlflowException to the status and error code `mlflow models serve` would use."""
    return _mlflow_error(exc, exc.message)


def _mlflow_error(exc: MlflowException, message: str) -> ServingError:
    # What MLflow classified (e.g. SCHEMA_ENFORCEMENT_FAILED/KAM01) is kept, not re-derived from the code.
    return ServingError(exc.get_http_status_code(), exc.error_code, message,
                        error_class=getattr(exc, "error_class", None), sqlstate=getattr(exc, "sqlstate", None))


@dataclass
class ParsedRequest:
    """A decoded `/invocations` body."""

    data: Any  # usually a pandas DataFrame; a dict/ndarray for tensor inputs
    params: dict[str, Any] | None
    unwrapped_output: bool  # unified LLM inputs are answered without the "predictions" wrapper
    # The fast path's (column names, rows x columns float64 array) that ``data`` was built on: capture
    # encodes it as is, without the pandas calls (~10 us per request on a busy event loop).
    raw: tuple[tuple[str, ...], np.ndarray] | None = None


def fast_path_columns(input_schema: Any) -> frozenset[str] | None:
    """The input names when every model input is a required ``double`` column, else None.

    For such models a `dataframe_split`/`dataframe_records` body of plain numbers becomes the
    same float64 DataFrame MLflow's parser would build, ~20x cheaper: MLflow casts column by
    column, which costs more than predicting. Anything else takes MLflow's own path.
    """
    try:
        if input_schema is None or input_schema.is_tensor_spec():
            return None
        inputs = input_schema.inputs
        if not inputs or any(spec.name is None or not spec.required or spec.type != DataType.double
                             for spec in inputs):
            return None
        return frozenset(spec.name for spec in inputs)
    except Exception:
        return None


def _fast_rows(decoded: dict[str, Any], names: frozenset[str]) -> tuple[list[str], np.ndarray] | None:
    if len(decoded) != 1:
        return None
    key, payload = next(iter(decoded.items()))
    if key == "dataframe_split":
        if not isinstance(payload, dict) or set(payload) != {"columns", "data"}:
            return None
        columns, rows = payload["columns"], payload["data"]
    elif key == "dataframe_records":
        if not isinstance(payload, list) or not payload or not isinstance(payload[0], dict):
            return None
        columns = list(payload[0])
        try:
            rows = [[record[name] for name in columns] for record in payload
                    if len(record) == len(columns)]
        except (KeyError, TypeError):
            return None
        if len(rows) != len(payload):
            return None
    else:
        return None
    if not isinstance(columns, list) or len(columns) != len(names) or set(columns) != names:
        return None
    if not isinstance(rows, list) or not rows:
        return None
    width = len(columns)
    for row in rows:
        if type(row) is not list or len(row) != width:
            return None
        for value in row:
            # bool is an int subclass but MLflow rejects it for doubles: only plain numbers here.
            if type(value) is not float and type(value) is not int:
                return None
    return columns, np.array(rows, dtype=np.float64)


class _ColumnsIndex:
    """The columns Index of the last fast-path frame, reused while requests name the same columns.

    Building it costs ~2/3 of the frame's construction (pandas infers the names' dtype); each frame
    gets a view of its own (``Index.view``, ~0.6 us against ~3 us for ``Index.copy``, which validates
    the names again), so renaming one frame's columns (``frame.columns.name = ...``) touches no other.
    The views share one array of names, made read-only: a model that writes into
    ``frame.columns.values`` in place gets numpy's "read-only" error instead of renaming the columns
    of every later request.
    """

    def __init__(self) -> None:
        self._last: tuple[list[str], pd.Index] | None = None

    def __call__(self, names: list[str]) -> pd.Index:
        last = self._last
        if last is None or last[0] != names:
            index = pd.Index(names)
            shared = index.to_numpy(copy=False)
            if isinstance(shared, np.ndarray):
                shared.flags.writeable = False
            last = self._last = (names, index)
        return last[1].view()


_columns_index = _ColumnsIndex()


def _fast_parsed(decoded: dict[str, Any], names: frozenset[str], limits: DecodeLimits) -> ParsedRequest | None:
    """The numeric fast path's frame of a decoded body, or None when it needs MLflow's parser."""
    rows, columns = json_shape(decoded)
    limits.check(rows, columns, "The request")
    fast = _fast_rows(decoded, names)
    if fast is None:
        return None
    columns_list, values = fast
    frame = pd.DataFrame(values, columns=_columns_index(columns_list), copy=False)
    return ParsedRequest(mark_float64(frame), None, False, (tuple(columns_list), values))


def parse_request(body: bytes, content_type: str | None, metadata: Any, input_schema: Any,
                  fast_columns: frozenset[str] | None = None,
                  limits: DecodeLimits | None = None) -> ParsedRequest:
    """Decode a request body the way `mlflow models serve` does, raising :class:`ServingError`.

    ``fast_columns`` (from :func:`fast_path_columns`) enables the numeric fast path. ``limits``
    bound what the body may decode to (413 beyond), checked before the costly step of each format.
    """
    limits = limits or _NO_LIMITS
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
            parsed = _parse_json(body, metadata, input_schema, fast_columns, limits)
        elif mime_type == CONTENT_TYPE_CSV:
            parsed = ParsedRequest(_parse_csv(body, input_schema, limits), None, False)
        elif mime_type == CONTENT_TYPE_PARQUET:
            try:
                rows, columns = parquet_shape(BytesIO(body))
            except Exception:
                pass  # not Parquet: MLflow's parser below words the error
            else:
                limits.check(rows, columns, "The Parquet body")
            parsed = ParsedRequest(mlflow_scoring.parse_parquet_input(BytesIO(body)), None, False)
        else:
            raise ServingError(
                415, "BAD_REQUEST",
                f"Unsupported Content-Type {content_type!r}. Supported: {', '.join(SUPPORTED_CONTENT_TYPES)}.",
            )
    except MlflowException as exc:
        raise _input_error(exc) from None
    except RecursionError:
        # json.loads raises RecursionError (not JSONDecodeError) on deeply nested input: MLflow answers 500.
        raise ServingError(400, "BAD_REQUEST", "Invalid input. The JSON body is nested too deeply.") from None
    except (OverflowError, ValueError, TypeError) as exc:
        # MLflow's parsers raise these unwrapped on some inputs (e.g. a tensor it cannot shape);
        # they are the client's input, never a server error.
        _logger.debug("Input rejected by the parser: %s: %s", type(exc).__name__, exc)
        raise ServingError(400, "BAD_REQUEST", f"Invalid input. {type(exc).__name__}: {exc}") from None
    rows, columns = decoded_shape(parsed.data)  # a last guard, whatever path the body took
    limits.check(rows, columns, "The request")
    return parsed


def _parse_json(body: bytes, metadata: Any, input_schema: Any, fast_columns: frozenset[str] | None,
                limits: DecodeLimits) -> ParsedRequest:
    limits.check_values(json_values_bound(body, limits.max_values), "The JSON body")
    decoded: Any = _UNDECODED
    if fast_columns is not None:
        # orjson decodes ~10x faster than json (100 rows of 20 floats: ~0.07 vs ~0.7 ms, the largest
        # cost of such a request). What it refuses, json decides below: its errors worded as before,
        # and what json alone accepts (NaN, Infinity, integers beyond 64 bits, a BOM). orjson refuses
        # every number a float64 cannot hold, so that check needs no pre-scan here.
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            if isinstance(decoded, dict) and (fast := _fast_parsed(decoded, fast_columns, limits)) is not None:
                return fast
            # No numeric table (nor is there one in json's result): MLflow's parser takes orjson's
            # result, unless json's differs from it (integers beyond 64 bits, which orjson reads as
            # floats and MLflow must see exact): then json decodes the body again.
            fast_columns = None
            if not orjson_is_json(body):
                decoded = _UNDECODED
    if decoded is _UNDECODED:
        try:
            decoded = decode_json(body)
        except (ValueError, UnicodeDecodeError) as exc:
            # MLflow's words (and status), without the input it appends.
            raise ServingError(400, "BAD_REQUEST",
                               f"Invalid input. Ensure that input is a valid JSON formatted string. Error: '{exc!r}'",
                               ) from None
    if not isinstance(decoded, dict):
        kind = "a list" if isinstance(decoded, list) else f"unexpected input type '{type(decoded).__name__}'"
        raise ServingError(400, "BAD_REQUEST", f"Invalid input. {mlflow_scoring.REQUIRED_INPUT_FORMAT}. Received {kind}.")
    if fast_columns is not None and (fast := _fast_parsed(decoded, fast_columns, limits)) is not None:
        return fast  # e.g. NaN cells
    rows, columns = json_shape(decoded)
    limits.check(rows, columns, "The request")
    parsed = mlflow_scoring._parse_json_data(decoded, metadata, input_schema)
    return ParsedRequest(parsed.data, parsed.params, parsed.is_unified_llm_input)


def _parse_csv(body: bytes, input_schema: Any, limits: DecodeLimits) -> pd.DataFrame:
    """MLflow's ``parse_csv_input``, reading no more rows than the limits allow."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServingError(400, "BAD_REQUEST", f"CSV body is not valid UTF-8: {exc}") from None
    columns = csv_columns_bound(text)
    limits.check(1, columns, "The CSV header")
    cap = csv_rows_cap(limits, columns)
    try:
        # Inside the try, as in MLflow's parser: a tensor signature has no pandas types (a 400, not a 500).
        dtypes = None if input_schema is None else dict(zip(input_schema.input_names(), input_schema.pandas_types(),
                                                            strict=False))
        # One row more than allowed tells that there are too many, without reading them all.
        frame = pd.read_csv(StringIO(text), dtype=dtypes, nrows=cap + 1)
    except Exception as exc:
        raise ServingError(
            400, "BAD_REQUEST",
            "Failed to parse input as a Pandas DataFrame. Ensure that the input is a valid CSV-formatted "
            f"Pandas DataFrame produced using the `pandas.DataFrame.to_csv()` method. Error: '{exc}'") from None
    if len(frame) > cap:
        limits.check(len(frame), frame.shape[1], "The CSV body (counted up to the limit)")
    return frame


def _input_error(exc: MlflowException) -> ServingError:
    # ServingError cleans the message: MLflow appends the whole input to some of its errors.
    return _mlflow_error(exc, exc.message)


def predictions_body(raw_predictions: Any, unwrapped: bool = False) -> bytes:
    """Serialise predictions exactly as `mlflow models serve` does."""
    predictions = _get_jsonable_obj(raw_predictions, pandas_orient="records")
    payload = predictions if unwrapped else {"predictions": predictions}
    return json.dumps(payload, cls=NumpyEncoder).encode()


def prediction_error(exc: BaseException, data: Any) -> ServingError:
    """The answer to a failed ``predict``: schema errors are the client's, 400 like MLflow's."""
    if isinstance(exc, MlflowException):
        return _mlflow_error(exc, f"Failed to predict: {exc.message}")
    return ServingError(
        400, "BAD_REQUEST",
        "Encountered an unexpected error while evaluating the model. Verify that the input is "
        f"compatible with the model for inference. Error: {type(exc).__name__}: {exc}",
    )
