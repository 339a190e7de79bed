"""The shadow process: a local worker's shadow version, predicted in a process of its own.

Predicting the shadow in the serving worker cost the primary ~2x its p99 even with every copy
predicted after the answer was sent: each copy is one ``pyfunc.predict`` (~1 ms of fixed cost, holding
the GIL) under the GIL the event loop needs. So each worker with a shadow version starts one child,
``python -m mlflow_deploy_plugin.engines.local.shadow_process``, which lowers its CPU priority once
loaded (``os.nice``: on a busy machine the primary wins the CPU; see :func:`_lower_priority`), and
only hands it copies:

- worker side, :class:`ShadowProcess`: the request path appends a copy to a bounded queue
  (:class:`~mlflow_deploy_plugin.serving.shadow_channel.CopyChannel`; full: dropped as
  ``queue_full``, or ``no_shadow`` while no child is there to take them, counted); a thread writes
  what gathered there to the child's pipe, many copies a message; another reads the child's events (calls, drops, lost capture rows: one event per batch
  of copies, not per copy) into the worker's Prometheus metrics, so the metric names and labels are
  the in-process mirror's. The worker never encodes, predicts or captures the shadow's answers: the
  child does;
- child side, :func:`main`: loads the shadow version once, smoke-tests it, and runs the same
  :class:`~mlflow_deploy_plugin.serving.shadow.ShadowMirror` as in process (timeouts captured as
  504 rows, raising calls as 500, copies dropped as ``busy`` behind a hung call, batches of copies that
  waited together, ``batch_wait_s`` to gather some), whose rows its own capture writer spools with
  the original request id and role ``shadow``: ``mlflow-deploy shadow report`` reads them as before.

Supervision, by the worker: a child that dies is started again (backoff 1 s doubling to 30 s); one
that sends nothing, not even its heartbeat, for ``timeout_s`` + :data:`HANG_GRACE_S` (a call that
holds its GIL: its mirror's own timeout cannot fire) is killed and started again. The copies it had
taken and not answered are counted as dropped (``crashed``), and the replacement is written to the
deployment's history (``shadow_crashed``, then ``shadow_recovered`` once the next child is ready; at
most one such pair per worker every :data:`ANNOUNCE_EVERY_S`), which ``-C notify`` receivers get.
None of this touches the request path.
A worker that stops closes its child (:meth:`ShadowProcess.close`: it predicts what it holds,
writes its rows, exits). The child also leaves when its pipe from the worker ends, after closing
its mirror and writer. But a child that cannot read (hung in a call that holds its GIL, or
stopped) would never see that end and outlive a worker killed outright: on Linux it asks the
kernel to kill it when its parent goes (``PR_SET_PDEATHSIG``, :func:`_die_with_parent`), so a
``kill -9`` of the worker ends it at once, as it ends the worker's own capture (the shadow rows it
held then are lost with the worker's, and counted with them by the supervisor: see below).
The kernel means the *thread* that started it, so every child is started by one thread that lives
as long as the :class:`ShadowProcess` (:class:`_Spawner`), not by whichever thread loads or
supervises. The child holds no descriptor of the worker's but its two pipe ends, and makes those
non-inheritable at once (nothing it starts keeps a pipe open after it is gone); its settings,
paths included, travel on the pipe, not on its command line.

Shadow rows a child answered but had not yet appended to its spool when it died (its writer appends
every 0.25 s) are counted, as a worker's are (``engines/local/capture_loss.py``): the child's
capture writer keeps its two counts, requests accepted and settled, in a file the worker made and
shares with it (``liveness.ShadowTallyFile``, ``CaptureWriter.tally_into``). A child that dies while
the worker lives: the worker adds the difference to ``mlflow_deploy_capture_dropped_requests_total``,
where the child's own capture drops go, logs it and removes the file (so nobody counts it again). A
child that dies with its killed worker: the file is ``run/live/<worker pid>.shadow``, beside the
worker's liveness file, with the child's pid, and the supervisor counts it as it counts the worker's
own (``engines/local/capture_loss.py``: once the child is gone, event reason
``shadow_died_with_worker``), then removes it. Without a supervisor (no liveness folder: in-process
tests) the file is unlinked and only the worker counts.

Messages (length-prefixed pickles, :mod:`~mlflow_deploy_plugin.serving.shadow_channel`):
worker -> child ``("start", settings)``, ``("copies", items)`` (see
:func:`~mlflow_deploy_plugin.serving.shadow_channel.pack_copies`), ``("flush", seq, seconds_left)``
(after the copies queued before it; the seconds the worker's caller still waits, counted when it is
written), ``("close", seconds)``; child -> worker ``("ready",
smoke_test)``, ``("error", text)``, ``("events", [("result", outcome, seconds, copies) | ("drop",
reason, copies) | ("capture_drop", rows), ...])`` (also empty: the heartbeat), ``("flushed", seq)``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import mmap
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin.engines.local.liveness import SHADOW_COUNTS_SIZE, ShadowTallyFile, shadow_tally_path
from mlflow_deploy_plugin.serving.shadow import CopyDropHook, CopyRun, MirrorFront
from mlflow_deploy_plugin.serving.shadow_channel import (
    CopyChannel,
    FrameReader,
    copy_of,
    encode_frame,
    unpack_copies,
    write_all,
)
from mlflow_deploy_plugin.spec import DeploymentSpec
from mlflow_deploy_plugin.state import append_history_file

_logger = logging.getLogger(__name__)

NICE = 10  # the child's CPU priority below the worker's
HANG_GRACE_S = 10.0  # beyond timeout_s, how long a silent child may take before it is replaced
HEARTBEAT_S = 1.0  # the child says it is alive at least this often
# The child sends its events in batches this often: each message wakes a thread of the worker,
# which then wants the GIL the serving loop holds (at one request at a time, each wake delays the
# request it lands on: see serving/shadow_channel.GATHER_S); the metrics may lag this much.
EVENTS_EVERY_S = HEARTBEAT_S
# The worker's supervising thread is woken by a child's end (its pipe closes) and by close; this is
# only its bound for a child that went silent, or died while something it started holds its pipe.
SUPERVISE_EVERY_S = 5.0
# The child's mirror waits this long for more copies to join a batch: nobody waits for a shadow's
# answer, and each pyfunc.predict costs ~1 ms whatever its rows, so fewer, larger calls keep its CPU
# small (at 300 req/s ~60 copies a call instead of one; at 50 ms the calls were still most of the
# child's CPU per copy: 150 us at c=1 in benchmarks/shadow_cost.py, 67 us at 200 ms).
BATCH_WAIT_S = 0.2
START_DEADLINE_S = 600.0  # a child that has not loaded its version by then is a failed start
RESTART_BACKOFF_S = (1.0, 30.0)
STABLE_AFTER_S = 60.0  # a child that served this long is replaced at once when it dies (no backoff)
# A replaced child is written to the deployment's history (`shadow_crashed`, then `shadow_recovered`
# once the next one serves) at most once per this, per worker: a shadow version that crashes at every
# start (restarted every 30 s at most) must not flood the history and the notify receivers.
ANNOUNCE_EVERY_S = 300.0


PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ShadowStartError(RuntimeError):
    """The shadow process could not load or smoke-test its version."""


class _Spawner:
    """Starts the shadow children from one thread of its own, which ends only after the last one.

    A child asks Linux to kill it when its parent dies (``PR_SET_PDEATHSIG``), and for Linux the
    parent is the *thread* that forked it: a child started by the thread that built the service,
    or by the supervisor (which ends at close, before the child has written its rows), would be
    killed when that thread ends.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[list[str], dict[str, Any], Future[Any]] | None] = queue.SimpleQueue()
        self._stopped = False
        # Taken by popen (check, then queue its job) and stop (mark, then queue the end): a job is
        # never queued behind the end, where the thread would never run it and popen wait forever.
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="shadow-spawner", daemon=True)
        self._thread.start()

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``subprocess.Popen(args, **kwargs)``, run by the spawner's thread."""
        done: Future[Any] = Future()
        with self._lock:
            if self._stopped:
                raise OSError("the shadow process was closed: no child is started any more")
            self._jobs.put((args, kwargs, done))
        proc: subprocess.Popen[bytes] = done.result()  # queued before the end: the thread runs it
        return proc

    def stop(self) -> None:
        """End the thread (once no child of it runs: a child it started is killed with it)."""
        with self._lock:
            self._stopped = True
            self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            args, kwargs, done = job
            try:
                done.set_result(subprocess.Popen(args, **kwargs))
            except BaseException as exc:  # the caller raises it
                done.set_exception(exc)


