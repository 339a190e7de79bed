"""The spool: answered requests as append-only records, cheap to write, turned into Arrow elsewhere.

The serving process encodes each captured request as one record (a few microseconds: numbers as
raw bytes, no pandas or Arrow) and appends records to a segment file; the converter process
(:mod:`.converter`) decodes whole segments into tables of the capture layout. So encoding Parquet
never holds the GIL of the process that serves.

A record is ``<length u32><crc32 u32><pickle>``. Float frames built by the request parser and
numeric prediction arrays (the common case) travel as raw bytes and are stacked in one go by the
converter; anything else is pickled as is and converted request by request as before. A segment
cut short by a crash ends in a torn record: reading stops there (the records before it are kept).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from mlflow_deploy_plugin.capture.arrow import (
    REQUEST_ATTRS,
    as_frame,
    day_of,
    prediction_columns,
    stacked_table,
    tables_by_day,
)
from mlflow_deploy_plugin.serving.frames import is_float64

_HEAD = struct.Struct("<II")
# Kinds of inputs / predictions in a record.
_RAW_FRAME = 1  # float64 frame: (columns, n_rows, bytes)
_RAW_ARRAY = 2  # numeric ndarray: (dtype str, shape, bytes)
_PICKLED = 3  # anything else, pickled with the record
_NONE = 0
# Where spooled files live (writers append, the converter reads): a folder per writer with its
# settings and a lock file the writer holds while it lives, segments being appended to, complete
# ones, and the converter's answers. Also spelled out in engines/local/capture_keeper.py (the
# supervisor cannot import this module): keep both the same.
LOCK_NAME = "lock"
CONFIG_NAME = "config.pickle"
SEGMENT_SUFFIX = ".seg"
OPEN_SUFFIX = ".open"  # being appended to; renamed to .seg once complete
DONE_SUFFIX = ".done"  # the converter's answer for a segment it converted (JSON)


def write_config(path: str, config: dict[str, Any]) -> None:
    """Store a writer's settings for the converter (root, deployment, redaction), private."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        pickle.dump(config, file, protocol=pickle.HIGHEST_PROTOCOL)


# Values of these packages unpickle in the converter; anything else (a class of the model's own
# code, say) travels as its text, which is also how Arrow would have stored it.
_PORTABLE_PACKAGES = frozenset({
    "builtins", "numpy", "pandas", "pyarrow", "datetime", "decimal", "fractions", "collections", "uuid",
    "zoneinfo", "pytz", "dateutil", "copyreg", "ipaddress", "_codecs",
})


def _text(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__}>"


class _PortablePickler(pickle.Pickler):
    """Pickles what the converter process can load; other objects become their text."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type) or callable(obj):  # pickled by reference (Cython functions too)
            module = getattr(obj, "__module__", None) or ""
        else:
            module = type(obj).__module__
        if (module or "").partition(".")[0] in _PORTABLE_PACKAGES:
            return NotImplemented
        return str, (_text(obj),)


def _dumps(value: Any, portable: bool) -> bytes:
    if not portable:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    buffer = io.BytesIO()
    _PortablePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def encode_record(request: Any) -> bytes:
    """One answered request as a spool record (runs on the request path: keep it cheap).

    Raises if the request cannot be encoded (e.g. inputs that cannot be pickled).
    """
    meta = tuple(getattr(request, name, None) for name in REQUEST_ATTRS)
    inputs, predictions = request.inputs, request.predictions
    n_rows = None
    if inputs is None:
        in_part: tuple = (_NONE,)
    elif isinstance(inputs, pd.DataFrame) and is_float64(inputs) and len(inputs) and len(inputs.columns):
        n_rows = len(inputs)
        in_part = (_RAW_FRAME, inputs.columns.tolist(), n_rows, inputs.to_numpy().tobytes())
    else:
        in_part = (_PICKLED, inputs)
    if predictions is None:
        pred_part: tuple = (_NONE,)
    elif (isinstance(predictions, np.ndarray) and predictions.dtype.kind in "biuf" and predictions.ndim in (1, 2)
          and n_rows is not None and len(predictions) == n_rows):
        pred_part = (_RAW_ARRAY, predictions.dtype.str, predictions.shape, predictions.tobytes())
    else:
        pred_part = (_PICKLED, predictions)
    body = _dumps((meta, in_part, pred_part), in_part[0] == _PICKLED or pred_part[0] == _PICKLED)
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


@dataclass(slots=True)
class SpoolRecord:
    """A decoded record: the request's :data:`REQUEST_ATTRS` and its inputs and predictions parts."""

    request: SimpleNamespace
    inputs: tuple
    predictions: tuple


