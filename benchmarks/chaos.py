"""Chaos benchmark: one fault at a time under a steady request loop, and what users saw.

Self-contained. It makes a throw-away folder (MLflow store on SQLite, artifacts, $MLFLOW_DEPLOY_HOME),
registers the example model (alias ``champion``) and the poison model of the tests
(``tests/assets/poison_model.py``), creates two deployments through the real CLI, each with
``workers=2``:

- ``chaos`` follows ``models:/<model>@champion`` (so it has an agent, and a warm standby);
- ``chaos-poison`` serves the poison model with ``timeout_s=--timeout`` (hung model, poison request).

Then, for each fault, ``--clients`` keep-alive clients (``--fresh``: a new connection per request)
post one row each in a loop (every request carries its own ``X-Request-Id``) while the fault happens, until the deployment is healthy again
and ``--settle`` more seconds have passed. Printed per fault:

- requests sent, and failed (anything but 200: connection errors, 503, 504); the slowest request;
- seconds to recover: from the fault to the deployment's status being healthy again with the
  faulty process replaced (polled every 50 ms); for the hung model, from the hanging request; for
  the supervisor, until the old workers are gone too (a fresh generation has started and they
  drained), and, separately, until a new supervisor runs;
- rows answered (200s) vs rows captured (those request ids found in the captured Parquet once the
  writers have flushed, waited for up to 60 s) vs rows counted as dropped from capture during the
  fault (``mlflow_deploy_capture_dropped_requests_total``, read from the deployment's metric files):
  what a killed worker had answered but not yet spooled is not captured, and the supervisor counts
  it as dropped (``engines/local/capture_loss.py``), so answered = captured + dropped (the count is
  "at most": a kill in the middle of a spool append counts that append whole).

Faults: ``worker`` / ``standby`` / ``agent`` / ``supervisor`` / ``converter`` (``kill -9`` of one
process; the converter is the deployment's capture converter, recovered once a new one runs),
``everything`` (``kill -9`` of every process of the deployment, then `mlflow-deploy up`),
``hung`` (a predict that never returns), ``poison`` (a request that segfaults its worker),
``takeover`` (``kill -9`` of the supervisor, and a successor that inherits no socket: `mlflow-deploy
up`, or the agent, whichever comes first; the workers, which would start one with their socket
within a tick, are frozen until it holds the supervisor lock, as on a machine too busy to run them.
The row says how the successor got its listening socket: ``handoff`` from the old workers, or
``beside`` them with SO_REUSEPORT, whose closing resets what waits in the old accept queue).
A fault may be named more than once (``--only takeover,takeover,takeover``).

    .venv/bin/python benchmarks/chaos.py [--clients 3] [--settle 3] [--timeout 3] [--only worker,hung] [--fresh]

Every wait is bounded (``--fault-timeout``); traffic goes to 127.0.0.1 only, and everything started
is stopped on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "examples"))
FAULTS = ("worker", "standby", "agent", "supervisor", "converter", "everything", "hung", "poison", "takeover")
HANG, CRASH = -1.0, -2.0  # tests/assets/poison_model.py


@dataclass
class Loop:
    """Keep-alive clients posting one row each until stopped; every request id and outcome kept."""

    url: str
    payload: dict
    clients: int
    fresh: bool = False  # a new connection per request (meets the accept queue every time)
    outcomes: list[tuple[str, str]] = field(default_factory=list)  # (request id, "200" or error)
    slowest_s: float = 0.0  # the longest a request waited for its answer (or its error)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, max_seconds: float) -> list[threading.Thread]:
        deadline = time.monotonic() + max_seconds

        def client() -> None:
            session = requests.Session()
            while not self.stop.is_set() and time.monotonic() < deadline:
                request_id = uuid.uuid4().hex
                sent = time.monotonic()
                if self.fresh:
                    session = requests.Session()
                try:
                    response = session.post(f"{self.url}/invocations", json=self.payload, timeout=60,
                                            headers={"X-Request-Id": request_id,
                                                     **({"Connection": "close"} if self.fresh else {})})
                    outcome = str(response.status_code)
                except requests.RequestException as exc:
                    outcome = type(exc).__name__
                    session = requests.Session()
                with self.lock:
                    self.outcomes.append((request_id, outcome))
                    self.slowest_s = max(self.slowest_s, time.monotonic() - sent)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(self.clients)]
        for thread in threads:
            thread.start()
        return threads


class Bench:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root = root
        self.args = args
        self.home = root / "deploy-home"
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
                    "MLFLOW_DEPLOY_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}

    def cli(self, *argv: str, tool: str = "mlflow") -> subprocess.CompletedProcess:
        prefix = [str(BIN / "mlflow"), "deployments"] if tool == "mlflow" else [str(BIN / "mlflow-deploy")]
        proc = subprocess.run([*prefix, *argv], capture_output=True, text=True, env=self.env, cwd=self.root,
                              timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
        return proc

    def status(self, name: str) -> dict:
        try:
            return json.loads((self.home / "deployments" / name / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def until(self, predicate: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + self.args.fault_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if predicate():
                    return
            time.sleep(0.05)
        raise TimeoutError(f"gave up after {self.args.fault_timeout:.0f}s waiting for {what}")

    def setup(self, poison: bool = True) -> tuple[str, str, dict, dict]:
        os.environ.update({k: v for k, v in self.env.items() if k.startswith(("MLFLOW_", "PYTHON"))})
        os.chdir(self.root)
        import mlflow
        from train import load_data, train

        train("chaos-model", c=1.0, alias="champion", experiment="chaos")
        features, _ = load_data()
        with mlflow.start_run():
            mlflow.pyfunc.log_model(name="model", python_model=str(REPO / "tests/assets/poison_model.py"),
                                    input_example=features.head(2), registered_model_name="chaos-poison",
                                    pip_requirements=["pandas"])
        row = features.iloc[[3]]
        payload = {"dataframe_split": json.loads(row.to_json(orient="split", index=False))}
        self.rows = {radius: {"dataframe_split": json.loads(row.assign(mean_radius=radius).to_json(
            orient="split", index=False))} for radius in (HANG, CRASH)}
        self.cli("create", "-t", "lifecycle", "--name", "chaos", "-m", "models:/chaos-model@champion",
                 "-C", "workers=2", "-C", "poll_interval_s=60")
        if poison:  # only for the faults that use it: an idle deployment still costs its start
            self.cli("create", "-t", "lifecycle", "--name", "chaos-poison", "-m", "models:/chaos-poison/1",
                     "-C", "workers=2", "-C", f"timeout_s={self.args.timeout:g}")
        return "chaos", "chaos-poison", payload, payload

    def healthy(self, name: str, replaced: set[int], extra: Callable[[dict], bool] = lambda s: True) -> bool:
        from mlflow_deploy_plugin.engines.local.processes import is_supervisor
        from mlflow_deploy_plugin.state import pid_alive

        status = self.status(name)
        root = self.home / "deployments" / name
        return (status.get("state") == "running" and is_supervisor(status.get("pid"), root)
                and len(status.get("worker_pids") or []) == 2
                and not replaced & set(status.get("worker_pids") or [])
                and not any(pid_alive(pid) for pid in replaced) and extra(status))

    def settle(self, name: str) -> None:
        """Before a fault: everything of the deployment is up (standby and agent included)."""
        self.until(lambda: self.healthy(name, set(), lambda s: s.get("standby_pid") and (
            name != "chaos" or s.get("agent_pid"))), f"{name} to be fully up")

    def run_fault(self, fault: str, name: str, payload: dict) -> dict:
        from mlflow_deploy_plugin.engines.local.processes import is_worker

        self.settle(name)
        url = self.status(name)["url"]
        loop = Loop(url, payload, self.args.clients, fresh=self.args.fresh)
        threads = loop.run(self.args.fault_timeout + 60)
        self.until(lambda: sum(1 for _, o in loop.outcomes if o == "200") >= 20, "traffic to flow")
        status = self.status(name)
        root = self.home / "deployments" / name
        started = time.monotonic()
        window_start = time.time()
        dropped_before = self.dropped(name)
        replaced: set[int] = set()
        supervisor_back: float | None = None
        how: str | None = None
        extra: Callable[[dict], bool] = lambda s: True  # noqa: E731
        if fault == "worker":
            replaced = {status["worker_pids"][0]}
            os.kill(status["worker_pids"][0], signal.SIGKILL)
        elif fault in ("standby", "agent", "converter"):
            if fault == "converter":  # runs while there is capture to convert: under traffic, soon
                self.until(lambda: self.status(name).get("converter_pid"), "the capture converter")
                status = self.status(name)
            victim = status[f"{fault}_pid"]
            os.kill(victim, signal.SIGKILL)
            extra = lambda s: s.get(f"{fault}_pid") not in (None, victim)  # noqa: E731
        elif fault == "supervisor":
            from mlflow_deploy_plugin.engines.local.processes import is_supervisor

            replaced = set(status["worker_pids"])
            os.kill(status["pid"], signal.SIGKILL)
            extra = lambda s: s.get("pid") != status["pid"]  # noqa: E731
            self.until(lambda: (s := self.status(name)).get("pid") != status["pid"]
                       and is_supervisor(s.get("pid"), root), "a new supervisor")
            supervisor_back = time.monotonic() - started
        elif fault == "takeover":
            how = self.takeover(name, status)
            supervisor_back = time.monotonic() - started
            replaced = set(status["worker_pids"])
            extra = lambda s: s.get("pid") != status["pid"]  # noqa: E731
        elif fault == "everything":
            replaced = set(status["worker_pids"])
            pids = [pid for pid in _processes_under(root)]
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            self.until(lambda: not _processes_under(root), "every process to be gone")
            self.cli("up", tool="mlflow-deploy")
        elif fault == "hung":
            before = status.get("hung_replaced", 0)
            threading.Thread(target=lambda: requests.post(f"{url}/invocations", json=self.rows[HANG], timeout=120),
                             daemon=True).start()
            extra = lambda s: s.get("hung_replaced", 0) > before  # noqa: E731
        elif fault == "poison":
            before = status.get("bad_requests", 0)
            with contextlib.suppress(requests.RequestException):
                requests.post(f"{url}/invocations", json=self.rows[CRASH], timeout=60)
            extra = lambda s: s.get("bad_requests", 0) > before  # noqa: E731
        self.until(lambda: self.healthy(name, replaced, extra), f"{name} to recover from {fault}")
        recovered = time.monotonic() - started
        settle_end = time.monotonic() + self.args.settle
        while time.monotonic() < settle_end:
            time.sleep(0.05)
        loop.stop.set()
        for thread in threads:
            thread.join(timeout=120)
        answered = {rid for rid, outcome in loop.outcomes if outcome == "200"}
        self.until(lambda: not any(is_worker(pid, root) for pid in replaced), "replaced workers to exit")
        # Capture writers roll a segment every 2 s; the converter writes it soon after.
        deadline = time.monotonic() + 60
        while True:
            captured = self.captured(name, window_start - 120, answered)
            after = self.dropped(name)
            # Counter files are removed when a deployment starts afresh (`up` after everything died).
            dropped = int(after - dropped_before if after >= dropped_before else after)
            if captured + dropped >= len(answered) or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        failed = [outcome for _, outcome in loop.outcomes if outcome != "200"]
        return {"fault": fault, "sent": len(loop.outcomes), "failed": len(failed),
                "failures": dict(sorted({o: failed.count(o) for o in set(failed)}.items())),
                "recover_s": round(recovered, 2), "slowest_s": round(loop.slowest_s, 2), "answered": len(answered), "captured": captured,
                "dropped": dropped,
                "supervisor_back_s": None if supervisor_back is None else round(supervisor_back, 2),
                "socket": how}

    def takeover(self, name: str, status: dict) -> str:
        """kill -9 of the supervisor, with a successor that inherits no socket (see the docstring);
        returns how it got its listening socket, from its history record."""
        from mlflow_deploy_plugin.engines.local.processes import supervisor_lock_held
        from mlflow_deploy_plugin.state import DeploymentPaths, StateStore

        paths = DeploymentPaths(self.home / "deployments" / name)
        frozen = list(status["worker_pids"])
        up: subprocess.Popen[bytes] | None = None
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            os.kill(status["pid"], signal.SIGKILL)
            self.until(lambda: not supervisor_lock_held(paths), "the killed supervisor's lock to be free")
            up = subprocess.Popen([str(BIN / "mlflow-deploy"), "up"], env=self.env, cwd=self.root,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.until(lambda: supervisor_lock_held(paths), "a successor to take the supervisor lock")
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            if up is not None:
                try:
                    up.wait(timeout=self.args.fault_timeout)
                except subprocess.TimeoutExpired:
                    up.kill()
                    up.wait()
        events = [e for e in StateStore(self.home).read_history(name) if e["event"] == "supervisor_replaced"]
        # Before the handoff existed the record had no "socket": such a successor bound beside them.
        return str(events[-1].get("socket", "beside")) if events else "?"

    def dropped(self, name: str) -> float:
        """The deployment's capture drop counter (every worker's and the supervisor's metric files)."""
        from mlflow_deploy_plugin.monitoring.capture_watch import dropped_total

        folder = self.home / "deployments" / name / "run" / "prometheus"
        return (dropped_total(str(folder), name) or 0.0) if folder.is_dir() else 0.0

    def captured(self, name: str, since: float, answered: set[str]) -> int:
        from datetime import UTC, datetime

        from mlflow_deploy_plugin.capture import capture_root, read_capture

        root = capture_root(name, None, str(self.home / "deployments" / name / "capture"))
        frame = read_capture(root, since=datetime.fromtimestamp(since, tz=UTC), columns=["_request_id"])
        return int(frame["_request_id"].isin(answered).sum())