class ShadowProcess(MirrorFront):
    """The worker's handle on its shadow process: the mirror the service feeds (submit, idle, flush, close)."""

    def __init__(self, spec: DeploymentSpec, model_dir: Path, capture_dir: str, capture_key: Path,
                 converter: str, on_drop: CopyDropHook, on_result: Callable[[str, float, int], None],
                 on_capture_drop: Callable[[int], None], *, nice: int = NICE,
                 hang_grace_s: float = HANG_GRACE_S, rng: Any = None, tally_dir: Path | None = None,
                 history: Path | None = None) -> None:
        """Start the child (it loads while the caller goes on); :meth:`wait_ready` waits for it.

        ``tally_dir``: the worker's liveness folder (``run/live``), where the child's capture counts
        are kept as ``<worker pid>.shadow`` for the supervisor to count if this worker is killed;
        ``None`` without a supervisor (an unlinked file the worker alone reads). ``history``: the
        deployment's history file, where a replaced child is announced; by default the one beside
        ``tally_dir`` (a Ray replica, which has no liveness folder, names it).
        """
        import random

        config = spec.config
        assert spec.shadow is not None
        self.version = spec.shadow.model_version
        self.model_name = spec.shadow.model_name
        self.sample_rate = config.shadow_sample_rate
        self.timeout_s = config.timeout_s
        self._settings = {"spec": spec.to_dict(), "model_dir": str(model_dir), "capture_dir": capture_dir,
                          "capture_key": str(capture_key), "converter": converter, "nice": nice}
        self._on_drop = on_drop
        self._on_result = on_result
        self._on_capture_drop = on_capture_drop
        self._hang_after_s = self.timeout_s + hang_grace_s
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._closed = False
        self.submitted = 0
        self.dropped: dict[str, int] = {}
        self.outcomes: dict[str, int] = {}
        self.restarts = 0
        self._settled = 0  # copies of the current child answered or dropped by it
        self._flushes: dict[int, threading.Event] = {}
        self._next_flush = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: str | None = None
        self._last_heard = time.monotonic()
        # Set when a child's pipe ends (it died) and at close: what the supervising thread sleeps on,
        # instead of polling (each wake of a worker thread wants the serving loop's GIL).
        self._stirred = threading.Event()
        self._ended: subprocess.Popen[bytes] | None = None  # the child whose pipe to us ended
        self._to_child: int | None = None  # the pipe to a child not yet attached to the channel
        self._ready_at = -float("inf")
        self._tally_path = shadow_tally_path(tally_dir, os.getpid()) if tally_dir is not None else None
        self._tally: ShadowTallyFile | None = None  # the current child's capture counts
        # The deployment's history, beside the liveness folder (<deployment>/run/live); None without a
        # supervisor. A child replaced (died, or silent) is written there so `-C notify` hears of it.
        if history is None and tally_dir is not None:
            history = tally_dir.parent.parent / "history.jsonl"
        self._history = history
        self._announced_at = -float("inf")
        self._crash_announced = False  # `shadow_crashed` written, its `shadow_recovered` not yet
        self._replaced_unannounced = 0
        self.capture_lost = 0  # shadow rows children died holding (counted as capture drops)
        self.channel = CopyChannel(config.max_queue, self._drop, on_lost=lambda n: self._drop("crashed", n))
        self._spawner = _Spawner()
        self._spawn()
        self._supervisor: threading.Thread | None = None

    # ---- request path ------------------------------------------------------------------------

    def _enqueue(self, answer: Any) -> bool:
        """Hand a copy of an answered request to the channel (``submit``, shared with the in-process
        mirror, decides which ones); never blocks."""
        return self.channel.put(copy_of(answer))

    # ---- the child ---------------------------------------------------------------------------

    def _spawn(self) -> None:
        """Start a child and the thread reading its events; its pipe is attached once it is ready."""
        tally = ShadowTallyFile(self._tally_path)
        to_child, to_child_w = os.pipe()
        from_child_r, from_child = os.pipe()
        try:
            self._proc = self._spawner.popen(
                [sys.executable, "-m", "mlflow_deploy_plugin.engines.local.shadow_process",
                 "--in-fd", str(to_child), "--out-fd", str(from_child), "--parent-pid", str(os.getpid()),
                 "--tally-fd", str(tally.fd)],
                pass_fds=(to_child, from_child, tally.fd), stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            os.close(to_child_w)
            os.close(from_child_r)
            tally.close()
            raise
        finally:
            os.close(to_child)  # the child's ends: only the child may hold them, so its death ends both pipes
            os.close(from_child)
        tally.started(self._proc.pid)
        self._to_child = to_child_w
        self._tally = tally
        self._ready.clear()
        self._start_error = None
        self._settled = 0
        self._last_heard = time.monotonic()
        try:
            write_all(to_child_w, encode_frame(("start", self._settings)))
        except OSError:
            os.close(from_child_r)
            self._kill()
            raise
        self._reader = threading.Thread(target=self._read, args=(from_child_r, self._proc), name="shadow-events",
                                        daemon=True)
        self._reader.start()

    def wait_ready(self, timeout_s: float = START_DEADLINE_S) -> None:
        """Wait until the child has loaded and smoke-tested the shadow version; raise if it could not."""
        if not self._ready.wait(timeout_s) or self._start_error is not None:
            error = self._start_error or f"the shadow process did not load within {timeout_s:g}s"
            self._kill()
            self._spawner.stop()
            raise ShadowStartError(f"Shadow version {self.model_name} v{self.version}: {error}")
        self._attach()
        self._supervisor = threading.Thread(target=self._supervise, name="shadow-supervisor", daemon=True)
        self._supervisor.start()

    def _read(self, fd: int, proc: subprocess.Popen[bytes]) -> None:
        reader = FrameReader(fd)
        try:
            while True:
                try:
                    message = reader.read()
                except Exception as exc:  # a garbled pipe: treat the child as gone
                    _logger.error("Shadow process sent an unreadable message: %s", exc)
                    message = None
                if message is None:
                    break
                self._last_heard = time.monotonic()
                self._handle(message)
        finally:
            os.close(fd)
            if not self._ready.is_set():  # died while loading
                self._start_error = self._start_error or f"the shadow process exited (code {proc.wait()})"
                self._ready.set()
            self._ended = proc
            self._stirred.set()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "events":
            for event in message[1]:  # each with how many copies (or rows) it stands for, last
                if event[0] == "result":
                    _, outcome, seconds, count = event
                    self.outcomes[outcome] = self.outcomes.get(outcome, 0) + count
                    self._on_result(outcome, seconds, count)
                    self._settled += count
                elif event[0] == "drop":
                    self._drop(event[1], event[2])
                    self._settled += event[2]
                elif event[0] == "capture_drop":
                    self._on_capture_drop(event[1])
        elif kind == "flushed":
            flushed = self._flushes.get(message[1])
            if flushed is not None:
                flushed.set()
        elif kind == "ready":
            _logger.info("Shadow process %d loaded %s v%s; smoke test: %s", self._proc.pid if self._proc else 0,
                         self.model_name, self.version, message[1])
            self._ready.set()
        elif kind == "error":
            self._start_error = message[1]
            self._ready.set()

    def _drop(self, reason: str, count: int = 1) -> None:
        with self._lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + count
        try:
            self._on_drop(reason=reason, count=count)  # a run of copies in one call, as ShadowMirror does
        except Exception:
            _logger.exception("Shadow drop counter failed")

    def _supervise(self) -> None:
        """Replace a child that died or went silent; never returns while the mirror is open."""
        backoff = RESTART_BACKOFF_S[0]
        while not self._closed:
            proc = self._proc
            assert proc is not None
            self._stirred.clear()  # before looking: an end or a close from now on wakes the wait below
            silent_s = time.monotonic() - self._last_heard
            if proc.poll() is None and self._ended is not proc and silent_s <= self._hang_after_s:
                self._stirred.wait(min(SUPERVISE_EVERY_S, self._hang_after_s - silent_s + 0.05))
                continue
            if self._closed:
                return
            if proc.poll() is None and self._ended is proc:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1.0)  # its pipe ends as it exits; its exit code comes a moment later
            # A child that served a while is replaced at once; one that dies soon after its start
            # (a copy that crashes the model, memory) waits, longer each time: no restart storm,
            # each restart being a model load beside the primary.
            if time.monotonic() - self._ready_at > STABLE_AFTER_S:
                backoff = RESTART_BACKOFF_S[0]
                wait = 0.0
            else:
                wait = backoff
                backoff = min(backoff * 2, RESTART_BACKOFF_S[1])
            if proc.poll() is None and self._ended is proc:
                why = "closed its pipe to the worker and did not exit"
            elif proc.poll() is None:
                why = f"said nothing for {silent_s:.0f}s (timeout_s + {self._hang_after_s - self.timeout_s:.0f}s grace)"
            else:
                why = f"exited with code {proc.returncode}"
            _logger.error("Shadow process %d %s: starting another in %.0fs.", proc.pid, why, wait)
            lost = self._retire(proc, reason="crashed")
            self._announce_crash(proc.pid, why, lost)
            self._sleep(wait)
            while not self._closed and not self._respawn():
                # Down, not replaced: a crash the throttle held back is written once it allows, or the
                # history would end on the last `shadow_recovered` while every copy is dropped.
                self._announce_held_crash()
                self._sleep(backoff)
                backoff = min(backoff * 2, RESTART_BACKOFF_S[1])
            self._held_crash = None  # replaced after all: counted in the next announcement's `replaced`
            self.restarts += 1
            if not self._closed:
                self._announce_recovered()

    # A crash the throttle did not write yet: (pid, why, copies lost); set only by the supervising thread.
    _held_crash: tuple[int, str, int] | None = None

    def _announce_crash(self, pid: int, why: str, lost: int) -> None:
        """``shadow_crashed`` in the history, unless one was written less than ANNOUNCE_EVERY_S ago
        (the replacements since are counted in the next one's ``replaced``; a held one is written by
        :meth:`_announce_held_crash` if its replacement cannot start)."""
        self._replaced_unannounced += 1
        now = time.monotonic()
        if self._history is None or now - self._announced_at < ANNOUNCE_EVERY_S:
            self._held_crash = (pid, why, lost)
            return
        self._write_crash(pid, why, lost)

    def _announce_held_crash(self) -> None:
        """Write the crash the throttle held back, once ANNOUNCE_EVERY_S since the last one has passed
        and its replacement still cannot start (``replaced`` counts it and those before it)."""
        held = self._held_crash
        if held is None or self._history is None or time.monotonic() - self._announced_at < ANNOUNCE_EVERY_S:
            return
        self._held_crash = None
        pid, why, lost = held
        self._write_crash(pid, why, lost, then="its replacement cannot start (still trying)")

    def _write_crash(self, pid: int, why: str, lost: int, then: str = "replaced") -> None:
        assert self._history is not None
        self._announced_at, self._crash_announced = time.monotonic(), True
        replaced, self._replaced_unannounced = self._replaced_unannounced, 0
        with contextlib.suppress(OSError):  # the log line says it too
            append_history_file(self._history, "shadow_crashed", actor=f"worker {os.getpid()}",
                                model={"model_name": self.model_name, "model_version": self.version},
                                error=f"shadow process {pid} {why}; {then}", shadow_pid=pid,
                                copies_dropped=lost, replaced=replaced, worker_pid=os.getpid())

    def _announce_recovered(self) -> None:
        """``shadow_recovered`` once the child started after an announced crash is ready."""
        if not self._crash_announced or self._history is None:
            return
        self._crash_announced = False
        with contextlib.suppress(OSError):
            append_history_file(self._history, "shadow_recovered", actor=f"worker {os.getpid()}",
                                model={"model_name": self.model_name, "model_version": self.version},
                                shadow_pid=self.pid, restarts=self.restarts, worker_pid=os.getpid())

    def _retire(self, proc: subprocess.Popen[bytes], reason: str, timeout_s: float = 5.0) -> int:
        """Make sure ``proc`` is gone and count the copies it took and never answered (waiting up
        to ``timeout_s`` in all for it to be reaped and for its last events); returns that count."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # killed but not reaped yet (a process in the kernel's hands)
            _logger.warning("Shadow process %d was killed and has not exited yet.", proc.pid)
        if self._reader is not None:
            self._reader.join(max(0.0, deadline - time.monotonic()))  # its last events count first
        sent = self.channel.detach()
        self._close_unattached()
        lost = sent - self._settled
        if lost > 0:
            self._drop(reason, lost)
        self._count_lost_capture(proc)
        return max(0, lost)

    def _count_lost_capture(self, proc: subprocess.Popen[bytes]) -> None:
        """Count the shadow rows the gone child had accepted and neither spooled nor counted."""
        with self._lock:
            tally, self._tally = self._tally, None
        if tally is None:
            return
        try:
            lost = tally.read().capture_unsettled
        except OSError as exc:
            _logger.warning("Could not read the capture counts of shadow process %d: %s", proc.pid, exc)
            tally.close()
            return
        if lost <= 0:
            tally.close()
            return
        self.capture_lost += lost
        _logger.warning("Shadow process %d exited (code %s) holding %d shadow answer(s) not yet in its capture "
                        "spool: counted as dropped from capture.", proc.pid, proc.returncode, lost)
        try:
            self._on_capture_drop(lost)
        except Exception:
            _logger.exception("Shadow capture drop counter failed")
        # Counted: the file goes, so the supervisor does not count these rows again if this worker
        # is killed next (killed before this line, they are counted twice: over, never under).
        tally.close()

    def capture_tally(self) -> tuple[int, int]:
        """The current child's capture counts: shadow answers its writer accepted, and settled
        (spooled or counted as dropped); (0, 0) when no child runs."""
        tally = self._tally
        if tally is None:
            return 0, 0
        with contextlib.suppress(OSError):
            counts = tally.read()
            return counts.capture_accepted, counts.capture_settled
        return 0, 0

    def _respawn(self) -> bool:
        try:
            self._spawn()
        except OSError as exc:
            _logger.error("Could not start the shadow process: %s", exc)
            return False
        deadline = time.monotonic() + START_DEADLINE_S
        while not self._ready.wait(0.2):
            if self._closed or time.monotonic() > deadline:
                break
        if self._ready.is_set() and self._start_error is None and not self._closed:
            self._attach()
            return True
        _logger.error("Shadow process could not start again: %s", self._start_error or "no answer")
        assert self._proc is not None
        self._retire(self._proc, reason="crashed")
        return False

    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a restart's backoff), or less if the mirror is closed meanwhile."""
        deadline = time.monotonic() + seconds
        while not self._closed and (left := deadline - time.monotonic()) > 0:
            self._stirred.wait(left)
            self._stirred.clear()

    def _attach(self) -> None:
        """The channel writes to the ready child's pipe from now on (and owns that descriptor)."""
        fd, self._to_child = self._to_child, None
        assert fd is not None
        self.channel.attach(fd)
        self._ready_at = time.monotonic()

    def _close_unattached(self) -> None:
        """Close the pipe of a child that never became ready (the channel owns only attached ones)."""
        fd, self._to_child = self._to_child, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.channel.detach()
        self._close_unattached()
        if self._proc is not None:
            self._count_lost_capture(self._proc)

    # ---- the mirror's other verbs ------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The current child's process id."""
        return self._proc.pid if self._proc is not None else None

    @property
    def ready(self) -> bool:
        """Whether a child has loaded its version and takes copies."""
        return self._ready.is_set() and self._start_error is None

    def idle(self) -> bool:
        """Whether every copy handed over has been answered or dropped (none waits, travels or runs)."""
        return self.channel.waiting() == 0 and self.channel.sent == self._settled

    def flush(self, timeout_s: float = 60.0) -> int:
        """Have the child write the shadow rows it holds (waiting up to ``timeout_s`` in all)."""
        deadline = time.monotonic() + timeout_s  # one budget: the copies ahead of it, then the answer

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        with self._lock:
            self._next_flush += 1
            seq = self._next_flush
            done = self._flushes[seq] = threading.Event()
        try:
            # The child is told the time left once the copies ahead have gone (not timeout_s): it
            # gives up when this call does, instead of writing on for a caller that stopped waiting.
            if self.channel.send_control(lambda: ("flush", seq, left()), timeout_s=timeout_s):
                done.wait(left())
        finally:
            self._flushes.pop(seq, None)
        return 0

    def close(self, timeout_s: float = 15.0) -> None:
        """Stop taking copies; the child predicts what it has, writes its rows and exits (killed at the deadline).

        Returns within ``timeout_s``, killing the child if need be: its own share ends early enough
        (a tenth of the budget, at most 1 s, is kept) for the kill, the reaping and its last events.
        """
        if self._closed:
            return
        deadline = time.monotonic() + timeout_s
        # Kept for killing a child that did not exit and reading its last events.
        kill_by = deadline - min(1.0, timeout_s / 10)

        def left(until: float = deadline) -> float:
            return max(0.0, until - time.monotonic())

        self._closed = True
        self._stirred.set()
        if self._supervisor is not None:
            # It stops replacing children (a restart under way is retired).
            self._supervisor.join(min(2.0, left(kill_by)))
        self.channel.close(timeout_s=min(2.0, timeout_s / 4, left(kill_by)))
        proc = self._proc
        if proc is None:
            self._spawner.stop()
            return
        # The child's own budget, half of what is left before the kill when it is told: it is asked
        # to be done well before the kill.
        share = left(kill_by) / 2
        if proc.poll() is None and self.channel.send_control(lambda: ("close", left(kill_by) / 2), timeout_s=share):
            try:
                proc.wait(left(kill_by))
            except subprocess.TimeoutExpired:
                _logger.warning("Shadow process %d did not stop within %.1fs: killing it.", proc.pid, timeout_s)
        self._retire(proc, reason="closed", timeout_s=left())
        self._spawner.stop()  # after the child is gone: its end would kill the child (see _Spawner)


