"""The channel from a serving worker to its shadow process, in process: real pipes, real threads.

The request path's side must never block: a full queue drops (counted), a pipe whose reader died
loses only the message being written (counted), and copies arrive in order, gathered.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pandas as pd
from conftest import wait_for
from unit_helpers import id_frame

from mlflow_deploy_plugin.serving.app import Answer
from mlflow_deploy_plugin.serving.frames import is_float64
from mlflow_deploy_plugin.serving.shadow import ShadowAnswer, ShadowMirror
from mlflow_deploy_plugin.serving.shadow_channel import (
    Copy,
    CopyChannel,
    FrameReader,
    copy_of,
    encode_frame,
    write_all,
)

WAIT_S = 10.0


def _copy(i: int) -> tuple:
    return (f"r{i}", 1.7e9 + i, ("inputs", id_frame([i])), None)


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


def test_without_a_reader_the_queue_fills_and_drops_then_everything_taken_arrives_in_order() -> None:
    drops: list[str] = []
    channel = CopyChannel(max_queue=3, on_drop=drops.append)
    accepted = [i for i in range(20) if channel.put(_copy(i))]
    # The queue holds 3 copies, the sender at most one message (what it gathered) while it waits
    # for a pipe: the rest were dropped, counted.
    assert 3 <= len(accepted) < 20 and drops == ["queue_full"] * (20 - len(accepted))
    read, write = os.pipe()
    channel.attach(write)
    reader = FrameReader(read)
    got: list[str] = []
    messages = 0
    while len(got) < len(accepted):
        kind, copies = reader.read()
        assert kind == "copies"
        messages += 1
        got += [copy[0] for copy in copies]
    assert got == [f"r{i}" for i in accepted] and messages <= 2  # in order, gathered: what it held, what waited
    assert channel.sent == len(accepted)
    channel.close(timeout_s=2)
    assert channel.detach() == len(accepted) and channel.detach() == 0  # handed over once
    os.close(read)


def test_a_dead_reader_loses_only_the_message_being_written_and_a_new_pipe_takes_over() -> None:
    lost: list[int] = []
    drops: list[str] = []
    channel = CopyChannel(max_queue=8, on_drop=drops.append, on_lost=lost.append)
    read, write = os.pipe()
    channel.attach(write)
    os.close(read)  # the shadow process died
    assert channel.put(_copy(1))
    wait_for(lambda: lost == [1], WAIT_S, "the copy to be counted as lost")
    assert channel.detach() == 0
    read, write = os.pipe()
    channel.attach(write)
    assert channel.put(_copy(2))
    assert FrameReader(read).read()[1][0][0] == "r2"
    channel.close(timeout_s=2)
    assert drops == []
    channel.detach()
    os.close(read)


def test_closing_without_a_pipe_drops_what_waits_as_closed() -> None:
    drops: list[str] = []
    channel = CopyChannel(max_queue=4, on_drop=drops.append)
    taken = sum(channel.put(_copy(i)) for i in range(3))
    channel.close(timeout_s=1)
    assert taken == 3 and drops == ["closed"] * 3
    assert not channel.put(_copy(9)) and drops[-1] == "closed"


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
