"""A serving worker process: load one model version, then serve it on a socket it inherited.

The supervisor owns the listening socket and passes it to every worker, so a new worker can
start accepting on the same port before the old one stops: that is how updates swap versions
without refusing a single connection. On SIGTERM a worker drains: it stops accepting, answers
what it has (telling keep-alive clients to reconnect), then exits.

If its supervisor dies (``kill -9``, OOM killer), a worker started with ``--on-orphan serve`` keeps
serving on the socket it holds and starts a new supervisor, handing it that very socket: the new
supervisor starts a fresh generation beside it and then tells it to drain (see
``engines/local/supervisor.py``). The port never closes. A successor started by someone else (the
agent, `mlflow-deploy up`) asks for the socket on the worker's control socket
(``engines/local/handoff.py``), answered until the worker drains. ``run-local`` workers (``--on-orphan
exit``) drain and exit instead: nothing of a foreground run may outlive it.

Liveness (``serving/watchdog.py``, ``engines/local/liveness.py``): the event loop beats a heartbeat
and every model call is timed; a call that does not return within ``timeout_s`` plus a grace makes
the worker answer 503 to everything waiting on it, stop accepting and exit.

Started as ``python -m mlflow_deploy_plugin.serving.worker --spec FILE --fd N --ready-fd M``, or forked
by the warm standby (``--standby HINT --fork-socket K``: imports done, it forks each worker the
supervisor asks for, ``engines/local/forkserver.py``); a forked worker keeps the standby's command line.
It reports on the ready pipe in the words of ``engines/local/worker_protocol.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

# Since when this worker runs (after the interpreter's own start): the cold start's phases are logged against it.
_T0 = time.monotonic()
if __name__ == "__main__":
    # No cyclic garbage collection while the worker imports (MLflow, scikit-learn, SciPy: ~3000 modules):
    # the ~5 full collections that allocation triggers on the way each walk every object made so far.
    # On again once they are done: _gc_on_after_imports.
    gc.disable()

from mlflow_deploy_plugin import timeline  # noqa: E402

if __name__ == "__main__":
    timeline.mark_process_start("worker")
    timeline.mark("worker: running")

import uvicorn  # noqa: E402

from mlflow_deploy_plugin.engines.local import forkserver  # noqa: E402
from mlflow_deploy_plugin.engines.local import worker_protocol as protocol  # noqa: E402
from mlflow_deploy_plugin.engines.local.handoff import HandoffServer, handoff_path  # noqa: E402
from mlflow_deploy_plugin.engines.local.liveness import (  # noqa: E402
    HEARTBEAT_S,
    HUNG_GRACE_S,
    LivenessWriter,
    liveness_dir,
)
from mlflow_deploy_plugin.engines.local.processes import spawn_supervisor, supervisor_lock_held  # noqa: E402
from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef  # noqa: E402
from mlflow_deploy_plugin.state import DeploymentPaths  # noqa: E402

if TYPE_CHECKING:  # imported where used, after argument parsing (see _prepare)
    pass

_logger = logging.getLogger("mlflow_deploy_plugin.worker")
# Warm standbys load the live model once to import what it needs, when it is at most this big.
_WARM_LOAD_MAX_BYTES = 256 * 1024 * 1024
# ... or this big, for a standby that forks the workers: it is started before the first of them
# (on the cold start's path), where a second load of a big model would cost seconds.
_FORK_WARM_LOAD_MAX_BYTES = 16 * 1024 * 1024
# An orphaned worker looks for a supervisor this often (jittered, so orphans do not stampede).
_ORPHAN_CHECK_S = 2.0
EXIT_HUNG = 75  # the worker exited because its model call hung


@dataclass
class Supervision:
    """What a worker does about its supervisor and its own liveness (see the module docstring)."""

    deployment: DeploymentPaths | None = None
    on_orphan: str = "exit"  # "serve": keep serving and start a new supervisor; "exit": drain
    listen_fd: int | None = None
    liveness: LivenessWriter | None = None
    watch: Any = None  # serving.watchdog.PredictWatch, once the model is loaded
    guard: Any = None  # serving.watchdog.HungGuard
    on_hung_exit: Any = None  # flushes capture before the worker leaves
    handoff: HandoffServer | None = None  # hands our listening socket to a successor supervisor


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM drains instead of dropping keep-alive connections."""

    def __init__(self, config: uvicorn.Config, service_state: Any, drain_grace_s: float,
                 on_started: Any, on_stopped_accepting: Any = None, supervision: Supervision | None = None,
                 ready_fd: int | None = None) -> None:
        super().__init__(config)
        self.on_stopped_accepting = on_stopped_accepting
        self._closed_listeners = False
        self.service_state = service_state
        self.drain_grace_s = drain_grace_s
        self.on_started = on_started
        self._drain_deadline: float | None = None
        self._parent = os.getppid()
        self._announced = False
        self.supervision = supervision or Supervision()
        self.ready_fd = ready_fd
        self.hung = False
        self._next_beat = 0.0
        self._next_orphan_check = 0.0
        self._candidates: list[subprocess.Popen[bytes]] = []

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self._announced:  # ready now, not at the next tick (up to 0.1 s later)
            self._announced = True
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.hung and sig == signal.SIGTERM:
            return  # leaving on our own (capture flushed); uvicorn's shutdown would wait on the hung call
        if self._drain_deadline is None and sig in (signal.SIGTERM, signal.SIGINT):
            self.begin_drain()
            return
        super().handle_exit(sig, frame)

    def begin_drain(self) -> None:
        self.service_state.draining = True
        self._drain_deadline = time.monotonic() + self.drain_grace_s

    async def on_tick(self, counter: int) -> bool:
        if self.started and not self._announced:
            self._announced = True
            self.on_started()
        now = time.monotonic()
        supervision = self.supervision
        if supervision.liveness is not None and now >= self._next_beat:
            supervision.liveness.beat()
            self._next_beat = now + HEARTBEAT_S
        if not self.hung and supervision.watch is not None and supervision.watch.hung:
            self._declare_hung()
        if os.getppid() != self._parent:
            self._orphaned(now)
        if self._drain_deadline is not None and not self.should_exit:
            if not self._closed_listeners:
                for server in self.servers:
                    server.close()  # stop accepting; the shared socket stays open for the others
                if supervision.handoff is not None:
                    supervision.handoff.close(wait=False)  # our copy of the socket goes too
                self._closed_listeners = True
                if self.on_stopped_accepting is not None:
                    self.on_stopped_accepting()
            # Exit once keep-alive clients have taken the hint (Connection: close) or at the deadline.
            if not self.server_state.connections or time.monotonic() > self._drain_deadline:
                if self.hung:
                    # uvicorn's shutdown would wait for the hung predict thread forever.
                    if supervision.on_hung_exit is not None:
                        supervision.on_hung_exit()
                    os._exit(EXIT_HUNG)
                self.should_exit = True
        return await super().on_tick(counter)

    def _declare_hung(self) -> None:
        """The model call has not returned within timeout_s + grace: 503 what waits, leave."""
        self.hung = True
        supervision = self.supervision
        busy = supervision.liveness.busy_for() if supervision.liveness is not None else 0.0
        _logger.error("Model call running for %.0fs (timeout_s + %.0fs grace): answering 503 to waiting "
                      "requests and exiting so the supervisor replaces this worker.", busy, HUNG_GRACE_S)
        if supervision.guard is not None:
            supervision.guard.declare_hung()
        if self.ready_fd is not None:
            protocol.report(self.ready_fd, protocol.HUNG, f"model call running for {busy:.0f}s")
        if self._drain_deadline is None:
            self.begin_drain()

    def _orphaned(self, now: float) -> None:
        """Our supervisor is gone: keep serving and get a new one started (or drain, for run-local)."""
        supervision = self.supervision
        if supervision.on_orphan != "serve" or supervision.deployment is None:
            if self._drain_deadline is None:
                _logger.warning("Supervisor is gone; draining and exiting.")
                self.begin_drain()
            return
        if self._drain_deadline is not None or now < self._next_orphan_check:
            return  # draining: our socket is closed, and the new supervisor is the one who asked
        self._next_orphan_check = now + _ORPHAN_CHECK_S * random.uniform(0.5, 1.5)
        self._candidates = [c for c in self._candidates if c.poll() is None]
        if self._candidates or supervisor_lock_held(supervision.deployment):
            return
        _logger.warning("Supervisor is gone; still serving, and starting a new supervisor.")
        with contextlib.suppress(OSError):
            self._candidates.append(spawn_supervisor(supervision.deployment, respawn=True,
                                                     fd=supervision.listen_fd))


