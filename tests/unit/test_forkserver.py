"""The fork server's two ends on a real socket pair, in process (the forking itself, with the
supervisor adopting the workers, is checked on a real deployment in test_update_and_supervision)."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

from mlflow_deploy_plugin.engines.local import forkserver


def _fds() -> tuple[dict[str, int], list[int]]:
    opened = [fd for pair in (os.pipe(), os.pipe()) for fd in pair]
    return dict(zip(forkserver.FD_NAMES, opened, strict=True)), opened


def test_a_request_carries_the_workers_descriptors_and_gets_the_pid_back() -> None:
    ours, theirs = forkserver.channel()
    fds, opened = _fds()
    seen: dict = {}

    def standby() -> None:  # answers as the standby does, without forking
        message, received, _, _ = socket.recv_fds(theirs, 1 << 16, 4)
        seen.update(json.loads(message), fds=len(received))
        for fd in received:
            os.close(fd)
        theirs.send(json.dumps({"pid": 4242}).encode())

    thread = threading.Thread(target=standby)
    thread.start()
    try:
        assert forkserver.request_fork(ours, ["--spec", "g.json"], {"A": "1"}, fds) == 4242
    finally:
        thread.join(timeout=10)
        for fd in opened:
            os.close(fd)
    assert seen == {"args": ["--spec", "g.json"], "env": {"A": "1"}, "fds": 4}
    assert theirs.get_inheritable() and not ours.get_inheritable()  # only the standby's end is passed on


def test_a_standby_that_refuses_gone_or_silent_is_a_fork_error() -> None:
    fds, opened = _fds()
    try:
        ours, theirs = forkserver.channel()
        theirs.send(json.dumps({"error": "OSError: no memory"}).encode())  # answered before asked
        with pytest.raises(forkserver.ForkError, match="could not fork a worker: OSError: no memory"):
            forkserver.request_fork(ours, [], {}, fds)
        ours, theirs = forkserver.channel()
        with pytest.raises(forkserver.ForkError, match="did not fork a worker within 0.1s"):
            forkserver.request_fork(ours, [], {}, fds, timeout_s=0.1)
        theirs.close()
        with pytest.raises(forkserver.ForkError):
            forkserver.request_fork(ours, [], {}, fds)
    finally:
        for fd in opened:
            os.close(fd)


def test_the_standby_leaves_when_the_supervisor_closes_its_end_and_answers_a_bad_request() -> None:
    ours, theirs = forkserver.channel()
    ours.send(b"{}")  # no descriptors attached: refused, answered, no fork
    ours.close()
    assert forkserver.serve(theirs) is None
    theirs.close()

    ours, theirs = forkserver.channel()
    ours.send(b"{}")
    thread = threading.Thread(target=forkserver.serve, args=(theirs,))
    thread.start()
    assert b"expected 4 descriptors" in ours.recv(1 << 16)
    ours.close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_standby_with_another_thread_refuses_to_fork() -> None:
    """A fork copies only the calling thread: the standby refuses while another one runs (the
    supervisor falls back to a fresh interpreter) and never forks."""
    ours, theirs = forkserver.channel()
    fds, opened = _fds()
    release = threading.Event()
    other = threading.Thread(target=release.wait, name="a-library-thread")
    other.start()
    try:
        socket.send_fds(ours, [json.dumps({"args": [], "env": {}}).encode()], list(fds.values()))
        ours.shutdown(socket.SHUT_WR)  # after this one request the standby is released
        assert forkserver.serve(theirs) is None  # returned here, in the standby: no child
        answer = json.loads(ours.recv(1 << 16))
    finally:
        release.set()
        other.join(timeout=10)
        theirs.close()
        ours.close()
        for fd in opened:
            os.close(fd)
    assert "other threads (a-library-thread)" in answer["error"]


def test_reaping_adopted_orphans_reaps_exited_children_only_and_never_known_ones() -> None:
    import subprocess
    import sys
    import time

    known = subprocess.Popen([sys.executable, "-c", "pass"])
    running = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    adopted = subprocess.Popen([sys.executable, "-c", "pass"])  # stands for an orphan we adopted
    try:
        deadline = time.monotonic() + 30
        reaped: list[int] = []
        while adopted.pid not in reaped and time.monotonic() < deadline:
            reaped += forkserver.reap_adopted({known.pid})
            time.sleep(0.01)
        assert reaped == [adopted.pid]
        assert known.wait(timeout=30) == 0  # its exit status was left for its own handle
    finally:
        running.communicate(timeout=30)