def start_shadow_process(spec: DeploymentSpec, model_dir: Path, capture_dir: str, capture_key: Path,
                         converter: str, hooks: Any, tally_dir: Path | None = None,
                         history: Path | None = None) -> ShadowProcess:
    """The ``shadow_starter`` of a local worker or a Ray replica for ``serving.service.build_service``
    (``tally_dir``, ``history``: see :class:`ShadowProcess`)."""
    return ShadowProcess(spec, model_dir, capture_dir, capture_key, converter, hooks.on_drop, hooks.on_result,
                         hooks.on_capture_drop, tally_dir=tally_dir, history=history)


# ---- the child ---------------------------------------------------------------------------------

class _Events:
    """The child's events, sent to the worker in batches (and as a heartbeat when there are none)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()
        self._pending: list[list[Any]] = []  # [event, count]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, event: tuple, count: int = 1) -> None:
        """Queue ``event`` standing for ``count`` copies (rows); sent as ``(*event, count)``, merged with
        the one before when it is the same (a batch's copies share outcome and time): the worker
        updates its metrics once per event, not once per copy."""
        with self._lock:
            last = self._pending[-1] if self._pending else None
            if last is not None and last[0] == event:
                last[1] += count
            else:
                self._pending.append([event, count])

    def send(self, message: tuple) -> None:
        data = encode_frame(message)
        with self._lock:
            write_all(self.fd, data)

    def flush(self, then: tuple | None = None) -> None:
        """Send the pending events (none: a heartbeat), then ``then`` if given, in one write: the
        worker handles what a message says after the events sent before it (a ``flushed`` must
        find the flushed copies' outcomes counted)."""
        with self._lock:
            pending, self._pending = self._pending, []
            data = encode_frame(("events", [(*event, count) for event, count in pending]))
            if then is not None:
                data += encode_frame(then)
            write_all(self.fd, data)

    def _run(self) -> None:
        last = 0.0
        while not self._stopped.wait(EVENTS_EVERY_S):
            if self._pending or time.monotonic() - last >= HEARTBEAT_S:
                try:
                    self.flush()
                except OSError:
                    return  # the worker is gone: the main loop sees its pipe end
                last = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(2.0)
        with contextlib.suppress(OSError):
            self.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlflow_deploy_plugin.engines.local.shadow_process")
    parser.add_argument("--in-fd", type=int, required=True, help="pipe the worker writes copies to")
    parser.add_argument("--out-fd", type=int, required=True, help="pipe this process writes events to")
    parser.add_argument("--parent-pid", type=int, default=0, help="the worker's pid: leave if it is gone")
    parser.add_argument("--tally-fd", type=int, default=-1, help="file the capture writer keeps its counts in")
    args = parser.parse_args(argv)
    os.umask(0o077)  # captured inputs are user data (see state.py)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [shadow %(process)d] %(name)s: %(message)s")
    for fd in (args.in_fd, args.out_fd, args.tally_fd):  # nothing this process starts may hold them open
        if fd >= 0:
            os.set_inheritable(fd, False)
    if not _die_with_parent(args.parent_pid):
        return 4
    reader = FrameReader(args.in_fd)
    events = _Events(args.out_fd)
    start = reader.read()
    if start is None or start[0] != "start":
        return 2
    settings = start[1]
    try:
        mirror, writer, smoke = _load(settings, events)
    except Exception as exc:  # reported to the worker, which fails its start as an in-process load would
        _logger.error("Shadow process could not start: %s", exc)
        events.send(("error", f"{type(exc).__name__}: {exc}"[:2000]))
        return 3
    _keep_tally(writer, args.tally_fd)
    _lower_priority(int(settings.get("nice", NICE)))
    events.send(("ready", smoke))
    events.start()
    closing = 5.0
    try:
        while True:
            message = reader.read()
            if message is None:
                break  # the worker is gone (or closed its end): finish what we have and leave
            kind = message[0]
            if kind == "copies":
                for copy in unpack_copies(message[1]):
                    if isinstance(copy, int):  # not ours: counted, and the others still go through
                        events.add(("drop", "crashed"), copy)
                    elif isinstance(copy, CopyRun):  # one item, one DataFrame per batch, not per copy
                        mirror.submit_run(copy)
                    else:
                        mirror.submit(copy)  # a copy it cannot take it counts as dropped itself
            elif kind == "flush":
                threading.Thread(target=_flush, args=(mirror, writer, events, message[1], message[2]),
                                 daemon=True).start()
            elif kind == "close":
                closing = float(message[1])
                break
    finally:
        mirror.close(timeout_s=min(5.0, closing / 2))
        writer.close(timeout_s=max(1.0, closing / 2))
        events.stop()
    return 0


def _die_with_parent(parent_pid: int) -> bool:
    """Have the kernel kill this process when the worker's thread that started it ends (the worker
    exited, even by ``kill -9``); False if the worker is already gone.

    The end of the worker's pipe says the same, but only to a process that reads it: one hung in a
    call that holds its GIL, or stopped, never would. Linux only (``prctl``); elsewhere the pipe's
    end is all there is.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                _logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        except (OSError, AttributeError) as exc:
            _logger.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
    # The worker died before the prctl: no signal will come (this process has another parent now).
    return not parent_pid or os.getppid() == parent_pid


def _keep_tally(writer: Any, fd: int) -> None:
    """Have the capture writer keep its counts in the worker's tally file (``liveness.ShadowTallyFile``)."""
    if fd < 0:
        return
    try:
        shared = mmap.mmap(fd, SHADOW_COUNTS_SIZE)
    except (OSError, ValueError) as exc:  # rows this process dies holding go uncounted, nothing else
        _logger.warning("Could not map the capture tally file: %s", exc)
        return
    writer.tally_into(memoryview(shared).cast("q"))


def _lower_priority(nice: int) -> None:
    """Run below the serving worker, once loaded: the primary wins the CPU whenever both want it.

    The child stays in the worker's session. With Linux's scheduler autogroups (on by default) CPU is
    shared between sessions first and nice only weighs inside one: in the worker's session the child
    takes at most a niced share of what the deployment gets and adds no share of its own beside the
    other sessions; in a session of its own with a lowered autogroup nice (tried) it starved on a busy
    machine, loading included. The load itself runs at normal priority: it is paid once, and the
    worker waits for it before it serves.
    """
    # Linux keeps a nice value per thread and os.nice changes the caller's only: the threads the
    # load started (the mirror's dispatcher, the capture writer, native pools) are lowered one by
    # one; threads started later (the predict calls) inherit it from their creator.
    with contextlib.suppress(OSError):
        os.nice(nice)
    target = os.getpriority(os.PRIO_PROCESS, 0)
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError, ValueError):
                if os.getpriority(os.PRIO_PROCESS, int(tid)) < target:
                    os.setpriority(os.PRIO_PROCESS, int(tid), target)


def _flush(mirror: Any, writer: Any, events: _Events, seq: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not mirror.idle() and time.monotonic() < deadline:
        time.sleep(0.01)  # the copies handed over before the flush are predicted and recorded first
    try:
        writer.flush(timeout_s=max(0.1, deadline - time.monotonic()))
    finally:
        # The events of the flushed copies (results, drops, capture drops) go first, or the worker's
        # flush() could return before its outcomes and metrics include them (events wait up to
        # EVENTS_EVERY_S otherwise).
        with contextlib.suppress(OSError):
            events.flush(then=("flushed", seq))


def _load(settings: dict[str, Any], events: _Events) -> tuple[Any, Any, str]:
    """Load and smoke-test the shadow version, and build its mirror and capture writer."""
    from mlflow_deploy_plugin.capture import capture_root
    from mlflow_deploy_plugin.serving.model_slot import ModelIdentity, ModelSlot
    from mlflow_deploy_plugin.serving.service import capture_redaction, shadow_batching, shadow_capture_writer
    from mlflow_deploy_plugin.serving.shadow import ShadowMirror

    spec = DeploymentSpec.from_dict(settings["spec"])
    model = spec.shadow
    assert model is not None
    config = spec.config
    slot = ModelSlot.load(ModelIdentity(model.model_name, model.model_version, model.version_uri,
                                        model.requested_uri, model.run_id), Path(settings["model_dir"]))
    smoke = slot.smoke_test()
    capture_dir = settings["capture_dir"]
    writer = shadow_capture_writer(spec, capture_root(spec.name, config.capture_uri, capture_dir),
                                   os.path.join(capture_dir, ".spool"),
                                   capture_redaction(spec, Path(settings["capture_key"])), settings["converter"],
                                   lambda count: events.add(("capture_drop",), count))

    def on_drop(reason: str, count: int) -> None:
        events.add(("drop", reason), count)

    mirror = ShadowMirror(slot.predict, model.model_version, writer.record, sample_rate=1.0,
                          max_queue=max(config.max_queue, 1), timeout_s=config.timeout_s,
                          on_drop=on_drop,
                          on_result=lambda outcome, seconds, count: events.add(("result", outcome, seconds), count),
                          batching=shadow_batching(spec, slot.metadata.flavors), max_batch_rows=config.max_batch_rows,
                          model_name=model.model_name, batch_wait_s=BATCH_WAIT_S)
    return mirror, writer, smoke


if __name__ == "__main__":
    sys.exit(main())
