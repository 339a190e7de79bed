"""The local engine's shadow process: a real child process, real models, real capture files.

The service is built as a local worker builds it (``shadow_starter=start_shadow_process``): the
shadow version is loaded in a child, never in this process; its rows join the primary's exactly; a
child killed or gone silent is replaced, the copies it took and never answered counted as dropped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import wait_for
from unit_helpers import TestClient, iris_data, split_body

from mlflow_deploy_plugin.capture import CaptureWriter, read_capture
from mlflow_deploy_plugin.engines.local.capture_loss import CaptureLoss
from mlflow_deploy_plugin.engines.local.liveness import ShadowTally, read_shadow_tally, shadow_tally_path
from mlflow_deploy_plugin.engines.local.shadow_process import (
    ShadowProcess,
    ShadowStartError,
    _Events,
    _flush,
    start_shadow_process,
)
from mlflow_deploy_plugin.serving.app import Answer
from mlflow_deploy_plugin.serving.metrics import observe_many
from mlflow_deploy_plugin.serving.model_slot import ModelSlot
from mlflow_deploy_plugin.serving.service import build_service
from mlflow_deploy_plugin.serving.shadow import ShadowMirror
from mlflow_deploy_plugin.serving.shadow_channel import FrameReader
from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef
from mlflow_deploy_plugin.state import StateStore

WAIT_S = 120.0  # a child loads MLflow and its model: seconds on a busy machine
# How much later than its timeout a call that must keep to it may return (threads scheduled late on a
# busy machine): far below what a second wait with the same budget, or an unbounded one, would add.
LATE_S = 3.0


def _killed_or_gone(pid: int) -> bool:
    """``pid`` (a child of this process) has exited by SIGKILL, or is gone (reaped by its handle)."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not _alive(pid)
    if not reaped:
        return False
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"exit status {status}"
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def no_multiprocess_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def _spec(**config: object) -> DeploymentSpec:
    return DeploymentSpec(name="unit", model=ModelRef("models:/iris/1", "iris", "1"),
                          shadow=ModelRef("models:/iris_challenger/2", "iris_challenger", "2"),
                          config=DeploymentConfig(shadow="models:/iris_challenger/2", **config))