@dataclass(frozen=True)
class WorkerSpec:
    """A generation file: the deployment spec plus where this engine keeps models and capture."""

    spec: DeploymentSpec
    models_dir: Path
    capture_dir: str

    @classmethod
    def read(cls, path: Path) -> WorkerSpec:
        raw = json.loads(Path(path).read_text())
        return cls(DeploymentSpec.from_dict(raw), Path(raw["models_dir"]), str(raw["capture_dir"]))

    def model_dir(self, model: ModelRef) -> Path:
        return self.models_dir / model.model_name / model.model_version

    @property
    def capture_key(self) -> Path:
        """The deployment's ``capture.key`` (``state.DeploymentPaths.capture_key``): models_dir is root/models."""
        return self.models_dir.parent / "capture.key"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlflow_deploy_plugin.serving.worker")
    parser.add_argument("--spec", help="JSON file describing what to serve")
    parser.add_argument("--standby", metavar="HINT_SPEC",
                        help="warm standby: import everything (and the flavors HINT_SPEC's models use), "
                             "then read the spec path to serve from stdin")
    parser.add_argument("--fork-socket", type=int, metavar="FD",
                        help="warm standby: fork the workers the supervisor asks for on this socket "
                             "(engines/local/forkserver.py) instead of becoming one")
    parser.add_argument("--fd", type=int, help="inherited listening socket (every worker has one)")
    parser.add_argument("--ready-fd", type=int, required=True, help="pipe to report readiness on")
    parser.add_argument("--deployment", type=Path, help="the deployment's folder (liveness file, new supervisor)")
    parser.add_argument("--on-orphan", choices=("serve", "exit"), default="exit",
                        help="when the supervisor dies: keep serving and start a new one, or drain and exit")
    args = parser.parse_args(argv)
    # Captured inputs and model copies are user data, whoever started this worker (see state.py).
    os.umask(0o077)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [worker %(process)d] %(name)s: %(message)s")
    spec_path = args.spec
    if args.standby:
        # What it warmed up for is told with "standby": a forking standby is replaced once the served
        # models need flavors it has not imported (each worker forked from it would import them).
        warmed = protocol.modules_detail(_warm_up(
            Path(args.standby), _FORK_WARM_LOAD_MAX_BYTES if args.fork_socket is not None else _WARM_LOAD_MAX_BYTES))
        gc.collect()  # what the warm-up left (its load of the live model) does not wait here with us
        if args.fork_socket is not None:
            # Out of every later collection: a collection writes to each object it walks, which would
            # unshare the pages the forked workers share with us.
            gc.freeze()
            protocol.report(args.ready_fd, protocol.STANDBY, warmed)
            work = forkserver.serve(socket.socket(fileno=args.fork_socket), close_in_child=(args.ready_fd,))
            if work is None:
                return 0  # released (the supervisor is stopping, or gone)
            global _T0
            _T0 = time.monotonic()  # a forked worker's start phases count from its fork
            timeline.mark("worker: forked by the standby")
            _reseed_after_fork()
            return main(work.argv)
        protocol.report(args.ready_fd, protocol.STANDBY, warmed)
        spec_path = sys.stdin.readline().strip()
        if not spec_path:
            return 0  # released without work (the supervisor is stopping)
    if not spec_path:
        parser.error("--spec or --standby is required")
    if args.fd is None:
        parser.error("--fd is required to serve")
    supervision = Supervision(on_orphan=args.on_orphan, listen_fd=args.fd)
    if args.deployment is not None:
        supervision.deployment = DeploymentPaths(args.deployment)
        supervision.liveness = LivenessWriter(liveness_dir(args.deployment / "run") / str(os.getpid()))
    try:
        worker_spec = WorkerSpec.read(Path(spec_path))
        server, capture = _prepare(worker_spec, args.fd, args.ready_fd, supervision)
    except Exception as exc:  # anything that stops the model from serving is reported, not raised
        _logger.error("Worker could not start: %s", exc)
        protocol.report(args.ready_fd, protocol.ERROR, str(exc))
        return 3
    # Loaded and smoke-tested: wait for the supervisor's "go" (sent once every worker of this
    # generation has loaded) before accepting, so versions never mix during a swap. The flavors'
    # modules its models needed are told with it (the supervisor compares them with its standby's).
    needed: set[str] = set()
    for share in worker_spec.spec.shares():
        with contextlib.suppress(Exception):  # only a hint: never a reason not to serve
            needed |= _flavor_modules(worker_spec.model_dir(share.model))
    # Only what the load really imported: a flavor of the MLmodel whose module the load never needs
    # (a leftover `mleap` flavor) would make the supervisor replace its standby after every update.
    needed = {module for module in needed if module in sys.modules}
    protocol.report(args.ready_fd, protocol.LOADED, protocol.modules_detail(needed))
    timeline.mark("worker: said loaded")
    # Everything imported and loaded so far lives as long as the worker: keep it out of the
    # cyclic GC, whose full passes over MLflow/sklearn/pandas objects otherwise stall requests.
    # Done while the supervisor decides on "go", not after it.
    gc.collect()
    gc.freeze()
    timeline.mark("worker: gc frozen, waiting for go")
    if sys.stdin.readline().strip() != protocol.GO:
        if capture is not None:
            capture.close(timeout_s=5.0)
        if supervision.liveness is not None:
            # Nothing is held any more (capture closed): a supervisor that no longer knows this worker
            # (one forked after the supervisor gave up on the fork) must not count it as lost.
            with contextlib.suppress(OSError):
                supervision.liveness.path.unlink()
        return 0  # the update was abandoned
    # Background threads (capture writer, batched predict) hand the GIL back to the event loop
    # after 1 ms instead of 5 ms: shorter waits for the requests that arrive meanwhile.
    timeline.mark("worker: go read")
    sys.setswitchinterval(0.001)
    sock = socket.socket(fileno=args.fd)
    supervision.handoff = _offer_handoff(supervision, args.fd)
    try:
        server.run(sockets=[sock])
    finally:
        if supervision.handoff is not None:
            supervision.handoff.close()
        if capture is not None:
            capture.close(timeout_s=30.0)  # graceful stop: everything accepted reaches disk
    return 0


