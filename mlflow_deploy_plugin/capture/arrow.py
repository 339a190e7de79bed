"""Turning answered requests into Arrow tables of the capture layout.

Kept apart from the writer because it is pure data work (no threads, locks or I/O) and is where
nearly all of capture's CPU goes: it runs in the converter process (:mod:`.converter`), never in the process that serves.
Requests of one day whose columns and dtypes match are stacked together, so a batch of thousands of
small requests costs a few vectorised concatenations. Whatever the model received or returned is
stored: inputs become a DataFrame with names that cannot clash with the meta columns, outputs become
``_prediction[_<col>]`` columns, and values Arrow cannot represent are kept as text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa

from mlflow_deploy_plugin.capture.layout import META_COLUMNS, PREDICTION_PREFIX

# Re-exported: the request attributes, days and merging are part of this module's interface.
from mlflow_deploy_plugin.capture.meta import REQUEST_ATTRS as REQUEST_ATTRS
from mlflow_deploy_plugin.capture.meta import RequestMeta as RequestMeta
from mlflow_deploy_plugin.capture.meta import day_of as day_of
from mlflow_deploy_plugin.capture.meta import input_names, meta_arrays
from mlflow_deploy_plugin.capture.meta import merge_tables as merge_tables
from mlflow_deploy_plugin.serving.frames import is_float64, stack_frames


class AnsweredRequest(Protocol):
    """What capture reads of one answered ``/invocations`` request.

    Serving hands :meth:`CaptureWriter.record` its own answer objects (capture does not import the
    app), other callers a :class:`CapturedRequest`: anything with these attributes will do.
    """

    @property
    def request_id(self) -> str: ...
    @property
    def timestamp(self) -> float: ...  # epoch seconds
    @property
    def model_version(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def latency_ms(self) -> float: ...
    # What the model took and returned, in whatever form it did (DataFrame, arrays, dicts, ...):
    # made tabular by as_frame and prediction_columns.
    @property
    def inputs(self) -> Any: ...
    @property
    def predictions(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class CapturedRequest:
    """One answered ``/invocations`` request, as handed to :meth:`CaptureWriter.record`.

    ``inputs`` and ``predictions`` are kept by reference until the next flush: do not mutate them
    after recording.
    """

    request_id: str
    timestamp: float  # epoch seconds
    model_version: str
    status: int
    latency_ms: float
    inputs: pd.DataFrame | None
    predictions: Any | None
    role: str = "primary"  # or "shadow" (layout: ``_role``)
    model_name: str | None = None  # the registered model answering (layout: ``_model_name``)


@dataclass(slots=True)
class _Group:
    """Requests of one day whose columns and dtypes match, so they concatenate cheaply.

    ``requests`` are read for their :data:`REQUEST_ATTRS` only (their inputs and predictions are
    in ``frames`` and ``predictions``); ``counts`` is how many rows each request has.
    """

    frames: list[pd.DataFrame | None] = field(default_factory=list)
    predictions: list[dict[str, np.ndarray]] = field(default_factory=list)
    requests: list[AnsweredRequest] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


def tables_by_day(batch: list[AnsweredRequest], deployment: str,
                  redact: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
                  ) -> tuple[dict[date, list[tuple[pa.Table, int]]], int]:
    """One Arrow table per day and column layout, each with the number of requests it holds.

    ``redact`` (see :mod:`.redaction`) is applied to the input columns of each table before they
    become Arrow. Also returns how many requests could not be converted (they are in no table).
    """
    groups: dict[tuple[int, tuple, tuple], _Group] = {}
    unconverted = 0
    for req in batch:
        try:
            day = int(float(req.timestamp) // 86400)
            frame = as_frame(req.inputs)
            n = len(frame) if frame is not None else 1
            # No inputs (e.g. a rejected request): one meta-only row, as the drift job expects.
            predictions = prediction_columns(req.predictions, n) if frame is not None else {}
            key = (
                day,
                _frame_signature(frame),
                tuple((name, _dtype_key(arr.dtype)) for name, arr in predictions.items()),
            )
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group()
            group.frames.append(frame)
            group.predictions.append(predictions)
            group.requests.append(req)
            group.counts.append(n)
        except Exception:
            unconverted += 1
    by_day: dict[date, list[tuple[pa.Table, int]]] = {}
    for (day_number, _, _), group in groups.items():
        try:
            table = _group_table(group, deployment, redact)
        except Exception:
            unconverted += len(group.requests)
            continue
        by_day.setdefault(day_of(day_number * 86400), []).append((table, len(group.requests)))
    return by_day, unconverted


def _group_table(group: _Group, deployment: str,
                 redact: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> pa.Table:
    meta = RequestMeta()
    for request in group.requests:
        meta.add(request)
    arrays = meta_arrays(meta, group.counts, deployment)
    names = list(META_COLUMNS)
    frames = [f for f in group.frames if f is not None]
    if frames:
        inputs = stack_frames(frames)
        if redact is not None:
            inputs = redact(inputs)
        for i, name in enumerate(inputs.columns):
            names.append(name)
            arrays.append(to_arrow(inputs.iloc[:, i]))
    for name in group.predictions[0]:
        column = np.concatenate([p[name] for p in group.predictions])
        names.append(name)
        arrays.append(to_arrow(column))
    return pa.Table.from_arrays(arrays, names=names)


def as_frame(inputs: Any) -> pd.DataFrame | None:
    """Inputs as a DataFrame with unique string column names that cannot clash with ours."""
    if inputs is None:
        return None
    if isinstance(inputs, pd.DataFrame):
        frame = inputs
    elif isinstance(inputs, pd.Series):
        frame = inputs.to_frame()
    elif isinstance(inputs, np.ndarray):
        frame = pd.DataFrame(inputs.reshape(len(inputs), -1) if inputs.ndim != 1 else inputs)
    elif isinstance(inputs, dict):
        try:
            frame = pd.DataFrame(inputs)
        except ValueError:
            frame = pd.DataFrame({"_input": [str(inputs)]})
    else:
        frame = pd.DataFrame({"_input": [str(inputs)]})
    if len(frame) == 0:
        return None
    fixed = input_names(frame.columns)
    if fixed != list(frame.columns):
        frame = frame.set_axis(fixed, axis=1)
    return frame


def _frame_signature(frame: pd.DataFrame | None) -> tuple:
    if frame is None:
        return ()
    if is_float64(frame):  # cheap for parser-built frames: no per-request dtypes Series
        return (tuple(frame.columns), "float64")
    return tuple(zip(frame.columns, map(str, frame.dtypes), strict=True))


def _dtype_key(dtype: np.dtype) -> str:
    # Strings of different widths concatenate fine; keep them in one group.
    return dtype.kind if dtype.kind in "USO" else dtype.str


def _object_array(values: Iterable[Any]) -> np.ndarray:
    items = list(values)
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def prediction_columns(predictions: Any, n_rows: int) -> dict[str, np.ndarray]:
    """Model output as 1-D column arrays of ``n_rows`` each, named ``_prediction[_<col>]``."""
    if predictions is None:
        return {}
    if isinstance(predictions, dict):
        try:
            predictions = pd.DataFrame(predictions)
        except ValueError:
            return _misaligned(predictions, n_rows)
    if isinstance(predictions, pd.DataFrame):
        if len(predictions) != n_rows:
            return _misaligned(predictions, n_rows)
        out: dict[str, np.ndarray] = {}
        for i, col in enumerate(predictions.columns):
            name = f"{PREDICTION_PREFIX}_{col}"
            if name in out:
                name = f"{name}.{i}"
            out[name] = predictions.iloc[:, i].to_numpy()
        return out
    if isinstance(predictions, pd.Series):
        arr = predictions.to_numpy()
    elif isinstance(predictions, np.ndarray):
        arr = predictions
    elif isinstance(predictions, list | tuple):
        try:
            arr = np.asarray(predictions)
        except ValueError:  # ragged nested lists
            arr = _object_array(predictions)
    else:
        arr = _object_array([predictions])
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if len(arr) != n_rows:
        return _misaligned(predictions, n_rows)
    if arr.ndim == 1:
        return {PREDICTION_PREFIX: arr}
    if arr.ndim == 2:
        return {f"{PREDICTION_PREFIX}_{i}": arr[:, i] for i in range(arr.shape[1])}
    return {PREDICTION_PREFIX: _object_array(row.tolist() for row in arr)}


def _misaligned(predictions: Any, n_rows: int) -> dict[str, np.ndarray]:
    # Output that does not map to input rows is kept whole, as text, on the request's first row.
    return {PREDICTION_PREFIX: _object_array([str(predictions)] + [None] * (n_rows - 1))}


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        result = pd.isna(value)
    except (TypeError, ValueError):
        return False
    return bool(result) if np.ndim(result) == 0 else False


# Deeper types are stored as text: Parquet writes a schema of nested lists and structs 70 levels
# deep, but its Arrow schema then fails to read back ("Invalid flatbuffers message"), and one such
# file would break reading the whole capture window (seen with fuzzed input).
_MAX_NESTING = 8


def _nesting(arrow_type: pa.DataType) -> int:
    """How many levels of lists, maps and structs ``arrow_type`` has (0 for a flat type)."""
    depth, level = 0, [arrow_type]
    while level:
        level = [t.field(i).type for t in level for i in range(t.num_fields)]
        if level:
            depth += 1
        if depth > _MAX_NESTING:
            break  # deep enough to be refused: no need to walk the rest
    return depth


def to_arrow(values: pd.Series | np.ndarray) -> pa.Array:
    """One column as Arrow, falling back to text for objects Arrow cannot represent (NaN and None
    as null)."""
    try:
        arr = pa.array(values, from_pandas=True)
        if pa.types.is_dictionary(arr.type):
            # Categories would make every file's schema differ; store plain values.
            arr = arr.cast(arr.type.value_type)
        if (isinstance(arr.type, pa.ExtensionType) or pa.types.is_null(arr.type)
                or _nesting(arr.type) > _MAX_NESTING):
            raise pa.ArrowTypeError("stored as text")
        return arr
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return pa.array([None if _is_missing(v) else str(v) for v in values], pa.string())
