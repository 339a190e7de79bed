"""The supervisor of one local deployment: owns the port, runs workers, restarts them, swaps them.

It is a small, long-lived process (standard library only, so it holds a few MB, not a copy of
MLflow) started detached by ``create`` so the service outlives the CLI call. It:

- binds the listening socket once and hands it to every worker, so updates never refuse a
  connection: new workers accept beside the old ones, then the old ones drain;
- starts the warm standby first and has it fork the workers (``forkserver.py``): they share its
  imported pages, so the standby costs a few MiB, not a second interpreter. It adopts them as a
  child subreaper, so they are its children (reaped, exit status read) as if it had started them;
- restarts crashed workers. A crash is judged by what the worker was doing (its liveness file,
  ``liveness.py``): dying inside a model call means a request killed it (recorded as a bad request,
  restarted at once, never held against the version; a SIGKILL is told apart as the kernel's OOM
  killer or not by the cgroup's OOM counter, ``oom.py``); dying after it has served is restarted at
  once; dying before it served anything is the version failing to stay up, restarted with
  exponential backoff, and after ``max_restarts`` such crashes in a row that worker is given up.
  The deployment is ``failed`` only when no worker is left: healthy workers are never stopped;
- replaces a worker whose model call has not returned within ``timeout_s`` + a grace, or whose
  event loop went silent (liveness, separate from readiness), and kills a draining worker that has
  not exited ``timeout_s`` + 5 s after being asked: an update never leaves an old worker behind;
- takes requests (update, stop) from the CLI through its mailbox (``mailbox.py``);
- keeps the deployment's background agent running while the spec needs one, and one capture
  converter while the capture spool has work (``capture_keeper.py``);
- rotates the logs of the deployment (size-bounded) and removes dead workers' live metrics;
- counts, when a worker is gone, the answered requests its capture writer still held in memory as
  dropped from capture (``capture_loss.py``), and the shadow answers its shadow child's writer
  held (the child dies with it): a ``kill -9`` loses them, but never silently;
- is the only writer of ``status.json``.

Losing the supervisor loses no request (gunicorn's re-exec pattern, without the exec): it holds
the deployment's supervisor lock (``processes.py``) for its whole life; workers that find their
parent gone keep serving on the socket they hold and start a new supervisor with that socket
(``--respawn --fd N``). Whoever takes the lock first becomes the supervisor; the others step
aside. The new one reads the old workers' pids from ``status.json`` (verified by command line),
starts a fresh generation on the same socket and, once it is ready, tells the old ones to drain.
With no socket to inherit (started by the agent or by `mlflow-deploy up` while old workers still
serve) it asks those workers for theirs: each hands a duplicate of the very listening socket over a
Unix-domain control socket, to a supervisor of this deployment only (``handoff.py``), so there is
still one socket and nothing queued on it is reset. Only if none answers does it bind the same port
beside them (every socket is bound with ``SO_REUSEPORT`` for that reason, after a probe that keeps
two deployments from ever sharing a port); the log says so, since connections still queued on the
old socket are then reset when its last worker closes it.

It imports only the standard library and the spec/state modules (and its own mailbox, worker
protocol, liveness, capture loss, OOM counter, socket handoff and process helpers): a test reads its import graph to keep it that way.

Run as ``python -m mlflow_deploy_plugin.engines.local.supervisor DEPLOYMENT_DIR [--respawn] [--fd N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow_deploy_plugin.engines.local.worker_protocol as protocol
import mlflow_deploy_plugin.timeline as timeline
from mlflow_deploy_plugin.engines.local.capture_keeper import ConverterKeeper
from mlflow_deploy_plugin.engines.local.capture_loss import CaptureLoss
from mlflow_deploy_plugin.engines.local.forkserver import (
    ForkedChild,
    ForkError,
    ForkRefused,
    become_subreaper,
    channel,
    reap_adopted,
    request_fork,
)
from mlflow_deploy_plugin.engines.local.handoff import (
    REQUEST_TIMEOUT_S,
    HandoffRefused,
    handoff_dir,
    handoff_path,
    request_socket,
)
from mlflow_deploy_plugin.engines.local.liveness import (
    HUNG_GRACE_S,
    SHADOW_SUFFIX,
    Liveness,
    liveness_dir,
    read_liveness,
    shadow_tally_path,
)
from mlflow_deploy_plugin.engines.local.mailbox import Mailbox
from mlflow_deploy_plugin.engines.local.oom import OOM, OomKills, describe_sigkill, own_oom_counter
from mlflow_deploy_plugin.engines.local.processes import (
    is_agent,
    is_supervisor,
    is_worker,
    live_workers,
    signal_pid,
    status_pids,
    take_supervisor_lock,
    wait_workers_gone,
)
from mlflow_deploy_plugin.spec import DeploymentSpec, SpecError, load_spec, spec_to_json
from mlflow_deploy_plugin.state import (
    PRIVATE_FILE_MODE,
    STATUS_FAILED,
    STATUS_RUNNING,
    STATUS_STARTING,
    STATUS_STOPPED,
    STATUS_UNHEALTHY,
    DeploymentPaths,
    StateStore,
    read_json,
    write_json_atomic,
)

_logger = logging.getLogger("mlflow_deploy_plugin.supervisor")
TICK_S = 0.05
HEALTHY_RESET_S = 60.0  # uptime after which a worker's crash no longer counts as "in a row"
MAX_BACKOFF_S = 30.0
DRAIN_MARGIN_S = 5.0  # a draining worker gets timeout_s plus this to exit before it is killed
HUNG_KILL_S = 5.0  # a hung worker has answered 503 to what waited on it by then
ORPHAN_KILL_WAIT_S = 5.0  # an orphan killed at shutdown is gone by then unless stuck in the kernel
LIVENESS_CHECK_S = 0.25
LOG_MAX_BYTES = int(os.environ.get("MLFLOW_DEPLOY_LOG_MAX_BYTES") or 10 * 1024 * 1024)
LOG_BACKUPS = 2
LOG_CHECK_S = 10.0
KEEP_WORKER_LOGS = 40  # logs of past workers kept (newest first)
HANDOFF_TOTAL_S = 3 * REQUEST_TIMEOUT_S  # asking a predecessor's workers for their socket, all told
STANDBY_FIRST_WAIT_S = 120.0  # the first workers wait this long for the standby to fork them (in the loop)
REAP_ADOPTED_S = 1.0  # how often orphaned descendants we adopted are reaped
# A standby that dies before it is ready is started again after 0.5 s, 1 s, 2 s ... up to this: it
# is only a speed-up, and one that cannot start (a broken environment, OOM) would otherwise cost an
# interpreter's imports at every tick.
STANDBY_FIRST_BACKOFF_S = 0.5
STANDBY_MAX_BACKOFF_S = 300.0
# A standby that dies sooner than this after it got ready counts as failing too (OOM-killed once
# ready, say): the backoff grows until one has lived this long.
STANDBY_HEALTHY_S = 60.0


@dataclass
class Worker:
    popen: subprocess.Popen[bytes] | ForkedChild  # ForkedChild: forked by the warm standby
    generation: int
    index: int
    ready_fd: int
    log_path: Path
    started_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    error: str | None = None
    draining: bool = False
    standby_ready: bool = False  # a warm standby that finished its imports
    standby_ready_at: float | None = None  # when it said so (monotonic)
    loaded_at: float | None = None  # model loaded and smoke-tested; waiting for "go" to accept
    released: bool = False
    stopped_accepting: bool = False  # draining: answers what it has, takes no new connection
    kill_at: float | None = None  # monotonic time after which a draining worker is killed
    hung: str | None = None  # why it was declared hung (its own word, or the supervisor's)
    pipe_closed: bool = False  # its ready pipe is at end of file: the worker is gone, nothing to wait on
    # Started as a fresh interpreter because the one the standby forked for it died before loading:
    # if this one loads, forking is what failed (a model that cannot load in a forked process).
    fork_retry: bool = False
    # The flavors' modules (``mlflow.sklearn`` ...) a worker's models need, or a standby imported.
    modules: frozenset[str] = frozenset()
    warmed_for: int | None = None  # a standby: the generation whose models it warmed up for
    _buffer: bytes = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tell(self, line: str) -> None:
        """Write one line to the worker's stdin; raises OSError if it cannot be delivered."""
        stdin = self.popen.stdin
        if stdin is None:  # never: _start_process always opens stdin as a pipe
            raise OSError(f"worker pid {self.pid} has no stdin pipe")
        stdin.write(f"{line}\n".encode())
        stdin.flush()

    def release(self) -> None:
        """Let a loaded worker start accepting connections."""
        self.released = True
        with contextlib.suppress(OSError):  # it died meanwhile: reaped as a crash or a failed update
            self.tell(protocol.GO)
            timeline.mark(f"supervisor: go sent to worker {self.pid}")

    def read_pipe(self) -> None:
        """Pick up what the worker said on its ready pipe (non-blocking)."""
        try:
            while True:
                chunk = os.read(self.ready_fd, 4096)
                if not chunk:
                    self.pipe_closed = True  # else select() would find it readable at every wait
                    break
                self._buffer += chunk
        except (BlockingIOError, OSError):
            pass
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            event, detail = protocol.parse(line.decode(errors="replace"))
            if event == protocol.READY and self.ready_at is None:
                self.ready_at = time.time()
                timeline.mark(f"supervisor: worker {self.pid} said ready")
            elif event == protocol.STANDBY:
                self.standby_ready = True
                self.standby_ready_at = time.monotonic()
                self.modules = protocol.parse_modules(detail)
            elif event == protocol.LOADED and self.loaded_at is None:
                self.loaded_at = time.time()
                self.modules = protocol.parse_modules(detail)
                timeline.mark(f"supervisor: worker {self.pid} said loaded")
            elif event == protocol.DRAINING:
                self.stopped_accepting = True
            elif event == protocol.ERROR:
                self.error = detail or "unknown error"
            elif event == protocol.HUNG and self.hung is None:
                self.hung = detail or "model call hung"


