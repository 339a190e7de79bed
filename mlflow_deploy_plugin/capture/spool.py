"""The spool: answered requests as append-only records, cheap to write, turned into Arrow elsewhere.

The serving process encodes captured requests as records (numbers as raw bytes, no pandas or
Arrow) and appends records to a segment file; the converter process (:mod:`.converter`) decodes
whole segments into tables of the capture layout. So encoding Parquet never holds the GIL of the
process that serves.

A record is ``<length u32><crc32 u32><body>``. The common case (the parser's float64 rows and
numeric predictions, or none) is a *batch* body (:mod:`.batch`, first byte 2): every request of
one column layout that a write of the writer thread takes, field by field. A float64 frame without
the parser's rows is a *compact* body (first byte 1; what older writers wrote for the common case):
a fixed header of numbers, the request's strings, the columns and prediction layout (pickled once
per layout and reused: the request path does not pickle), then the raw bytes of the inputs and
predictions. The converter stacks the batch and compact records of one day and layout in one go.
Anything else is a pickle (its first byte is 0x80) converted request by request. A segment cut
short by a crash ends in a torn record: reading stops there (the records before it are kept).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from mlflow_deploy_plugin.capture.batch import (
    BATCH,
    BatchRecord,
    LayoutBuffer,
    batch_item,
    batch_requests,
    encode_batches,
    item_request,
    read_batch,
)
from mlflow_deploy_plugin.capture.layout import META_COLUMNS
from mlflow_deploy_plugin.capture.meta import (
    REQUEST_ATTRS,
    RequestMeta,
    day_of,
    input_names,
    meta_arrays,
    numeric_array,
    prediction_arrays,
)

if TYPE_CHECKING:
    import pandas as pd

# pandas is not imported here: the converter process decodes compact records (nearly all traffic)
# with numpy and Arrow alone and loads pandas (~40 MiB resident) only for a record that needs it
# (pickled inputs, a redaction). The request path's frames come from a process that has it loaded.

_HEAD = struct.Struct("<II")
# A compact body: kind, timestamp, latency_ms, status, rows, then the byte lengths of request_id,
# model_version, role, model_name and the layout; those follow in that order, then the raw inputs
# (rows x columns float64, row by row) and the raw predictions (the rest of the body).
_COMPACT_HEAD = struct.Struct("<BddiIHHHHH")
_COMPACT = 1  # first byte of a compact body (a pickle's first byte is 0x80)
_MAX_TEXT = 0xFFFF
# Pickled layouts (columns, prediction dtype and shape after the rows) by layout, for the request
# path; bounded, since the columns of a body parsed by MLflow's parsers are the client's choice.
_LAYOUTS: dict[tuple, bytes] = {}
_MAX_LAYOUTS = 256
# Kinds of inputs / predictions in a record.
_RAW_FRAME = 1  # float64 frame: (columns, n_rows, bytes)
_RAW_ARRAY = 2  # numeric ndarray: (dtype str, shape, bytes)
_PICKLED = 3  # anything else, pickled with the record
_NONE = 0
_FLOAT64 = np.dtype(np.float64)
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


# pandas' DataFrame and serving.frames.is_float64, bound by _frame_type once pandas is loaded (no
# value can be a DataFrame before): the request path then reads two globals, no import statement.
_DataFrame: Any = None
_is_float64: Any = None


def _frame_type() -> Any:
    global _DataFrame, _is_float64
    pandas = sys.modules.get("pandas")
    if pandas is not None:
        from mlflow_deploy_plugin.serving.frames import is_float64

        _DataFrame, _is_float64 = pandas.DataFrame, is_float64
    return _DataFrame


def encode_record(request: Any) -> bytes:
    """One answered request as a spool record (runs on the request path: keep it cheap).

    Raises if the request cannot be encoded (e.g. inputs that cannot be pickled).
    """
    inputs, predictions = request.inputs, request.predictions
    raw = getattr(request, "raw_inputs", None)
    if raw is not None:
        body = _raw_body(request, raw, predictions)
        if body is not None:
            return _HEAD.pack(len(body), zlib.crc32(body)) + body
    frame_type = _DataFrame if _DataFrame is not None else _frame_type()
    is_frame = frame_type is not None and isinstance(inputs, frame_type)
    if is_frame:
        body = _compact_body(request, inputs, predictions)
        if body is not None:
            return _HEAD.pack(len(body), zlib.crc32(body)) + body
    meta = tuple(getattr(request, name, None) for name in REQUEST_ATTRS)
    n_rows = rows_of_raw(raw) if inputs is None else None
    if n_rows is not None and raw is not None:  # no frame, its rows only (a shadow copy, an item of a batch): kept as rows
        columns, values = raw
        in_part: tuple = (_RAW_FRAME, list(columns), n_rows, values.astype(np.float64).tobytes())
    elif inputs is None:
        in_part = (_NONE,)
    elif is_frame and _is_float64(inputs) and len(inputs) and len(inputs.columns):
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


def _compact_body(request: Any, inputs: pd.DataFrame, predictions: Any) -> bytes | None:
    """The compact body of a float64 frame with numeric predictions (or none); None when the
    request is anything else (it is pickled then)."""
    n_rows = len(inputs)
    if not n_rows or not len(inputs.columns) or not _is_float64(inputs):
        return None
    return _compact(request, tuple(inputs.columns.tolist()), n_rows, inputs.to_numpy(), predictions)


def rows_of_raw(raw: Any) -> int | None:
    """The row count of a request's ``raw_inputs`` (see :func:`_raw_body`), None if it is not one."""
    if type(raw) is tuple and len(raw) == 2 and type(raw[1]) is np.ndarray and raw[1].ndim == 2:
        return int(raw[1].shape[0])
    return None


