"""The channel from a serving worker to its shadow process, in process: real pipes, real threads.

The request path's side must never block: a full queue drops (counted), a pipe whose reader died
loses only the message being written (counted), and copies arrive in order, gathered.
"""

from __future__ import annotations

import os
import pickle
import select
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import wait_for
from unit_helpers import id_frame

from mlflow_deploy_plugin.serving.app import Answer
from mlflow_deploy_plugin.serving.frames import is_float64
from mlflow_deploy_plugin.serving.shadow import CopyRun, ShadowAnswer, ShadowMirror, frame_of_raw
from mlflow_deploy_plugin.serving.shadow_channel import (
    Copy,
    CopyChannel,
    FrameReader,
    copy_of,
    encode_frame,
    pack_copies,
    unpack_copies,
    write_all,
)

WAIT_S = 10.0


def _copy(i: int) -> tuple:
    return (f"r{i}", 1.7e9 + i, ("inputs", id_frame([i])), None)


def _ids(items: list) -> list[str]:
    """The request ids of what unpack_copies read, runs expanded."""
    return [request_id for item in items
            for request_id in (item.request_ids if isinstance(item, CopyRun) else [item.request_id])]


def test_frames_round_trip_and_the_end_of_the_pipe_reads_as_none() -> None:
    read, write = os.pipe()
    big = np.arange(200_000, dtype=np.float64)  # larger than a pipe's buffer: written in pieces
    received: list = []
    reader = threading.Thread(target=lambda: received.extend(iter(FrameReader(read).read, None)))
    reader.start()
    write_all(write, encode_frame(("copies", [1, 2])))
    write_all(write, encode_frame(("big", big)))
    os.close(write)
    reader.join(WAIT_S)
    os.close(read)
    assert received[0] == ("copies", [1, 2])
    assert received[1][0] == "big" and np.array_equal(received[1][1], big)
    assert len(received) == 2


def test_a_copy_travels_in_its_cheapest_form_and_is_rebuilt_as_the_parser_built_it() -> None:
    values = np.array([[1.0, 2.0]])
    frame = pd.DataFrame(values, columns=["a", "b"])
    fast = copy_of(Answer("q", 1.5, "1", 200, 1.0, frame, None, params={"k": 1}, raw_inputs=(("a", "b"), values)))
    assert fast[2][0] == "raw"  # the array, not the DataFrame
    rebuilt = Copy(*fast)
    assert rebuilt.request_id == "q" and rebuilt.params == {"k": 1}
    pd.testing.assert_frame_equal(rebuilt.inputs, frame)
    assert is_float64(rebuilt.inputs) and rebuilt.raw_inputs[0] == ("a", "b")
    slow = Copy(*copy_of(Answer("s", 1.5, "1", 200, 1.0, id_frame([3]), None)))
    pd.testing.assert_frame_equal(slow.inputs, id_frame([3]))
    assert slow.raw_inputs is None and slow.params is None


def test_drop_hooks_are_called_with_keywords_so_an_order_cannot_be_swapped(tmp_path: Path) -> None:
    """The shadow's drop hook takes (reason, count), the capture writer's (n, reason): both are
    called with keywords (their protocols name them), so a hook written for the other order, or
    passed to the wrong one, fails instead of counting a reason as a number. Keyword-only hooks
    here: the positional calls raised TypeError (the writer's suppressed it: nothing counted)."""
    from mlflow_deploy_plugin.capture import CapturedRequest, CaptureWriter

    copy_drops: list[tuple[str, int]] = []

    def on_copy_drop(*, reason: str, count: int) -> None:
        copy_drops.append((reason, count))

    channel = CopyChannel(max_queue=1, on_drop=on_copy_drop)
    accepted = sum(channel.put(_copy(i)) for i in range(10))
    channel.close(timeout_s=2)
    assert accepted < 10 and sum(count for _, count in copy_drops) >= 10 - accepted
    assert {reason for reason, _ in copy_drops} <= {"no_shadow", "closed"}

    capture_drops: list[tuple[int, str]] = []

    def on_capture_drop(*, n: int, reason: str) -> None:
        capture_drops.append((n, reason))

    writer = CaptureWriter(str(tmp_path / "capture"), "dep", spool_dir=str(tmp_path / "spool"), converter="external",
                           on_drop=on_capture_drop)
    writer.close(timeout_s=2)
    assert not writer.record(CapturedRequest("r", time.time(), "1", 200, 1.0, pd.DataFrame({"x": [1.0]}), np.array([1])))
    assert capture_drops == [(1, "closed")]


