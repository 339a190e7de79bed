"""The supervisor of one local deployment: owns the port, runs workers, restarts them, swaps them.

It is a small, long-lived process (standard library only, so it holds a few MB, not a copy of
MLflow) started detached by ``create`` so the service outlives the CLI call. It:

- binds the listening socket once and hands it to every worker, so updates never refuse a
  connection: new workers accept beside the old ones, then the old ones drain;
- restarts crashed workers with exponential backoff and gives up (status ``failed``) after
  ``max_restarts`` crashes in a row;
- takes requests (update, stop) from the CLI through its mailbox (``mailbox.py``);
- keeps the deployment's background agent running while the spec needs one;
- is the only writer of ``status.json``.

It imports only the standard library and the spec/state modules (and its own mailbox and worker
protocol): a test reads its import graph to keep it that way.

Run as ``python -m mlflow_deploy_plugin.engines.local.supervisor DEPLOYMENT_DIR``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow_deploy_plugin.engines.local.worker_protocol as protocol
from mlflow_deploy_plugin.engines.local.mailbox import Mailbox
from mlflow_deploy_plugin.spec import DeploymentSpec, SpecError, load_spec, spec_to_json
from mlflow_deploy_plugin.state import (
    STATUS_FAILED,
    STATUS_RUNNING,
    STATUS_STARTING,
    STATUS_STOPPED,
    STATUS_UNHEALTHY,
    DeploymentPaths,
    StateStore,
    write_json_atomic,
)

_logger = logging.getLogger("mlflow_deploy_plugin.supervisor")
TICK_S = 0.05
HEALTHY_RESET_S = 60.0  # uptime after which a worker's crash no longer counts as "in a row"
MAX_BACKOFF_S = 30.0


@dataclass
class Worker:
    popen: subprocess.Popen[bytes]
    generation: int
    index: int
    ready_fd: int
    log_path: Path
    started_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    error: str | None = None
    draining: bool = False
    standby_ready: bool = False  # a warm standby that finished its imports
    loaded_at: float | None = None  # model loaded and smoke-tested; waiting for "go" to accept
    released: bool = False
    stopped_accepting: bool = False  # draining: answers what it has, takes no new connection
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

    def read_pipe(self) -> None:
        """Pick up what the worker said on its ready pipe (non-blocking)."""
        try:
            while chunk := os.read(self.ready_fd, 4096):
                self._buffer += chunk
        except (BlockingIOError, OSError):
            pass
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            event, detail = protocol.parse(line.decode(errors="replace"))
            if event == protocol.READY and self.ready_at is None:
                self.ready_at = time.time()
            elif event == protocol.STANDBY:
                self.standby_ready = True
            elif event == protocol.LOADED and self.loaded_at is None:
                self.loaded_at = time.time()
            elif event == protocol.DRAINING:
                self.stopped_accepting = True
            elif event == protocol.ERROR:
                self.error = detail or "unknown error"


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


def bind_socket(host: str, port: int | None) -> socket.socket:
    """Bind the deployment's listening socket (port 0 = a free port chosen by the kernel)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port or 0))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """Runs and watches the workers of one deployment until asked to stop."""

    def __init__(self, paths: DeploymentPaths) -> None:
        self.paths = paths
        self.store = StateStore(paths.root.parent.parent)
        self.workers: dict[int, Worker] = {}
        self.current: Generation | None = None
        self.pending: PendingUpdate | None = None
        self.restarts = 0
        self.crashes_in_row = 0
        self.respawn_at: dict[int, float] = {}  # worker index -> when to start it again
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

    # -- workers -------------------------------------------------------------------------------

    def _spawn(self, generation: Generation, index: int) -> Worker:
        standby = self.standby
        if (standby is not None and standby.standby_ready and self.standby_sock is generation.sock
                and standby.popen.poll() is None):
            # A warm process (imports done) takes the work: the swap costs only the model load.
            self.standby = None
            try:
                standby.tell(str(generation.spec_file))
            except OSError:
                pass
            else:
                standby.generation, standby.index, standby.started_at = generation.number, index, time.time()
                _logger.info("Standby pid %d takes worker %d of generation %d", standby.pid, index,
                             generation.number)
                return standby
        return self._start_process(generation, index)

    def _keep_standby(self) -> None:
        """Keep one warm process ready for the next swap or restart (``-C warm_standby``)."""
        current = self.current
        if current is None or not current.spec.config.warm_standby or self.pending is not None:
            return
        if self.standby is not None and (self.standby.popen.poll() is not None or self.standby_sock is not current.sock):
            self._release_standby()
        if self.standby is None and all(w.ready_at for w in self._workers_of(current)):
            self.standby_sock = current.sock
            self.standby = self._start_process(current, -1, standby=True)

    def _release_standby(self) -> None:
        standby, self.standby = self.standby, None
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
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        self._standby_count = getattr(self, "_standby_count", 0) + int(standby)
        name = f"standby-{self._standby_count}" if standby else f"{generation.number}-{index}"
        log_path = self.paths.logs / f"worker-{name}.log"
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(self.paths.metrics), PYTHONUNBUFFERED="1",
                   MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        what = ["--standby", str(generation.spec_file)] if standby else ["--spec", str(generation.spec_file)]
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "mlflow_deploy_plugin.serving.worker", *what,
                 "--fd", str(generation.sock.fileno()), "--ready-fd", str(write_fd)],
                pass_fds=(generation.sock.fileno(), write_fd),
                stdin=subprocess.PIPE,
                stdout=log, stderr=log, env=env,
            )
        os.close(write_fd)
        worker = Worker(popen, -1 if standby else generation.number, index, read_fd, log_path)
        self.workers[popen.pid] = worker
        _logger.info("Started %s (pid %d)", "warm standby" if standby else
                     f"worker {index} of generation {generation.number}", popen.pid)
        return worker

    def _new_generation(self, spec: DeploymentSpec, number: int) -> Generation:
        config = spec.config
        same_address = self.current is not None and (
            self.current.spec.config.host, self.current.spec.config.port) == (config.host, config.port)
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
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def _workers_of(self, generation: Generation | None) -> list[Worker]:
        if generation is None:
            return []
        return [w for w in self.workers.values() if w.generation == generation.number and not w.draining]

    def _drain(self, workers: list[Worker]) -> None:
        for worker in workers:
            worker.draining = True
            with contextlib.suppress(ProcessLookupError):
                worker.popen.send_signal(signal.SIGTERM)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
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
        self.paths.requests.mkdir(parents=True, exist_ok=True)
        self.paths.metrics.mkdir(parents=True, exist_ok=True)
        for stale in self.paths.metrics.glob("*.db"):
            stale.unlink()
        try:
            self.current = self._new_generation(spec, spec.generation)
        except OSError as exc:
            self.last_error = f"Cannot bind {spec.config.host}:{spec.config.port}: {exc}"
            self.state = STATUS_FAILED
            self._write_status()
            return 1
        for index in range(spec.config.workers):
            self._spawn(self.current, index)
        self._write_status()
        while True:
            self._tick()
            if self.stop_requested is not None or self.state == STATUS_FAILED:
                break
            time.sleep(TICK_S)
        return self._shutdown()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.stop_requested is None:
            self.stop_requested = "signal"

    def _tick(self) -> None:
        for worker in list(self.workers.values()):
            worker.read_pipe()
        self._release_loaded()
        self._reap()
        self._respawn_due()
        self._advance_update()
        self._answer_drained()
        self._handle_requests()
        self._refresh_state()
        if self.ever_ready:
            self._keep_agent()
            self._keep_standby()
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
        for pid, worker in list(self.workers.items()):
            code = worker.popen.poll()
            if code is None:
                continue
            worker.read_pipe()
            os.close(worker.ready_fd)
            del self.workers[pid]
            forget_worker_metrics(self.paths.metrics, pid)
            if worker.draining or worker.generation == -1:
                if worker is self.standby:
                    self.standby = None
                continue
            reason = worker.error or f"worker {_exit_description(code)}: {_log_tail(worker.log_path)}"
            if self.pending and worker.generation == self.pending.generation.number:
                self._fail_update(reason)
            elif self.current and worker.generation == self.current.number:
                self._on_crash(worker, self.current, reason)

    def _on_crash(self, worker: Worker, current: Generation, reason: str) -> None:
        """``worker`` of the serving generation ``current`` died: restart it, or give up."""
        self.last_error = reason
        if not self.ever_ready:
            # A model that never came up will not come up on retry: fail create with the reason.
            _logger.error("Worker failed before becoming ready: %s", reason)
            self.state = STATUS_FAILED
            return
        if worker.ready_at and time.time() - worker.ready_at > HEALTHY_RESET_S:
            self.crashes_in_row = 0
        self.crashes_in_row += 1
        max_restarts = current.spec.config.max_restarts
        self.store.append_history(self.paths.name, "crashed", error=reason, restarts=self.restarts)
        if self.crashes_in_row > max_restarts:
            _logger.error("Worker crashed %d times in a row; giving up: %s", self.crashes_in_row, reason)
            self.state = STATUS_FAILED
            self.store.append_history(self.paths.name, "failed", error=reason)
            return
        delay = min(MAX_BACKOFF_S, 0.5 * 2 ** (self.crashes_in_row - 1))
        self.restarts += 1
        _logger.warning("Worker %d crashed (%s); restart %d in %.1fs", worker.index, reason, self.restarts, delay)
        self.respawn_at[worker.index] = time.monotonic() + delay

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

    def _fail_update(self, reason: str) -> None:
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
        self._answer(pending.request_id, ok=False, error=reason)

    def _answer(self, request_id: str, ok: bool, error: str | None = None) -> None:
        self.mailbox.answer(request_id, {"ok": ok, "error": error, "status": self._status()})

    # -- status --------------------------------------------------------------------------------

    def _refresh_state(self) -> None:
        if self.state == STATUS_FAILED:
            return
        workers = self._workers_of(self.current)
        wanted = self.current.spec.config.workers if self.current else 1
        ready = [w for w in workers if w.ready_at]
        if len(ready) == wanted:
            self.ever_ready = True
            self.state = STATUS_RUNNING
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
            "agent_pid": self.agent.pid if self.agent is not None and self.agent.poll() is None else None,
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
        if self.agent is not None and self.agent.poll() is None:
            self.agent.terminate()
        grace = (self.current.spec.config.timeout_s if self.current else 60.0) + 10
        deadline = time.monotonic() + grace
        while any(w.popen.poll() is None for w in everyone) and time.monotonic() < deadline:
            time.sleep(TICK_S)
        for worker in everyone:
            if worker.popen.poll() is None:
                _logger.warning("Worker %d did not drain in %.0fs; killing it", worker.pid, grace)
                worker.popen.kill()
                worker.popen.wait()
        self.workers.clear()
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


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m mlflow_deploy_plugin.engines.local.supervisor DEPLOYMENT_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [supervisor %(process)d] %(message)s")
    return Supervisor(DeploymentPaths(Path(args[0]).resolve())).run()


if __name__ == "__main__":
    sys.exit(main())
