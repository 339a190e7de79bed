"""The fork server's two ends on a real socket pair, in process (the forking itself, with the
supervisor adopting the workers, is checked on a real deployment in test_update_and_supervision)."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

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
    assert "other threads (" in answer["error"] and "a-library-thread" in answer["error"]


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


def test_an_answered_refusal_is_told_apart_from_a_malformed_answer() -> None:
    """A refusal (the standby answered an error: it would again) stops the supervisor's forking; a
    reply without a usable pid is only a failed fork, never a crash of the supervisor."""
    fds, opened = _fds()
    try:
        ours, theirs = forkserver.channel()
        theirs.send(json.dumps({"error": "ForkError: other threads"}).encode())
        with pytest.raises(forkserver.ForkRefused):
            forkserver.request_fork(ours, [], {}, fds)
        for reply in ({"pid": "12"}, {"pid": 0}, {"pid": True}, [4242]):
            ours, theirs = forkserver.channel()
            theirs.send(json.dumps(reply).encode())
            with pytest.raises(forkserver.ForkError) as raised:
                forkserver.request_fork(ours, [], {}, fds)
            assert not isinstance(raised.value, forkserver.ForkRefused)
    finally:
        for fd in opened:
            os.close(fd)


def test_a_forked_worker_dead_before_loading_is_started_fresh_and_forking_stops_if_that_loads(
        tmp_path: Path) -> None:
    """Some models cannot load in a forked process (CUDA initialised by the standby's warm-up, a
    native thread pool): the supervisor retries such a worker once as a fresh interpreter instead of
    failing the create or update, and stops forking when the fresh one loads."""
    import subprocess
    import sys
    import time

    from mlflow_deploy_plugin.engines.local.supervisor import STATUS_FAILED, Generation, Supervisor, Worker
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore

    paths = StateStore(tmp_path / "home").paths("dep")
    paths.metrics.mkdir(parents=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(paths)
    supervisor.forking = True
    spec = DeploymentSpec("dep", ModelRef("models:/m/1", "m", "1"))
    forked = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])  # stands in for the forked one
    stdin_read, stdin_write = os.pipe()
    os.close(stdin_read)
    ready_read, ready_write = os.pipe()
    os.close(ready_write)
    forked.wait(timeout=30)  # reaped here: its handle then reads an unknown status, still an exit
    child = forkserver.ForkedChild(forked.pid, stdin_write)
    fresh: list[Worker] = []
    with socket.socket() as sock:
        supervisor.current = Generation(1, spec, sock, paths.root / "spec-1.json")
        supervisor.workers[forked.pid] = Worker(child, 1, 0, ready_read, paths.logs / "worker-1-0.log")
        try:
            supervisor._reap()
            fresh = list(supervisor.workers.values())
            assert [(w.generation, w.index, w.fork_retry, isinstance(w.popen, subprocess.Popen)) for w in fresh] == [
                (1, 0, True, True)]
            assert supervisor.state != STATUS_FAILED and supervisor.restarts == 0  # not judged as a crash
            assert supervisor.forking
            fresh[0].loaded_at = time.time()  # the fresh interpreter loaded where the forked one could not
            supervisor._keep_standby()
            assert not supervisor.forking
        finally:
            for worker in fresh:
                worker.popen.kill()
                worker.popen.wait(timeout=30)
                os.close(worker.ready_fd)


def test_a_forked_worker_reseeds_numpys_global_generator() -> None:
    """Workers forked from one standby would otherwise draw the same numpy.random sequence (Python's
    ``random`` reseeds itself at a fork, numpy's legacy generator does not)."""
    import numpy as np

    from mlflow_deploy_plugin.serving.worker import _reseed_after_fork

    np.random.seed(0)
    as_forked = np.random.rand(4)
    np.random.seed(0)
    _reseed_after_fork()
    assert not np.array_equal(np.random.rand(4), as_forked)


def test_children_are_found_by_their_parent_without_the_kernels_children_files() -> None:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert child.pid in forkserver._children_by_parent()
        assert child.pid in forkserver._children()
    finally:
        child.kill()
        child.wait(timeout=30)


def test_a_forking_standby_is_replaced_once_the_served_models_need_flavors_it_did_not_import(
        tmp_path: Path, classifier_path: Path, controlled_path: Path) -> None:
    """The standby warms up for the models that serve when it starts; after an update to models of
    another flavor, every worker forked from it would import that flavor itself. Standby and workers
    tell the flavors' modules they imported / need on their ready pipes; the supervisor replaces the
    standby when the serving generation needs some it lacks, never for the generation it warmed up
    for (one that could not import them is replaced once, not at every tick)."""
    import subprocess
    import sys

    from mlflow_deploy_plugin.engines.local import worker_protocol as protocol
    from mlflow_deploy_plugin.engines.local.supervisor import Generation, Supervisor, Worker
    from mlflow_deploy_plugin.serving.worker import _flavor_modules
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore

    sklearn, pyfunc = _flavor_modules(classifier_path), _flavor_modules(controlled_path)
    assert sklearn == {"mlflow.sklearn"} and pyfunc == {"mlflow.pyfunc.loaders.code_model"}  # a model from code
    paths = StateStore(tmp_path / "home").paths("dep")
    supervisor = Supervisor(paths)
    supervisor.forking = True
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    pipes: list[int] = []

    def told(generation: int, event: str, modules: set[str]) -> Worker:
        """A worker (generation -1: the standby warmed up for ``generation``) that said ``event``."""
        read_end, write_end = os.pipe()
        pipes.append(read_end)
        os.set_blocking(read_end, False)
        protocol.report(write_end, event, protocol.modules_detail(modules))
        os.close(write_end)
        worker = Worker(process, -1 if event == protocol.STANDBY else generation, 0, read_end, tmp_path / "log",
                        warmed_for=generation if event == protocol.STANDBY else None)
        worker.read_pipe()
        return worker

    try:
        with socket.socket() as sock:
            spec = DeploymentSpec("dep", ModelRef("models:/m/2", "m", "2"))
            current = supervisor.current = Generation(2, spec, sock, paths.root / "generation-2.json")
            supervisor.workers = {1: told(2, protocol.LOADED, pyfunc)}
            supervisor.standby = told(1, protocol.STANDBY, sklearn)
            reason = supervisor._stale_standby(current)
            assert reason and "generation 1 (mlflow.sklearn)" in reason and "need mlflow.pyfunc.loaders.code_model" in reason
            supervisor.standby = told(2, protocol.STANDBY, set())  # warmed up for this one, and failed to
            assert supervisor._stale_standby(current) is None
            supervisor.standby = told(1, protocol.STANDBY, sklearn | pyfunc)  # has them all
            assert supervisor._stale_standby(current) is None
            supervisor.workers = {1: told(2, protocol.LOADED, sklearn)}  # an update to the same flavor
            supervisor.standby = told(1, protocol.STANDBY, sklearn)
            assert supervisor._stale_standby(current) is None
    finally:
        process.kill()
        process.wait(timeout=30)
        for fd in pipes:
            os.close(fd)