def test_without_a_reader_the_queue_fills_and_drops_then_everything_taken_arrives_in_order() -> None:
    drops: list[tuple[str, int]] = []
    channel = CopyChannel(max_queue=3, on_drop=lambda reason, count: drops.append((reason, count)))
    accepted = [i for i in range(20) if channel.put(_copy(i))]
    # The queue holds 3 copies, the sender at most one message (what it gathered) while it waits
    # for a pipe: the rest were dropped, counted as what happened: no shadow process to take them
    # (it is starting or being replaced), not pressure.
    assert 3 <= len(accepted) < 20 and drops == [("no_shadow", 1)] * (20 - len(accepted))
    read, write = os.pipe()
    channel.attach(write)
    reader = FrameReader(read)
    got: list[str] = []
    messages = 0
    while len(got) < len(accepted):
        kind, items = reader.read()
        assert kind == "copies"
        messages += 1
        got += [copy.request_id for copy in unpack_copies(items)]
    assert got == [f"r{i}" for i in accepted] and messages <= 2  # in order, gathered: what it held, what waited
    # Counted once its write returned (the reader may have its bytes a moment before).
    wait_for(lambda: channel.sent == len(accepted), WAIT_S, "the channel to count what it wrote")
    channel.close(timeout_s=2)
    assert channel.detach() == len(accepted) and channel.detach() == 0  # handed over once
    os.close(read)


def test_with_a_shadow_process_that_does_not_keep_up_a_full_queue_drops_as_queue_full() -> None:
    drops: list[tuple[str, int]] = []
    channel = CopyChannel(max_queue=3, on_drop=lambda reason, count: drops.append((reason, count)))
    read, write = os.pipe()
    channel.attach(write)  # a shadow process is there, reading nothing
    taken = 0
    while not drops:  # the queue fills at once or, behind the pipe's buffer (64 KiB), soon
        assert taken < 100_000, "copies to a pipe nobody reads were never dropped"
        channel.put(_copy(taken))
        taken += 1
    assert drops == [("queue_full", 1)]  # pressure, not a missing shadow process
    channel.detach()  # as the supervisor does with a dead child's pipe: the blocked write ends
    os.close(read)
    channel.close(timeout_s=2)


def test_a_dead_reader_loses_only_the_message_being_written_and_a_new_pipe_takes_over() -> None:
    lost: list[int] = []
    drops: list[tuple[str, int]] = []
    channel = CopyChannel(max_queue=8, on_drop=lambda reason, count: drops.append((reason, count)),
                          on_lost=lost.append)
    read, write = os.pipe()
    channel.attach(write)
    os.close(read)  # the shadow process died
    assert channel.put(_copy(1))
    wait_for(lambda: lost == [1], WAIT_S, "the copy to be counted as lost")
    assert channel.detach() == 0
    read, write = os.pipe()
    channel.attach(write)
    assert channel.put(_copy(2))
    assert [copy.request_id for copy in unpack_copies(FrameReader(read).read()[1])] == ["r2"]
    channel.close(timeout_s=2)
    assert drops == []
    channel.detach()
    os.close(read)


