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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BATCH = 2  # a batch body's first byte (compact: 1, a pickle: 0x80)
_HEAD = struct.Struct("<BxxxIII")
_RECORD_HEAD = struct.Struct("<II")  # spool.py's record head: length, crc32 of the body
_FLOAT64 = np.dtype(np.float64)
# What a request adds to a batch record besides its texts and raw bytes (two float64, a u32 row
# count, four u32 text lengths and an i16 status): the writer's buffer bound counts this for it.
PER_REQUEST_BYTES = 8 + 8 + 4 + 16 + 2
_TEXT_FIELDS = 4


def batch_size(request: Any) -> tuple[int, int] | None:
    """``(bytes, rows)`` this request will take in a batch record, or None if the form does not take
    it: its parser's raw rows (``raw_inputs``: columns, float64 rows x columns), numeric predictions
    of one row each (or none), and the attributes of the types the converter gives them (as a
    compact record's). Runs on the request path: a few attribute reads and type checks."""
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
    request_id, version, status, role, name = (request.request_id, request.model_version, request.status,
                                               request.role, request.model_name)
    if (type(request_id) is not str or type(version) is not str or type(status) is not int
            or not 0 <= status <= 0x7FFF or type(request.timestamp) not in (float, int)
            or type(request.latency_ms) not in (float, int) or not (role is None or type(role) is str)
            or not (name is None or type(name) is str)):
        return None
    return size + values.nbytes + PER_REQUEST_BYTES + len(request_id), rows


@dataclass(slots=True)
class _Group:
    """The requests of one layout, field by field, as a batch record holds them."""

    columns: tuple
    pred_layout: tuple | None
    request_id: list[str] = field(default_factory=list)
    timestamp: list[float] = field(default_factory=list)
    model_version: list[str] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    role: list[str] = field(default_factory=list)
    model_name: list[str] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    predictions: list[np.ndarray] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)  # should the group have to be encoded one by one


def encode_batches(requests: Sequence[Any], layout_bytes: Any) -> tuple[list[bytes], list[Any]]:
    """Batch records (head included) for ``requests``, one per layout, and the requests the form
    does not take (for the caller to encode one by one). ``layout_bytes(columns, pred_layout)`` is
    the pickled layout (:mod:`.spool` keeps them cached)."""
    groups: dict[tuple, _Group] = {}
    rest: list[Any] = []
    last_key: tuple | None = None
    group: _Group | None = None
    for request in requests:
        try:
            if batch_size(request) is None:
                rest.append(request)
                continue
        except AttributeError:  # not a request: encode_record says what it makes of it
            rest.append(request)
            continue
        request_id, timestamp, version, status, latency, role, name, (columns, values), predictions = (
            request.request_id, request.timestamp, request.model_version, request.status, request.latency_ms,
            request.role, request.model_name, request.raw_inputs, request.predictions)
        if predictions is None:
            key: tuple = (columns, None)
        else:
            key = (columns, predictions.dtype.str, predictions.shape[1:])
        if key != last_key:  # consecutive requests nearly always share one: one tuple compare
            group = groups.get(key)
            if group is None:
                pred_layout = None if predictions is None else (predictions.dtype.str, predictions.shape[1:])
                group = groups[key] = _Group(columns, pred_layout)
            last_key = key
        assert group is not None
        group.request_id.append(request_id)
        group.timestamp.append(timestamp)
        group.model_version.append(version)
        group.status.append(status)
        group.latency_ms.append(latency)
        group.role.append(role or "")
        group.model_name.append(name or "")
        group.values.append(values)
        if predictions is not None:
            group.predictions.append(predictions)
        group.requests.append(request)
    records = []
    for group in groups.values():
        try:
            records.append(_record(group, layout_bytes(group.columns, group.pred_layout)))
        except (UnicodeEncodeError, TypeError, ValueError):  # a lone surrogate, unhashable labels: one by one
            rest.extend(group.requests)
    return records, rest


def _texts(values: list[str]) -> tuple[bytes, list[int]]:
    """The UTF-8 bytes of ``values`` one after the other, and each one's byte length."""
    joined = "".join(values)
    data = joined.encode()
    if len(data) == len(joined):  # ASCII (request ids, versions: nearly always): lengths are len()
        return data, [len(value) for value in values]
    parts = [value.encode() for value in values]
    return b"".join(parts), [len(part) for part in parts]


def _record(group: _Group, layout: bytes) -> bytes:
    n = len(group.request_id)
    values = group.values[0] if n == 1 else np.concatenate(group.values)
    values = np.ascontiguousarray(values)
    rows = np.fromiter((len(v) for v in group.values), dtype=np.uint32, count=n)
    pieces: list[Any] = [
        _HEAD.pack(BATCH, n, len(values), len(layout)),
        np.array(group.timestamp, dtype=np.float64),
        np.array(group.latency_ms, dtype=np.float64),
        rows,
    ]
    texts, lengths = [], []
    for column in (group.request_id, group.model_version, group.role, group.model_name):
        data, sizes = _texts(column)
        texts.append(data)
        lengths += sizes
    pieces += [np.array(lengths, dtype=np.uint32), np.array(group.status, dtype=np.int16), *texts, layout, values]
    if group.predictions:
        predictions = group.predictions[0] if n == 1 else np.concatenate(group.predictions)
        pieces.append(np.ascontiguousarray(predictions))
    length, crc = 0, 0
    for piece in pieces:
        if isinstance(piece, np.ndarray):
            if not piece.nbytes:  # a view of no bytes cannot be cast (predictions of 0 columns)
                continue
            piece = piece.data.cast("B")
        length += len(piece)
        crc = zlib.crc32(piece, crc)
    return b"".join((_RECORD_HEAD.pack(length, crc), *pieces))


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