@dataclass
class Generation:
    """One spec (model version + config) and the socket its workers serve on."""

    number: int
    spec: DeploymentSpec
    sock: socket.socket
    spec_file: Path


@dataclass
class PendingUpdate:
    request_id: str
    generation: Generation
    deadline: float
    reason: str


def _log_tail(path: Path, max_bytes: int = 4000, lines: int = 6) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            tail = handle.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line for line in tail.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


def _exit_description(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def forget_worker_metrics(metrics_dir: Path, pid: int) -> None:
    """Drop a dead worker's live gauges from the Prometheus multiprocess folder.

    What ``prometheus_client.multiprocess.mark_process_dead`` does, without importing it here.
    """
    for path in metrics_dir.glob(f"gauge_live*_{pid}.db"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def bind_socket(host: str, port: int | None, beside_orphans: bool = False) -> socket.socket:
    """Bind the deployment's listening socket (port 0 or None = a free port chosen by the kernel).

    ``SO_REUSEPORT`` lets a successor supervisor bind the same port while orphaned workers still
    accept on this socket. It would also let a second deployment bind a port in use, so unless we
    are binding beside our own orphans a plain probe bind must succeed first.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not port or not beside_orphans:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port or 0))  # EADDRINUSE if anyone listens there
            port = probe.getsockname()[1]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def adopt_socket(fd: int, host: str, port: int | None) -> socket.socket | None:
    """The listening socket an orphaned worker handed us, if it is one and serves this address."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        bound_host, bound_port = sock.getsockname()[:2]
    except OSError:
        listening, bound_host, bound_port = 0, None, None
    if not listening or (port and bound_port != port) or (bound_host != host and host != "localhost"):
        with contextlib.suppress(OSError):
            sock.close()
        return None
    sock.set_inheritable(True)
    return sock


def rotate_logs(logs_dir: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS,
                keep: int = KEEP_WORKER_LOGS) -> None:
    """Keep the deployment's logs bounded: each at most ``max_bytes`` (+ ``backups`` older parts),
    and the logs of at most ``keep`` past workers.

    Copy-then-truncate, because the writers hold the file open: they write with O_APPEND, so after
    the truncation they continue at the start of the emptied file.
    """
    try:
        logs = [p for p in logs_dir.glob("*.log") if p.is_file()]
    except OSError:
        return
    for path in logs:
        try:
            if path.stat().st_size <= max_bytes:
                continue
            for number in range(backups, 1, -1):
                older = path.with_name(f"{path.name}.{number - 1}")
                if older.exists():
                    os.replace(older, path.with_name(f"{path.name}.{number}"))
            if backups:
                shutil.copyfile(path, path.with_name(f"{path.name}.1"))
            os.truncate(path, 0)
        except OSError as exc:
            _logger.warning("Could not rotate %s: %s", path, exc)
    workers = sorted((p for p in logs if p.name.startswith("worker-")), key=lambda p: p.stat().st_mtime
                     if p.exists() else 0.0, reverse=True)
    for path in workers[keep:]:
        for old in [path, *path.parent.glob(f"{path.name}.*")]:
            with contextlib.suppress(OSError):
                old.unlink()


class Supervisor:
    """Runs and watches the workers of one deployment until asked to stop."""

    def __init__(self, paths: DeploymentPaths, *, heal: bool = True, respawn: bool = False,
                 inherited_fd: int | None = None) -> None:
        """``heal``: workers outlive this process and start its successor (False for run-local).
        ``respawn``: started by an orphaned worker or agent (do nothing for a stopped deployment).
        ``inherited_fd``: the listening socket the orphaned workers serve on."""
        self.paths = paths
        self.heal = heal
        self.respawn = respawn
        self.inherited_fd = inherited_fd
        self.lock_fd: int | None = None
        # Workers of a previous supervisor: pid -> when to kill it (None until asked to drain).
        self.orphans: dict[int, float | None] = {}
        self.orphans_told = False
        self.bad_requests = 0
        self.oom_kills = 0  # workers the kernel's OOM killer killed (``oom.py``)
        self.oom = OomKills(own_oom_counter())  # workers stay in our cgroup: its counter is theirs
        self.hung_replaced = 0
        self.takeovers = 0
        self.given_up: set[int] = set()  # worker indexes no longer restarted (crash budget spent)
        self._next_liveness = 0.0
        self._next_log_check = 0.0
        self.store = StateStore(paths.root.parent.parent)
        self.workers: dict[int, Worker] = {}
        self.current: Generation | None = None
        self.pending: PendingUpdate | None = None
        self.restarts = 0
        self.crashes_in_row = 0
        self.respawn_at: dict[int, float] = {}  # worker index -> when to start it again
        # Worker index -> (the fault's history event, its error, when): once the replacement serves,
        # `worker_recovered` says so (a `crashed` alert needs its "healed" for receivers to close it).
        self.healing: dict[int, tuple[str, str, float]] = {}
        self.state = STATUS_STARTING
        self.last_error: str | None = None
        self.started_at = time.time()
        self.stop_requested: str | None = None  # the request id (or "signal") asking us to stop
        self.ever_ready = False
        self._last_status: dict[str, Any] | None = None
        self.mailbox = Mailbox(paths.requests)
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_restart_at = 0.0
        # An update is answered once the old workers stopped accepting: from then on every new
        # connection reaches the new version.
        self.answer_when_drained: tuple[str, list[Worker], float] | None = None
        self.standby: Worker | None = None
        self.standby_sock: socket.socket | None = None
        # Workers are forked by the warm standby (``forkserver.py``) once we can adopt them.
        self.forking = False
        self.fork_channel: socket.socket | None = None  # our end of the standby's fork requests
        self.standby_failures = 0  # standbys in a row that died before they were ready
        self.standby_restart_at = 0.0  # no standby is started before then (monotonic)
        self.standby_error: str | None = None  # why there is no standby now (status.json says it)
        # The first generation and when its workers stop waiting for the warm standby that forks them.
        self.first_workers: tuple[Generation, float] | None = None
        self._next_reap_adopted = 0.0
        # The workers' capture writers spool (capture/.spool, see serving/service.py); this converts.
        self.converter = ConverterKeeper(paths.capture / ".spool", paths.logs / "capture-converter.log")
        self.capture_loss = CaptureLoss(self.store, paths.name, paths.metrics)

    # -- workers -------------------------------------------------------------------------------

    def _spawn(self, generation: Generation, index: int) -> Worker:
        """Start worker ``index`` of ``generation``: forked by the warm standby if it forks the workers,
        else the standby itself if it was started on this generation's socket (a warm process takes
        the work: the swap costs only the model load); a fresh interpreter without a ready standby,
        or if the standby fails to give one."""
        standby = self.standby
        if (standby is not None and standby.standby_ready and standby.popen.poll() is None
                and generation.spec.config.warm_standby):  # not when the update turns it off
            if self.forking:
                try:
                    return self._fork_process(generation, index)
                except ForkRefused as exc:  # it would refuse again: no more forking here
                    self._stop_forking(f"warm standby pid {standby.pid} refused to fork worker {index}: {exc}")
                except ForkError as exc:
                    _logger.warning("Warm standby pid %d could not fork worker %d (%s); starting a fresh "
                                    "process, and another standby", standby.pid, index, exc)
                    self._release_standby()
            elif self.standby_sock is generation.sock:
                self.standby = None
                with contextlib.suppress(OSError):  # it died meanwhile (reaped as a standby): a fresh one starts
                    standby.tell(str(generation.spec_file))
                    standby.generation, standby.index, standby.started_at = generation.number, index, time.time()
                    _logger.info("Standby pid %d takes worker %d of generation %d", standby.pid, index,
                                 generation.number)
                    return standby
        return self._start_process(generation, index)

    def _stop_forking(self, reason: str) -> None:
        """Start every later worker (and standby) as a fresh interpreter, as without a forking
        standby: forking failed in a way that would repeat."""
        if not self.forking:
            return
        _logger.warning("Workers of this deployment start as fresh interpreters from now on (they no longer "
                        "share the warm standby's pages): %s", reason)
        self.forking = False
        self._release_standby()

    def _keep_standby(self) -> None:
        """Keep one warm process ready for the next swap or restart (``-C warm_standby``)."""
        if self.forking:
            retried = next((w for w in self.workers.values() if w.fork_retry and w.loaded_at), None)
            if retried is not None:
                self._stop_forking(f"worker pid {retried.pid} loaded as a fresh interpreter where the one the "
                                   "standby forked for it died before loading")
        current = self.current
        if current is None or self.pending is not None:
            return
        if not current.spec.config.warm_standby:
            # Turned off by an update: the standby goes, and the workers start as fresh interpreters.
            if self.standby is not None:
                _logger.info("Warm standby pid %d released: warm_standby is off", self.standby.pid)
                self._release_standby()
            self.standby_error = None
            return
        # A forking standby hands each worker the socket it is given; one that becomes a worker
        # serves on the socket it was started with.
        if self.standby is not None and (code := self.standby.popen.poll()) is not None:
            # It died since this tick's reaping: counted as _reap would have (backoff included).
            self._standby_died(self.standby, _exit_description(code))
        elif self.standby is not None and not self.forking and self.standby_sock is not current.sock:
            self._release_standby()
        standby = self.standby
        if standby is not None and standby.standby_ready:
            self.standby_error = None  # there is one again
            if standby.standby_ready_at is not None and time.monotonic() - standby.standby_ready_at >= STANDBY_HEALTHY_S:
                self.standby_failures = 0
        elif standby is not None and time.time() - standby.started_at > STANDBY_FIRST_WAIT_S:
            # Alive but never ready (stuck in an import, say): not kept for ever in place of a working one.
            self._release_standby()
            self._standby_failed(standby, f"was not ready {STANDBY_FIRST_WAIT_S:g}s after it started")
        if self.forking and (stale := self._stale_standby(current)):
            # Replaced now that the update is done (never on its way): the new one imports what
            # the served models need, so the workers forked from it on restarts and updates do not.
            _logger.info("Replacing the warm standby pid %d: %s", self.standby.pid if self.standby else 0, stale)
            self._release_standby()
        if (self.standby is None and all(w.ready_at for w in self._workers_of(current))
                and time.monotonic() >= self.standby_restart_at):
            self.standby_sock = current.sock
            self.standby = self._start_process(current, -1, standby=True)

    def _stale_standby(self, current: Generation) -> str | None:
        """Why the forking standby should be replaced (None: it should not): the serving generation's
        models need flavors' modules it did not import. Never for the generation it warmed up for, so
        a standby that could not import them (the workers import them themselves) is replaced once."""
        standby = self.standby
        if standby is None or not standby.standby_ready or standby.warmed_for == current.number:
            return None
        needed = frozenset().union(*(w.modules for w in self._workers_of(current) if w.loaded_at))
        missing = needed - standby.modules
        if not missing:
            return None
        return (f"it warmed up for generation {standby.warmed_for} ({', '.join(sorted(standby.modules)) or 'no flavor'}"
                f"); generation {current.number}'s models need {', '.join(sorted(missing))}, which every worker "
                "forked from it would import itself")

    def _release_standby(self) -> None:
        standby, self.standby = self.standby, None
        if self.fork_channel is not None:
            self.fork_channel.close()  # a forking standby leaves when this end closes
            self.fork_channel = None
        if standby is None:
            return
        if standby.popen.stdin is not None:
            with contextlib.suppress(OSError):
                standby.popen.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            standby.popen.terminate()
        standby.draining = True  # reaped without crash accounting

    def _start_process(self, generation: Generation, index: int, standby: bool = False) -> Worker:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        log_path = self._log_path(generation, index, standby)
        what = ["--standby", str(generation.spec_file)] if standby else ["--spec", str(generation.spec_file)]
        fds = [write_fd]
        theirs = None
        if standby and self.forking:
            # It forks the workers: each gets its socket with the request, so it holds none itself
            # (nor keeps an old generation's port open).
            self.fork_channel, theirs = channel()
            what += ["--fork-socket", str(theirs.fileno())]
            fds.append(theirs.fileno())
        else:
            what += ["--fd", str(generation.sock.fileno())]
            fds.append(generation.sock.fileno())
        try:
            with open(log_path, "ab") as log:
                popen = subprocess.Popen(
                    [sys.executable, "-m", "mlflow_deploy_plugin.serving.worker", *what,
                     "--ready-fd", str(write_fd), *self._worker_args()],
                    pass_fds=fds, stdin=subprocess.PIPE, stdout=log, stderr=log, env=self._worker_env(generation),
                )
        finally:
            os.close(write_fd)
            if theirs is not None:
                theirs.close()
        worker = Worker(popen, -1 if standby else generation.number, index, read_fd, log_path,
                        warmed_for=generation.number if standby else None)
        timeline.mark(f"supervisor: {'standby' if standby else 'worker'} {popen.pid} spawned")
        self.workers[popen.pid] = worker
        _logger.info("Started %s (pid %d)", ("warm standby (forks the workers)" if self.forking else "warm standby")
                     if standby else f"worker {index} of generation {generation.number}", popen.pid)
        return worker

    def _fork_process(self, generation: Generation, index: int) -> Worker:
        """Worker ``index`` of ``generation``, forked by the warm standby (``forkserver.py``): it
        shares the standby's imported pages. Raises ForkError if the standby does not fork it."""
        assert self.standby is not None and self.fork_channel is not None
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        stdin_read, stdin_write = os.pipe()
        log_path = self._log_path(generation, index, standby=False)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            pid = request_fork(self.fork_channel, ["--spec", str(generation.spec_file), *self._worker_args()],
                               self._worker_env(generation),
                               {"listen": generation.sock.fileno(), "ready": write_fd, "stdin": stdin_read,
                                "log": log_fd})
        except ForkError:
            os.close(read_fd)
            os.close(stdin_write)
            raise
        finally:
            for fd in (write_fd, stdin_read, log_fd):
                os.close(fd)
        worker = Worker(ForkedChild(pid, stdin_write), generation.number, index, read_fd, log_path)
        timeline.mark(f"supervisor: worker {pid} forked by the standby")
        self.workers[pid] = worker
        _logger.info("Warm standby pid %d forked worker %d of generation %d (pid %d)", self.standby.pid, index,
                     generation.number, pid)
        return worker

    def _log_path(self, generation: Generation, index: int, standby: bool) -> Path:
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        self._standby_count = getattr(self, "_standby_count", 0) + int(standby)
        name = f"standby-{self._standby_count}" if standby else f"{generation.number}-{index}"
        return self.paths.logs / f"worker-{name}.log"

    def _worker_args(self) -> list[str]:
        return ["--deployment", str(self.paths.root), "--on-orphan", "serve" if self.heal else "exit"]

    def _worker_env(self, generation: Generation) -> dict[str, str]:
        return dict(self._child_env(generation.spec), PROMETHEUS_MULTIPROC_DIR=str(self.paths.metrics),
                    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")

    def _standby_first(self, generation: Generation) -> None:
        """Start the warm standby before the first workers, so it forks them (they share its pages)
        and their cold start is its imports, not theirs. The workers wait for it in the loop
        (:meth:`_start_first_workers`), which meanwhile answers stops, signals and status."""
        self.standby = self._start_process(generation, -1, standby=True)
        self.standby_sock = generation.sock

    def _start_first_workers(self) -> None:
        """Start the first generation's workers once the warm standby that forks them is ready, or
        gone, or slower than STANDBY_FIRST_WAIT_S (they then start as fresh interpreters); at once
        without a standby."""
        if self.first_workers is None:
            return
        generation, deadline = self.first_workers
        standby = self.standby
        if (standby is not None and not standby.standby_ready and not standby.pipe_closed
                and standby.popen.poll() is None and time.monotonic() < deadline):
            return
        self.first_workers = None
        if generation is not self.current:
            return  # an update that came meanwhile serves instead
        if standby is not None and not standby.standby_ready and standby.popen.poll() is None:
            _logger.warning("Warm standby pid %d not ready after %.0fs; the first workers start as fresh "
                            "interpreters", standby.pid, STANDBY_FIRST_WAIT_S)
        for index in range(generation.spec.config.workers):
            self._spawn(generation, index)

    def _child_env(self, spec: DeploymentSpec | None) -> dict[str, str]:
        """The environment of workers and the agent: ours, plus the store the spec was created
        against (`mlflow-deploy up` may run from cron or systemd, without MLFLOW_TRACKING_URI)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if spec is not None and spec.tracking_uri and not env.get("MLFLOW_TRACKING_URI"):
            env["MLFLOW_TRACKING_URI"] = spec.tracking_uri
        return env

    def _new_generation(self, spec: DeploymentSpec, number: int, sock: socket.socket | None = None) -> Generation:
        config = spec.config
        same_address = self.current is not None and (
            self.current.spec.config.host, self.current.spec.config.port) == (config.host, config.port)
        if sock is None:
            sock = self.current.sock if same_address and self.current else bind_socket(config.host, config.port)
        spec_file = self.paths.root / "run" / f"generation-{number}.json"
        write_json_atomic(spec_file, spec_to_json(spec, models_dir=str(self.paths.models),
                                                  capture_dir=str(self.paths.capture)))
        return Generation(number, spec, sock, spec_file)

    def _keep_agent(self) -> None:
        """Run the background agent while the current spec needs one; restart it if it dies."""
        wanted = self.current is not None and self.current.spec.needs_agent
        agent = self.agent
        if agent is not None and agent.poll() is None:  # alive
            if not wanted:
                agent.terminate()
                self.agent = None
        elif wanted and time.monotonic() >= self.agent_restart_at:
            if self.agent is not None:
                _logger.warning("Agent exited with %s; restarting it", self.agent.returncode)
            self.agent_restart_at = time.monotonic() + 5.0
            with open(self.paths.logs / "agent.log", "ab") as log:
                self.agent = subprocess.Popen(
                    [sys.executable, "-m", "mlflow_deploy_plugin.agent", str(self.paths.root)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    env=self._child_env(self.current.spec if self.current else None))

    def _workers_of(self, generation: Generation | None) -> list[Worker]:
        if generation is None:
            return []
        return [w for w in self.workers.values() if w.generation == generation.number and not w.draining]

    def _drain_deadline(self) -> float:
        timeout = self.current.spec.config.timeout_s if self.current else 60.0
        return time.monotonic() + timeout + DRAIN_MARGIN_S

    def _drain(self, workers: list[Worker]) -> None:
        for worker in workers:
            worker.draining = True
            if worker.kill_at is None:
                worker.kill_at = self._drain_deadline()
            with contextlib.suppress(ProcessLookupError):
                worker.popen.send_signal(signal.SIGTERM)

    def _kill_overdue(self) -> None:
        """A draining worker that has not exited in time is killed: none is ever left behind."""
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.kill_at is not None and now > worker.kill_at and worker.popen.poll() is None:
                _logger.warning("Worker %d did not exit in time after being asked to; killing it", worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    worker.popen.kill()
                worker.kill_at = None
        for pid, kill_at in list(self.orphans.items()):
            if kill_at is not None and now > kill_at:
                _logger.warning("Orphaned worker %d did not drain in time; killing it", pid)
                signal_pid(pid, signal.SIGKILL)
                self.orphans[pid] = None

    # -- liveness ------------------------------------------------------------------------------

    def _live_path(self, pid: int) -> Path:
        return liveness_dir(self.paths.root / "run") / str(pid)

    def _worker_gone(self, pid: int, how: str) -> Liveness | None:
        """A worker is gone: count the capture it held and its shadow child held (``capture_loss.py``),
        remove its liveness and shadow tally files, and return its last liveness record."""
        live = read_liveness(self._live_path(pid))
        self.capture_loss.worker_gone(pid, live, how)
        self.capture_loss.shadow_gone(pid, shadow_tally_path(self._live_path(pid).parent, pid), how)
        with contextlib.suppress(OSError):
            self._live_path(pid).unlink()
        return live

    def _check_liveness(self) -> None:
        """Replace a serving worker whose model call or event loop is stuck (readiness is not
        enough: a hung worker still looks ready, and keeps accepting connections it cannot answer)."""
        now = time.monotonic()
        if now < self._next_liveness:
            return
        self._next_liveness = now + LIVENESS_CHECK_S
        for worker in list(self.workers.values()):
            if worker.draining or not worker.ready_at or worker.generation == -1 or self.current is None:
                continue
            limit = self.current.spec.config.timeout_s + HUNG_GRACE_S
            why = worker.hung
            live = read_liveness(self._live_path(worker.pid))
            if why is None and live is not None:
                if live.busy_for(now) > limit + 1.0:  # the worker says so itself at `limit`
                    why = f"model call running for {live.busy_for(now):.0f}s"
                elif live.silent_for(now) > limit:
                    why = f"event loop silent for {live.silent_for(now):.0f}s"
            if why is not None:
                self._replace_hung(worker, why)

    def _replace_hung(self, worker: Worker, why: str) -> None:
        self.hung_replaced += 1
        reason = f"worker {worker.index} (pid {worker.pid}) hung: {why}; replaced"
        _logger.error("%s", reason)
        self.last_error = reason
        self.store.append_history(self.paths.name, "worker_hung", error=reason)
        worker.draining = True
        worker.kill_at = time.monotonic() + HUNG_KILL_S
        with contextlib.suppress(ProcessLookupError):
            worker.popen.send_signal(signal.SIGTERM)
        if self.current is not None and worker.generation == self.current.number:
            self.respawn_at[worker.index] = time.monotonic()
            # Only a worker started in its place heals it: a pending update's hung worker is not
            # replaced (the update goes on or fails), so no `worker_recovered` would ever follow.
            self.healing[worker.index] = ("worker_hung", reason, time.time())

    # -- a predecessor's workers ---------------------------------------------------------------

    def _tend_orphans(self) -> None:
        """Drain the previous supervisor's workers once our own generation serves."""
        for pid in list(self.orphans):
            if not is_worker(pid, self.paths.root):
                del self.orphans[pid]
                forget_worker_metrics(self.paths.metrics, pid)
                self._worker_gone(pid, "(a previous supervisor's) is gone")
                with contextlib.suppress(OSError):
                    handoff_path(self.paths.root / "run", pid).unlink()
        if not self.orphans or self.orphans_told or self.current is None:
            return
        ready = [w for w in self._workers_of(self.current) if w.ready_at]
        if len(ready) < self.current.spec.config.workers - len(self.given_up):
            return
        self.orphans_told = True
        _logger.info("Generation %d serves; asking the previous supervisor's workers %s to drain",
                     self.current.number, sorted(self.orphans))
        deadline = self._drain_deadline()
        for pid in self.orphans:
            signal_pid(pid, signal.SIGTERM)
            self.orphans[pid] = deadline
        self.store.append_history(self.paths.name, "taken_over", generation=self.current.number,
                                  replaced_pids=sorted(self.orphans))

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        timeline.mark("supervisor: running")
        try:
            spec = load_spec(self.paths.spec)
        except SpecError as exc:
            _logger.error("Unusable deployment spec: %s", exc)
            return 2
        if spec is None:
            _logger.error("No deployment spec at %s", self.paths.spec)
            return 2
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if not self.respawn:  # a respawned one never recreates the folders of a deleted deployment
            (self.paths.root / "run").mkdir(parents=True, exist_ok=True)
        self.lock_fd = take_supervisor_lock(self.paths, wait_s=2.0)
        if self.lock_fd is None:
            _logger.info("Another supervisor of %s is running; leaving it be.", self.paths.name)
            return 0
        previous: dict[str, Any] = read_json(self.paths.status) or {}
        if previous.get("pid") != os.getpid() and is_supervisor(previous.get("pid"), self.paths.root):
            _logger.info("Supervisor %s of %s (started before supervisor locks) is running; leaving it be.",
                         previous.get("pid"), self.paths.name)
            return 0
        if self.respawn and previous.get("state") in (STATUS_STOPPED, STATUS_FAILED):
            _logger.info("%s was %s meanwhile; not starting it again.", self.paths.name, previous.get("state"))
            return 0
        self._adopt(previous)
        self.paths.requests.mkdir(parents=True, exist_ok=True)
        self.paths.metrics.mkdir(parents=True, exist_ok=True)
        self._forget_dead_metrics()
        self._forget_dead_handoffs()
        self._count_dead_workers()
        number = max(spec.generation, int(previous.get("generation") or 0) + 1) if previous else spec.generation
        how = "bound"  # how we got the listening socket (told in the history on a takeover)
        try:
            sock = None
            # Keep the port a deployment without a fixed one had: its URL is in the registry's tags.
            port = spec.config.port or previous.get("port")
            if self.inherited_fd is not None:
                sock = adopt_socket(self.inherited_fd, spec.config.host, port)
                if sock is not None:
                    how = "inherited"
                    _logger.info("Serving on the listening socket the worker that started us handed down (fd %d)",
                                 self.inherited_fd)
            if sock is None and self.orphans:
                sock = self._socket_from_orphans(spec.config.host, port)
                how = "handoff" if sock is not None else "beside"
            if sock is None:
                try:
                    sock = bind_socket(spec.config.host, port, beside_orphans=bool(self.orphans))
                except OSError:
                    if spec.config.port or not port:
                        raise
                    sock = bind_socket(spec.config.host, None)
            self.current = self._new_generation(spec, number, sock)
        except OSError as exc:
            self.last_error = f"Cannot bind {spec.config.host}:{spec.config.port}: {exc}"
            self.state = STATUS_FAILED
            self._write_status()
            return 1
        self.forking = become_subreaper()
        if not self.forking:
            _logger.warning("Cannot adopt forked workers (prctl PR_SET_CHILD_SUBREAPER failed): the warm "
                            "standby and the workers each run their own interpreter")
        elif spec.config.warm_standby:
            self._standby_first(self.current)
        self.first_workers = (self.current, time.monotonic() + STANDBY_FIRST_WAIT_S)
        self._start_first_workers()
        self._write_status()
        if self.orphans:
            self.store.append_history(self.paths.name, "supervisor_replaced", serving_pids=sorted(self.orphans),
                                      generation=number, socket=how)
        while True:
            self._tick()
            if self.stop_requested is not None or self.state == STATUS_FAILED:
                break
            self._wait_tick()
        return self._shutdown()

    def _wait_tick(self) -> None:
        """Wait for the next tick, or less: until a worker says something on its ready pipe.

        A worker's ``loaded`` then gets its ``go`` at once (and its ``ready`` is in status.json at
        once), not at the end of a tick: on a cold start that waited ~25 ms on average each time.
        """
        fds = [w.ready_fd for w in self.workers.values() if not w.pipe_closed]
        if not fds:
            time.sleep(TICK_S)
            return
        try:
            select.select(fds, [], [], TICK_S)
        except (OSError, ValueError):  # a pipe closed under us: the next tick reaps its worker
            time.sleep(TICK_S)

    def _adopt(self, previous: dict[str, Any]) -> None:
        """Take over from a previous supervisor that died: its serving workers become orphans we
        drain once our generation serves; its agent goes now (we start our own)."""
        root = self.paths.root
        self.orphans = {pid: None for pid in live_workers(previous, root)}
        for pid in status_pids(previous, "agent_pid"):
            if is_agent(pid, root):
                signal_pid(pid, signal.SIGTERM)
        if not previous:
            return
        self.restarts = int(previous.get("restarts") or 0)
        self.bad_requests = int(previous.get("bad_requests") or 0)
        self.oom_kills = int(previous.get("oom_kills") or 0)
        self.hung_replaced = int(previous.get("hung_replaced") or 0)
        self.capture_loss.lost = int(previous.get("capture_lost") or 0)
        if previous.get("state") not in (STATUS_STOPPED, STATUS_FAILED):
            self.takeovers = int(previous.get("takeovers") or 0) + 1
        if self.orphans:
            _logger.warning("Taking over %s: workers %s of the previous supervisor keep serving until ours are "
                            "ready", self.paths.name, sorted(self.orphans))
            self.ever_ready = True  # the service is up: a crash of ours is a crash, not a failed create

    def _socket_from_orphans(self, host: str, port: int | None) -> socket.socket | None:
        """The very socket the previous supervisor's workers serve on, handed over by one of them
        (``handoff.py``); None if none would (then we bind beside them, and say what that costs)."""
        run_dir = self.paths.root / "run"
        deadline = time.monotonic() + HANDOFF_TOTAL_S
        refusals: list[str] = []
        for pid in self.orphans:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                refusals.append("out of time")
                break
            try:
                fd = request_socket(handoff_path(run_dir, pid), self.paths.root, min(REQUEST_TIMEOUT_S, remaining))
            except HandoffRefused as exc:
                refusals.append(f"worker {pid}: {exc}")
                continue
            sock = adopt_socket(fd, host, port)
            if sock is None:  # adopt_socket closed it
                refusals.append(f"worker {pid}: its socket is not a listening socket on {host}:{port}")
                continue
            _logger.info("Took over the listening socket %s:%s from worker %d by handoff: the previous "
                         "workers and ours share one socket, so nothing queued on it is reset", host,
                         sock.getsockname()[1], pid)
            return sock
        _logger.warning("No worker of the previous supervisor handed over its listening socket (%s); binding "
                        "beside them with SO_REUSEPORT: connections still queued on their socket are reset "
                        "when the last of them closes it", "; ".join(refusals) or "none asked")
        return None

    def _count_dead_workers(self) -> None:
        """Liveness files of workers that died while no supervisor watched (everything killed, a
        reboot): count the capture they held, once, and remove them."""
        with contextlib.suppress(OSError):
            # <pid> and <pid>.shadow: a shadow tally without its liveness file is counted too.
            names = {path.name.removesuffix(SHADOW_SUFFIX) for path in liveness_dir(self.paths.root / "run").iterdir()}
            for pid in sorted(int(name) for name in names if name.isdigit()):
                if pid in self.orphans or is_worker(pid, self.paths.root):
                    continue  # alive, just not ours to adopt (status.json did not name it)
                self._worker_gone(pid, "died while no supervisor watched")

    def _forget_dead_handoffs(self) -> None:
        """Control sockets of workers that are gone (killed before they could remove them)."""
        with contextlib.suppress(OSError):
            for path in handoff_dir(self.paths.root / "run").glob("*.sock"):
                if not (path.stem.isdigit() and int(path.stem) in self.orphans):
                    with contextlib.suppress(OSError):
                        path.unlink()

    def _forget_dead_metrics(self) -> None:
        """Live gauges of processes that are gone are dropped; counters stay, so totals keep counting."""
        if not self.orphans:
            for stale in self.paths.metrics.glob("*.db"):
                stale.unlink()
            return
        for path in self.paths.metrics.glob("*.db"):
            pid = path.stem.rpartition("_")[2]
            if pid.isdigit() and int(pid) not in self.orphans:
                forget_worker_metrics(self.paths.metrics, int(pid))

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.stop_requested is None:
            self.stop_requested = "signal"

    def _tick(self) -> None:
        for worker in list(self.workers.values()):
            worker.read_pipe()
        self._start_first_workers()
        self._release_loaded()
        self._reap()
        self._check_liveness()
        self._respawn_due()
        self._announce_recovered()
        self._advance_update()
        self._answer_drained()
        self._handle_requests()
        self._tend_orphans()
        self._kill_overdue()
        self._refresh_state()
        if self.ever_ready:  # not before: the converter's imports would slow the cold start
            self._keep_agent()
            self._keep_standby()
            self.converter.tend(lambda: self._child_env(None))
        if time.monotonic() >= self._next_log_check:
            self._next_log_check = time.monotonic() + LOG_CHECK_S
            rotate_logs(self.paths.logs)
        self._write_status()

    def _release_loaded(self) -> None:
        """Workers accept only once their whole generation has loaded: no mix of old and new
        versions while a slower new worker is still loading, and nothing new serves if one fails."""
        for generation in (self.current, self.pending.generation if self.pending else None):
            workers = self._workers_of(generation)
            if workers and all(w.loaded_at for w in workers):
                for worker in workers:
                    if not worker.released:
                        worker.release()
            if generation is self.current:
                for worker in workers:  # restarts of the serving generation go at once
                    if worker.loaded_at and not worker.released:
                        worker.release()

    def _reap(self) -> None:
        self.oom.poll()
        if self.forking and time.monotonic() >= self._next_reap_adopted:
            # Orphans of our descendants (a killed worker's shadow process) are ours to reap now.
            self._next_reap_adopted = time.monotonic() + REAP_ADOPTED_S
            known = set(self.workers) | {p.pid for p in (self.agent, self.converter.popen) if p is not None}
            reap_adopted(known)
        for pid, worker in list(self.workers.items()):
            code = worker.popen.poll()
            if code is None:
                continue
            worker.read_pipe()
            os.close(worker.ready_fd)
            del self.workers[pid]
            forget_worker_metrics(self.paths.metrics, pid)
            how, cause = _exit_description(code), None
            if code == -signal.SIGKILL and not worker.draining:
                # Not killed by us (we kill only draining or hung workers, marked draining): a
                # person, or the OOM killer. Say which when the cgroup tells (a standby's too, so
                # its OOM kill is not read as a later kill -9's).
                cause = self.oom.cause_of_sigkill()
                how = describe_sigkill(cause)
                if cause == OOM:
                    self.oom_kills += 1
            # Whatever way it went (crashed, killed while draining or hung): what it held is counted.
            live = self._worker_gone(pid, how)
            with contextlib.suppress(OSError):
                handoff_path(self.paths.root / "run", pid).unlink()
            if worker.draining or worker.generation == -1:
                if worker is self.standby:  # it died on its own (a released one is no longer self.standby)
                    self._standby_died(worker, how)
                continue
            if self._retry_unforked(worker, how):
                continue
            reason = worker.error or f"worker {how}: {_log_tail(worker.log_path)}"
            if self.pending and worker.generation == self.pending.generation.number:
                self._fail_update(reason, cause)
            elif self.current and worker.generation == self.current.number:
                self._on_crash(worker, self.current, reason, live, cause)

    def _standby_died(self, standby: Worker, how: str) -> None:
        """The warm standby died on its own: the next one starts at once if this one had served as a
        standby for STANDBY_HEALTHY_S, else after a backoff (one that cannot start, or that is killed
        soon after it gets ready, would fail again: a broken environment, OOM)."""
        self._release_standby()
        ready_for = None if standby.standby_ready_at is None else time.monotonic() - standby.standby_ready_at
        if ready_for is not None and ready_for >= STANDBY_HEALTHY_S:
            self.standby_failures, self.standby_error = 0, None
            _logger.warning("Warm standby pid %d %s; starting another", standby.pid, how)
            return
        self._standby_failed(standby, how + (" before it was ready" if ready_for is None
                                             else f" {ready_for:.0f}s after it got ready"))

    def _standby_failed(self, standby: Worker, what: str) -> None:
        """Count a failed standby and put the next one off (doubling from STANDBY_FIRST_BACKOFF_S)."""
        self.standby_failures += 1
        delay = min(STANDBY_MAX_BACKOFF_S, STANDBY_FIRST_BACKOFF_S * 2 ** (self.standby_failures - 1))
        self.standby_restart_at = time.monotonic() + delay
        self.standby_error = (f"warm standby pid {standby.pid} {what} ({self.standby_failures} in a row; the next "
                              f"one starts in {delay:g}s): {_log_tail(standby.log_path)}")
        _logger.warning("%s", self.standby_error)

    def _retry_unforked(self, worker: Worker, how: str) -> bool:
        """A worker the standby forked died before its model loaded: start it once more as a fresh
        interpreter (True) instead of counting the failure. Some models cannot load in a forked
        process (CUDA initialised in the standby by its warm-up load, a native thread pool it
        started); if the fresh one loads, :meth:`_keep_standby` stops forking. A version that cannot
        load at all fails the fresh one too, which is then judged as any worker."""
        if not self.forking or not isinstance(worker.popen, ForkedChild) or worker.loaded_at:
            return False
        generation = next((g for g in (self.pending.generation if self.pending else None, self.current)
                           if g is not None and g.number == worker.generation), None)
        if generation is None:
            return False
        _logger.warning("Worker pid %d, forked by the warm standby, %s before its model loaded; starting worker "
                        "%d of generation %d again as a fresh interpreter", worker.pid, how, worker.index,
                        generation.number)
        self._start_process(generation, worker.index).fork_retry = True
        return True

    def _on_crash(self, worker: Worker, current: Generation, reason: str, live: Liveness | None = None,
                  cause: str | None = None) -> None:
        """``worker`` of the serving generation ``current`` died: restart it, or give up on it.
        ``cause``: for a SIGKILL, ``oom``, ``killed`` or ``killed (cause unknown)`` (``oom.py``),
        recorded in the history entry."""
        why = {"cause": cause} if cause is not None else {}
        self.last_error = reason
        if not self.ever_ready:
            # A model that never came up will not come up on retry: fail create with the reason.
            _logger.error("Worker failed before becoming ready: %s", reason)
            self.state = STATUS_FAILED
            return
        # The event the fault is written as (bad_request or crashed, below); forgotten where it is not restarted.
        busy = worker.ready_at and live is not None and live.busy_since
        self.healing[worker.index] = ("bad_request" if busy else "crashed", reason, time.time())
        if worker.ready_at and live is not None and live.busy_since:
            # It died inside a model call: a request killed it (a segfaulting native model, memory
            # blown by one input). The client's fault, not the version's: count it, restart at once.
            self.bad_requests += 1
            self.restarts += 1
            self.last_error = (f"a request of {live.busy_rows} row(s) killed worker {worker.index} while it was "
                               f"predicting ({self.bad_requests} such request(s) so far): {reason}")
            _logger.warning("%s", self.last_error)
            self.store.append_history(self.paths.name, "bad_request", error=reason, rows=live.busy_rows,
                                      model_version=current.spec.model.model_version, **why)
            self.respawn_at[worker.index] = time.monotonic()
            return
        served = live is not None and live.predicts > 0
        if worker.ready_at and (served or time.time() - worker.ready_at > HEALTHY_RESET_S):
            # It had served: the version stays up. Something outside killed it (kill -9, the OOM killer).
            self.crashes_in_row = 0
            self.restarts += 1
            _logger.warning("Worker %d died after serving (%s); restarting it", worker.index, reason)
            self.store.append_history(self.paths.name, "crashed", error=reason, restarts=self.restarts, **why)
            self.respawn_at[worker.index] = time.monotonic()
            return
        # It died before serving anything: the version may not be able to stay up. That is what
        # the crash budget is for.
        self.crashes_in_row += 1
        max_restarts = current.spec.config.max_restarts
        self.store.append_history(self.paths.name, "crashed", error=reason, restarts=self.restarts, **why)
        if self.crashes_in_row > max_restarts:
            others = [w for w in self._workers_of(current) if w.ready_at and w is not worker]
            message = f"worker {worker.index} crashed {self.crashes_in_row} times in a row before serving"
            if others or self.orphans:
                # Healthy workers are never stopped for it: serve with fewer until the next update.
                _logger.error("%s; no longer restarting it: %s", message, reason)
                self.given_up.add(worker.index)
                self.healing.pop(worker.index, None)
                self.last_error = f"{message}; no longer restarted (an update starts it again): {reason}"
                self.store.append_history(self.paths.name, "worker_given_up", error=reason, index=worker.index)
                return
            _logger.error("%s; giving up: %s", message, reason)
            self.state = STATUS_FAILED
            self.healing.pop(worker.index, None)
            self.store.append_history(self.paths.name, "failed", error=reason)
            return
        delay = min(MAX_BACKOFF_S, 0.5 * 2 ** (self.crashes_in_row - 1))
        self.restarts += 1
        _logger.warning("Worker %d crashed (%s); restart %d in %.1fs", worker.index, reason, self.restarts, delay)
        self.respawn_at[worker.index] = time.monotonic() + delay

    def _announce_recovered(self) -> None:
        """Write ``worker_recovered`` once the worker started in place of a crashed, killed or hung one
        serves (said ready after the fault): the fault's "healed", for alert receivers."""
        if not self.healing or self.current is None:
            return
        for worker in self._workers_of(self.current):
            fault = self.healing.get(worker.index)
            if fault is None or worker.draining or worker.ready_at is None or worker.ready_at < fault[2]:
                continue
            del self.healing[worker.index]
            self.store.append_history(self.paths.name, "worker_recovered", index=worker.index, pid=worker.pid,
                                      fault=fault[0], error=fault[1][:500],
                                      down_s=round(worker.ready_at - fault[2], 2))

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self.respawn_at.items()):
            if when <= now and self.current is not None:
                del self.respawn_at[index]
                self._spawn(self.current, index)

    # -- updates -------------------------------------------------------------------------------

    def _handle_requests(self) -> None:
        for request_id, request in self.mailbox.new_requests():
            op = request.get("op")
            if op == "stop":
                self.stop_requested = request_id
            elif op == "update":
                try:
                    spec = DeploymentSpec.from_dict(request.get("spec"))
                except SpecError as exc:
                    self._answer(request_id, ok=False, error=f"unusable spec: {exc}")
                    continue
                self._start_update(request_id, spec, request.get("reason", "update"))
            else:
                self._answer(request_id, ok=False, error=f"unknown request {op!r}")

    def _start_update(self, request_id: str, spec: DeploymentSpec, reason: str) -> None:
        if self.pending is not None:
            self._answer(request_id, ok=False, error="another update is in progress; retry when it ends")
            return
        number = (self.current.number if self.current else 0) + 1
        try:
            generation = self._new_generation(spec, number)
        except OSError as exc:
            self._answer(request_id, ok=False, error=f"cannot bind the new address: {exc}")
            return
        timeout = spec.config.startup_timeout_s
        _logger.info("Update to generation %d (%s) requested: %s", number, spec.model.version_uri, reason[:200])
        self.pending = PendingUpdate(request_id, generation, time.monotonic() + timeout, reason)
        for index in range(spec.config.workers):
            self._spawn(generation, index)

    def _answer_drained(self) -> None:
        if self.answer_when_drained is None:
            return
        request_id, old_workers, deadline = self.answer_when_drained
        if all(w.stopped_accepting or w.popen.poll() is not None for w in old_workers) \
                or time.monotonic() > deadline:
            self.answer_when_drained = None
            self._answer(request_id, ok=True)

    def _advance_update(self) -> None:
        pending = self.pending
        if pending is None:
            return
        new_workers = self._workers_of(pending.generation)
        if new_workers and all(w.ready_at for w in new_workers):
            old = self.current
            self.current = pending.generation
            self.pending = None
            self.respawn_at.clear()
            self.healing.clear()  # a new generation serves: `updated` says so
            self.given_up.clear()
            self.crashes_in_row = 0
            self.ever_ready = True
            self.store.write_spec(pending.generation.spec.replace(generation=pending.generation.number))
            old_workers = self._workers_of(old)
            if old is not None:
                self._drain(old_workers)
                if old.sock is not self.current.sock:
                    old.sock.close()
            self.state = STATUS_RUNNING
            self._write_status()
            self.answer_when_drained = (pending.request_id, old_workers, time.monotonic() + 5.0)
        elif time.monotonic() > pending.deadline:
            self._fail_update(f"new version not ready within startup_timeout_s "
                              f"({pending.generation.spec.config.startup_timeout_s:g}s)")

    def _fail_update(self, reason: str, cause: str | None = None) -> None:
        """Abandon the pending update; its requester is answered with ``reason`` and, when a new
        worker died of SIGKILL, ``cause`` (``oom``, ``killed`` or ``killed (cause unknown)``), which
        its ``update_failed`` history entry carries as ``bad_request`` / ``crashed`` entries do."""
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        abandoned = self._workers_of(pending.generation)
        # Never released, they hold no connection: no drain needed, and SIGKILL also stops model
        # code that ignores SIGTERM.
        for worker in abandoned:
            worker.draining = True
            with contextlib.suppress(ProcessLookupError):
                worker.popen.kill()
        if self.current is None or pending.generation.sock is not self.current.sock:
            pending.generation.sock.close()
        _logger.warning("Update failed, the current version keeps serving: %s", reason)
        self._answer(pending.request_id, ok=False, error=reason, **({"cause": cause} if cause is not None else {}))

    def _answer(self, request_id: str, ok: bool, error: str | None = None, **more: Any) -> None:
        self.mailbox.answer(request_id, {"ok": ok, "error": error, "status": self._status(), **more})

    # -- status --------------------------------------------------------------------------------

    def _refresh_state(self) -> None:
        if self.state == STATUS_FAILED:
            return
        workers = self._workers_of(self.current)
        wanted = self.current.spec.config.workers if self.current else 1
        ready = [w for w in workers if w.ready_at]
        if len(ready) == wanted:
            if not self.ever_ready:
                timeline.mark("supervisor: all workers ready, status running")
            self.ever_ready = True
            self.state = STATUS_RUNNING
        elif self.orphans and not self.orphans_told:
            self.state = STATUS_RUNNING  # the previous supervisor's workers serve while ours start
        elif self.ever_ready:
            self.state = STATUS_UNHEALTHY
        else:
            self.state = STATUS_STARTING

    def _status(self) -> dict[str, Any]:
        spec = self.current.spec if self.current else None
        host, port = (self.current.sock.getsockname()[:2] if self.current and self.current.sock.fileno() >= 0
                      else (spec.config.host, spec.config.port) if spec else (None, None))
        url_host = f"[{host}]" if ":" in str(host) else host
        if host in ("0.0.0.0", "::"):
            url_host = "127.0.0.1"
        current_workers = self._workers_of(self.current)
        others = sorted({w.pid for w in self.workers.values() if w not in current_workers
                         and w is not self.standby} | set(self.orphans))
        return {
            "state": self.state,
            "pid": os.getpid(),
            "worker_pids": sorted(w.pid for w in current_workers),
            "host": host,
            "port": port,
            "url": f"{spec.config.scheme if spec else 'http'}://{url_host}:{port}",  # https with -C tls_cert
            "model_version": spec.model.model_version if spec else None,
            "traffic": [[share.model.model_version, share.percent] for share in spec.shares()] if spec else [],
            "generation": self.current.number if self.current else None,
            "restarts": self.restarts,
            "started_at": self.started_at,
            "last_error": self.last_error,
            "updating": self.pending is not None,
            "standby_pid": self.standby.pid if self.standby is not None else None,
            "standby_error": self.standby_error,
            "agent_pid": self.agent.pid if self.agent is not None and self.agent.poll() is None else None,
            "converter_pid": self.converter.pid,
            # Pending, draining and hung workers, and a previous supervisor's: every process a
            # successor (or a test's clean-up) must find.
            "other_pids": others,
            "serving_pids": sorted({w.pid for w in current_workers if w.ready_at}
                                   | {pid for pid, told in self.orphans.items() if told is None}),
            "bad_requests": self.bad_requests,
            "oom_kills": self.oom_kills,
            "hung_replaced": self.hung_replaced,
            **self.capture_loss.status(),
            "takeovers": self.takeovers,
            "given_up_workers": sorted(self.given_up),
        }

    def _write_status(self) -> None:
        status = self._status()
        if status != self._last_status:
            self._last_status = status
            write_json_atomic(self.paths.status, dict(status, updated_at=time.time()))

    def _shutdown(self) -> int:
        failed = self.state == STATUS_FAILED
        if self.pending is not None:
            self._fail_update("deployment is stopping")
        if self.answer_when_drained is not None:
            self._answer(self.answer_when_drained[0], ok=True)
            self.answer_when_drained = None
        self._release_standby()
        everyone = list(self.workers.values())
        self._drain(everyone)
        for pid in self.orphans:
            signal_pid(pid, signal.SIGTERM)
        if self.agent is not None and self.agent.poll() is None:
            self.agent.terminate()
        grace = (self.current.spec.config.timeout_s if self.current else 60.0) + DRAIN_MARGIN_S
        deadline = time.monotonic() + grace

        def anyone_left() -> bool:
            return (any(w.popen.poll() is None for w in everyone)
                    or any(is_worker(pid, self.paths.root) for pid in self.orphans))

        while anyone_left() and time.monotonic() < deadline:
            self.converter.tend(lambda: self._child_env(None))  # the writers wait for their last segments
            time.sleep(TICK_S)
        for worker in everyone:
            if worker.popen.poll() is None:
                _logger.warning("Worker %d did not drain in %.0fs; killing it", worker.pid, grace)
                worker.popen.kill()
                worker.popen.wait()
            # A drained worker closed its capture writer (nothing held); a killed one may not have.
            self._worker_gone(worker.pid, _exit_description(worker.popen.returncode))
        killed = [pid for pid in self.orphans if is_worker(pid, self.paths.root) and signal_pid(pid, signal.SIGKILL)]
        # Not our children (no wait()): their capture tallies are read once they are gone, not while
        # the SIGKILL may still be on its way.
        if stuck := wait_workers_gone(killed, self.paths.root, ORPHAN_KILL_WAIT_S):
            _logger.warning("Orphaned workers %s still run %.0fs after SIGKILL; counting their capture as it "
                            "stands", stuck, ORPHAN_KILL_WAIT_S)
        for pid in self.orphans:
            forget_worker_metrics(self.paths.metrics, pid)
            self._worker_gone(pid, "(a previous supervisor's) stopped")
        self.orphans.clear()
        self.workers.clear()
        # Nothing writes to the spool now: a last pass converts what every writer left.
        self.converter.stop(lambda: self._child_env(None), grace)
        if self.agent is not None:
            try:
                self.agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        if not failed:
            self.state = STATUS_STOPPED
        self._write_status()
        if self.stop_requested and self.stop_requested != "signal":
            self._answer(self.stop_requested, ok=True)
        return 1 if failed else 0


def _wait_for_go(log_path: Path) -> bool:
    """Wait for ``go`` on stdin (see ``processes.spawn_supervisor``), then log to ``log_path`` as a
    supervisor spawned with its log does; False on anything else (the create failed: exit)."""
    if sys.stdin.readline().strip() != "go":
        return False
    timeline.mark("supervisor: told to go")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    for source, target in ((null_fd, 0), (log_fd, 1), (log_fd, 2)):
        os.dup2(source, target)
    os.close(log_fd)
    os.close(null_fd)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlflow_deploy_plugin.engines.local.supervisor")
    parser.add_argument("deployment_dir", type=Path)
    parser.add_argument("--respawn", action="store_true",
                        help="started by an orphaned worker or agent: do nothing for a stopped deployment")
    parser.add_argument("--fd", type=int, default=None, help="inherited listening socket to serve on")
    parser.add_argument("--wait-for-go", action="store_true",
                        help="started before the deployment's folder is ready: wait for 'go' on stdin "
                             "(end of file: exit) before touching it, then log to its logs/supervisor.log")
    args = parser.parse_args(argv)
    timeline.mark_process_start("supervisor")
    if args.wait_for_go and not _wait_for_go(args.deployment_dir / "logs" / "supervisor.log"):
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [supervisor %(process)d] %(message)s")
    return Supervisor(DeploymentPaths(args.deployment_dir.resolve()), respawn=args.respawn,
                      inherited_fd=args.fd).run()


if __name__ == "__main__":
    sys.exit(main())