def _offer_handoff(supervision: Supervision, listen_fd: int) -> HandoffServer | None:
    """Be ready to hand our listening socket to a successor supervisor that has none
    (``engines/local/handoff.py``); only workers that outlive their supervisor have successors."""
    if supervision.on_orphan != "serve" or supervision.deployment is None:
        return None
    root = supervision.deployment.root
    handoff = HandoffServer(handoff_path(root / "run", os.getpid()), listen_fd, root)
    try:
        handoff.start()
    except OSError as exc:  # a successor then binds beside us (SO_REUSEPORT), as before
        _logger.warning("Cannot offer the listening socket to a successor supervisor: %s", exc)
        handoff.close()
        return None
    return handoff


def _import_before_mlflow(model_dirs: list[Path]) -> None:
    """Import what the models' flavors need that is much cheaper to import before MLflow is.

    skops (the default format of scikit-learn models since MLflow 3) builds its list of trusted
    types at import by looking each type up in every loaded module: after MLflow's ~1000 modules
    that is ~1.3 s of CPU, before them ~0.55 s (measured for the sklearn example); MLflow loads
    skops.io with the model, so done here it is paid once, and at the low price, on the cold start.
    """
    for path in model_dirs:
        try:
            text = (path / "MLmodel").read_text()
        except OSError:
            continue  # not fetched yet: the model load fetches and imports as usual
        if "serialization_format: skops" in text:
            with contextlib.suppress(ImportError):
                import skops.io  # noqa: F401
            return