def test_copies_travel_in_runs_in_their_order_and_a_bad_run_counts_its_copies() -> None:
    def raw(request_id: str, columns: tuple, rows: list[list[float]], params: dict | None = None) -> tuple:
        values = np.array(rows, dtype=np.float64)
        return copy_of(Answer(request_id, 1.5, "1", 200, 1.0, pd.DataFrame(values, columns=list(columns)), None,
                              params=params, raw_inputs=(columns, values)))

    copies = [raw("a", ("x", "y"), [[1, 2]]), raw("b", ("x", "y"), [[3, 4], [5, 6]]),
              raw("c", ("x", "z"), [[7, 8]]), raw("p", ("x", "z"), [[9, 10]], params={"k": 1}),
              _copy(11), raw("d", ("x", "z"), [[12, 13]])]
    items = pack_copies(copies)
    # a and b share their columns: one run, one array; c starts another; p (params) and the frame
    # travel alone, and d starts a run of its own after them (the order is kept).
    assert [item[0] for item in items] == ["run", "run", "one", "one", "run"]
    assert items[0][2] == ["a", "b"] and items[0][4] == [1, 2] and items[0][5].shape == (3, 2)
    rebuilt = unpack_copies(pickle.loads(pickle.dumps(items)))
    # A run is read as one CopyRun (one item for the mirror: no DataFrame per copy), any other copy as a Copy.
    assert [type(item) for item in rebuilt] == [CopyRun, CopyRun, Copy, Copy, CopyRun]
    assert _ids(rebuilt) == ["a", "b", "c", "p", "r11", "d"]
    ab = rebuilt[0]
    assert ab.columns == ("x", "y") and ab.counts == [1, 2] and ab.values.tolist() == [[1, 2], [3, 4], [5, 6]]
    b = ab.copies()[1]
    assert b.inputs is None and b.raw_inputs[0] == ("x", "y") and b.raw_inputs[1].tolist() == [[3, 4], [5, 6]]
    frame = frame_of_raw(*b.raw_inputs)  # as the parser's fast path built the primary's frame
    pd.testing.assert_frame_equal(frame, pd.DataFrame([[3.0, 4.0], [5.0, 6.0]], columns=["x", "y"]))
    assert is_float64(frame)
    assert rebuilt[2].params == {"k": 1} and rebuilt[3].params is None
    pd.testing.assert_frame_equal(rebuilt[3].inputs, id_frame([11]))
    # A run whose lengths disagree is not ours: its copies are counted, the others still read.
    broken = ("run", ("x",), ["e", "f"], [1.0, 2.0], [1, 1], np.zeros((3, 1)))
    read_back = unpack_copies([broken, *items[:1]])
    assert read_back[0] == 2 and _ids(read_back[1:]) == ["a", "b"]
    # One that fails partway (its second count is no row count) is counted once, in full: none of
    # its copies goes on, or the first would be both predicted and counted as dropped.
    partway = ("run", ("x",), ["g", "h", "i"], [1.0, 2.0, 3.0], [1, 1.5, 0.5], np.zeros((3, 1)))
    assert unpack_copies([partway, *items[:1]])[0] == 3
    assert [getattr(copy, "request_id", copy) for copy in unpack_copies([partway])] == [3]


def test_copies_gather_into_one_message_and_a_control_message_goes_after_them() -> None:
    # After a message the sender lets copies gather for a minute: the flush hurries it, and comes
    # after the copies queued before it.
    channel = CopyChannel(max_queue=16, on_drop=lambda reason, count: None, gather_s=60.0)
    read, write = os.pipe()
    channel.attach(write)
    reader = FrameReader(read)
    try:
        assert channel.put(_copy(0))  # after a quiet spell: written at once
        assert [copy.request_id for copy in unpack_copies(reader.read()[1])] == ["r0"]
        assert all(channel.put(_copy(i)) for i in range(1, 6))
        # r0 left the queue when the reader got it, but the sender counts it finished only after
        # its write returns: wait for that, then exactly the 5 gathering copies wait.
        wait_for(lambda: channel.waiting() == 5, WAIT_S, "r0 to be counted as written")
        assert channel.send_control(lambda: ("flush", 1, WAIT_S), timeout_s=WAIT_S)
        kind, items = reader.read()
        assert kind == "copies" and [copy.request_id for copy in unpack_copies(items)] == [f"r{i}" for i in range(1, 6)]
        assert reader.read() == ("flush", 1, WAIT_S)
        assert channel.waiting() == 0 and channel.sent == 6 and channel.messages == 2
    finally:
        channel.close(timeout_s=2)
        channel.detach()
        os.close(read)


