"""Inference capture: real Parquet files in a temp folder, real threads, bounded waits."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlflow_deploy_plugin.capture import (
    META_COLUMNS,
    CapturedRequest,
    CaptureWriter,
    parse_since,
    prune_capture,
    read_capture,
)

NOW = time.time()


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"Timed out after {timeout_s}s waiting for {what}")


def request(rid: str, rows: int = 2, *, ts: float = NOW, version: str = "1", status: int = 200,
            inputs: pd.DataFrame | None = None, predictions: object = "default") -> CapturedRequest:
    if inputs is None and rows:
        inputs = pd.DataFrame({"x": np.arange(rows, dtype=np.float64), "name": [f"n{i}" for i in range(rows)]})
    if isinstance(predictions, str) and predictions == "default":
        predictions = None if inputs is None else np.arange(len(inputs)) * 10
    return CapturedRequest(rid, ts, version, status, 1.5, inputs, predictions)


class Opaque:
    def __str__(self) -> str:
        return "<opaque>"


def parquet_files(root: Path) -> list[Path]:
    return sorted(root.glob("date=*/*.parquet"))


@contextlib.contextmanager
def converter_stopped(writer: CaptureWriter) -> Iterator[None]:
    """The writer's converter process stopped (SIGSTOP) while inside: stands in for a stalled disk
    or network; Parquet writing stops, the request path goes on."""
    pid = wait_until(lambda: writer.converter_pid, 30, "the converter process to start")
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_concurrent_record_then_close_keeps_every_accepted_row(tmp_path: Path) -> None:
    root = tmp_path / "capture"
    writer = CaptureWriter(str(root), "dep", flush_rows=700, flush_interval_s=0.2)
    expected: dict[str, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(t: int) -> None:
        rng = np.random.default_rng(t)
        start.wait(5)
        for i in range(500):
            rows = int(rng.integers(1, 6))
            rid = f"t{t}-{i}"
            assert writer.record(request(rid, rows))
            with lock:
                expected[rid] = rows

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    writer.close(timeout_s=120)  # a bound for a busy machine: the converter starts within it

    assert writer.dropped_requests == 0
    assert writer.accepted_requests == writer.written_requests == 4000
    frame = read_capture(str(root))
    assert list(frame.columns[:len(META_COLUMNS)]) == list(META_COLUMNS)
    assert len(frame) == sum(expected.values())
    counts = frame.groupby("_request_id").size().to_dict()
    assert counts == expected
    assert not frame.duplicated(["_request_id", "_row"]).any()
    # Rows keep their position in the request and their own prediction.
    assert (frame["_prediction"] == frame["_row"] * 10).all()
    assert (frame["x"] == frame["_row"]).all()
    assert not list(root.glob("date=*/.*")), "temp files left behind"


def test_row_layout_and_types(tmp_path: Path) -> None:
    root = tmp_path / "capture"
    with CaptureWriter(str(root), "dep", flush_interval_s=60) as writer:
        writer.record(request("a", 3))
        writer.record(request("df", inputs=pd.DataFrame({"x": [1.0, 2.0]}),
                              predictions=pd.DataFrame({"p": [0.1, 0.2], "label": ["u", "v"]})))
        writer.record(request("2d", inputs=pd.DataFrame({"x": [1.0, 2.0]}),
                              predictions=np.array([[0.1, 0.9], [0.8, 0.2]])))
        writer.record(request("bad", rows=0, status=400))
        writer.record(request("odd", inputs=pd.DataFrame({"x": [1.0, 2.0, 3.0], "obj": [1, "a", Opaque()]}),
                              predictions=[1, 2, 3]))
    schema = pq.read_schema(parquet_files(root)[0])
    assert schema.field("_timestamp").type == pa.timestamp("us", tz="UTC")
    assert [schema.field(c).type for c in ("_status", "_latency_ms", "_row")] == [pa.int16(), pa.float32(),
                                                                                   pa.int32()]
    assert schema.field("_request_id").type == pa.string()
    frame = read_capture(str(root)).set_index(["_request_id", "_row"])
    assert frame.loc[("df", 1), "_prediction_label"] == "v"
    assert frame.loc[("2d", 0), "_prediction_1"] == pytest.approx(0.9)
    bad = frame.loc[("bad", 0)]
    assert bad["_status"] == 400 and pd.isna(bad["x"]) and pd.isna(bad["_prediction"])
    # Mixed or foreign objects have no Arrow type: stored as text rather than failing the flush.
    assert list(frame.loc["odd", "obj"]) == ["1", "a", "<opaque>"]
    assert list(frame.loc["odd", "_prediction"]) == [1, 2, 3]
    assert (frame["_deployment"] == "dep").all()


def test_time_based_flush_without_close(tmp_path: Path) -> None:
    root = tmp_path / "capture"
    writer = CaptureWriter(str(root), "dep", flush_rows=1_000_000, flush_interval_s=0.3)
    try:
        assert writer.record(request("r1", 2))
        wait_until(lambda: parquet_files(root), 10, "a file written by the time-based flush")
        assert len(read_capture(str(root))) == 2
        assert not writer.closed
    finally:
        writer.close()


@pytest.mark.parametrize("spool", ["under-the-root", "elsewhere"])
def test_unwritable_root_drops_and_never_raises(tmp_path: Path, spool: str) -> None:
    """Spooling fails (the spool is under the root) or the converter's Parquet writes fail."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    drops: list[tuple[int, str]] = []
    writer = CaptureWriter(str(blocker / "capture"), "dep", flush_rows=5, flush_interval_s=0.05,
                           on_drop=lambda n, reason: drops.append((n, reason)),
                           spool_dir=str(tmp_path / "spool") if spool == "elsewhere" else None)
    try:
        slowest = 0.0
        for i in range(200):
            began = time.perf_counter()
            writer.record(request(f"r{i}", 1))
            slowest = max(slowest, time.perf_counter() - began)
        assert slowest < 1.0  # loose for loaded CI: record never waits on the failing writes
        wait_until(lambda: writer.dropped_requests >= 200, 60, "every request counted as dropped")
        assert sum(n for n, _ in drops) == writer.dropped_requests
        assert {reason for _, reason in drops} <= {"write_error", "buffer_full"}
        assert "write_error" in {reason for _, reason in drops}
    finally:
        writer.close(timeout_s=5)
    assert writer.written_requests == 0
    assert writer.buffered_requests == 0, "failed writes must not pile up"
    assert not list((tmp_path / "spool").glob("*/*")), "the spool is emptied, lost requests counted"