def _raw_body(request: Any, raw: Any, predictions: Any) -> bytes | None:
    """The compact body from the parser's ``(columns, float64 rows x columns array)`` that the
    request's input frame was built on (``Answer.raw_inputs``): the same record as from the frame,
    without a pandas call (they cost ~10 us per request in a busy worker). None if not such a pair."""
    if type(raw) is not tuple or len(raw) != 2:
        return None
    columns, values = raw
    if (type(columns) is not tuple or not columns or type(values) is not np.ndarray or values.dtype != _FLOAT64
            or values.ndim != 2 or values.shape[1] != len(columns) or not values.shape[0]):
        return None
    return _compact(request, columns, values.shape[0], values, predictions)


def _compact(request: Any, columns: tuple, n_rows: int, values: np.ndarray, predictions: Any) -> bytes | None:
    """The compact body of ``n_rows`` float64 ``values`` (rows x ``columns``) and the predictions."""
    if predictions is None:
        pred_layout, pred_bytes = None, b""
    elif (isinstance(predictions, np.ndarray) and predictions.dtype.kind in "biuf" and predictions.ndim in (1, 2)
          and len(predictions) == n_rows):
        pred_layout, pred_bytes = (predictions.dtype.str, predictions.shape[1:]), predictions.tobytes()
    else:
        return None
    try:  # an Answer has them all: read directly, it is the hot path (getattr with a default for others)
        request_id, timestamp, version, status, latency, role, name = (
            request.request_id, request.timestamp, request.model_version, request.status, request.latency_ms,
            request.role, request.model_name)
    except AttributeError:
        request_id, timestamp, version, status, latency, role, name = (
            getattr(request, attr, None) for attr in REQUEST_ATTRS)
    # Exactly the types the converter would make of them (str, float, a status int16 holds), else pickled.
    if (type(request_id) is not str or type(version) is not str or type(status) is not int
            or not 0 <= status <= 0x7FFF or type(timestamp) not in (float, int) or type(latency) not in (float, int)
            or not (role is None or type(role) is str) or not (name is None or type(name) is str)):
        return None
    try:
        texts = (request_id.encode(), version.encode(), role.encode() if role else b"",
                 name.encode() if name else b"")
        layout = layout_bytes(columns, pred_layout)
    except (UnicodeEncodeError, TypeError):  # a lone surrogate; unhashable column labels
        return None
    if max(len(layout), *map(len, texts)) > _MAX_TEXT:
        return None
    head = _COMPACT_HEAD.pack(_COMPACT, timestamp, latency, status, n_rows, *map(len, texts), len(layout))
    return b"".join((head, *texts, layout, values.tobytes(), pred_bytes))


def layout_bytes(columns: tuple, pred_layout: tuple | None) -> bytes:
    """The pickled ``(columns, prediction layout)`` of a compact or batch record, cached (the
    request path does not pickle). Raises TypeError for unhashable column labels."""
    key = (columns, pred_layout)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _dumps(key, True)
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