def test_half_a_queue_of_copies_ends_the_gathering() -> None:
    """The sender gathers copies for a long while (few wakes of a thread that wants the serving
    loop's GIL), but not until the queue is full: copies put while a full queue waits for its
    message would be dropped as queue_full. Half the queue goes at once."""
    drops: list[tuple[str, int]] = []
    channel = CopyChannel(max_queue=16, on_drop=lambda reason, count: drops.append((reason, count)), gather_s=60.0)
    read, write = os.pipe()
    channel.attach(write)
    reader = FrameReader(read)
    try:
        assert channel.put(_copy(0))  # after a quiet spell: written at once, then a minute of gathering
        assert _ids(unpack_copies(reader.read()[1])) == ["r0"]
        wait_for(lambda: channel.waiting() == 0, WAIT_S, "r0 to be counted as written")
        assert all(channel.put(_copy(i)) for i in range(1, 9))  # 8: half of max_queue
        # Long before the minute is up (the old sender waited it out).
        assert select.select([read], [], [], WAIT_S)[0], "half a queue of copies still waits for the gathering"
        kind, items = reader.read()
        assert kind == "copies" and _ids(unpack_copies(items)) == [f"r{i}" for i in range(1, 9)]
        assert drops == []
    finally:
        channel.close(timeout_s=2)
        channel.detach()
        os.close(read)


def test_a_control_message_is_made_when_it_is_written_after_the_copies_ahead_of_it() -> None:
    """A flush tells the shadow process the time its caller has left once the copies queued before
    it have gone (a child that reads slowly can take most of the budget with them), not the budget
    the caller had before that wait: the child then gives up when its caller does."""
    channel = CopyChannel(max_queue=16, on_drop=lambda reason, count: None, gather_s=60.0)
    read, write = os.pipe()
    channel.attach(write)
    reader = FrameReader(read)
    sent: list[bool] = []
    try:
        # Larger than the pipe's buffer (64 KiB): its write waits until the reader takes it.
        assert channel.put(("big", 1.7e9, ("inputs", pd.DataFrame(np.zeros((20_000, 2)))), None))
        asked = time.monotonic()
        deadline = asked + WAIT_S
        control = threading.Thread(target=lambda: sent.append(channel.send_control(
            lambda: ("flush", 1, deadline - time.monotonic()), timeout_s=WAIT_S)))
        control.start()
        held_s = time.monotonic() - asked  # nothing is read before this: the flush waits at least that long
        kind, items = reader.read()
        assert kind == "copies" and _ids(unpack_copies(items)) == ["big"]
        control.join(WAIT_S)
        assert sent == [True]  # written: the read below has it
        flush = reader.read()
        assert flush[:2] == ("flush", 1)
        assert flush[2] < WAIT_S - held_s  # the time left when it was written, not the whole budget
    finally:
        channel.close(timeout_s=2)
        channel.detach()
        os.close(read)


def test_closing_without_a_pipe_drops_what_waits_as_closed() -> None:
    drops: list[tuple[str, int]] = []
    channel = CopyChannel(max_queue=4, on_drop=lambda reason, count: drops.append((reason, count)))
    taken = sum(channel.put(_copy(i)) for i in range(3))
    channel.close(timeout_s=1)
    assert taken == 3 and drops == [("closed", 3)]  # what waited: one count of its copies
    assert not channel.put(_copy(9)) and drops[-1] == ("closed", 1)