def test_buffer_full_drops_without_blocking(tmp_path: Path) -> None:
    root = tmp_path / "capture"
    drops: list[tuple[int, str]] = []
    writer = CaptureWriter(str(root), "dep", max_buffer_requests=5, flush_rows=1, flush_interval_s=0.05,
                           on_drop=lambda n, reason: drops.append((n, reason)))
    stopped = contextlib.ExitStack()
    try:
        assert writer.record(request("first", 1))
        wait_until(lambda: writer.written_requests == 1, 30, "the first request to be written")
        stopped.enter_context(converter_stopped(writer))
        accepted = 0
        slowest = 0.0
        for i in range(100):
            began = time.perf_counter()
            accepted += writer.record(request(f"r{i}", 1))
            slowest = max(slowest, time.perf_counter() - began)
        assert accepted == 5
        assert writer.dropped_requests == 95
        assert drops == [(1, "buffer_full")] * 95
        assert slowest < 1.0  # generous for loaded CI; a blocked call would take 10 s
    finally:
        stopped.close()
        writer.close(timeout_s=30)
    assert writer.written_requests == 6
    assert set(read_capture(str(root))["_request_id"]) == {"first", "r0", "r1", "r2", "r3", "r4"}
    assert not writer.record(request("late", 1)), "a closed writer accepts nothing"


def test_sampling_rate_is_respected(tmp_path: Path) -> None:
    writer = CaptureWriter(str(tmp_path / "capture"), "dep", sample_rate=0.1, rng_seed=1234,
                           max_buffer_requests=10_000, flush_interval_s=60)
    try:
        accepted = sum(writer.record(request(f"r{i}", 1)) for i in range(5000))
    finally:
        writer.close()
    # Binomial(5000, 0.1): sd ~21; +-100 is almost 5 sd.
    assert 400 <= accepted <= 600
    assert writer.dropped_requests == 0
    assert writer.written_requests == accepted


