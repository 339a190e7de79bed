"""The spool's batch record: many answered requests of one column layout in one record.

A compact record (:mod:`.spool`) has a fixed cost per request on the serving process (a header
packed, four strings encoded, a crc, a join: ~7 us of a busy worker's ~10 us per captured request)
against well under a microsecond for its bytes. So the writer thread (:mod:`.writer`) encodes the
requests a write takes (the last ``_WRITE_EVERY_S``, 0.25 s) as one batch record per layout
(columns and prediction dtype), paying that fixed cost once per write: the request path only
checks that a request fits this form and queues it.

A batch body, all numbers little-endian::

    head: kind (2), 3 pad bytes, requests n, rows (total), layout bytes      16 bytes
    timestamp f64[n], latency_ms f64[n], rows u32[n], text lengths u32[4n], status i16[n]
    texts: every request_id, then every model_version, role, model_name (UTF-8; "" for None)
    layout (pickled (columns, prediction layout), as in a compact record)
    inputs: rows x columns float64, request after request; then the predictions' raw bytes

It decodes (:func:`read_batch`) into the same request attributes as the compact records of the same
requests, so the converter stacks both into the same tables. A request this form does not take
(non-float inputs, non-numeric predictions, meta of other types) is encoded as before, alone.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from mlflow_deploy_plugin.capture.meta import REQUEST_ATTRS

BATCH = 2  # a batch body's first byte (compact: 1, a pickle: 0x80)
_HEAD = struct.Struct("<BxxxIII")
_RECORD_HEAD = struct.Struct("<II")  # spool.py's record head: length, crc32 of the body
_FLOAT64 = np.dtype(np.float64)
# What a request adds to a batch record besides its texts and raw bytes (two float64, a u32 row
# count, four u32 text lengths and an i16 status): the writer's buffer bound counts this and those
# for it (exact for ASCII texts); a record's head and layout (a few hundred bytes a write) come on top.
PER_REQUEST_BYTES = 8 + 8 + 4 + 16 + 2
_TEXT_FIELDS = 4
# Requests whose rows take fewer bytes than this are stacked into one array per record (a buffer of
# its own per request costs ~1 us of Python; for large ones the copy costs more than that).
_STACK_BELOW = 2048
# Rows (inputs and predictions) of one batch record at most, unless one request has more: records
# stay far below the 4 GiB their length field can say.
_MAX_RECORD_BYTES = 16 * 1024 * 1024


def batch_item(request: Any) -> tuple[tuple, int, int] | None:
    """What a batch record needs of ``request`` (its ``item``), the bytes it will take there and its
    row count, or None if the form does not take it. The form takes the parser's raw rows
    (``raw_inputs``: columns, float64 rows x columns), numeric predictions of one row each (or
    none), and attributes of the types the converter gives them (as a compact record's).

    Runs on the request path: a few attribute reads and type checks. The item is a plain tuple of
    the request's attributes and arrays: the request object itself (its DataFrame, its Python
    objects) is not kept while the item waits for the writer thread.

    The rule that comes with it: the item holds the request's own arrays, not copies, until the
    writer thread encodes them (up to ``_WRITE_EVERY_S`` later), so nothing may write into the raw
    rows or the predictions once the request is recorded. The parser's rows and the DataFrame built
    on them are the request's alone; the batcher's per-request predictions are views of one stacked
    output, only read; a shadow model gets rows of its own (:func:`..serving.shadow._frame_of`) and
    its output is copied once a call. A primary model that hands back one output buffer it reuses
    call after call would break this rule (and its own answers under concurrency).
    """
    raw = getattr(request, "raw_inputs", None)
    if type(raw) is not tuple or len(raw) != 2:
        return None
    columns, values = raw
    if (type(values) is not np.ndarray or values.dtype != _FLOAT64 or values.ndim != 2 or type(columns) is not tuple
            or not columns or values.shape[1] != len(columns) or not values.shape[0]):
        return None
    rows = values.shape[0]
    predictions = request.predictions
    if predictions is None:
        size = 0
    elif (type(predictions) is np.ndarray and predictions.dtype.kind in "biuf" and predictions.ndim in (1, 2)
          and len(predictions) == rows):
        size = predictions.nbytes
    else:
        return None
    # REQUEST_ATTRS in their order, then the rows and predictions (item_request reads it so).
    item = (request.request_id, request.timestamp, request.model_version, request.status, request.latency_ms,
            request.role, request.model_name, columns, values, predictions)
    request_id, timestamp, version, status, latency, role, name = item[:7]
    if (type(request_id) is not str or type(version) is not str or type(status) is not int
            or not 0 <= status <= 0x7FFF or type(timestamp) not in (float, int) or type(latency) not in (float, int)
            or not (role is None or type(role) is str) or not (name is None or type(name) is str)):
        return None
    texts = len(request_id) + len(version) + (len(role) if role else 0) + (len(name) if name else 0)
    return item, size + values.nbytes + PER_REQUEST_BYTES + texts, rows


def item_request(item: tuple) -> SimpleNamespace:
    """An item (:func:`batch_item`) as a request again, for a record of its own."""
    *attrs, columns, values, predictions = item
    return SimpleNamespace(**dict(zip(REQUEST_ATTRS, attrs, strict=True)), inputs=None, predictions=predictions,
                           raw_inputs=(columns, values))


def encode_batches(items: Sequence[tuple], layout_bytes: Any) -> tuple[list[list[Any]], list[tuple]]:
    """Batch records for ``items`` (from :func:`batch_item`), one per layout (each as the buffers
    that make it up, head first: see :func:`_record`), and the items of a layout that could not be
    (a lone surrogate in a text, unhashable column labels), for the caller to encode one by one.
    ``layout_bytes(columns, pred_layout)`` is the pickled layout (:mod:`.spool` keeps them cached)."""
    groups: dict[tuple, list[tuple]] = {}
    last_key: tuple | None = None
    group: list[tuple] = []
    for item in items:  # a key and an append per request: the fields are taken apart in C (zip)
        columns, predictions = item[7], item[9]
        if predictions is None:
            key: tuple = (columns,)
        elif predictions.ndim == 1:
            key = (columns, predictions.dtype)
        else:
            key = (columns, predictions.dtype, predictions.shape[1])
        if key != last_key:  # consecutive requests nearly always share one: one tuple compare
            group = groups.setdefault(key, [])
            last_key = key
        group.append(item)
    records, rest = [], []
    for members in groups.values():
        predictions = members[0][9]
        pred_layout = None if predictions is None else (predictions.dtype.str, predictions.shape[1:])
        try:
            layout = layout_bytes(members[0][7], pred_layout)
            records += [_record(members[start:stop], layout) for start, stop in _spans(members)]
        except (UnicodeEncodeError, TypeError, ValueError):
            rest.extend(members)
    return records, rest


def _spans(members: list[tuple]) -> list[tuple[int, int]]:
    """The requests cut, between requests, into runs of at most ``_MAX_RECORD_BYTES`` of input rows
    (a larger request alone)."""
    sizes = [item[8].nbytes for item in members]
    if sum(sizes) <= _MAX_RECORD_BYTES:
        return [(0, len(members))]
    spans, start, size = [], 0, 0
    for index, more in enumerate(sizes):
        if index > start and size + more > _MAX_RECORD_BYTES:
            spans.append((start, index))
            start, size = index, 0
        size += more
    spans.append((start, len(members)))
    return spans


def _texts(values: Sequence[str]) -> tuple[bytes, list[int]]:
    """The UTF-8 bytes of ``values`` one after the other, and each one's byte length."""
    joined = "".join(values)
    data = joined.encode()
    if len(data) == len(joined):  # ASCII (request ids, versions: nearly always): lengths are len()
        return data, list(map(len, values))
    parts = [value.encode() for value in values]
    return b"".join(parts), list(map(len, parts))