def read_records(data: bytes) -> tuple[list[SpoolRecord | None], int]:
    """Decode a segment's bytes; returns the records (None for one that is whole but cannot be
    loaded) and how many bytes at the end were torn."""
    records: list[SpoolRecord | None] = []
    view = memoryview(data)
    offset, end = 0, len(data)
    while offset + _HEAD.size <= end:
        length, crc = _HEAD.unpack_from(view, offset)
        start = offset + _HEAD.size
        if length == 0 or start + length > end:
            break  # torn tail (or zeros a crash left after the last record)
        body = view[start:start + length]
        if zlib.crc32(body) != crc:
            break
        offset = start + length
        try:
            meta, in_part, pred_part = pickle.loads(body)
        except Exception:
            records.append(None)
            continue
        records.append(SpoolRecord(SimpleNamespace(**dict(zip(REQUEST_ATTRS, meta, strict=False))),
                                   in_part, pred_part))
    return records, end - offset


@dataclass(slots=True)
class _Stack:
    """Raw-bytes requests of one day, column layout and prediction layout: stacked in one go."""

    columns: tuple
    requests: list[SimpleNamespace] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    inputs: list[bytes] = field(default_factory=list)
    predictions: list[bytes] = field(default_factory=list)


def records_to_tables(records: list[SpoolRecord | None], deployment: str,
                      redact: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
                      ) -> tuple[dict[date, list[tuple[pa.Table, int]]], int]:
    """Tables of the capture layout by day, each with its request count, and how many requests failed.

    The same tables :func:`.arrow.tables_by_day` builds from the requests themselves.
    """
    stacks: dict[tuple, _Stack] = {}
    others: list[Any] = []  # AnsweredRequest-like namespaces
    unconverted = 0
    for record in records:
        if record is None:
            unconverted += 1
            continue
        req, in_part, pred_part = record.request, record.inputs, record.predictions
        try:
            if in_part[0] == _RAW_FRAME and pred_part[0] in (_RAW_ARRAY, _NONE):
                _, columns, n_rows, raw = in_part
                pred_key = pred_part[1:3] if pred_part[0] == _RAW_ARRAY else None
                if pred_key is not None:
                    pred_key = (pred_key[0], pred_key[1][1:])  # dtype and columns, not the row count
                columns = tuple(columns)
                key = (day_of(req.timestamp), columns, pred_key)
                stack = stacks.get(key)
                if stack is None:
                    stack = stacks[key] = _Stack(columns)
                stack.requests.append(req)
                stack.counts.append(n_rows)
                stack.inputs.append(raw)
                if pred_part[0] == _RAW_ARRAY:
                    stack.predictions.append(pred_part[3])
            else:
                req.inputs = _unpart(in_part)
                req.predictions = _unpart(pred_part)
                others.append(req)
        except Exception:
            unconverted += 1
    by_day, unconverted_others = tables_by_day(others, deployment, redact)
    unconverted += unconverted_others
    for (day, _, pred_key), stack in stacks.items():
        try:
            table = _stack_table(stack, pred_key, deployment, redact)
        except Exception:
            unconverted += len(stack.requests)
            continue
        by_day.setdefault(day, []).append((table, len(stack.requests)))
    return by_day, unconverted


def _stack_table(stack: _Stack, pred_key: tuple | None, deployment: str,
                 redact: Callable[[pd.DataFrame], pd.DataFrame] | None) -> pa.Table:
    total = sum(stack.counts)
    ncols = len(stack.columns)
    values = np.frombuffer(b"".join(stack.inputs), dtype=np.float64)
    matrix = values.reshape(total, ncols) if ncols else np.empty((total, 0))
    frame = as_frame(pd.DataFrame(matrix, columns=list(stack.columns), copy=False))
    predictions: dict[str, np.ndarray] = {}
    if pred_key is not None:
        dtype, tail = pred_key
        stacked = np.frombuffer(b"".join(stack.predictions), dtype=np.dtype(dtype)).reshape((total, *tail))
        predictions = prediction_columns(stacked, total)
    return stacked_table(stack.requests, stack.counts, frame, predictions, deployment, redact)


def _unpart(part: tuple) -> Any:
    if part[0] == _NONE:
        return None
    if part[0] == _PICKLED:
        return part[1]
    if part[0] == _RAW_FRAME:
        _, columns, n_rows, raw = part
        return pd.DataFrame(np.frombuffer(raw, dtype=np.float64).reshape(n_rows, len(columns)),
                            columns=list(columns))
    _, dtype, shape, raw = part
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