def test_invalid_settings_are_refused(tmp_path: Path) -> None:
    for kwargs in ({"sample_rate": 0}, {"sample_rate": 1.5}, {"flush_rows": 0}, {"retention_days": 0}):
        with pytest.raises(ValueError):
            CaptureWriter(str(tmp_path), "dep", **kwargs)


def _partition(root: Path, day: str) -> Path:
    folder = root / f"date={day}"
    folder.mkdir(parents=True)
    (folder / "part-x.parquet").write_bytes(b"")
    return folder


def test_retention_prunes_old_partitions(tmp_path: Path) -> None:
    root = tmp_path / "capture"
    now = datetime(2024, 5, 10, 12, tzinfo=UTC)
    for day in ("2024-05-01", "2024-05-02", "2024-05-03", "2024-05-09", "2024-05-10"):
        _partition(root, day)
    (root / "not-a-partition").mkdir()
    removed = prune_capture(str(root), "dep", 7, now=now)
    assert removed == [f"{root}/date=2024-05-01", f"{root}/date=2024-05-02"]
    assert sorted(p.name for p in root.iterdir()) == [
        "date=2024-05-03", "date=2024-05-09", "date=2024-05-10", "not-a-partition"]
    assert prune_capture(str(tmp_path / "missing"), None, 7, now=now) == []


def test_writer_prunes_at_start(tmp_path: Path) -> None:
    root = tmp_path / "capture"
    old = _partition(root, "2000-01-01")
    today = _partition(root, datetime.now(UTC).date().isoformat())
    writer = CaptureWriter(str(root), "dep", retention_days=3, flush_interval_s=60)
    try:
        wait_until(lambda: not old.exists(), 10, "the old partition to be pruned")
        assert today.exists()
    finally:
        writer.close()


def test_read_capture_window_and_mixed_schemas(tmp_path: Path) -> None:
    root = tmp_path / "capture"
    base = datetime(2024, 3, 1, 23, 0, tzinfo=UTC).timestamp()
    with CaptureWriter(str(root), "dep", flush_interval_s=60) as writer:
        writer.record(request("v1-early", 1, ts=base, version="1",
                              inputs=pd.DataFrame({"x": [1.0], "code": [7]})))
        writer.record(request("v1-late", 1, ts=base + 7200, version="1",
                              inputs=pd.DataFrame({"x": [2.0], "code": [8]})))
        writer.flush()
        # A later model version: a new column, and "code" now text.
        writer.record(request("v2", 1, ts=base + 3600, version="2",
                              inputs=pd.DataFrame({"x": [3.0], "code": ["z"], "extra": [True]})))
    assert [p.parent.name for p in parquet_files(root)].count("date=2024-03-02") == 2
    assert [p.parent.name for p in parquet_files(root)].count("date=2024-03-01") == 1

    everything = read_capture(str(root))
    assert list(everything["_request_id"]) == ["v1-early", "v2", "v1-late"]
    assert list(everything["code"]) == ["7", "z", "8"]
    assert everything["extra"].isna().sum() == 2

    start = datetime(2024, 3, 2, 0, 0, tzinfo=UTC)
    window = read_capture(str(root), since=start, until=start + timedelta(hours=1))
    assert list(window["_request_id"]) == ["v2"]  # since inclusive ...
    window = read_capture(str(root), since=start.replace(tzinfo=None), until=start + timedelta(hours=1, seconds=1))
    assert list(window["_request_id"]) == ["v2", "v1-late"]  # ... until exclusive, naive = UTC
    assert read_capture(str(root), until=start).shape[0] == 1

    picked = read_capture(str(root), since=start, columns=["_request_id", "x", "nope"])
    assert list(picked.columns) == ["_request_id", "x", "nope"]
    assert picked["nope"].isna().all()

    empty = read_capture(str(root), since=datetime(2030, 1, 1))
    assert empty.empty and list(empty.columns) == list(META_COLUMNS)
    assert read_capture(str(tmp_path / "missing")).empty
    # A URI root reads the same data.
    assert len(read_capture(root.as_uri())) == 3


def test_uri_root_is_written(tmp_path: Path) -> None:
    root = tmp_path / "by-uri"
    with CaptureWriter(root.as_uri(), "dep", flush_interval_s=60) as writer:
        writer.record(request("u", 2))
    assert len(read_capture(str(root))) == 2