def test_the_mirror_waits_batch_wait_s_for_copies_to_join_a_batch(controlled_slot) -> None:
    from unit_helpers import controlled

    model = controlled(controlled_slot)
    recorded: list[ShadowAnswer] = []
    # Up to 2 rows a batch, waiting as long as it takes: the two copies are one call, whenever the second comes.
    mirror = ShadowMirror(controlled_slot.predict, "7", recorded.append, batching=True, max_batch_rows=2,
                          batch_wait_s=WAIT_S * 10)
    try:
        mirror.submit(ShadowAnswer("a", 1.7e9, "1", 200, 1.0, id_frame([1]), None))
        mirror.submit(ShadowAnswer("b", 1.7e9, "1", 200, 1.0, id_frame([2]), None))
        wait_for(lambda: len(recorded) == 2, WAIT_S, "two shadow answers")
    finally:
        mirror.close()
    assert model.calls == [[1, 2]]
    assert [answer.predictions.tolist() for answer in recorded] == [[2], [4]]


class _Predictor:
    """A shadow's predict (a real function) that tests can hold: ``x * 2 + y`` per row, or its text
    with ``as_text``; raises on a row whose x is in ``poison``; records the frame of every call."""

    def __init__(self, as_text: bool = False) -> None:
        self.frames: list[pd.DataFrame] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Semaphore(0)
        self.poison: set[float] = set()
        self.as_text = as_text

    def __call__(self, frame: pd.DataFrame, params: dict | None) -> np.ndarray:
        self.frames.append(frame)
        self.started.release()
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        if self.poison.intersection(frame["x"]):
            raise ValueError("poisoned row")
        answer = frame["x"].to_numpy() * 2 + (frame["y"].to_numpy() if "y" in frame else 0)
        return answer.astype(str) if self.as_text else answer


def _run_of(first: int, counts: list[int], columns: tuple = ("x", "y")) -> CopyRun:
    """Copies r{first}, r{first+1}... of ``counts`` rows each, as the channel delivers them: row j of
    the run is (j + first * 100, -j)."""
    copies = []
    row = first * 100
    for index, count in enumerate(counts):
        values = np.array([[row + j, -(row + j)] for j in range(count)], dtype=np.float64)[:, :len(columns)]
        copies.append(copy_of(Answer(f"r{first + index}", 1.7e9 + index, "1", 200, 1.0, None, None,
                                     raw_inputs=(columns, values))))
        row += count
    [item] = unpack_copies(pickle.loads(pickle.dumps(pack_copies(copies))))
    assert isinstance(item, CopyRun)
    return item


def test_runs_are_predicted_in_one_call_on_one_frame_and_captured_copy_by_copy_exactly(tmp_path) -> None:
    from mlflow_deploy_plugin.capture import CaptureWriter, read_capture

    predict = _Predictor()
    writer = CaptureWriter(str(tmp_path / "capture"), "unit", spool_dir=str(tmp_path / "spool"))
    mirror = ShadowMirror(predict, "2", writer.record, batching=True, model_name="challenger", batch_wait_s=0.0)
    try:
        predict.gate.clear()
        assert mirror.submit_run(_run_of(0, [1])) == 1
        assert predict.started.acquire(timeout=WAIT_S)  # that call holds the mirror: the next runs wait together
        assert mirror.submit_run(_run_of(1, [2, 1])) == 2 and mirror.submit_run(_run_of(3, [3])) == 1
        assert mirror.submit_run(_run_of(4, [1], columns=("x",))) == 1  # other columns: a call of its own
        predict.gate.set()
        wait_for(lambda: mirror.idle() and len(predict.frames) == 3, WAIT_S, "the shadow to predict every run")
        writer.flush(timeout_s=WAIT_S)
    finally:
        predict.gate.set()
        mirror.close()
        writer.close(timeout_s=WAIT_S)
    # The two runs with the same columns: one call, one frame of their rows in their order.
    both = predict.frames[1]
    assert both["x"].tolist() == [100, 101, 102, 300, 301, 302] and is_float64(both)
    assert predict.frames[2].columns.tolist() == ["x"]
    rows = read_capture(str(tmp_path / "capture"), shadow=True).sort_values(["_request_id", "_row"])
    assert set(rows["_role"]) == {"shadow"} and set(rows["_model_name"]) == {"challenger"}
    # Every copy's rows under its own request id, in its row order, with its own answers.
    got = [(rid, row, x, y, pred) for rid, row, x, y, pred in rows[["_request_id", "_row", "x", "y", "_prediction"]]
           .itertuples(index=False) if rid != "r4"]
    assert got == [("r0", 0, 0.0, -0.0, 0.0),
                   ("r1", 0, 100.0, -100.0, 100.0), ("r1", 1, 101.0, -101.0, 101.0),
                   ("r2", 0, 102.0, -102.0, 102.0),
                   ("r3", 0, 300.0, -300.0, 300.0), ("r3", 1, 301.0, -301.0, 301.0), ("r3", 2, 302.0, -302.0, 302.0)]
    assert mirror.outcomes == {"ok": 5} and mirror.submitted == 5