def _record(members: list[tuple], layout: bytes) -> list[Any]:
    """The batch record of items of one layout, as the buffers that make it up (its head first; each
    one's ``len`` is its size in bytes). A large request's rows and predictions are buffers of their
    own, the arrays the request came with: no copy of them is made here (the kernel copies them into
    the segment file, ``os.writev``). Copies into new objects were what 100-row requests cost most:
    fresh memory, faulted in page by page, for every write."""
    request_id, timestamp, version, status, latency, role, name, _, values, predictions = zip(*members, strict=True)
    n = len(members)
    rows = np.fromiter(map(len, values), dtype=np.uint32, count=n)
    pieces: list[Any] = [
        _HEAD.pack(BATCH, n, int(rows.sum()), len(layout)),
        np.array(timestamp, dtype=np.float64),
        np.array(latency, dtype=np.float64),
        rows,
    ]
    texts, lengths = [], []
    for column in (request_id, version, role, name):
        if None in column:
            column = tuple(text or "" for text in column)
        data, sizes = _texts(column)
        texts.append(data)
        lengths += sizes
    pieces += [np.array(lengths, dtype=np.uint32), np.array(status, dtype=np.int16), *texts, layout]
    stacked = n > 1 and values[0].nbytes < _STACK_BELOW  # small ones: one copy costs less than a buffer each
    pieces += [np.concatenate(values)] if stacked else values
    if predictions[0] is not None:
        pieces += [np.concatenate(predictions)] if stacked else predictions
    buffers: list[Any] = [b""]
    length, crc = 0, 0
    for piece in pieces:
        if isinstance(piece, np.ndarray):
            if not piece.nbytes:  # a view of no bytes cannot be cast (predictions of 0 columns)
                continue
            piece = np.ascontiguousarray(piece).data.cast("B")
        elif not piece:
            continue
        length += len(piece)
        crc = zlib.crc32(piece, crc)
        buffers.append(piece)
    buffers[0] = _RECORD_HEAD.pack(length, crc)
    return buffers