def test_parse_since() -> None:
    now = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now=now) == now - timedelta(minutes=30)
    assert parse_since("1h", now=now) == now - timedelta(hours=1)
    assert parse_since("24h", now=now) == now - timedelta(hours=24)
    assert parse_since("7d", now=now) == now - timedelta(days=7)
    assert parse_since("90s", now=now) == now - timedelta(seconds=90)
    assert parse_since("2024-05-01T12:00:00", now=now) == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_since("2024-05-01T14:00:00+02:00") == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_since("2024-05-01T12:00:00Z") == datetime(2024, 5, 1, 12, tzinfo=UTC)
    for bad in ("", "yesterday", "5 weeks", "-1h", "1y"):
        with pytest.raises(ValueError, match="30m") as info:
            parse_since(bad, now=now)
        assert repr(bad) in str(info.value)


def test_writer_inherited_through_fork_works_in_the_child(tmp_path: Path) -> None:
    root = tmp_path / "capture"
    writer = CaptureWriter(str(root), "dep", flush_interval_s=60)
    try:
        writer.record(request("parent", 1))
        pid = os.fork()
        if pid == 0:  # child: must not run pytest's teardown, so always leave through _exit
            code = 1
            try:
                ok = writer.record(request("child", 1))
                # The child starts a converter of its own: its imports take seconds on a busy machine.
                writer.close(timeout_s=60)
                code = 0 if ok and writer.written_requests == 1 else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 90
        while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
            assert time.monotonic() < deadline, "forked child did not finish"
            time.sleep(0.02)
        assert os.waitstatus_to_exitcode(status[1]) == 0
    finally:
        writer.close()
    frame = read_capture(str(root))
    assert sorted(frame["_request_id"]) == ["child", "parent"]


def test_deeply_nested_inputs_are_kept_as_text_and_every_file_reads_back(tmp_path: Path) -> None:
    """Arrow writes a 70-level list/struct schema to Parquet but cannot read it back: one such file
    would break reading every captured row of its window (found by tests/test_fuzz_http.py)."""
    deep: object = 1
    for _ in range(70):
        deep = {"k": [deep]}
    root = tmp_path / "capture"
    with CaptureWriter(str(root), "dep") as writer:
        assert writer.record(request("deep", inputs=pd.DataFrame({"x": [deep]}, dtype=object)))
        assert writer.record(request("plain", 2))
    captured = read_capture(str(root))
    assert set(captured["_request_id"]) == {"deep", "plain"}
    assert captured.loc[captured["_request_id"] == "deep", "x"].iloc[0].startswith("{'k': [{'k'")


CRASHING_WRITER = """
import os, sys, time
from mlflow_deploy_plugin.capture import CapturedRequest, CaptureWriter
import numpy as np, pandas as pd
root, spool = sys.argv[1], sys.argv[2]
writer = CaptureWriter(root, "dep", flush_interval_s=600, spool_dir=spool)
for i in range(3):
    frame = pd.DataFrame({"x": [float(i)], "name": [f"n{i}"]})
    assert writer.record(CapturedRequest(f"crashed-{i}", time.time(), "1", 200, 1.0, frame, np.array([i])))
print("recorded", flush=True)
sys.stdin.read()  # killed by the test while waiting here
"""


def test_a_crashed_writers_spool_is_converted_by_the_next_start(tmp_path: Path) -> None:
    """A worker killed with its converter (SIGKILL to its process group) with requests still in the
    spool, the last record torn: the converter of the next writer on the same spool converts them,
    skipping the torn record."""
    root, spool = tmp_path / "capture", tmp_path / "spool"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    crashed = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(root), str(spool)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
    try:
        assert crashed.stdout is not None
        assert crashed.stdout.readline().strip() == b"recorded"
        # Not the writer's dot-named folder: it is renamed once locked, maybe while glob lists it.
        segment = wait_until(lambda: [p for p in spool.glob("[!.]*/*.open") if p.stat().st_size > 0], 30,
                             "the records to reach the spool file")[0]
        wait_until(lambda: segment.read_bytes().count(b"crashed-") == 3, 30, "all three records spooled")
    finally:
        os.killpg(crashed.pid, signal.SIGKILL)  # the writer and its converter, if it started one
        crashed.wait(30)
    with segment.open("ab") as file:  # a record cut short by the crash
        file.write(b"\x40\x00\x00\x00\x01\x02\x03\x04torn")
    assert not parquet_files(root)
    with CaptureWriter(str(root), "dep", flush_interval_s=60, spool_dir=str(spool)) as writer:
        assert writer.record(request("after-restart", 1))
    captured = read_capture(str(root))
    assert sorted(set(captured["_request_id"])) == ["after-restart", "crashed-0", "crashed-1", "crashed-2"]
    assert sorted(captured.loc[captured["_request_id"].str.startswith("crashed"), "name"]) == ["n0", "n1", "n2"]
    assert not list(spool.iterdir()), "the orphaned spool folder is removed once converted"


