"""The spool's batch record (:mod:`capture.batch`): the requests a write takes, one record per layout,
become exactly the rows their records one by one give, and the writer counts them as before.

In process: records are encoded with :func:`encode_records` (what the writer thread does) and
:func:`encode_record` (a record per request, as before and as old spools hold), decoded with
:func:`read_records` / :func:`records_to_tables` as the converter does. The writer tests use a real
:class:`CaptureWriter`, its converter process and :func:`read_capture`.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mlflow_deploy_plugin.capture import CapturedRequest, CaptureWriter, read_capture
from mlflow_deploy_plugin.capture.arrow import tables_by_day
from mlflow_deploy_plugin.capture.batch import BatchRecord, LayoutBuffer, batch_item
from mlflow_deploy_plugin.capture.redaction import CaptureRedaction
from mlflow_deploy_plugin.capture.spool import (
    CompactRecord,
    SpoolRecord,
    encode_layouts,
    encode_record,
    encode_records,
    read_records,
    records_to_tables,
    request_count,
)
from mlflow_deploy_plugin.serving.app import Answer
from mlflow_deploy_plugin.serving.shadow import frame_of_raw

T0 = 1.7e9 + 0.123456
COLUMNS = ("a", "b", "_status")  # "_status" clashes with a meta column: stored as "_input_status"


def answer(request_id: str, rows: int, predictions: object, *, columns: tuple = COLUMNS, start: float = 0.0,
           timestamp: float = T0, **attrs: object) -> Answer:
    """An answer as the app hands it to capture: the parser's raw rows and the frame built on them."""
    values = np.arange(rows * len(columns), dtype=np.float64).reshape(rows, len(columns)) + start
    return Answer(request_id, timestamp, attrs.pop("model_version", "3"), attrs.pop("status", 200),  # type: ignore[arg-type]
                  attrs.pop("latency_ms", 1.5), frame_of_raw(columns, values), predictions,  # type: ignore[arg-type]
                  raw_inputs=(columns, values), **attrs)  # type: ignore[arg-type]


def sorted_tables(by_day: dict, unconverted: int) -> list[pa.Table]:
    """Every table (one per day and layout), rows sorted, tables in order of their first request id."""
    assert unconverted == 0
    found = [table.sort_by([("_request_id", "ascending"), ("_row", "ascending")])
             for day in by_day.values() for table, _ in day]
    return sorted(found, key=lambda table: table["_request_id"][0].as_py())


def converted(data: bytes, redact: object = None) -> list[pa.Table]:
    records, torn = read_records(data)
    assert torn == 0
    return sorted_tables(*records_to_tables(records, "dep", redact))  # type: ignore[arg-type]


def batched(requests: list) -> bytes:
    records, failed = encode_records(requests)
    assert failed == 0
    return b"".join(records)


def same(expected: list[pa.Table], got: list[pa.Table]) -> None:
    assert [t.schema for t in got] == [t.schema for t in expected]
    for g, e in zip(got, expected, strict=True):
        assert g.equals(e), (g.to_pandas(), e.to_pandas())


def mixed_answers() -> list[Answer]:
    holes = answer("holes", 3, np.array([np.nan, 1.0, 2.0]))
    holes.raw_inputs[1][1, 0] = np.nan  # the frame is built on the same array: both see the hole
    return [
        answer("one-row", 1, np.array([1], dtype=np.int64), model_name="churn"),
        answer("rows", 4, np.array([0, 1, 1, 0], dtype=np.int64), start=0.5, model_name="churn", latency_ms=2),
        answer("float-out", 2, np.array([0.5, 1.5], dtype=np.float32), model_name="churn"),
        answer("two-outputs", 2, np.array([[1, 2], [3, 4]], dtype=np.int32), role="shadow", model_name="challenger"),
        answer("failed", 1, None, status=400),
        answer("other-columns", 2, np.array([7, 8]), columns=("x", "y"), timestamp=T0 + 86400),
        answer("next-day", 1, np.array([1], dtype=np.int64), timestamp=T0 + 86400, model_name="churn"),
        answer("unnamed-é", 3, np.array([1, 2, 3]), role="", status=503, model_version="4"),
        answer("int-time", 1, np.array([1], dtype=np.int64), timestamp=int(T0) + 2, model_name="churn"),
        holes,
    ]


