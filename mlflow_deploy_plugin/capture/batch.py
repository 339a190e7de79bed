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

    The item holds the request's own arrays, not copies: the writer copies it into a
    :class:`LayoutBuffer` at once (``record()``), so nothing of the request is kept after it;
    :func:`.spool.encode_records` encodes items on the spot.
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
    rows = np.fromiter(map(len, values), dtype=np.uint32, count=len(members))
    stacked = len(members) > 1 and values[0].nbytes < _STACK_BELOW  # small ones: one copy costs less than a buffer each
    value_pieces: list[Any] = [np.concatenate(values)] if stacked else list(values)
    pred_pieces: list[Any] = [] if predictions[0] is None else (
        [np.concatenate(predictions)] if stacked else list(predictions))
    return _record_of(request_id, timestamp, version, status, latency, role, name, rows, value_pieces, pred_pieces,
                      layout)


def _record_of(request_id: Sequence[str], timestamp: Sequence[float], version: Sequence[str], status: Sequence[int],
               latency: Sequence[float], role: Sequence[str | None], name: Sequence[str | None], rows: np.ndarray,
               value_pieces: list[Any], pred_pieces: list[Any], layout: bytes) -> list[Any]:
    """A batch record from its requests' fields, rows (u32 per request) and the arrays that hold
    their input rows and predictions, one after the other (as buffers: see :func:`_record`)."""
    pieces: list[Any] = [
        _HEAD.pack(BATCH, len(request_id), int(rows.sum()), len(layout)),
        np.array(timestamp, dtype=np.float64),
        np.array(latency, dtype=np.float64),
        rows,
    ]
    texts, lengths = [], []
    columns: tuple[Sequence[str | None], ...] = (request_id, version, role, name)
    for column in columns:
        texts_of = tuple(text or "" for text in column) if None in column else column
        data, sizes = _texts(texts_of)  # type: ignore[arg-type]  # no None left
        texts.append(data)
        lengths += sizes
    pieces += [np.array(lengths, dtype=np.uint32), np.array(status, dtype=np.int16), *texts, layout,
               *value_pieces, *pred_pieces]
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


# A layout's buffer starts with room for this many rows, or for as many as its last write took.
_FIRST_ROWS = 256