def encode_records(requests: Iterable[Any]) -> tuple[list[bytes], int]:
    """Records for answered requests, as few as their layouts allow: one batch record (:mod:`.batch`)
    per layout for those :func:`.batch.batch_item` takes, a record each for the others; and how many
    requests could not be encoded at all (e.g. inputs that cannot be pickled)."""
    items, records, failed = [], [], 0
    for request in requests:
        taken = batch_item(request)
        if taken is not None:
            items.append(taken[0])
            continue
        try:
            records.append(encode_record(request))
        except Exception:
            failed += 1
    batched, failed_items = _encode_items(items)
    return records + [b"".join(record) for record in batched], failed + failed_items


def encode_items(items: list[tuple]) -> tuple[list[Any], int, int]:
    """The spool bytes of items of :func:`.batch.batch_item` (what the writer thread encodes): the
    buffers to write one after the other (``os.writev``: the requests' own arrays among them), their
    size in bytes, and how many items could not be encoded at all."""
    records, failed = _encode_items(items)
    buffers = [buffer for record in records for buffer in record]
    return buffers, sum(map(len, buffers)), failed


def encode_layouts(layouts: Iterable[LayoutBuffer]) -> tuple[list[Any], int, int]:
    """The spool bytes of the requests in ``layouts`` (what the writer thread encodes): batch
    records (the buffers to write one after the other, views of the layouts' arrays: write them
    before the layouts are reused), their size in bytes, and how many requests could not be
    encoded at all. A layout whose batch records cannot be made (a lone surrogate in a text,
    unhashable column labels) has its requests encoded one by one, as :func:`encode_items` does."""
    records: list[list[Any]] = []
    failed = 0
    for layout in layouts:
        try:
            records += layout.records(layout_bytes)
        except Exception:
            more, failed_items = _encode_items(layout.items())
            records += more
            failed += failed_items
    buffers = [buffer for record in records for buffer in record]
    return buffers, sum(map(len, buffers)), failed


def _encode_items(items: list[tuple]) -> tuple[list[list[Any]], int]:
    if not items:
        return [], 0
    try:
        records, rest = encode_batches(items, layout_bytes)
    except Exception:  # a flaw of the batch form must not lose the requests: a record each
        records, rest = [], list(items)
    failed = 0
    for item in rest:
        try:
            records.append([encode_record(item_request(item))])
        except Exception:
            failed += 1
    return records, failed


@dataclass(slots=True)
class CompactRecord:
    """A decoded compact record: the request's attributes, its layout (pickled) and raw bytes."""

    request_id: str
    timestamp: float
    model_version: str
    status: int
    latency_ms: float
    role: str | None
    model_name: str | None
    rows: int
    layout: bytes
    raw: memoryview  # the inputs' bytes, then the predictions'


def _read_compact(body: memoryview) -> CompactRecord:
    _, timestamp, latency, status, rows, *lengths = _COMPACT_HEAD.unpack_from(body)
    offset = _COMPACT_HEAD.size
    fields = []
    for length in lengths:
        fields.append(body[offset:offset + length])
        offset += length
    if offset > len(body):
        raise ValueError("compact record shorter than its header says")
    request_id, version, role, name, layout = fields
    return CompactRecord(str(request_id, "utf-8"), timestamp, str(version, "utf-8"), status, latency,
                         str(role, "utf-8") or None, str(name, "utf-8") or None, rows, bytes(layout),
                         body[offset:])


@dataclass(slots=True)
class SpoolRecord:
    """A decoded record: the request's :data:`REQUEST_ATTRS` and its inputs and predictions parts."""

    request: SimpleNamespace
    inputs: tuple
    predictions: tuple


Record = SpoolRecord | CompactRecord | BatchRecord | None


def read_records(data: bytes) -> tuple[list[Record], int]:
    """Decode a segment's bytes; returns the records (None for each request of one that is whole but
    cannot be loaded) and how many bytes at the end were torn.

    A compact or batch record's inputs and predictions are views of ``data`` (split by its layout
    later)."""
    records: list[Record] = []
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
        if body[0] == _COMPACT:
            try:
                records.append(_read_compact(body))
            except (ValueError, struct.error):
                records.append(None)
            continue
        if body[0] == BATCH:
            try:
                records.append(read_batch(body))
            except (ValueError, struct.error):
                records.extend([None] * batch_requests(body))
            continue
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
    requests: list[SimpleNamespace] | RequestMeta = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    inputs: list[bytes | memoryview] = field(default_factory=list)
    predictions: list[bytes | memoryview] = field(default_factory=list)