def test_a_batch_record_gives_the_rows_a_record_per_request_gives() -> None:
    requests = mixed_answers()
    records, torn = read_records(batched(requests))
    assert torn == 0 and all(isinstance(r, BatchRecord) for r in records)
    # One record per layout (columns, prediction dtype and shape): not one per request.
    assert len(records) == 6 and request_count(records) == len(requests)
    one_by_one = b"".join(encode_record(r) for r in requests)
    assert all(isinstance(r, CompactRecord) for r in read_records(one_by_one)[0])
    expected = converted(one_by_one)
    same(expected, converted(batched(requests)))
    same(sorted_tables(*tables_by_day(requests, "dep")), expected)  # and what the requests themselves give
    rows = pd.concat([t.to_pandas() for t in expected]).set_index(["_request_id", "_row"])
    assert rows.loc[("two-outputs", 1), "_role"] == "shadow" and rows.loc[("unnamed-é", 2), "_role"] == "primary"
    assert pd.isna(rows.loc[("failed", 0), "_model_name"]) and rows.loc[("failed", 0), "_status"] == 400
    assert pd.isna(rows.loc[("holes", 1), "a"]) and pd.isna(rows.loc[("holes", 0), "_prediction"])
    assert rows.loc[("rows", 3), "_input_status"] == 11.5