def _processes_under(root: Path) -> list[int]:
    marker = str(root).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if any(arg == marker or arg.startswith(marker + b"/") for arg in argv):
                    found.append(int(entry.name))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0, help="traffic kept flowing after recovery (s)")
    parser.add_argument("--timeout", type=float, default=3.0, help="timeout_s of the poison deployment")
    parser.add_argument("--fault-timeout", type=float, default=300.0, help="bound of every wait (s)")
    parser.add_argument("--only", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs) afterwards")
    parser.add_argument("--fresh", action="store_true", help="a new connection per request (no keep-alive)")
    args = parser.parse_args()
    faults = [f for f in args.only.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill too, as on Ctrl-C
    root = Path(tempfile.mkdtemp(prefix="mlflow-deploy-chaos-"))
    bench = Bench(root, args)
    results = []
    try:
        main_name, poison_name, payload, _ = bench.setup(poison=bool({"hung", "poison"} & set(faults)))
        for fault in faults:
            name = poison_name if fault in ("hung", "poison") else main_name
            print(f"fault {fault} on {name} ...", file=sys.stderr, flush=True)
            results.append(bench.run_fault(fault, name, payload))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        for name in ("chaos", "chaos-poison"):
            with contextlib.suppress(Exception):
                bench.cli("delete", "-t", "lifecycle", "--name", name)
        for pid in _processes_under(bench.home):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}", file=sys.stderr)
    print(f"{'fault':<11} {'sent':>6} {'failed':>6} {'recover_s':>9} {'slowest_s':>9} {'answered':>8} {'captured':>8}"
          f" {'dropped':>7}  failures")
    for r in results:
        back = f" (a new supervisor after {r['supervisor_back_s']:.2f}s)" if r["supervisor_back_s"] is not None else ""
        back += f" (socket: {r['socket']})" if r["socket"] else ""
        print(f"{r['fault']:<11} {r['sent']:>6} {r['failed']:>6} {r['recover_s']:>9.2f} {r['slowest_s']:>9.2f} {r['answered']:>8} "
              f"{r['captured']:>8} {r['dropped']:>7}  {r['failures'] or ''}{back}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