def request_count(records: list[Record]) -> int:
    """How many requests ``records`` (from :func:`read_records`) hold."""
    return sum(record.requests if isinstance(record, BatchRecord) else 1 for record in records)


def records_to_tables(records: list[Record], deployment: str,
                      redact: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
                      ) -> tuple[dict[date, list[tuple[pa.Table, int]]], int]:
    """Tables of the capture layout by day, each with its request count, and how many requests failed.

    The same tables :func:`.arrow.tables_by_day` builds from the requests themselves.
    """
    stacks: dict[tuple, _Stack] = {}
    compact: dict[tuple[int, bytes], _Stack] = {}  # (day number, pickled layout) -> its records
    layouts: dict[bytes, tuple[tuple, tuple | None, int, int]] = {}  # columns, prediction layout, sizes
    others: list[Any] = []  # AnsweredRequest-like namespaces
    unconverted = 0
    for record in records:
        if record is None:
            unconverted += 1
            continue
        if isinstance(record, CompactRecord):
            try:
                _stack_compact(record, compact, layouts)
            except Exception:
                unconverted += 1
            continue
        if isinstance(record, BatchRecord):
            try:
                _stack_batch(record, compact, layouts)
            except Exception:
                unconverted += record.requests
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
                assert isinstance(stack.requests, list)
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
    by_day: dict[date, list[tuple[pa.Table, int]]] = {}
    if others:
        from mlflow_deploy_plugin.capture.arrow import tables_by_day  # pandas: only for such records

        by_day, unconverted_others = tables_by_day(others, deployment, redact)
        unconverted += unconverted_others
    stacked = [(day, pred_key, stack) for (day, _, pred_key), stack in stacks.items()]
    stacked += [(day_of(day * 86400), layouts[layout][1], stack) for (day, layout), stack in compact.items()]
    for day, pred_key, stack in stacked:
        try:
            table = _stack_table(stack, pred_key, deployment, redact)
        except Exception:
            unconverted += len(stack.requests)
            continue
        by_day.setdefault(day, []).append((table, len(stack.requests)))
    return by_day, unconverted


def _layout(layout: bytes, layouts: dict[bytes, tuple[tuple, tuple | None, int, int]],
            ) -> tuple[tuple, tuple | None, int, int]:
    """A pickled layout's columns, prediction layout, and bytes per row of inputs and predictions."""
    known = layouts.get(layout)
    if known is None:
        columns, pred_layout = pickle.loads(layout)
        row_items = 1
        if pred_layout is not None:
            for size in pred_layout[1]:
                row_items *= int(size)
        row_bytes = row_items * np.dtype(pred_layout[0]).itemsize if pred_layout is not None else 0
        known = layouts[layout] = (tuple(columns), pred_layout, 8 * len(columns), row_bytes)
    return known


def _stack_of(stacks: dict[tuple[int, bytes], _Stack], day: int, layout: bytes, columns: tuple) -> tuple[_Stack, RequestMeta]:
    stack = stacks.get((day, layout))
    if stack is None:
        stack = stacks[(day, layout)] = _Stack(columns, RequestMeta())
    meta = stack.requests
    assert isinstance(meta, RequestMeta)
    return stack, meta