def test_a_copy_whose_answers_capture_cannot_take_raw_gets_its_frame_and_a_failed_run_is_retried_copy_by_copy(
        tmp_path) -> None:
    from mlflow_deploy_plugin.capture import CaptureWriter, read_capture

    predict = _Predictor(as_text=True)  # text answers: capture pickles the record, with the copy's frame
    predict.poison = {101.0}
    writer = CaptureWriter(str(tmp_path / "capture"), "unit", spool_dir=str(tmp_path / "spool"))
    mirror = ShadowMirror(predict, "2", writer.record, batching=True)
    try:
        assert mirror.submit_run(_run_of(1, [2, 1])) == 2
        wait_for(mirror.idle, WAIT_S, "the shadow to answer the run")
        writer.flush(timeout_s=WAIT_S)
    finally:
        mirror.close()
        writer.close(timeout_s=WAIT_S)
    # The run's call failed (r1 holds a poisoned row), then each copy alone: only r1 fails.
    assert [frame["x"].tolist() for frame in predict.frames] == [[100, 101, 102], [100, 101], [102]]
    rows = read_capture(str(tmp_path / "capture"), shadow=True).sort_values(["_request_id", "_row"])
    assert rows[["_request_id", "_row", "x", "_status"]].values.tolist() == [
        ["r1", 0, 100.0, 500], ["r1", 1, 101.0, 500], ["r2", 0, 102.0, 200]]
    assert rows["_prediction"].tolist()[-1] == "102.0"
    assert mirror.outcomes == {"error": 1, "ok": 1}


def test_a_run_takes_the_room_the_queue_has_and_a_large_one_is_cut_into_batches() -> None:
    recorded: list[ShadowAnswer] = []
    drops: list[tuple[str, int]] = []
    predict = _Predictor()
    mirror = ShadowMirror(predict, "2", recorded.append, batching=True, max_queue=3, max_batch_rows=4,
                          on_drop=lambda reason, count: drops.append((reason, count)))
    try:
        predict.gate.clear()
        mirror.submit_run(_run_of(0, [1]))
        assert predict.started.acquire(timeout=WAIT_S)
        # Room for 3 copies: the last two of five are dropped, counted; the three kept are 6 rows,
        # more than a batch: cut between copies (r1 r2, then r3).
        assert mirror.submit_run(_run_of(1, [2, 2, 2, 1, 1])) == 3
        assert drops == [("queue_full", 2)]  # one call for the run's two copies: the metric adds 2 once
        predict.gate.set()
        wait_for(lambda: len(recorded) == 4, WAIT_S, "four shadow answers")
    finally:
        predict.gate.set()
        mirror.close()
    assert [frame["x"].tolist() for frame in predict.frames] == [[0], [100, 101, 102, 103], [104, 105]]
    assert [answer.request_id for answer in recorded] == ["r0", "r1", "r2", "r3"]
    assert recorded[3].predictions.tolist() == [104 * 2 - 104, 105 * 2 - 105]
    assert mirror.submitted == 4 and mirror.dropped == {"queue_full": 2}
    assert mirror.submit_run(_run_of(9, [1, 1])) == 0 and drops[-1] == ("closed", 2)  # closed: counted