class LayoutBuffer:
    """The requests of one column layout waiting for the writer thread, copied out of them.

    :meth:`add` copies a request's item (:func:`batch_item`) into growing arrays (its input rows and
    predictions) and lists (its scalars and texts: no container per request), so nothing of the
    request outlives it: the objects a request made die with it, and the memory they took is reused
    by the next one while it is hot, instead of ~a quarter second of requests (their rows, their
    predictions and the batch output those are views of) staying alive until the writer thread
    takes them. The writer thread then encodes each buffer's requests as batch records
    (:meth:`records`) from a few contiguous arrays: one checksum call and one ``writev`` buffer each
    (buffers of their own per request made ~900 GIL hand-overs a write at 100 rows: ``zlib.crc32``
    releases the GIL for every piece of more than 5 KiB). Its arrays are reused write after write
    (:meth:`clear`, the writer keeps a few: ``writer._KEEP_BYTES``): no fresh memory faulted in for
    every write. They grow by doubling: at most twice what the writer's buffer bound lets wait.
    """

    __slots__ = ("columns", "latency", "model_name", "model_version", "pred_dtype", "pred_tail", "predictions",
                 "request_id", "role", "row_counts", "rows", "status", "timestamp", "values")

    def __init__(self, columns: tuple, values: np.ndarray, predictions: np.ndarray | None,
                 rows_hint: int = _FIRST_ROWS) -> None:
        self.columns = columns
        self.pred_dtype = None if predictions is None else predictions.dtype
        self.pred_tail: tuple = () if predictions is None else predictions.shape[1:]
        capacity = max(rows_hint, _FIRST_ROWS)
        self.values = np.empty((capacity, values.shape[1]), dtype=_FLOAT64)
        self.predictions = None if predictions is None else np.empty((capacity, *self.pred_tail), self.pred_dtype)
        self.rows = 0
        self.request_id: list[str] = []
        self.timestamp: list[float] = []
        self.model_version: list[str] = []
        self.status: list[int] = []
        self.latency: list[float] = []
        self.role: list[str | None] = []
        self.model_name: list[str | None] = []
        self.row_counts: list[int] = []

    def takes(self, columns: tuple, predictions: np.ndarray | None) -> bool:
        """True if a request of these columns and predictions belongs here."""
        if self.columns is not columns and self.columns != columns:
            return False
        if predictions is None:
            return self.pred_dtype is None
        return self.pred_dtype == predictions.dtype and self.pred_tail == predictions.shape[1:]

    def add(self, item: tuple) -> None:
        """Copy ``item`` (of :func:`batch_item`, one :meth:`takes` accepts) in."""
        request_id, timestamp, version, status, latency, role, name, _, values, predictions = item
        start = self.rows
        stop = start + len(values)
        if stop > len(self.values):
            self._grow(stop)
        self.values[start:stop] = values
        if predictions is not None:
            self.predictions[start:stop] = predictions  # type: ignore[index]
        self.rows = stop
        self.row_counts.append(stop - start)
        self.request_id.append(request_id)
        self.timestamp.append(timestamp)
        self.model_version.append(version)
        self.status.append(status)
        self.latency.append(latency)
        self.role.append(role)
        self.model_name.append(name)

    def _grow(self, rows: int) -> None:
        capacity = max(rows, 2 * len(self.values))
        values = np.empty((capacity, self.values.shape[1]), dtype=_FLOAT64)
        values[:self.rows] = self.values[:self.rows]
        self.values = values
        if self.predictions is not None:
            predictions = np.empty((capacity, *self.pred_tail), self.pred_dtype)
            predictions[:self.rows] = self.predictions[:self.rows]
            self.predictions = predictions

    @property
    def requests(self) -> int:
        """How many requests it holds."""
        return len(self.request_id)

    @property
    def nbytes(self) -> int:
        """The memory its arrays take (its capacity, not what it holds)."""
        return self.values.nbytes + (self.predictions.nbytes if self.predictions is not None else 0)

    def clear(self) -> None:
        """Empty, keeping its arrays (their pages stay faulted in) for the next write's requests."""
        self.rows = 0
        for field in (self.request_id, self.timestamp, self.model_version, self.status, self.latency, self.role,
                      self.model_name, self.row_counts):
            field.clear()

    def records(self, layout_bytes: Any) -> list[list[Any]]:
        """Its requests as batch records (each as its buffers: :func:`_record`), cut between requests
        into records of at most ``_MAX_RECORD_BYTES`` of input rows. Raises what encoding raises (a
        lone surrogate in a text: UnicodeEncodeError; unhashable column labels: TypeError): the
        caller then encodes :meth:`items` one by one."""
        pred_layout = None if self.pred_dtype is None else (self.pred_dtype.str, self.pred_tail)
        layout = layout_bytes(self.columns, pred_layout)
        counts = np.array(self.row_counts, dtype=np.uint32)
        ends = np.cumsum(counts, dtype=np.int64)
        row_bytes = self.values.shape[1] * _FLOAT64.itemsize
        records, first, first_row = [], 0, 0
        while first < self.requests:
            # The requests whose rows end within _MAX_RECORD_BYTES of this record's first row (at least one).
            last = max(int(np.searchsorted(ends, first_row + _MAX_RECORD_BYTES // max(row_bytes, 1), "right")),
                       first + 1)
            end_row = int(ends[last - 1])
            span = slice(first, last)
            preds = [] if self.predictions is None else [self.predictions[first_row:end_row]]
            records.append(_record_of(self.request_id[span], self.timestamp[span], self.model_version[span],
                                      self.status[span], self.latency[span], self.role[span], self.model_name[span],
                                      counts[span], [self.values[first_row:end_row]], preds, layout))
            first, first_row = last, end_row
        return records

    def items(self) -> list[tuple]:
        """Its requests as items again (their arrays: copies), for records of their own."""
        out, start = [], 0
        for index, rows in enumerate(self.row_counts):
            stop = start + rows
            predictions = None if self.predictions is None else self.predictions[start:stop].copy()
            out.append((self.request_id[index], self.timestamp[index], self.model_version[index], self.status[index],
                        self.latency[index], self.role[index], self.model_name[index], self.columns,
                        self.values[start:stop].copy(), predictions))
            start = stop
        return out


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