def test_requests_either_side_of_midnight_in_one_batch_go_to_their_days() -> None:
    midnight = (T0 // 86400 + 1) * 86400
    requests = [answer(f"r{i}", 1 + i % 3, np.arange(1 + i % 3), timestamp=midnight - 1.5 + i) for i in range(4)]
    [record], _ = read_records(batched(requests))
    assert isinstance(record, BatchRecord) and record.requests == 4
    by_day, unconverted = records_to_tables([record], "dep")
    assert sorted(table.num_rows for day in by_day.values() for table, _ in day) == [3, 4]
    same(converted(b"".join(encode_record(r) for r in requests)), sorted_tables(by_day, unconverted))


def test_a_redaction_gives_the_same_table_from_a_batch() -> None:
    redact = CaptureRedaction(exclude=("b",), hashed=("a",), key="secret").apply
    requests = mixed_answers()
    got = converted(batched(requests), redact)
    same(converted(b"".join(encode_record(r) for r in requests), redact), got)
    same(sorted_tables(*tables_by_day(requests, "dep", redact)), got)
    assert all("b" not in t.column_names for t in got)
    assert {t.schema.field("a").type for t in got if "a" in t.column_names} == {pa.string()}


def test_requests_the_batch_form_does_not_take_are_encoded_alone_and_convert_the_same() -> None:
    requests: list = [
        answer("numbers", 2, np.array([1, 0])),
        answer("labels", 2, np.array(["no", "yes"])),  # text predictions: pickled
        answer("misaligned", 2, np.array([1, 2, 3])),
        answer("numpy-status", 1, np.array([1]), status=np.int64(200)),
        answer("dict-out", 1, {"p": [0.5]}),
        CapturedRequest("no-raw", T0, "3", 200, 1.0, pd.DataFrame({"a": [1.0], "b": [2.0], "_status": [3.0]}),
                        np.array([1])),
        CapturedRequest("no-inputs", T0, "3", 413, 0.2, None, None),
        answer("numbers-2", 1, np.array([1])),
    ]
    records, torn = read_records(batched(requests))
    kinds = [type(r).__name__ for r in records]
    assert torn == 0 and kinds.count("BatchRecord") == 1 and request_count(records) == len(requests), kinds
    assert kinds.count("CompactRecord") == 1 and kinds.count("SpoolRecord") == 5, kinds
    same(converted(b"".join(encode_record(r) for r in requests)), converted(batched(requests)))


def test_a_torn_or_damaged_batch_record_costs_only_its_own_requests() -> None:
    first = batched([answer(f"a{i}", 2, np.array([1, 2])) for i in range(3)])
    single = encode_record(answer("single", 1, np.array([1])))
    last = batched([answer(f"z{i}", 1, np.array([1])) for i in range(4)])
    records, torn = read_records(first + single + last[:-5])
    assert torn == len(last) - 5 and request_count(records) == 4
    by_day, unconverted = records_to_tables(records, "dep")
    assert unconverted == 0 and sum(t.num_rows for day in by_day.values() for t, _ in day) == 7

    # Whole (the crc is right) but its rows do not add up to its head's: each of its requests is counted.
    body = bytearray(first[8:])
    struct.pack_into("<I", body, 8, 7)  # total rows: 6 in truth
    damaged = struct.pack("<II", len(body), zlib.crc32(body)) + bytes(body)
    records, torn = read_records(damaged + single)
    assert torn == 0 and records[:3] == [None] * 3 and isinstance(records[3], CompactRecord)
    by_day, unconverted = records_to_tables(records, "dep")
    assert unconverted == 3 and sum(t.num_rows for day in by_day.values() for t, _ in day) == 1

    # Decoded, but its bytes do not fit its layout (a flaw, not a crash): its requests are counted.
    records, _ = read_records(first + single)
    assert isinstance(records[0], BatchRecord)
    records[0].rows = records[0].rows + 1
    by_day, unconverted = records_to_tables(records, "dep")
    assert unconverted == 3 and sum(t.num_rows for day in by_day.values() for t, _ in day) == 1


def test_old_spools_of_pickled_and_compact_records_still_convert() -> None:
    """A spool written before batch records (a record per request) converts as it did, beside new ones."""
    requests = mixed_answers()
    old = b"".join(encode_record(r) for r in requests[:5])
    records, _ = read_records(old + batched(requests[5:]))
    assert {type(r) for r in records} == {CompactRecord, BatchRecord}
    same(converted(b"".join(encode_record(r) for r in requests)), converted(old + batched(requests[5:])))
    pickled = encode_record(CapturedRequest("mixed", T0, "1", 200, 1.0, pd.DataFrame({"s": ["x"]}), np.array([0])))
    assert isinstance(read_records(pickled)[0][0], SpoolRecord)


def _wait(predicate: object, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_the_writer_spools_batches_counts_requests_and_reads_back_the_same_rows(tmp_path: Path) -> None:
    """A real writer, its converter and read_capture: every request accepted is written once, the
    tally counts requests (not records), and the rows are those of the requests themselves."""
    requests = [answer(f"r{i:03d}", 1 + i % 4, np.arange(1 + i % 4, dtype=np.int64), start=float(i),
                       timestamp=time.time(), model_name="churn") for i in range(200)]
    requests.append(CapturedRequest("pickled", time.time(), "3", 200, 1.0, pd.DataFrame({"s": ["x"]}), np.array([1])))
    tally = memoryview(bytearray(16)).cast("q")
    writer = CaptureWriter(str(tmp_path / "capture"), "dep", spool_dir=str(tmp_path / "spool"), flush_interval_s=60)
    try:
        writer.tally_into(tally)
        assert all(writer.record(r) for r in requests)
        assert tally[0] == len(requests)
        _wait(lambda: tally[1] == len(requests), "every request to reach the spool file")
        assert writer.flush() == len(requests)
    finally:
        writer.close(timeout_s=30)
    assert (writer.written_requests, writer.dropped_requests, writer.buffered_bytes) == (len(requests), 0, 0)
    captured = read_capture(str(tmp_path / "capture")).sort_values(["_request_id", "_row"]).reset_index(drop=True)
    expected = pd.concat([t.to_pandas() for t in sorted_tables(*tables_by_day(requests, "dep"))])
    expected = expected.sort_values(["_request_id", "_row"]).reset_index(drop=True)
    assert len(captured) == writer.written_rows == sum(len(r.inputs) for r in requests)
    for column in expected.columns:
        got, want = captured[column], expected[column]
        if want.dtype == object:  # "s" of the pickled request: missing on the other rows (None or NaN)
            got, want = got.where(got.notna(), None), want.where(want.notna(), None)
        pd.testing.assert_series_equal(got, want, check_dtype=False, check_names=False)


def test_the_buffer_bound_counts_batched_requests_in_bytes(tmp_path: Path) -> None:
    """Requests the writer thread encodes later count against max_buffer_bytes at record time (their
    share of a batch record), and what is refused is counted as buffer_full; once encoded, what
    waits is counted in the bytes it takes in the spool."""
    drops: list[tuple[int, str]] = []
    writer = CaptureWriter(str(tmp_path / "capture"), "dep", spool_dir=str(tmp_path / "spool"), converter="external",
                           flush_interval_s=600, max_buffer_bytes=40 * (10 * 3 * 8 + 10 * 8 + 48),
                           on_drop=lambda n, reason: drops.append((n, reason)))
    try:
        accepted = sum(writer.record(answer(f"r{i:02d}", 10, np.zeros(10))) for i in range(100))
        assert 30 <= accepted < 100 and drops == [(1, "buffer_full")] * (100 - accepted)
        # Past the bound by the heads of the records a write made at most (a few hundred bytes).
        assert writer.buffered_bytes <= writer.max_buffer_bytes + 512
        _wait(lambda: writer.settled_requests == accepted, "the accepted requests to reach the spool file")
        spooled = sum(p.stat().st_size for p in (tmp_path / "spool").rglob("seg-*"))
        assert writer.buffered_bytes == spooled, "counted in what the spool holds once encoded"
        assert not writer.record(answer("huge", 20_000, np.zeros(20_000))), "larger than the whole buffer"
        assert drops[-1] == (1, "buffer_full") and writer.dropped_requests == 100 - accepted + 1
    finally:
        writer.close(timeout_s=0.5)


@pytest.mark.parametrize("rows", [1, 100])
def test_a_shadow_copy_without_a_frame_is_batched_from_its_raw_rows(rows: int) -> None:
    from mlflow_deploy_plugin.serving.shadow import ShadowAnswer

    values = np.arange(rows * 3, dtype=np.float64).reshape(rows, 3)
    copy = ShadowAnswer("s1", T0, "4", 200, 2.0, None, np.zeros(rows), model_name="challenger",
                        raw_inputs=(COLUMNS, values))
    [record], _ = read_records(batched([copy]))
    assert isinstance(record, BatchRecord) and record.role == ["shadow"]
    same(converted(encode_record(copy)), converted(batched([copy])))


def test_the_writer_writes_more_buffers_than_one_writev_takes_in_order(tmp_path: Path) -> None:
    from mlflow_deploy_plugin.capture.writer import _IOV_MAX, _write_all

    rows = [np.full((1 + i % 3, 2), float(i)) for i in range(2 * _IOV_MAX + 5)]
    buffers = [b"", *(row.data.cast("B") for row in rows), b"end"]
    path = tmp_path / "out.seg"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        _write_all(fd, buffers)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(buffers)


def test_writev_takes_at_least_posix_minimum_buffers_whatever_sysconf_says() -> None:
    """sysconf may answer -1 (indeterminate) or not know SC_IOV_MAX: a bound below 1 made every
    spool append fail (an empty writev makes no progress)."""
    from mlflow_deploy_plugin.capture.writer import _iov_max

    def unknown(name: str) -> int:
        raise ValueError(f"unrecognized configuration name {name}")

    assert _iov_max(lambda _name: -1) == 16
    assert _iov_max(unknown) == 16
    assert _iov_max(None) == 16
    assert _iov_max(lambda _name: 4) == 16
    assert _iov_max(lambda _name: 1 << 20) == 1024
    assert _iov_max(lambda _name: 512) == 512


def test_a_graceful_close_writes_the_batched_requests_memory_held(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """What waits in memory for its batch record (as in the quarter second before a stop) is
    encoded, spooled and converted by close(); the tally says so meanwhile and after."""
    import mlflow_deploy_plugin.capture.writer as writer_module

    monkeypatch.setattr(writer_module, "_WRITE_EVERY_S", 3600.0)  # appends wait an hour after the first
    tally = memoryview(bytearray(16)).cast("q")
    writer = CaptureWriter(str(tmp_path / "capture"), "dep", spool_dir=str(tmp_path / "spool"), flush_interval_s=600)
    writer.tally_into(tally)
    try:
        assert writer.record(answer("r0", 2, np.array([1, 0]), timestamp=time.time()))
        _wait(lambda: tally[1] == 1, "the first record to reach the spool file")
        assert all(writer.record(answer(f"r{i}", 1 + i % 2, np.ones(1 + i % 2), timestamp=time.time()))
                   for i in range(1, 10))
        assert (tally[0], tally[1]) == (10, 1), "nine held in memory, not yet encoded"
    finally:
        writer.close(timeout_s=30)
    assert (tally[0], tally[1]) == (10, 10) and writer.written_requests == 10 and writer.dropped_requests == 0
    captured = read_capture(str(tmp_path / "capture"))
    assert sorted(set(captured["_request_id"])) == sorted(f"r{i}" for i in range(10)) and len(captured) == 16


def layout_of(requests: list[Answer]) -> LayoutBuffer:
    """The requests copied into one layout buffer, as record() does."""
    items = [batch_item(r)[0] for r in requests]  # type: ignore[index]
    layout = LayoutBuffer(items[0][7], items[0][8], items[0][9])
    for item in items:
        assert layout.takes(item[7], item[9])
        layout.add(item)
    return layout


def test_a_layout_buffer_gives_the_rows_a_record_per_request_gives_cut_into_records_of_bounded_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests copied into a layout's buffer (grown past its first size) become the rows their
    records one by one give; past _MAX_RECORD_BYTES of input rows the buffer is cut between
    requests into several records (a request larger than that alone)."""
    import mlflow_deploy_plugin.capture.batch as batch_module

    requests = [answer(f"r{i:03d}", 1 + i % 5, np.arange(1 + i % 5, dtype=np.int64), start=float(i),
                       model_name="churn") for i in range(150)]  # 450 rows: more than the first 256
    requests.append(answer("big", 40, np.zeros(40, dtype=np.int64), model_name="churn"))
    one_by_one = converted(b"".join(encode_record(r) for r in requests))
    buffers, size, failed = encode_layouts([layout_of(requests)])
    assert failed == 0 and size == sum(map(len, buffers))
    assert [type(r) for r in read_records(b"".join(buffers))[0]] == [BatchRecord]
    same(one_by_one, converted(b"".join(buffers)))
    monkeypatch.setattr(batch_module, "_MAX_RECORD_BYTES", 10 * len(COLUMNS) * 8)  # 10 rows a record
    buffers, _, failed = encode_layouts([layout_of(requests)])
    records, torn = read_records(b"".join(buffers))
    assert failed == 0 and torn == 0 and len(records) > 40
    assert all(sum(r.rows) <= 10 or len(r.rows) == 1 for r in records)  # type: ignore[union-attr]
    same(one_by_one, converted(b"".join(buffers)))


def test_a_layout_whose_batch_record_cannot_be_made_is_encoded_request_by_request() -> None:
    """A lone surrogate in one request id (no UTF-8 for it): the batch record of its layout cannot be
    made, so every request of it is spooled in a record of its own, as before the buffers, with its
    own rows."""
    requests = [answer("ok-1", 2, np.array([1, 0])), answer("bad-\ud800", 1, np.array([1]), start=7.0),
                answer("ok-2", 1, np.array([0]), start=9.0)]
    buffers, _, failed = encode_layouts([layout_of(requests)])
    records, torn = read_records(b"".join(buffers))
    assert failed == 0 and torn == 0 and len(records) == 3
    assert not any(isinstance(r, BatchRecord) for r in records)
    assert b"".join(buffers) == b"".join(encode_record(r) for r in requests)


def test_the_writer_keeps_copies_of_a_requests_rows_not_the_request_objects(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Once record() returns, nothing of the request is held while it waits for the writer thread
    (its arrays die with it, and writing into them changes nothing captured); the buffers reused
    write after write give every request's own rows."""
    import gc
    import weakref

    import mlflow_deploy_plugin.capture.writer as writer_module

    monkeypatch.setattr(writer_module, "_WRITE_EVERY_S", 3600.0)  # what is recorded waits in memory
    tally = memoryview(bytearray(16)).cast("q")
    writer = CaptureWriter(str(tmp_path / "capture"), "dep", spool_dir=str(tmp_path / "spool"), flush_interval_s=600)
    writer.tally_into(tally)
    expected: dict[str, list[float]] = {}
    try:
        assert writer.record(answer("first", 1, np.array([1]), timestamp=time.time()))
        _wait(lambda: tally[1] == 1, "the first record to reach the spool file")  # later ones wait an hour
        expected["first"] = [0.0, 1.0, 2.0]
        for round_ in range(3):  # a flush writes them; the next round reuses the buffers
            refs = []
            for i in range(20):
                request = answer(f"r{round_}-{i:02d}", 1 + i % 3, np.arange(1 + i % 3, dtype=np.int64),
                                 start=100.0 * round_ + i, timestamp=time.time())
                assert writer.record(request)
                expected[request.request_id] = request.raw_inputs[1].ravel().tolist()
                refs += [weakref.ref(request.raw_inputs[1]), weakref.ref(request.predictions)]
                request.raw_inputs[1][:] = -1.0  # the caller's arrays are its own again
                request.predictions[:] = -1  # type: ignore[index]
                del request
            gc.collect()
            assert tally[1] < tally[0], "the round waits in memory"
            assert all(ref() is None for ref in refs), "no array of a recorded request is kept"
            writer.flush(timeout_s=60)
    finally:
        writer.close(timeout_s=30)
    assert writer.written_requests == 61 and writer.dropped_requests == 0
    captured = read_capture(str(tmp_path / "capture"))
    got = {rid: group.sort_values("_row")[list(COLUMNS[:2]) + ["_input_status"]].to_numpy().ravel().tolist()
           for rid, group in captured.groupby("_request_id")}
    assert got == expected
    assert set(captured["_prediction"].tolist()) <= {0, 1, 2}, "the predictions as they were when recorded"


def test_requests_whose_column_labels_cannot_be_hashed_cost_only_themselves(tmp_path: Path) -> None:
    """Column labels that cannot be hashed (a list among them) cannot key a layout buffer nor a
    converter's stack: those requests are counted as not converted, the others around them are
    written as always, write after write (nothing of the odd layout is kept for reuse)."""
    odd = (("a",), ["b"])  # a tuple of labels (batch_item takes it) with an unhashable label

    def unhashable(request_id: str) -> Answer:
        return Answer(request_id, time.time(), "3", 200, 1.0, None, np.array([1]),
                      raw_inputs=(tuple(odd), np.ones((1, 2))))

    drops: list[tuple[int, str]] = []
    writer = CaptureWriter(str(tmp_path / "capture"), "dep", spool_dir=str(tmp_path / "spool"), flush_interval_s=600,
                           on_drop=lambda n, reason: drops.append((n, reason)))
    try:
        for round_ in range(2):
            requests = [answer(f"r{round_}-0", 2, np.array([1, 0]), timestamp=time.time()), unhashable(f"u{round_}-0"),
                        unhashable(f"u{round_}-1"), answer(f"r{round_}-1", 1, np.array([1]), timestamp=time.time())]
            assert all(writer.record(r) for r in requests), "accepted: the writer thread encodes them"
            writer.flush(timeout_s=60)
    finally:
        writer.close(timeout_s=30)
    assert (writer.written_requests, writer.dropped_requests, writer.buffered_requests) == (4, 4, 0)
    assert sum(n for n, _ in drops) == 4 and {reason for _, reason in drops} == {"convert_error"}
    captured = read_capture(str(tmp_path / "capture"))
    assert sorted(set(captured["_request_id"])) == ["r0-0", "r0-1", "r1-0", "r1-1"] and len(captured) == 6