def _reseed_after_fork() -> None:
    """A forked worker draws other random numbers than its siblings: Python's ``random`` reseeds
    itself at a fork, numpy's legacy global generator (which models may use) does not."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _flavor_modules(model_dir: Path) -> set[str]:
    """The modules loading the model at ``model_dir`` imports for its flavors (``mlflow.<flavor>``
    and the pyfunc loader module), read from its MLmodel file."""
    from mlflow.models import Model

    flavors = Model.load(str(model_dir)).flavors
    loader = flavors.get("python_function", {}).get("loader_module")
    return {f"mlflow.{name}" for name in flavors if name != "python_function"} | ({loader} if loader else set())


def _warm_up(hint_spec: Path, load_max_bytes: int = _WARM_LOAD_MAX_BYTES) -> set[str]:
    """Import what serving needs before there is work, so a swap costs only the model load.
    Returns the flavors' modules (:func:`_flavor_modules`) of the hinted models it imported."""
    import importlib

    with contextlib.suppress(OSError, ValueError, KeyError):
        hinted = WorkerSpec.read(hint_spec)
        _import_before_mlflow([hinted.model_dir(share.model) for share in hinted.spec.shares()])

    import mlflow.pyfunc

    import mlflow_deploy_plugin.capture.writer  # noqa: F401
    import mlflow_deploy_plugin.serving.app  # noqa: F401
    from mlflow_deploy_plugin.model_copy import ensure_local_copy

    _gc_on_after_imports()
    try:
        hint = WorkerSpec.read(hint_spec)
    except (OSError, ValueError, KeyError):
        return set()
    wanted: set[str] = set()
    for share in hint.spec.shares():
        path = hint.model_dir(share.model)
        try:
            # The copy the workers load (the CLI's prefetch may still be making it: this waits for
            # nothing, it makes one too and the first complete copy wins). Without it the warm-up
            # would import no flavor, and every worker would import its own.
            ensure_local_copy(share.model.version_uri, path)
            modules = _flavor_modules(path)
            wanted |= modules
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            if size <= load_max_bytes:
                # Loading the live model once pulls in exactly what its flavor needs (sklearn, skops,
                # ...: seconds of imports), so the next version of it loads in a fraction of that.
                mlflow.pyfunc.load_model(str(path), suppress_warnings=True)  # checked at the copy
                continue
        except Exception as exc:
            _logger.debug("Warm-up of %s failed: %s", path, exc)
            continue
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception as exc:
                _logger.debug("Warm-up import of %s failed: %s", module, exc)
    return {module for module in wanted if module in sys.modules}