def test_shadow_runs_in_its_own_process_pairs_join_and_a_dead_or_silent_one_is_replaced(
        tmp_path: Path, classifier_path: Path, rotated_classifier_path: Path, no_multiprocess_metrics: None) -> None:
    paths = {"1": classifier_path, "2": rotated_classifier_path}
    drops: list[str] = []

    def starter(spec, model_dir, capture_dir, capture_key, converter, hooks):  # noqa: ANN001, ANN202
        def on_drop(reason: str, count: int) -> None:
            drops.extend([reason] * count)
            hooks.on_drop(reason=reason, count=count)

        # As start_shadow_process, with a short grace: a silent child is replaced 1 + 2 s after its last word.
        return ShadowProcess(spec, model_dir, capture_dir, capture_key, converter, on_drop, hooks.on_result,
                             hooks.on_capture_drop, hang_grace_s=2.0)

    service = build_service(_spec(timeout_s=1.0), lambda model: paths[model.model_version],
                            str(tmp_path / "capture"), tmp_path / "capture.key", shadow_starter=starter)
    shadow = service.shadow
    assert isinstance(shadow, ShadowProcess) and shadow.pid != os.getpid()
    first_pid = shadow.pid
    assert first_pid is not None
    # Below the worker once loaded, in the worker's session (the same scheduler autogroup).
    # Every thread of it (Linux keeps a nice value per thread): the dispatcher and the capture
    # writer started during the load, and so the predict calls they start.
    threads = [int(tid) for tid in os.listdir(f"/proc/{first_pid}/task")]
    assert len(threads) > 1
    # Nice values stop at 19: a test run under `nice -n 10` or more sees the child at 19.
    lowered = min(os.getpriority(os.PRIO_PROCESS, 0) + 10, 19)
    assert all(os.getpriority(os.PRIO_PROCESS, tid) >= lowered for tid in threads), \
        {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in threads}
    assert os.getsid(first_pid) == os.getsid(0)
    assert [slot.identity.model_version for slot, _ in service.slots] == ["1"]  # v2 is not loaded here
    features, _ = iris_data()
    try:
        with TestClient(service.app) as client:
            service.state.ready = True

            def ask(request_id: str, i: int) -> None:
                response = client.post("/invocations", json=split_body(features.iloc[[i, i + 1]]),
                                       headers={"X-Request-Id": request_id})
                assert response.status_code == 200 and response.headers["x-model-version"] == "1"

            for i in range(10):
                ask(f"before-{i}", i * 12)
            wait_for(shadow.idle, WAIT_S, "the shadow process to answer every copy")
            service.capture.flush(timeout_s=30)  # reaches the child's writer too
            assert set(read_capture(str(tmp_path / "capture"), shadow=True)["_role"]) == {"primary", "shadow"}

            # Killed: replaced.
            os.kill(first_pid, signal.SIGKILL)
            wait_for(lambda: shadow.restarts == 1 and shadow.ready, WAIT_S, "a new shadow process")
            assert shadow.pid != first_pid
            for i in range(6):
                ask(f"after-{i}", i * 20)
            wait_for(shadow.idle, WAIT_S, "the new shadow process to answer every copy")
            # Answered is not yet spooled: the child's writer appends its rows every 0.25 s, and rows
            # still in its memory when it is killed are counted as capture drops, not captured (see
            # the test of that below). Spool them first, so what follows checks the copy the silent
            # child holds, not that race.
            service.capture.flush(timeout_s=30)

            # Silent (stopped: not even its heartbeat, as when a call holds its GIL): replaced too.
            stopped = shadow.pid
            assert stopped is not None
            os.kill(stopped, signal.SIGSTOP)
            ask("held", 3)
            wait_for(lambda: shadow.restarts == 2 and shadow.ready, WAIT_S,
                     "the silent shadow process to be replaced")
            assert not _alive(stopped) and shadow.pid != stopped
            ask("next", 5)
            wait_for(shadow.idle, WAIT_S, "the third shadow process to answer")
            text = client.get("/metrics").text
    finally:
        last_pid = shadow.pid
        service.capture.close(timeout_s=20)
    assert last_pid is not None and not _alive(last_pid)  # closing the capture stops the child
    both = read_capture(str(tmp_path / "capture"), shadow=True)
    primary, mirrored = both[both["_role"] == "primary"], both[both["_role"] == "shadow"]
    answered = {f"before-{i}" for i in range(10)} | {f"after-{i}" for i in range(6)} | {"next"}
    assert set(primary["_request_id"]) == answered | {"held"}
    assert set(mirrored["_model_version"]) == {"2"} and set(mirrored["_status"]) == {200}
    # The kill lost nothing answered; the copy the silent child held was answered (if the child was
    # replaced before the copy reached it) or counted as dropped (crashed): every copy accounted for.
    assert drops.count("crashed") <= 1 and drops.count("crashed") + len(set(mirrored["_request_id"])) == 18
    assert answered <= set(mirrored["_request_id"])
    pairs = primary.merge(mirrored, on=["_request_id", "_row"], suffixes=("", "_shadow"))
    assert len(pairs) == 2 * len(set(mirrored["_request_id"]))
    assert shadow.submitted == 18 and shadow.outcomes == {"ok": 18 - drops.count("crashed")}
    # The worker's metrics count the child's calls, under the names the in-process mirror used.
    assert ('mlflow_deploy_shadow_calls_total{deployment="unit",model_version="2",outcome="ok"} '
            f'{18.0 - drops.count("crashed")}') in text