def test_without_batching_each_copy_of_a_run_is_predicted_alone() -> None:
    recorded: list[ShadowAnswer] = []
    predict = _Predictor()
    mirror = ShadowMirror(predict, "2", recorded.append, batching=False)
    try:
        mirror.submit_run(_run_of(1, [2, 1]))
        wait_for(lambda: len(recorded) == 2, WAIT_S, "two shadow answers")
    finally:
        mirror.close()
    assert [frame["x"].tolist() for frame in predict.frames] == [[100, 101], [102]]
    assert all(is_float64(frame) for frame in predict.frames)
    assert [(a.request_id, a.inputs["x"].tolist(), a.predictions.tolist()) for a in recorded] == [
        ("r1", [100, 101], [100, 101]), ("r2", [102], [102])]


def test_a_run_is_cut_between_copies() -> None:
    run = _run_of(0, [2, 2, 2, 5, 1])
    parts = run.split(4)
    assert [part.request_ids for part in parts] == [["r0", "r1"], ["r2"], ["r3"], ["r4"]]
    assert [part.counts for part in parts] == [[2, 2], [2], [5], [1]]
    assert np.array_equal(np.concatenate([part.values for part in parts]), run.values)
    assert run.split(100) == [run] and run.head(2).values.tolist() == run.values[:4].tolist()


def test_after_a_full_message_the_sender_writes_the_next_without_gathering() -> None:
    # Gathering for a minute, 4 copies a message: a backlog must still go out message after message
    # (gathering after a full one would only cap the copies a second, then drop them as queue_full).
    channel = CopyChannel(max_queue=64, on_drop=lambda reason, count: None, max_copies=4, gather_s=60.0)
    read, write = os.pipe()
    channel.attach(write)
    messages: list[list[str]] = []

    def read_all() -> None:
        reader = FrameReader(read)
        while (message := reader.read()) is not None:
            messages.append([copy.request_id for copy in unpack_copies(message[1])])

    # The first copy is larger than the pipe holds: its write waits for the reader, while the
    # others queue behind it.
    assert channel.put(("r0", 1.7e9, ("inputs", id_frame(range(40_000))), None))
    assert all(channel.put(_copy(i)) for i in range(1, 10))
    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        wait_for(lambda: sum(map(len, messages)) == 10, WAIT_S, "the backlog to be written")
        assert [request_id for message in messages for request_id in message] == [f"r{i}" for i in range(10)]
        assert all(len(message) <= 4 for message in messages) and len(messages) >= 3
    finally:
        channel.close(timeout_s=2)
        channel.detach()  # the end of the pipe: the reader stops
        reader.join(WAIT_S)
        os.close(read)


def test_a_message_holds_about_max_bytes_of_inputs_and_a_larger_copy_goes_alone() -> None:
    def raw(request_id: str, rows: int) -> tuple:  # rows x 2 float64: 16 bytes a row
        values = np.zeros((rows, 2))
        return copy_of(Answer(request_id, 1.5, "1", 200, 1.0, None, None, raw_inputs=(("x", "y"), values)))

    channel = CopyChannel(max_queue=16, on_drop=lambda reason, count: None, gather_s=60.0, max_bytes=1000)
    read, write = os.pipe()
    try:
        # Queued before there is a pipe; a flush then has them all written, as many messages as it takes.
        for copy in (raw("big", 125), raw("a", 40), raw("b", 40), raw("c", 5), raw("d", 5), _copy(1)):
            assert channel.put(copy)
        channel.attach(write)
        assert channel.send_control(lambda: ("flush", 1, WAIT_S), timeout_s=WAIT_S)
        reader = FrameReader(read)
        messages = []
        while (message := reader.read())[0] == "copies":
            messages.append(_ids(unpack_copies(message[1])))
        # 2,000 bytes: alone; 640 and 640: one each; then 640 + 80 + 80 + one id_frame row (2 cells).
        assert messages == [["big"], ["a"], ["b", "c", "d", "r1"]]
    finally:
        channel.close(timeout_s=2)
        channel.detach()
        os.close(read)