KILLED_WITH_RECORDS_IN_MEMORY = """
import sys, time
import numpy as np, pandas as pd
import mlflow_deploy_plugin.capture.writer as writer_module
from mlflow_deploy_plugin.capture import CapturedRequest, CaptureWriter
from mlflow_deploy_plugin.engines.local.liveness import LivenessWriter
root, spool, live = sys.argv[1], sys.argv[2], sys.argv[3]
writer_module._WRITE_EVERY_S = 3600.0  # after the first append, what is recorded stays in memory
writer = CaptureWriter(root, "dep", flush_interval_s=600, spool_dir=spool, converter="external")
writer.tally_into(LivenessWriter(__import__("pathlib").Path(live)).capture_tally())
def record(i):
    frame = pd.DataFrame({"x": [float(i)]})
    assert writer.record(CapturedRequest(f"answered-{i}", time.time(), "1", 200, 1.0, frame, np.array([i])))
record(0)  # appended at once: the first append is not held
deadline = time.monotonic() + 60
while writer.settled_requests < 1:
    assert time.monotonic() < deadline, "the first record never reached the spool file"
    time.sleep(0.01)
for i in range(1, 200):
    record(i)
print("recorded", flush=True)
sys.stdin.read()  # killed by the test while waiting here
"""


def test_what_a_killed_writer_held_in_memory_is_left_counted_in_its_liveness_file(tmp_path: Path) -> None:
    """``kill -9`` of a process whose writer holds records not yet appended to the spool: those are
    lost, and the tally it kept in its liveness file (a shared memory map) says exactly how many, which
    is what the local supervisor counts as dropped (engines/local/capture_loss.py)."""
    from mlflow_deploy_plugin.engines.local.liveness import read_liveness

    root, spool, live = tmp_path / "capture", tmp_path / "spool", tmp_path / "live" / "1"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.Popen([sys.executable, "-c", KILLED_WITH_RECORDS_IN_MEMORY, str(root), str(spool), str(live)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert killed.stdout is not None
        assert killed.stdout.readline().strip() == b"recorded"
    finally:
        killed.kill()
        killed.wait(30)
    converter = subprocess.run([sys.executable, "-m", "mlflow_deploy_plugin.capture.converter", str(spool), "--drain"],
                               env=env, timeout=120, capture_output=True, text=True)
    assert converter.returncode == 0, converter.stderr[-3000:]
    captured = set(read_capture(str(root))["_request_id"])
    record = read_liveness(live)
    assert record is not None and record.capture_accepted == 200
    assert captured == {"answered-0"} and record.capture_unsettled == 199


def test_float_frames_take_the_raw_path_and_read_back_like_any_frame(tmp_path: Path) -> None:
    """Frames marked float64 by the request parser travel as raw bytes: same columns and values as
    the pickled path, prediction dtypes kept (float32 stays float32)."""
    from mlflow_deploy_plugin.serving.frames import mark_float64

    root = tmp_path / "capture"
    with CaptureWriter(str(root), "dep", flush_interval_s=60) as writer:
        for i in range(3):
            fast = mark_float64(pd.DataFrame({"a": [i, i + 0.5], "_status": [1.0, 2.0]}, dtype=np.float64))
            assert writer.record(request(f"fast{i}", inputs=fast,
                                         predictions=np.array([[i, 1], [i, 2]], dtype=np.float32)))
        assert writer.record(request("plain", inputs=pd.DataFrame({"a": [9.0], "_status": [3.0]}),
                                     predictions=np.array([[7, 8]], dtype=np.float32)))
    frame = read_capture(str(root)).sort_values(["_request_id", "_row"]).set_index(["_request_id", "_row"])
    assert list(frame.loc[("fast1", 1), ["a", "_input_status", "_prediction_0", "_prediction_1"]]) == [1.5, 2.0, 1, 2]
    assert list(frame.loc[("plain", 0), ["a", "_input_status", "_prediction_0", "_prediction_1"]]) == [9.0, 3.0, 7, 8]
    schema = pq.read_schema(parquet_files(root)[0])
    assert schema.field("_prediction_0").type == pa.float32()
    assert writer.written_requests == 4 and writer.written_rows == 7


def test_one_external_converter_serves_every_writer_of_a_spool_and_its_last_pass_takes_the_rest(
        tmp_path: Path) -> None:
    """The local engine's way: writers start no converter (converter="external"); the supervisor's
    keeper runs one for the whole spool, again after it is killed, and its last pass on stop
    converts what writers that closed too early (or died) left."""
    from mlflow_deploy_plugin.engines.local.capture_keeper import ConverterKeeper

    root, spool = tmp_path / "capture", tmp_path / "spool"
    keeper = ConverterKeeper(spool, tmp_path / "converter.log", idle_exit_s=60)
    writers = [CaptureWriter(str(root), "dep", flush_interval_s=0.2, spool_dir=str(spool), converter="external")
               for _ in range(2)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        for i, writer in enumerate(writers):
            assert writer.record(request(f"w{i}-a", 1))

        def converted(count: int) -> bool:
            keeper.tend(lambda: env)
            return sum(w.written_requests for w in writers) == count

        wait_until(lambda: converted(2), 60, "the keeper's converter to convert both writers' segments")
        assert [w.converter_pid for w in writers] == [None, None], "the writers start none"
        first = keeper.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for i, writer in enumerate(writers):
            assert writer.record(request(f"w{i}-b", 1))
        wait_until(lambda: converted(4), 60, "a new converter after the kill")
        assert keeper.pid not in (None, first) and keeper.restarts == 1
        os.kill(keeper.pid, signal.SIGSTOP)  # stalled: the writers cannot wait for their last rows
        for i, writer in enumerate(writers):
            assert writer.record(request(f"w{i}-c", 1))
            writer.close(timeout_s=1)
        os.kill(keeper.pid, signal.SIGCONT)
        keeper.stop(lambda: env, 60)
    finally:
        for writer in writers:
            writer.close(timeout_s=1)
        if keeper.pid is not None:
            keeper.popen.kill()  # type: ignore[union-attr]
    assert keeper.pid is None
    assert sorted(read_capture(str(root))["_request_id"]) == ["w0-a", "w0-b", "w0-c", "w1-a", "w1-b", "w1-c"]
    assert not [p for p in spool.iterdir()], "the spool is empty after the last pass"


def test_the_keepers_converter_leaves_when_idle_and_is_back_with_the_next_records(tmp_path: Path) -> None:
    """An idle deployment holds no converter: it exits after ``idle_exit_s`` with nothing to do; the
    keeper starts one again as soon as a writer spools records (before their segment is complete,
    so a start delays no row), and nothing recorded is lost."""
    from mlflow_deploy_plugin.engines.local.capture_keeper import ConverterKeeper

    root, spool = tmp_path / "capture", tmp_path / "spool"
    keeper = ConverterKeeper(spool, tmp_path / "converter.log", idle_exit_s=0.5)
    # Segments complete only when flushed: whatever starts the converter, it is not a complete one.
    writer = CaptureWriter(str(root), "dep", flush_interval_s=3600, spool_dir=str(spool), converter="external")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def tended() -> ConverterKeeper:
        keeper.tend(lambda: env)
        return keeper

    try:
        pids = []
        for i in range(2):
            assert writer.record(request(f"r{i}", 1))
            pid = wait_until(lambda: tended().pid, 60, "a converter started for the records being spooled")
            assert writer.written_requests == i, "their segment is not complete yet"
            assert pid not in pids
            pids.append(pid)
            writer.flush(timeout_s=0)  # complete it: the running converter converts it
            wait_until(lambda n=i + 1: tended() and writer.written_requests == n, 60, f"r{i} converted")
            wait_until(lambda: tended().popen is None, 60, "the converter to exit, idle")
            assert keeper.restarts == 0, "an idle exit is no failure"
    finally:
        writer.close(timeout_s=5)
        keeper.stop(lambda: env, 60)
    assert sorted(read_capture(str(root))["_request_id"]) == ["r0", "r1"]