@dataclass(slots=True)
class BatchRecord:
    """A decoded batch record: its requests' attributes, field by field, its layout and raw bytes."""

    request_id: list[str]
    timestamp: np.ndarray  # float64
    model_version: list[str]
    status: np.ndarray  # int16
    latency_ms: np.ndarray  # float64
    role: list[str | None]
    model_name: list[str | None]
    rows: np.ndarray  # uint32: each request's row count
    layout: bytes
    raw: memoryview  # the inputs' bytes, then the predictions'

    @property
    def requests(self) -> int:
        """How many requests it holds."""
        return len(self.request_id)


def batch_requests(body: memoryview) -> int:
    """How many requests a batch body says it holds (1 if even its head is unreadable)."""
    try:
        return max(int(_HEAD.unpack_from(body)[1]), 1)
    except struct.error:
        return 1


def _split_texts(data: bytes, lengths: np.ndarray) -> list[str]:
    ends = np.cumsum(lengths, dtype=np.int64).tolist()
    starts = [0, *ends[:-1]]
    text = str(data, "utf-8")
    source: Any = text if len(text) == len(data) else data  # ASCII: slice the decoded text
    if source is text:
        return [text[a:b] for a, b in zip(starts, ends, strict=True)]
    return [str(data[a:b], "utf-8") for a, b in zip(starts, ends, strict=True)]


def read_batch(body: memoryview) -> BatchRecord:
    """Decode a batch body (raises ValueError or struct.error if it is not one)."""
    _, n, total_rows, layout_length = _HEAD.unpack_from(body)
    offset = _HEAD.size

    def take(dtype: Any, count: int) -> np.ndarray:
        nonlocal offset
        array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        offset += array.nbytes
        return array

    timestamps = take("<f8", n)
    latency = take("<f8", n)
    rows = take("<u4", n)
    lengths = take("<u4", _TEXT_FIELDS * n).reshape(_TEXT_FIELDS, n)
    status = take("<i2", n)
    texts = []
    for sizes in lengths:
        size = int(sizes.sum())
        if offset + size > len(body):
            raise ValueError("batch record shorter than its text lengths say")
        texts.append(_split_texts(bytes(body[offset:offset + size]), sizes))
        offset += size
    if offset + layout_length > len(body) or int(rows.sum()) != total_rows:
        raise ValueError("batch record's head does not fit its body")
    layout = bytes(body[offset:offset + layout_length])
    offset += layout_length
    request_id, version, role, name = texts
    return BatchRecord(request_id, timestamps, version, status, latency, [r or None for r in role],
                       [m or None for m in name], rows, layout, body[offset:])