def _shadow_process(tmp_path: Path, model_dir: Path, drops: list[str] | None = None,
                    capture_drops: list[int] | None = None, tally_dir: Path | None = None,
                    **config: object) -> ShadowProcess:
    """A ShadowProcess as the worker starts one (the child loads ``model_dir``), not yet waited for."""
    drop_list = drops if drops is not None else []
    capture_list = capture_drops if capture_drops is not None else []
    return ShadowProcess(_spec(**config), model_dir, str(tmp_path / "capture"), tmp_path / "capture.key", "own",
                         lambda reason, count: drop_list.extend([reason] * count),
                         lambda outcome, seconds, count: None, capture_list.append,
                         tally_dir=tally_dir)


def _returns_within(call: Callable[[], object], bound_s: float, what: str) -> None:
    thread = threading.Thread(target=call, name="bounded-call", daemon=True)
    thread.start()
    wait_for(lambda: not thread.is_alive(), bound_s, what)


def test_flush_and_close_keep_to_their_timeout_when_the_child_answers_nothing(
        tmp_path: Path, rotated_classifier_path: Path) -> None:
    shadow = _shadow_process(tmp_path, rotated_classifier_path)
    try:
        shadow.wait_ready(WAIT_S)
        pid = shadow.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # reads nothing, answers nothing, exits on nothing but a kill
        _returns_within(lambda: shadow.flush(timeout_s=2.0), 2.0 + LATE_S, "flush(timeout_s=2) to return")
        _returns_within(lambda: shadow.close(timeout_s=3.0), 3.0 + LATE_S, "close(timeout_s=3) to return")
        # The child that did not exit was killed within that budget. Its exit may take the kernel longer
        # on a busy machine (close keeps to its budget, it does not wait for that): it ends by SIGKILL.
        wait_for(lambda: _killed_or_gone(pid), 30.0, "the killed shadow process to be gone")
    finally:
        shadow.close(timeout_s=10)


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: nothing runs; its reaper may be slow to collect it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_a_child_that_reads_nothing_does_not_outlive_its_killed_worker(
        tmp_path: Path, rotated_classifier_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(_spec().to_dict()))
    live_dir = tmp_path / "run" / "live"
    worker = subprocess.Popen([sys.executable, str(Path(__file__).parent / "assets" / "shadow_parent.py"),
                               str(spec_file), str(rotated_classifier_path), str(tmp_path), str(live_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline()  # the worker's child is ready (or the worker died: "")
        assert line.strip().isdigit(), f"the stand-in worker said {line!r} (exit {worker.poll()})"
        child = int(line)
        # It outlived the thread that built its ShadowProcess (a Linux parent-death signal follows
        # the thread that forked, not the process).
        assert not _gone(child)
        # Its command line names no folder of the deployment's (its settings came on the pipe)...
        assert str(tmp_path) not in Path(f"/proc/{child}/cmdline").read_text()
        # ... and every pipe it holds but its stdio is closed on exec: nothing it starts keeps the
        # worker's pipes open (the end of which is how either side learns the other is gone).
        pipes = [fd for fd in os.listdir(f"/proc/{child}/fd")
                 if int(fd) > 2 and os.readlink(f"/proc/{child}/fd/{fd}").startswith("pipe:")]
        assert pipes
        for fd in pipes:
            flags = int(Path(f"/proc/{child}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
            assert flags & os.O_CLOEXEC, f"the child's pipe fd {fd} is inheritable"
        # Its capture counts are beside its worker's liveness file, with its pid, for the supervisor.
        tally_path = shadow_tally_path(live_dir, worker.pid)
        assert tally_path.stat().st_mode & 0o777 == 0o600 and read_shadow_tally(tally_path).child_pid == child
        os.kill(child, signal.SIGSTOP)  # as hung in a call holding its GIL: it reads no pipe's end
        held = read_shadow_tally(tally_path)  # final: a stopped child stores nothing more
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(WAIT_S)
        wait_for(lambda: _gone(child), 30.0, f"the shadow child {child} to die with its worker")
        # The supervisor counts what the child held when both died (what the worker could not), once.
        store = StateStore(tmp_path / "home")
        loss = CaptureLoss(store, "unit", tmp_path)
        assert loss.shadow_gone(worker.pid, tally_path, "killed by signal SIGKILL") == held.capture_unsettled
        assert not tally_path.exists() and loss.shadow_gone(worker.pid, tally_path, "again") == 0
        assert loss.lost == held.capture_unsettled
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(WAIT_S)
        if child and not _gone(child):
            os.kill(child, signal.SIGKILL)
        for stream in (worker.stdin, worker.stdout):
            if stream is not None:
                stream.close()


def test_shadow_rows_a_killed_child_held_in_memory_are_counted_as_capture_drops(
        tmp_path: Path, rotated_classifier_path: Path) -> None:
    capture_drops: list[int] = []
    live_dir = tmp_path / "run" / "live"  # as a supervised worker's: the child's counts are a file there
    tally_path = shadow_tally_path(live_dir, os.getpid())
    shadow = _shadow_process(tmp_path, rotated_classifier_path, capture_drops=capture_drops, tally_dir=live_dir)
    features, _ = iris_data()
    try:
        shadow.wait_ready(WAIT_S)
        pid = shadow.pid
        assert pid is not None

        def unsettled() -> int:
            accepted, settled = shadow.capture_tally()
            return accepted - settled

        # Catch the child with answers its writer has not spooled yet (it appends every 0.25 s), and
        # stop it there: what it holds then is what its kill loses.
        held, sent = 0, 0
        while not held:
            assert sent < 20_000, "the child's writer never held an answer when looked at"
            for _ in range(5):
                assert shadow.submit(Answer(f"r{sent}", 1.7e9, "1", 200, 1.0, features.iloc[[sent % 150]], None))
                sent += 1
            if wait_for(lambda: unsettled() > 0 or shadow.idle(), WAIT_S, "the copies to be answered") is True \
                    and unsettled() > 0:
                os.kill(pid, signal.SIGSTOP)
                held = unsettled()
                if not held:
                    os.kill(pid, signal.SIGCONT)
        accepted, settled = shadow.capture_tally()
        os.kill(pid, signal.SIGKILL)
        # The supervisor sees it dead and counts what it held (before it starts another).
        wait_for(lambda: capture_drops, WAIT_S, "the rows the dead child held to be counted")
        # Counted here, so gone from the file a supervisor would read if this worker died now: the
        # file goes (or is already the next child's, which holds nothing yet).
        def the_dead_childs_file() -> ShadowTally | None:
            return tally if (tally := read_shadow_tally(tally_path)) is not None and tally.child_pid == pid else None

        wait_for(lambda: the_dead_childs_file() is None, 30.0, "the worker to remove the counted child's file")
        after = read_shadow_tally(tally_path)
        assert after is None or (after.capture_accepted, after.capture_settled) == (0, 0)
        wait_for(lambda: shadow.restarts == 1 and shadow.ready, WAIT_S, "the next shadow process")
        assert read_shadow_tally(tally_path) == ShadowTally(0, 0, shadow.pid) and shadow.pid != pid
    finally:
        shadow.close(timeout_s=20)
    assert not tally_path.exists()  # a closed shadow process leaves nothing to count
    # Counted once, where the shadow's other capture drops go (the capture dropped counter).
    assert capture_drops == [held] and shadow.capture_lost == held
    # What it had spooled is captured: answered = captured + counted as dropped.
    # (On a busy machine the child may be caught before its first append: then nothing was spooled.)
    def captured() -> int:
        return len(set(read_capture(str(tmp_path / "capture"), shadow=True)["_request_id"]))

    wait_for(lambda: captured() == settled, 60.0, "the spooled shadow rows to be converted")
    assert captured() == settled == accepted - held


def test_a_replaced_shadow_process_is_written_to_the_history_at_most_once_per_interval(
        tmp_path: Path, rotated_classifier_path: Path) -> None:
    """A shadow process that crashes is a fault `-C notify` receivers hear of (`shadow_crashed`, then
    `shadow_recovered` once the next one is ready); one that crashes again soon is replaced and
    counted, not written again (a version crashing at every start must not flood the history)."""
    from mlflow_deploy_plugin.state import read_history_file

    history = tmp_path / "history.jsonl"  # the deployment's, beside run/live
    shadow = _shadow_process(tmp_path, rotated_classifier_path, tally_dir=tmp_path / "run" / "live")
    try:
        shadow.wait_ready(WAIT_S)
        first = shadow.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: [e["event"] for e in read_history_file(history)] == ["shadow_crashed", "shadow_recovered"],
                 WAIT_S, "the crash and the recovery in the history")
        crashed, recovered = read_history_file(history)
        assert crashed["shadow_pid"] == first and f"{first} exited with code -9" in crashed["error"]
        assert crashed["model"] == recovered["model"] == {"model_name": "iris_challenger", "model_version": "2"}
        assert recovered["shadow_pid"] == shadow.pid != first and crashed["worker_pid"] == os.getpid()
        second = shadow.pid
        assert second is not None
        os.kill(second, signal.SIGKILL)
        wait_for(lambda: shadow.restarts == 2 and shadow.ready and shadow.pid != second, WAIT_S,
                 "the second replacement")
        assert len(read_history_file(history)) == 2  # within ANNOUNCE_EVERY_S: counted for the next one
    finally:
        shadow.close(timeout_s=20)


def test_a_throttled_crash_whose_replacement_cannot_start_is_written_once_the_throttle_allows(
        tmp_path: Path, rotated_classifier_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash within ANNOUNCE_EVERY_S of the last announced one was only counted for the next one, which
    never came when its replacement could not start: the history (and every `-C notify` receiver) ended
    on `shadow_recovered` while the shadow was down and every copy dropped."""
    import shutil

    from mlflow_deploy_plugin.engines.local import shadow_process
    from mlflow_deploy_plugin.state import read_history_file

    history = tmp_path / "history.jsonl"
    model = shutil.copytree(rotated_classifier_path, tmp_path / "model")  # the session's own is shared
    shadow = _shadow_process(tmp_path, model, tally_dir=tmp_path / "run" / "live")
    try:
        shadow.wait_ready(WAIT_S)
        os.kill(shadow.pid or 0, signal.SIGKILL)
        wait_for(lambda: [e["event"] for e in read_history_file(history)] == ["shadow_crashed", "shadow_recovered"],
                 WAIT_S, "the first crash and its recovery")
        second = shadow.pid
        model.rename(tmp_path / "gone")  # the next child cannot load its version
        os.kill(second or 0, signal.SIGKILL)
        # The throttle holds the crash (the default 300 s) until a replacement has failed to start ...
        wait_for(lambda: shadow._start_error is not None, WAIT_S, "a replacement to fail to start")
        assert [e["event"] for e in read_history_file(history)] == ["shadow_crashed", "shadow_recovered"]
        # ... and once it allows, the next failed start writes the held crash.
        monkeypatch.setattr(shadow_process, "ANNOUNCE_EVERY_S", 0.0)
        wait_for(lambda: len(read_history_file(history)) == 3, WAIT_S, "the held crash in the history")
        last = read_history_file(history)[-1]
        assert last["event"] == "shadow_crashed" and last["shadow_pid"] == second and last["replaced"] == 1
        assert "replacement cannot start" in last["error"] and not shadow.ready
    finally:
        shadow.close(timeout_s=20)


def test_a_shadow_version_that_cannot_load_fails_the_build(
        tmp_path: Path, classifier_path: Path, no_multiprocess_metrics: None) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "MLmodel").write_text("flavors: {python_function: {loader_module: no_such_module_here}}\n")
    paths = {"1": classifier_path, "2": broken}
    with pytest.raises(ShadowStartError, match="iris_challenger v2"):
        build_service(_spec(), lambda model: paths[model.model_version], str(tmp_path / "capture"),
                      tmp_path / "capture.key", shadow_starter=start_shadow_process)


def test_the_child_sends_one_event_per_batch_and_the_worker_counts_it_as_its_copies() -> None:
    read, write = os.pipe()
    events = _Events(write)
    try:
        for _ in range(3):  # a batch of three copies: one call, one time
            events.add(("result", "ok", 0.02))
        events.add(("result", "ok", 0.03))
        events.add(("drop", "busy"), 2)
        events.add(("drop", "busy"))
        events.add(("capture_drop",), 5)
        events.flush()
        assert FrameReader(read).read() == ("events", [("result", "ok", 0.02, 3), ("result", "ok", 0.03, 1),
                                                       ("drop", "busy", 3), ("capture_drop", 5)])
    finally:
        os.close(write)
        os.close(read)


def test_the_childs_flush_sends_the_flushed_copies_events_before_it_says_flushed(
        tmp_path: Path, rotated_slot: ModelSlot) -> None:
    # The child's own pieces, in process: its mirror predicts with a real model into a real capture
    # writer, its events go to a real pipe. The event thread is not started, so the only way the
    # outcomes reach the pipe is the flush itself: they must come before "flushed" (the worker's
    # flush() returns on "flushed", and its outcomes and metrics must then include these copies).
    read, write = os.pipe()
    events = _Events(write)
    writer = CaptureWriter(str(tmp_path / "capture"), "unit", spool_dir=str(tmp_path / "spool"))
    mirror = ShadowMirror(rotated_slot.predict, "2", writer.record,
                          on_result=lambda outcome, seconds, count: events.add(("result", outcome, seconds), count))
    features, _ = iris_data()
    try:
        for i in range(3):
            assert mirror.submit(Answer(f"r{i}", 1.7e9, "1", 200, 1.0, features.iloc[[i]], None))
        _flush(mirror, writer, events, 7, 30.0)
        os.close(write)  # what the flush wrote is all there is to read
        write = -1
        reader = FrameReader(read)
        first, second = reader.read(), reader.read()
    finally:
        mirror.close(timeout_s=5)
        writer.close(timeout_s=10)
        if write >= 0:
            os.close(write)
        os.close(read)
    assert first[0] == "events" and sum(event[-1] for event in first[1] if event[:2] == ("result", "ok")) == 3, first
    assert second == ("flushed", 7)


def test_observing_many_at_once_is_observing_one_by_one() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    bulk_registry, single_registry = CollectorRegistry(), CollectorRegistry()
    bulk = Histogram("h", "h", ["v"], buckets=(0.01, 0.1, 1.0), registry=bulk_registry).labels("2")
    single = Histogram("h", "h", ["v"], buckets=(0.01, 0.1, 1.0), registry=single_registry).labels("2")
    for amount, count in ((0.05, 7), (0.005, 1), (3.0, 2), (0.1, 4), (0.2, 0)):
        observe_many(bulk, amount, count)
        for _ in range(count):
            single.observe(amount)
    def samples(registry: CollectorRegistry) -> dict[str, float]:  # but the time each was created
        return {name: float(value) for name, _, value in (
            line.decode().rpartition(" ") for line in generate_latest(registry).splitlines())
            if name and not name.startswith("#") and "_created" not in name}

    bulk_samples, single_samples = samples(bulk_registry), samples(single_registry)
    assert bulk_samples == pytest.approx(single_samples)  # the sum: 0.05 * 7 may round unlike 7 additions
    assert bulk_samples['h_bucket{le="0.1",v="2"}'] == 12 and bulk_samples['h_count{v="2"}'] == 14