def _stack_batch(record: BatchRecord, stacks: dict[tuple[int, bytes], _Stack],
                 layouts: dict[bytes, tuple[tuple, tuple | None, int, int]]) -> None:
    """Add a batch record's requests to the stacks of their day and layout, the ones its compact
    records would join (raises if its sizes do not fit)."""
    columns, _, in_row_bytes, pred_row_bytes = _layout(record.layout, layouts)
    rows = record.rows.astype(np.int64)
    total = int(rows.sum())
    split = total * in_row_bytes
    if not len(rows) or int(rows.min()) < 1 or len(record.raw) != split + total * pred_row_bytes:
        raise ValueError("batch record's bytes do not fit its layout")
    days = (record.timestamp // 86400).astype(np.int64)
    parts: list[tuple[int, Any, list[tuple[int, int]]]]
    if days[0] == days[-1] and (days == days[0]).all():
        parts = [(int(days[0]), slice(None), [(0, total)])]
    else:  # requests either side of midnight UTC: each day's, its rows request by request
        ends = np.cumsum(rows)
        parts = []
        for day in np.unique(days).tolist():
            chosen = np.flatnonzero(days == day)
            spans = [(int(ends[i] - rows[i]), int(ends[i])) for i in chosen.tolist()]
            parts.append((day, chosen, spans))
    for day, chosen, spans in parts:
        stack, meta = _stack_of(stacks, day, record.layout, columns)
        every = isinstance(chosen, slice)
        for name in ("request_id", "model_version", "role", "model_name"):
            values = getattr(record, name)
            getattr(meta, name).extend(values if every else [values[i] for i in chosen.tolist()])
        meta.timestamp.extend(record.timestamp[chosen].tolist())
        meta.status.extend(record.status[chosen].tolist())
        meta.latency_ms.extend(record.latency_ms[chosen].tolist())
        stack.counts.extend(rows[chosen].tolist())
        for start, stop in spans:
            stack.inputs.append(record.raw[start * in_row_bytes:stop * in_row_bytes])
            if pred_row_bytes:
                stack.predictions.append(record.raw[split + start * pred_row_bytes:split + stop * pred_row_bytes])


def _stack_compact(record: CompactRecord, stacks: dict[tuple[int, bytes], _Stack],
                   layouts: dict[bytes, tuple[tuple, tuple | None, int, int]]) -> None:
    """Add a compact record to the stack of its day and layout (raises if its sizes do not fit)."""
    columns, _, in_row_bytes, pred_row_bytes = _layout(record.layout, layouts)
    rows = record.rows
    split = rows * in_row_bytes
    if rows < 1 or len(record.raw) != split + rows * pred_row_bytes:
        raise ValueError("compact record's bytes do not fit its layout")
    stack, meta = _stack_of(stacks, int(record.timestamp // 86400), record.layout, columns)
    meta.request_id.append(record.request_id)
    meta.timestamp.append(record.timestamp)
    meta.model_version.append(record.model_version)
    meta.status.append(record.status)
    meta.latency_ms.append(record.latency_ms)
    meta.role.append(record.role)
    meta.model_name.append(record.model_name)
    stack.counts.append(rows)
    stack.inputs.append(record.raw[:split])
    if pred_row_bytes:
        stack.predictions.append(record.raw[split:])


def _stack_table(stack: _Stack, pred_key: tuple | None, deployment: str,
                 redact: Callable[[pd.DataFrame], pd.DataFrame] | None) -> pa.Table:
    """The table of a stack's requests: the one place that builds capture tables from raw records,
    with or without a redaction (what :func:`.arrow.tables_by_day` gives for the same requests)."""
    total = sum(stack.counts)
    ncols = len(stack.columns)
    values = np.frombuffer(b"".join(stack.inputs), dtype=np.float64)
    # Column by column in memory (one transposing copy): each column then becomes Arrow without
    # a strided gather of its own (~2x faster for 20 columns).
    matrix = np.ascontiguousarray(values.reshape(total, ncols).T).T if ncols else np.empty((total, 0))
    predictions: dict[str, np.ndarray] = {}
    if pred_key is not None:
        dtype, tail = pred_key
        stacked = np.frombuffer(b"".join(stack.predictions), dtype=np.dtype(dtype)).reshape((total, *tail))
        predictions = prediction_arrays(stacked)
    meta = stack.requests
    if not isinstance(meta, RequestMeta):
        requests, meta = meta, RequestMeta()
        for request in requests:
            meta.add(request)
    names = input_names(stack.columns)
    if redact is None:
        inputs = [numeric_array(matrix[:, i]) for i in range(ncols)]
    else:
        # The redaction works on a DataFrame (pandas is loaded for it only); hashed columns become text.
        import pandas as pd

        from mlflow_deploy_plugin.capture.arrow import to_arrow

        frame = redact(pd.DataFrame(matrix, columns=names, copy=False))
        names = list(frame.columns)
        inputs = [to_arrow(frame.iloc[:, i]) for i in range(len(names))]
    arrays = [*meta_arrays(meta, stack.counts, deployment), *inputs, *map(numeric_array, predictions.values())]
    return pa.Table.from_arrays(arrays, names=[*META_COLUMNS, *names, *predictions])


def _unpart(part: tuple) -> Any:
    if part[0] == _NONE:
        return None
    if part[0] == _PICKLED:
        return part[1]
    if part[0] == _RAW_FRAME:
        import pandas as pd

        _, columns, n_rows, raw = part
        return pd.DataFrame(np.frombuffer(raw, dtype=np.float64).reshape(n_rows, len(columns)),
                            columns=list(columns))
    _, dtype, shape, raw = part
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