def _gc_on_after_imports() -> None:
    """Turn the cyclic GC on again after the imports it was off for (see the top of this module).

    What the imports made (modules, classes, functions: kept for the process's life) is frozen out
    of every later collection, without collecting first: after the ~3000 modules of MLflow,
    scikit-learn and SciPy that one full pass walks ~430k objects (~0.25 s of CPU on the cold
    start's critical path) to find ~1,400 garbage objects (a few hundred kB, kept frozen for the
    worker's life). The model's load runs with the GC on, so a big model's cyclic garbage never
    piles up, yet its collections walk only what the load makes. Measured on the example model:
    ~0.4 s of CPU less to the first answer than with the GC on throughout, and ~0.25 s less
    again than collecting before the freeze; the same peak RSS.
    """
    if not gc.isenabled():  # once, in a worker started as a process (not when a test calls us)
        gc.freeze()
        gc.enable()


def _phase(phases: list[tuple[str, float, float]], name: str) -> None:
    """Note the end of a start phase: wall and CPU seconds since the worker began."""
    phases.append((name, time.monotonic() - _T0, time.process_time()))


def _prepare(worker_spec: WorkerSpec, fd: int, ready_fd: int,
             supervision: Supervision | None = None) -> tuple[DrainingServer, Any]:
    phases: list[tuple[str, float, float]] = [("", 0.0, 0.0)]
    _phase(phases, "interpreter and uvicorn (a standby's: and its warm-up, and waiting)")
    timeline.mark("worker: spec read, importing")
    # Heavy imports here, after argument parsing, so a bad invocation fails fast.
    _import_before_mlflow([worker_spec.model_dir(share.model) for share in worker_spec.spec.shares()])
    timeline.mark("worker: imported what goes before MLflow (skops)")
    import mlflow.pyfunc  # noqa: F401  (imported by what follows anyway; here to time it apart)

    timeline.mark("worker: mlflow.pyfunc imported")
    import mlflow_deploy_plugin.serving.app  # noqa: F401
    from mlflow_deploy_plugin.serving.service import build_service

    _gc_on_after_imports()
    _phase(phases, "imports")
    timeline.mark("worker: serving app imported")
    spec = worker_spec.spec
    config = spec.config
    # The supervisor runs the deployment's one capture converter (engines/local/capture_keeper.py). A
    # shadow version runs in a process of its own (engines/local/shadow_process.py): never on our GIL.
    # Its capture counts are kept beside our liveness file: if this worker is killed (its shadow child
    # dies with it), the supervisor counts what the child held (engines/local/capture_loss.py).
    live = supervision.liveness if supervision is not None else None
    shadow_starter = None
    if spec.shadow is not None:  # imported only then: not on every worker's way to its first answer
        from mlflow_deploy_plugin.engines.local.shadow_process import start_shadow_process

        shadow_starter = functools.partial(start_shadow_process,
                                           tally_dir=live.path.parent if live is not None else None)
    service = build_service(spec, worker_spec.model_dir, worker_spec.capture_dir, worker_spec.capture_key,
                            capture_converter="external", shadow_starter=shadow_starter)
    _phase(phases, "model fetch+load+smoke test, app")
    timeline.mark("worker: app built")
    app, state, slots, capture = service.app, service.state, service.slots, service.capture
    supervision = supervision or Supervision()
    if supervision.liveness is not None:
        from mlflow_deploy_plugin.serving.watchdog import HungGuard, PredictWatch

        watch = PredictWatch(supervision.liveness, config.timeout_s + HUNG_GRACE_S)
        for slot, _ in slots:
            setattr(slot, "predict", watch.wrap(slot.predict))  # noqa: B010 (mypy: no method assignment)
        app = supervision.guard = HungGuard(app)
        supervision.watch = watch
        if capture is not None:
            writer = capture
            supervision.on_hung_exit = lambda: writer.close(timeout_s=5.0)
            # Counts of the primary's writer in the liveness file: if this worker is killed, the
            # supervisor counts what it answered but had not spooled yet (engines/local/capture_loss.py).
            capture.tally_into(supervision.liveness.capture_tally())
    uv_config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on",
        timeout_graceful_shutdown=max(5, int(config.timeout_s)), timeout_keep_alive=5,
        # The body limit is enforced by the app; this caps headers and pipelined junk.
        h11_max_incomplete_event_size=64 * 1024,
        # HTTPS when configured (validated at create: both files, matching): tokens never in clear.
        ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key,
    )

    def started() -> None:
        # A fresh heartbeat before READY: a load longer than the liveness deadline must not read
        # as a silent event loop in the moment before the first tick beats.
        if supervision.liveness is not None:
            supervision.liveness.beat()
        state.ready = True
        protocol.report(ready_fd, protocol.READY)
        timeline.mark("worker: serving, said ready")
        _phase(phases, "go, serving")
        # Where the cold start went (wall / CPU seconds since the worker's imports began).
        _logger.info("Ready after %.2f s (%.2f s CPU): %s", phases[-1][1], phases[-1][2], ", ".join(
            f"{name} {end - start:.2f} s ({cpu_end - cpu_start:.2f} CPU)"
            for (_, start, cpu_start), (name, end, cpu_end) in zip(phases, phases[1:], strict=False)))

    return DrainingServer(uv_config, state, drain_grace_s=2.0, on_started=started,
                          on_stopped_accepting=lambda: protocol.report(ready_fd, protocol.DRAINING),
                          supervision=supervision, ready_fd=ready_fd), capture

if __name__ == "__main__":
    sys.exit(main())
