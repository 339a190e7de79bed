"""Serving benchmark: our `lifecycle` deployment vs `mlflow models serve` and MLServer (issue 10).

Self-contained. It makes a throw-away folder (SQLite tracking store, artifacts and
$MLFLOW_DEPLOY_HOME), trains and registers a 20-feature LogisticRegression, starts every server on
that model as real subprocesses, measures their cold start (launch -> first 200), checks they
predict the same, and drives them with the same closed-loop load, cell by cell, the servers
interleaved within each cell (reversed on odd passes), medians over passes:

    .venv/bin/python benchmarks/serving.py [--workers 1] [--duration 5] [--passes 2] \\
        [--cells 1x1,1x8,1x32,1x64,100x32 | --rows 1,100 --concurrency 1,8,32] [--client-procs 1] \\
        [--out results.json] [--ours-variant NAME:KEY=VALUE] [--no-nocap] [--no-peer] [--no-mlserver] \\
        [--engine ray] [--shadow]

The servers of the default run (``make bench-serving``), one worker each:

- ``peer``: `mlflow models serve -w 1` (uvicorn);
- ``mlserver`` and ``mlserver-batch``: MLServer 1.7.1 with MLflow's runtime on the same model
  folder, plain and with adaptive batching (32, 2 ms), installed by the benchmark into a
  virtualenv of its own and spoken to in the V2 protocol (see ``benchmarks/serving_mlserver.py``);
- ``ours``: `mlflow deployments create -t lifecycle` as shipped (capture, schema enforcement,
  metrics and the warm standby on), on its default ``/invocations`` (the route our users call and
  `mlflow models serve` shares; ours also speaks V2, but the issue's goals are about the default);
- ``ours-nocap``: the same with ``-C capture=false``, so capture's cost is a ratio of one run.

The default cells are the issue's: 1 row at c = 1, 8, 32, 64 and 100 rows at c = 32. Access logs
are off for every server (ours never writes one; `mlflow models serve` gets
``UVICORN_ACCESS_LOG=false``, MLServer ``debug: false``). Memory is the PSS of each server's
process group, idle before the load and after it, with each process's share (a CLI parent, a
supervisor, a warm standby: what the total is made of). The report ends with the issue's table, the
ratios against each peer and a met / NOT met line per goal the run can judge
(``benchmarks/serving_goals.py``).

``--ours-variant NAME:KEY=VALUE[,KEY=VALUE]`` starts one more deployment of ours with those ``-C``
(e.g. capture off; ``env.VAR=VALUE`` sets an environment variable instead, e.g.
``old:env.PYTHONPATH=/path/to/other/checkout`` to compare two versions of our code), measured in
the same cells, interleaved with the others (``nocap:capture=false`` is one unless ``--no-nocap``).
``--rows`` and ``--concurrency`` measure every pair of theirs instead of ``--cells``.
``--engine ray`` adds, in the same cells, our deployment on Ray Serve with 1 and 2 replicas and a
trivial Serve endpoint (the proxy's own ceiling) on a private local Ray cluster: see
``benchmarks/serving_ray.py``.

The load generator is a minimal HTTP/1.1 client on raw asyncio streams (persistent keep-alive
connections, request bytes prepared in advance) running in separate processes (this script
re-run with ``--_client``), so it is cheap enough not to be the bottleneck on a small machine
that also runs the servers; the CPU it uses is measured and printed next to the servers' own.
Each cell also accounts, per kind of process (our worker, converter, supervisor, standby, agent;
the load generator as ``client``), CPU and run-queue wait per request, the CPU of threads other than
the main one, context switches per 1,000 requests, and our worker's rows per predict call (its CPU
per request follows that closely: each call costs ~1 ms): where capture's cost goes, on a machine
too busy for throughput to say.

Traffic goes to 127.0.0.1 only and every step is bounded in time. Everything started is stopped
on exit, Ctrl-C or error (peer and MLServer: their process groups; ours: `mlflow deployments delete`).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import procfs  # benchmarks/procfs.py
import serving_goals  # benchmarks/serving_goals.py: the issue's table and goals
import serving_mlserver  # benchmarks/serving_mlserver.py: MLServer's venv, repository and V2 bodies
import serving_ray  # benchmarks/serving_ray.py: the --engine ray servers

MODEL_NAME = "bench-logreg"
DEPLOYMENT = "bench"
N_FEATURES = 20
SEED = 42
BODIES_PER_SHAPE = 64  # distinct request bodies per row count, cycled by the load generator
WARMUP_S = 1.0
# Shadow cells measure after a longer warm-up, off and on alike: a `deployments update` that turns the
# shadow on pauses the traffic for longer than the capture converter's idle exit (5 s: it loads the
# shadow version), so the converter starts again with the next cell's first requests and converts its
# first segment 2 s later (its imports, ~0.15-0.3 s of CPU): with a 1 s warm-up that landed in every
# shadow-on window and nearly no off one (converter CPU per request 33-59 us on vs 5-10 off, a process
# exiting in each on window): a cost of the switch, not of mirroring, which is what shadow_cells measures.
SHADOW_WARMUP_S = 4.0
# Bound of a server start (and of `mlflow deployments get`): MLFLOW_BENCH_STARTUP_S on a crowded machine.
STARTUP_DEADLINE_S = float(os.environ.get("MLFLOW_BENCH_STARTUP_S") or 180.0)
REQUEST_GRACE_S = 15.0  # how long after the window an in-flight request may still take

# ------------------------------------------------------------------------------------------------
# Load generator (runs in its own process: `serving.py --_client SPEC_JSON`)
# ------------------------------------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked, close = 0, False, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    if not chunked:
        return status, await reader.readexactly(length), close
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return status, b"".join(parts), close
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def _client_main(spec: dict[str, Any]) -> dict[str, Any]:
    host, port, path = spec["host"], spec["port"], spec.get("path", "/invocations")
    requests = [
        (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
         f"Content-Length: {len(body.encode())}\r\n\r\n").encode() + body.encode()
        for body in spec["bodies"]
    ]
    t_start, t_window, t_end = spec["t_start"], spec["t_window"], spec["t_end"]
    latencies: list[float] = []
    completions: list[float] = []  # completion times inside the window (for per-second buckets)
    statuses: dict[str, int] = {}
    errors: dict[str, Any] = {"non_200": 0, "transport": 0, "reconnects": 0, "first": None}
    cpu: dict[str, float] = {}

    def mark(key: str) -> None:
        times = os.times()
        cpu[key] = times.user + times.system

    loop = asyncio.get_running_loop()
    now_mono = time.monotonic()
    loop.call_later(max(0.0, t_window - now_mono), mark, "window")
    loop.call_later(max(0.0, t_end - now_mono), mark, "end")

    async def connection(index: int) -> None:
        reader = writer = None
        n = index
        while True:
            now = time.monotonic()
            if now >= t_end:
                break
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
                writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            payload = requests[n % len(requests)]
            n += spec["concurrency"]
            sent = time.monotonic()
            try:
                writer.write(payload)
                await writer.drain()
                status, body, close = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                done = time.monotonic()
                if t_window <= done <= t_end:
                    errors["transport"] += 1
                    errors["first"] = errors["first"] or f"{type(exc).__name__}: {exc}"
                writer.close()
                reader = writer = None
                errors["reconnects"] += 1
                await asyncio.sleep(0.01)
                continue
            done = time.monotonic()
            if t_window <= sent and done <= t_end:
                latencies.append(done - sent)
                completions.append(done)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status != 200:
                    errors["non_200"] += 1
                    errors["first"] = errors["first"] or f"HTTP {status}: {body[:300]!r}"
            if close:
                writer.close()
                reader = writer = None
                errors["reconnects"] += 1
        if writer is not None:
            writer.close()

    await asyncio.sleep(max(0.0, t_start - time.monotonic()))
    tasks = [asyncio.create_task(connection(i)) for i in range(spec["concurrency"])]
    _done, pending = await asyncio.wait(tasks, timeout=t_end - time.monotonic() + REQUEST_GRACE_S)
    for task in pending:
        task.cancel()
    for task in _done:
        if task.exception() is not None:
            errors["transport"] += 1
            errors["first"] = errors["first"] or f"{type(task.exception()).__name__}: {task.exception()}"
    if "end" not in cpu:
        mark("end")
    return {
        "latencies": [round(x, 6) for x in latencies],
        "completions": [round(x - t_window, 4) for x in completions],
        "statuses": statuses,
        "errors": errors,
        "stuck": len(pending),
        "cpu_s": cpu["end"] - cpu.get("window", cpu["end"]),
    }


def client_process(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = asyncio.run(_client_main(spec))
    sys.stdout.write(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------
# Process bookkeeping and cleanup
# ------------------------------------------------------------------------------------------------


class Cleanup:
    """Stops what we started, once, whatever the way out (finally, atexit, SIGTERM)."""

    def __init__(self) -> None:
        self.peer: subprocess.Popen | None = None
        self.groups: list[tuple[str, subprocess.Popen]] = []  # other servers stopped by process group
        self.ours_created: list[str] = []  # deployment names
        self.ray_created: list[str] = []  # deployment names on -t lifecycle:/ray
        self.ray_cluster: Any = None  # serving_ray.Cluster, stopped after its deployments
        self.clients: list[subprocess.Popen] = []
        self.workdir: Path | None = None
        self.keep = False
        self.done = False

    def run(self) -> None:
        if self.done:
            return
        self.done = True
        for client in self.clients:
            if client.poll() is None:
                client.kill()
        for name in self.ours_created:
            try:
                subprocess.run([mlflow_bin(), "deployments", "delete", "-t", "lifecycle", "--name", name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120, check=True)
                print(f"stopped {name} (mlflow deployments delete)", file=sys.stderr)
            except (subprocess.SubprocessError, OSError) as exc:
                print(f"WARNING: `mlflow deployments delete` failed ({exc}); killing its process group",
                      file=sys.stderr)
                _kill_ours_by_status(name)
        for name in self.ray_created:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run([mlflow_bin(), "deployments", "delete", "-t", "lifecycle:/ray", "--name", name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=180, check=True)
                print(f"stopped {name} (mlflow deployments delete -t lifecycle:/ray)", file=sys.stderr)
        if self.ray_cluster is not None:
            self.ray_cluster.stop()
        if self.peer is not None and self.peer.poll() is None:
            stop_group(self.peer)
            print("stopped peer (process group)", file=sys.stderr)
        for name, process in self.groups:
            stop_group(process)  # also when its parent exited: workers may remain in the group
            print(f"stopped {name} (process group)", file=sys.stderr)
        if self.workdir is not None and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self.workdir is not None:
            print(f"kept {self.workdir}", file=sys.stderr)


CLEANUP = Cleanup()


def mlflow_bin() -> str:
    return str(Path(sys.executable).with_name("mlflow"))


def stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    # The group may still hold uvicorn workers after the CLI parent exited.
    with contextlib.suppress(ProcessLookupError):
        deadline = time.monotonic() + grace_s
        while group_pids(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def _kill_ours_by_status(name: str = DEPLOYMENT) -> None:
    status = read_status(name)
    pid = status.get("pid")
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def read_status(name: str = DEPLOYMENT) -> dict[str, Any]:
    path = Path(os.environ["MLFLOW_DEPLOY_HOME"]) / "deployments" / name / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def group_pids(pgid: int) -> list[int]:
    return [pid for pid, fields in procfs.live_processes() if int(fields[2]) == pgid]


def group_cpu_s(pgid: int) -> dict[int, float]:
    """User+system CPU seconds of each live process in a process group."""
    return pids_cpu_s(group_pids(pgid))


def server_cpu_s(server: dict[str, Any]) -> dict[int, float]:
    """CPU seconds of the server's processes: its process group, or a Ray server's whole private cluster."""
    if server.get("engine") == "ray":
        if CLEANUP.ray_cluster is None or CLEANUP.ray_cluster.proc is None:
            return {}
        return pids_cpu_s(CLEANUP.ray_cluster.pids())
    return group_cpu_s(server["pgid"])


def pids_cpu_s(pids: list[int]) -> dict[int, float]:
    return {pid: procfs.cpu_s(fields) for pid in pids if (fields := procfs.stat_fields(pid)) is not None}


def accounting_snapshot(pids: list[int]) -> dict[int, dict[str, float]]:
    """CPU seconds (utime+stime) and scheduling counters (:func:`procfs.thread_counters`) of each
    live process of ``pids``."""
    out = {}
    for pid in pids:
        fields, counters = procfs.stat_fields(pid), procfs.thread_counters(pid)
        if fields is not None and counters is not None:
            out[pid] = {"cpu_s": procfs.cpu_s(fields), **counters}
    return out


ROLE_FIGURES = ("cpu_s", "voluntary", "involuntary", "run_s", "runq_s", "main_run_s", "main_runq_s", "main_voluntary")


def per_role(before: dict[int, dict[str, float]], after: dict[int, dict[str, float]], roles: dict[int, str],
             requests: int, duration: float) -> dict[str, dict[str, float]]:
    """What each kind of process (worker, converter, supervisor, standby, agent, client ...) used in
    the window, per request: CPU µs and run-queue wait µs per request, context switches per 1,000
    requests, and % of one core. A process started in the window counts from zero (a converter
    started again pays its start here); one that exited in it is left out (counted in ``exited``)."""
    sums: dict[str, dict[str, float]] = {}
    for pid, end in after.items():
        start = before.get(pid, dict.fromkeys(ROLE_FIGURES, 0.0))
        role = roles.get(pid) or procfs.process_name(pid) or str(pid)
        acc = sums.setdefault(role, {**dict.fromkeys(ROLE_FIGURES, 0.0), "processes": 0, "exited": 0})
        for key in ROLE_FIGURES:
            acc[key] += end[key] - start[key]
        acc["processes"] += 1
    for pid in before.keys() - after.keys():
        role = roles.get(pid) or "exited"
        sums.setdefault(role, {**dict.fromkeys(ROLE_FIGURES, 0.0), "processes": 0, "exited": 0})["exited"] += 1
    per_1k = 1000 / requests if requests else float("nan")
    return {role: {"cpu_us_per_req": acc["cpu_s"] * 1e3 * per_1k, "cpu_pct": 100 * acc["cpu_s"] / duration,
                   "run_us_per_req": acc["run_s"] * 1e3 * per_1k, "runq_us_per_req": acc["runq_s"] * 1e3 * per_1k,
                   "vol_per_1k": acc["voluntary"] * per_1k, "invol_per_1k": acc["involuntary"] * per_1k,
                   # Other threads than the main one (a worker's capture writer thread, Arrow's pools ...).
                   "threads_us_per_req": (acc["run_s"] - acc["main_run_s"]) * 1e3 * per_1k,
                   "main_runq_us_per_req": acc["main_runq_s"] * 1e3 * per_1k,
                   "main_vol_per_1k": acc["main_voluntary"] * per_1k,
                   "processes": acc["processes"], "exited": acc["exited"]}
            for role, acc in sorted(sums.items())}


def predict_batches(server: dict[str, Any]) -> tuple[float, float] | None:
    """Our deployment's predict calls and the rows they took so far (its ``/metrics`` batch-size
    histogram), None for other servers or when unreadable. Requests per predict call is what a
    worker's CPU per request depends on most (each call costs ~1 ms whatever its size)."""
    if "deployment" not in server:
        return None
    try:
        status, text = http("GET", f"{server['url']}/metrics", timeout=5.0)
    except (OSError, urllib.error.URLError):
        return None
    count = total = 0.0
    for line in text.decode(errors="replace").splitlines():
        if line.startswith("mlflow_deploy_predict_batch_rows_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith("mlflow_deploy_predict_batch_rows_sum"):
            total += float(line.rsplit(" ", 1)[1])
    return (count, total) if status == 200 else None


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all cores) since boot."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def group_rss_mb(pgid: int) -> float:
    return sum(procfs.rss_bytes(pid) for pid in group_pids(pgid)) / 2**20


def memory_of(pgid: int, roles: dict[int, str] | None = None) -> dict[str, Any]:
    """RSS and PSS of a server's process group, how many processes it has, and each one's PSS
    (named by ``roles`` where given, else by what it runs: a CLI parent shows as such). PSS splits
    shared pages among their users, so workers forked by the warm standby, or libraries mapped by
    several processes, count what they cost."""
    pids = group_pids(pgid)
    per_process = [{"pid": pid, "what": (roles or {}).get(pid) or procfs.process_name(pid),
                    "pss_mb": round(procfs.pss_bytes(pid) / 2**20, 1)} for pid in pids]
    return {"rss_mb": group_rss_mb(pgid), "pss_mb": sum(p["pss_mb"] for p in per_process), "processes": len(pids),
            "per_process": per_process}


def process_roles(server: dict[str, Any]) -> dict[int, str]:
    """Our deployment's processes by role, from its status.json (a worker the warm standby forked
    has the standby's command line); {} for the peers."""
    if "deployment" not in server:
        return {}
    status = read_status(server["deployment"])
    roles = {pid: "worker" for pid in status.get("worker_pids") or []}
    roles.update({status[key]: key.removesuffix("_pid") for key in ("pid", "standby_pid", "agent_pid", "converter_pid")
                  if status.get(key)})
    if status.get("pid"):
        roles[status["pid"]] = "supervisor"
    return roles


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ping(url_of: Any, t0: float, process: subprocess.Popen | None, what: str, path: str = "/ping",
              server_process: bool = False) -> float:
    """Poll ``path`` (/ping) until 200; returns seconds since ``t0``. ``url_of()`` may return None (not yet
    known). ``process`` failing stops the wait; if it is the server itself (``server_process``), any exit does."""
    deadline = t0 + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:
        url = url_of()
        if url:
            try:
                status, _ = http("GET", f"{url}{path}", timeout=2.0)
                if status == 200:
                    return time.monotonic() - t0
            except (OSError, urllib.error.URLError):
                pass
        if process is not None and process.poll() is not None and (process.returncode != 0 or server_process):
            raise RuntimeError(f"{what} exited with code {process.returncode} before answering {path}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer {path} within {STARTUP_DEADLINE_S:.0f}s")


# ------------------------------------------------------------------------------------------------
# Setup: model, servers
# ------------------------------------------------------------------------------------------------


def train_and_register() -> Any:
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    features, labels = make_classification(n_samples=5000, n_features=N_FEATURES, n_informative=8,
                                           random_state=SEED)
    frame = pd.DataFrame(features, columns=[f"f{i}" for i in range(N_FEATURES)])
    model = LogisticRegression(max_iter=1000).fit(frame, labels)
    mlflow.set_experiment("serving-benchmark")
    with mlflow.start_run():
        mlflow.sklearn.log_model(model, name="model", signature=infer_signature(frame, model.predict(frame)),
                                 input_example=frame.head(5), registered_model_name=MODEL_NAME,
                                 pip_requirements=["scikit-learn"])
    return frame


def make_bodies(frame: Any, rows: int, protocol: str = "mlflow") -> list[str]:
    """``BODIES_PER_SHAPE`` request bodies of ``rows`` rows each: MLflow's ``dataframe_split`` or, for
    ``protocol="v2"``, V2 inference requests of the same rows in the same order."""
    bodies = []
    for i in range(BODIES_PER_SHAPE):
        start = (i * rows) % (len(frame) - rows)
        part = frame.iloc[start:start + rows]
        columns, data = list(part.columns), part.to_numpy().tolist()
        bodies.append(serving_mlserver.v2_body(columns, data) if protocol == "v2"
                      else json.dumps({"dataframe_split": {"columns": columns, "data": data}}))
    return bodies


def start_peer(workers: int) -> dict[str, Any]:
    port = free_port()
    log = open(Path.cwd() / "peer.log", "wb")  # noqa: SIM115 - lives as long as the peer
    t0 = time.monotonic()
    # No access log, as for the others: `mlflow models serve` runs the `uvicorn` CLI, which reads
    # UVICORN_* variables for its options (uvicorn's default would log every request).
    env = {**os.environ, "UVICORN_ACCESS_LOG": "false"}
    CLEANUP.peer = subprocess.Popen(
        [mlflow_bin(), "models", "serve", "-m", f"models:/{MODEL_NAME}/1", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    cold = wait_ping(lambda: url, t0, CLEANUP.peer, "mlflow models serve")
    return {"name": "peer", "url": url, "port": port, "pgid": CLEANUP.peer.pid, "cold_start_s": cold}


def download_model(workdir: Path) -> Path:
    """The registered model's folder, as MLServer's MLflow runtime loads it (a local copy)."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file on stderr otherwise
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL_NAME}/1",
                                                    dst_path=str(workdir / "mlserver-model")))


def start_mlserver(exe: Path, model_dir: Path, workers: int, batching: bool, workdir: Path) -> dict[str, Any]:
    """MLServer on the model folder (``mlserver start``), plain or with adaptive batching; cold start
    is launch -> the model's V2 ready endpoint answers 200."""
    name = "mlserver-batch" if batching else "mlserver"
    port = free_port()
    folder = serving_mlserver.write_repository(workdir / name, model_dir, port=port, grpc_port=free_port(),
                                               metrics_port=free_port(), workers=workers, batching=batching)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its venv only
    env["PATH"] = f"{exe.parent}{os.pathsep}{env.get('PATH', '')}"
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the server
    t0 = time.monotonic()
    process = subprocess.Popen(serving_mlserver.command(exe, folder), cwd=folder, env=env,
                               stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    CLEANUP.groups.append((name, process))
    paths = serving_mlserver.paths()
    url = f"http://127.0.0.1:{port}"
    try:
        cold = wait_ping(lambda: url, t0, process, f"mlserver ({name})", paths["ready_path"], server_process=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; its log: {(workdir / f'{name}.log').read_text(errors='replace')[-2000:]}") from None
    return {"name": name, "url": url, "port": port, "pgid": process.pid, "cold_start_s": cold,
            "path": paths["path"], "ready_path": paths["ready_path"], "protocol": "v2"}


def start_ours(workers: int, extra_config: list[str], variant: str | None = None) -> dict[str, Any]:
    deployment = DEPLOYMENT if variant is None else f"{DEPLOYMENT}-{variant}"
    label = "ours" if variant is None else f"ours-{variant}"
    config = ["-C", f"workers={workers}"]
    env = dict(os.environ)
    for item in extra_config:
        if item.startswith("env."):  # e.g. env.PYTHONPATH=/other/checkout: another version of our code
            key, _, value = item.removeprefix("env.").partition("=")
            env[key] = value
        else:
            config += ["-C", item]
    log_path = Path.cwd() / f"{label}-create.log"
    log = open(log_path, "wb")  # noqa: SIM115
    t0 = time.monotonic()
    CLEANUP.ours_created.append(deployment)  # delete is harmless if create fails
    create = subprocess.Popen(
        [mlflow_bin(), "deployments", "create", "-t", "lifecycle", "--name", deployment,
         "-m", f"models:/{MODEL_NAME}/1", *config],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=env)
    try:
        cold = wait_ping(lambda: read_status(deployment).get("url"), t0, create, "mlflow deployments create")
        create.wait(timeout=STARTUP_DEADLINE_S)
    except BaseException:
        stop_group(create, grace_s=3)
        raise
    cli_done = time.monotonic() - t0
    if create.returncode != 0:
        raise RuntimeError(f"mlflow deployments create failed: {log_path.read_text()[-2000:]}")
    got = subprocess.run([mlflow_bin(), "deployments", "get", "-t", "lifecycle", "--name", deployment],
                         capture_output=True, text=True, timeout=STARTUP_DEADLINE_S, check=True).stdout
    status = read_status(deployment)
    url = status["url"]
    if url not in got:
        print(f"WARNING: `mlflow deployments get` does not show {url}:\n{got}", file=sys.stderr)
    return {"name": label, "url": url, "port": status["port"], "pgid": status["pid"], "cold_start_s": cold,
            "create_cli_s": cli_done, "deployment": deployment}


def compare_predictions(frame: Any, servers: list[dict[str, Any]]) -> dict[str, Any]:
    sample = frame.iloc[:100]
    columns, data = list(sample.columns), sample.to_numpy().tolist()
    answers = {}
    for server in servers:
        v2 = server.get("protocol") == "v2"
        body = (serving_mlserver.v2_body(columns, data) if v2
                else json.dumps({"dataframe_split": {"columns": columns, "data": data}}))
        url = server["url"] + (server["path"] if v2 else "/invocations")
        status, text = http("POST", url, body.encode())
        if status != 200:
            raise RuntimeError(f"{server['name']} answered {status} to the comparison sample: {text[:300]!r}")
        answer = json.loads(text)
        # Compared as lists of predictions: V2's one output tensor, or /invocations' "predictions".
        answers[server["name"]] = serving_mlserver.v2_predictions(answer) if v2 else answer.get("predictions", answer)
    names = list(answers)
    equal = all(answers[n] == answers[names[0]] for n in names)
    if not equal:
        print(f"WARNING: predictions differ: { {n: str(a)[:200] for n, a in answers.items()} }", file=sys.stderr)
    return {"equal": equal, "rows": len(sample), "sample": str(answers[names[0]])[:120]}


# ------------------------------------------------------------------------------------------------
# One measurement
# ------------------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def measure(server: dict[str, Any], bodies: list[str], concurrency: int, duration: float,
            client_procs: int, spec_dir: Path, rows: int, warmup_s: float = WARMUP_S) -> dict[str, Any]:
    procs = max(1, min(client_procs, concurrency))
    t_start = time.monotonic() + 0.5  # time for the clients to start (they import only stdlib)
    t_window = t_start + warmup_s
    t_end = t_window + duration
    clients = []
    for i in range(procs):
        share = concurrency // procs + (1 if i < concurrency % procs else 0)
        spec_path = spec_dir / f"client-{i}.json"
        spec_path.write_text(json.dumps({
            "host": "127.0.0.1", "port": server["port"], "path": server.get("path", "/invocations"),
            "bodies": bodies[i::procs] or bodies,
            "concurrency": share, "t_start": t_start, "t_window": t_window, "t_end": t_end}))
        client = subprocess.Popen([sys.executable, __file__, "--_client", str(spec_path)],
                                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        clients.append(client)
        CLEANUP.clients.append(client)
    accounted = server.get("engine") != "ray"  # a Ray server's processes are the cluster's
    client_pids = {client.pid: "client" for client in clients}
    time.sleep(max(0.0, t_window - time.monotonic()))
    server_cpu0, busy0 = server_cpu_s(server), machine_busy_s()
    snap0 = accounting_snapshot([*server_cpu0, *client_pids]) if accounted else {}
    batches0 = predict_batches(server)  # one /metrics request each side of the window: noise enough
    time.sleep(max(0.0, t_end - time.monotonic()))
    server_cpu1, busy1 = server_cpu_s(server), machine_busy_s()
    snap1 = accounting_snapshot([*server_cpu1, *client_pids]) if accounted else {}
    batches1 = predict_batches(server)
    # Calls and rows of the window (the two /metrics reads land a few ms inside it: near enough).
    batch_calls, batch_rows = ((batches1[0] - batches0[0], batches1[1] - batches0[1])
                               if batches0 is not None and batches1 is not None else (float("nan"), float("nan")))
    roles = {**process_roles(server), **client_pids} if accounted else {}
    # Per process (CLI parent, supervisor, each worker): shows how evenly workers share the load.
    per_process = sorted((100 * (t - server_cpu0.get(pid, 0.0)) / duration for pid, t in server_cpu1.items()),
                         reverse=True)
    server_cpu0, server_cpu1 = sum(server_cpu0.values()), sum(server_cpu1.values())
    results = []
    for client in clients:
        out, _ = client.communicate(timeout=REQUEST_GRACE_S + 30)
        CLEANUP.clients.remove(client)
        if client.returncode != 0:
            raise RuntimeError(f"load generator exited with {client.returncode}")
        results.append(json.loads(out))
    latencies = sorted(x for r in results for x in r["latencies"])
    completions = [x for r in results for x in r["completions"]]
    buckets = [0] * max(1, int(duration))
    for c in completions:
        buckets[min(len(buckets) - 1, int(c))] += 1
    statuses: dict[str, int] = {}
    for r in results:
        for code, n in r["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    client_cpu = sum(r["cpu_s"] for r in results)
    busy = busy1 - busy0
    return {
        "server": server["name"], "rows": rows,
        "concurrency": concurrency, "client_procs": procs, "duration_s": duration,
        "requests": len(latencies), "rps": len(latencies) / duration,
        "p50_ms": percentile(latencies, 0.50) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": (latencies[-1] * 1000) if latencies else float("nan"),
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        "rps_per_second_min": min(buckets), "rps_per_second_max": max(buckets),
        "errors": sum(r["errors"]["non_200"] + r["errors"]["transport"] for r in results),
        "non_200": sum(r["errors"]["non_200"] for r in results),
        "transport_errors": sum(r["errors"]["transport"] for r in results),
        "reconnects": sum(r["errors"]["reconnects"] for r in results),
        "stuck_connections": sum(r["stuck"] for r in results),
        "first_error": next((r["errors"]["first"] for r in results if r["errors"]["first"]), None),
        "statuses": statuses,
        "client_cpu_core_pct": 100 * client_cpu / duration,
        "server_cpu_core_pct": 100 * (server_cpu1 - server_cpu0) / duration,
        "server_cpu_per_process_pct": [round(x, 1) for x in per_process],
        # Requests per CPU-second of the server: robust to other jobs stealing the CPU.
        "req_per_server_cpu_s": len(latencies) / (server_cpu1 - server_cpu0) if server_cpu1 > server_cpu0
        else float("nan"),
        "rows_per_predict_call": batch_rows / batch_calls if batch_calls else float("nan"),
        # Per kind of process, per request: what capture on vs off costs where (see per_role).
        "per_role": per_role(snap0, snap1, roles, len(latencies), duration) if accounted else {},
        "machine_busy_pct": 100 * busy / duration / (os.cpu_count() or 1),
        "client_share_of_busy_pct": 100 * client_cpu / busy if busy > 0 else float("nan"),
        # CPU used by neither the server nor the load generator (other jobs on the machine).
        "other_cpu_core_pct": 100 * (busy - client_cpu - (server_cpu1 - server_cpu0)) / duration,
    }


def shadow_cells(ours: dict[str, Any], frame: Any, args: argparse.Namespace, spec_dir: Path) -> dict[str, Any]:
    """Our primary's latency with a shadow version off and on, alternating, under the same load.

    The shadow (v2, another LogisticRegression) answers a copy of every captured request after the
    answer is sent (``-C shadow``); what it may cost the primary is what this shows: each shadow-on
    cell's p99 against the mean of the two shadow-off cells around it (the machine's load drifts),
    ``--passes`` on cells per load point (off, on, off, on, ..., off), the median of those ratios.
    One pair of off cells can differ by half on a 2-core machine: one ratio decides nothing. Each
    cell is measured after :data:`SHADOW_WARMUP_S` of load, so what a switch restarts is not in it.
    """
    import mlflow
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    labels = (frame["f0"] + frame["f1"] > 0).astype(int)  # another model, answering differently
    with mlflow.start_run():
        model = LogisticRegression(max_iter=1000).fit(frame, labels)
        mlflow.sklearn.log_model(model, name="model", signature=infer_signature(frame, model.predict(frame)),
                                 input_example=frame.head(5), registered_model_name=MODEL_NAME,
                                 pip_requirements=["scikit-learn"])
    cells: list[dict[str, Any]] = []
    point_ratios: list[dict[str, Any]] = []
    for rows, conc in args.cells:
        bodies = make_bodies(frame, rows)
        states = [("off", "none"), ("on", f"models:/{MODEL_NAME}/2")] * max(1, args.passes) + [("off", "none")]
        point = []
        for state, value in states:
            subprocess.run([mlflow_bin(), "deployments", "update", "-t", "lifecycle", "--name", DEPLOYMENT,
                            "-C", f"shadow={value}"], capture_output=True, text=True, timeout=STARTUP_DEADLINE_S,
                           check=True)
            cell = measure(ours, bodies, conc, args.duration, args.client_procs, spec_dir, rows, SHADOW_WARMUP_S)
            cell["shadow"] = state
            if state == "on":
                _, text = http("GET", f"{ours['url']}/metrics")
                cell["shadow_metrics"] = {line.split(" ")[0]: float(line.split(" ")[1])
                                          for line in text.decode().splitlines()
                                          if line.startswith(("mlflow_deploy_shadow_calls_total",
                                                              "mlflow_deploy_shadow_dropped_requests_total"))}
            point.append(cell)
            print(f"  ours  rows={rows:<4} conc={conc:<3} shadow {state:<3} {cell['rps']:8.1f} req/s  "
                  f"p50 {cell['p50_ms']:7.2f} ms  p99 {cell['p99_ms']:7.2f} ms  errors {cell['errors']}",
                  file=sys.stderr)
        cells.extend(point)
        point_ratios.append(shadow_ratio(point))
    for r in point_ratios:
        each = ", ".join(f"{x:.2f}" for x in r["p99_on_over_off_each"])
        print(f"  shadow cost rows={r['rows']:<4} conc={r['concurrency']:<3} p99 on/off "
              f"{r['p99_on_over_off']:.2f}x (median of {each}; {r['p99_on_ms']:.2f} vs {r['p99_off_ms']:.2f} ms), "
              f"req/s on/off {r['rps_on_over_off']:.2f}x, goal <= 1.1x: "
              f"{'met' if r['p99_on_over_off'] <= 1.1 else 'NOT met'}", file=sys.stderr)
    return {"cells": cells, "ratios": point_ratios}


def shadow_ratio(point: list[dict[str, Any]]) -> dict[str, Any]:
    """One load point's off, on, off, ..., off cells as ratios: each on cell against its two neighbours."""
    p99_each, rps_each, on_p99, off_p99 = [], [], [], []
    for i in range(1, len(point) - 1, 2):
        before, on, after = point[i - 1], point[i], point[i + 1]
        off = (before["p99_ms"] + after["p99_ms"]) / 2
        p99_each.append(on["p99_ms"] / off if off else float("nan"))
        rps_each.append(on["rps"] / ((before["rps"] + after["rps"]) / 2))
        on_p99.append(on["p99_ms"])
        off_p99.append(off)
    return {"rows": point[0]["rows"], "concurrency": point[0]["concurrency"],
            "p99_on_ms": statistics.median(on_p99), "p99_off_ms": statistics.median(off_p99),
            "p99_on_over_off": statistics.median(p99_each), "p99_on_over_off_each": p99_each,
            "rps_on_over_off": statistics.median(rps_each)}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    print()
    print(f"Servers: workers={report['workers']}, machine: {os.cpu_count()} cores; "
          f"load: closed loop, {report['duration_s']:g} s per cell after {WARMUP_S:g} s warm-up")
    for server in report["servers"]:
        extra = f", `create` returned after {server['create_cli_s']:.2f} s" if "create_cli_s" in server else ""
        print(f"  {server['name']:<5} {server['url']}  cold start (launch -> first 200 {server.get('ready_path', '/ping')}): "
              f"{server['cold_start_s']:.2f} s{extra}")
        for when, memory in server.get("memory", {}).items():
            print(f"        memory {when}: RSS {memory['rss_mb']:.0f} MB, PSS {memory['pss_mb']:.0f} MiB, "
                  f"{memory['processes']:.0f} processes ("
                  + ", ".join(f"{p['what']} {p['pss_mb']:.0f}" for p in memory.get("per_process", [])) + ")")
    cmp = report["predictions"]
    print(f"  predictions equal on {cmp['rows']} rows: {cmp['equal']}")
    print()
    header = (f"{'rows':>4} {'conc':>4} {'server':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
              f"{'err':>4} {'rps/s min-max':>14} {'req/cpu-s':>9} {'srv cpu%':>8} {'cli cpu%':>8} {'cli/busy':>8} {'oth cpu%':>8}  srv cpu% per process")
    print(header)
    print("-" * len(header))
    for cell in report["results"]:
        print(f"{cell['rows']:>4} {cell['concurrency']:>4} {cell['server']:<14} {cell['rps']:>8.1f} "
              f"{cell['p50_ms']:>8.2f} {cell['p99_ms']:>8.2f} {cell['max_ms']:>8.1f} {cell['errors']:>4} "
              f"{cell['rps_per_second_min']:>6}-{cell['rps_per_second_max']:<7} "
              f"{cell['req_per_server_cpu_s']:>9.0f} {cell['server_cpu_core_pct']:>8.0f} {cell['client_cpu_core_pct']:>8.0f} "
              f"{cell['client_share_of_busy_pct']:>7.0f}% {cell['other_cpu_core_pct']:>8.0f}  "
              f"{'/'.join(f'{x:.0f}' for x in cell['server_cpu_per_process_pct'] if x >= 0.5) or '0'}")
    print()
    print("Ratios (throughput ours/theirs; p99 theirs/ours; > 1 means ours is better):")
    for ratio in report["ratios"]:
        print(f"  rows={ratio['rows']:>3} conc={ratio['concurrency']:>2}: throughput x{ratio['throughput_ours_over_theirs']:.2f}"
              f"   p99 x{ratio['p99_theirs_over_ours']:.2f}   req per server CPU-s x{ratio['cpu_efficiency_ours_over_theirs']:.2f}")
    for ratio in report.get("variant_ratios", []):
        print(f"  rows={ratio['rows']:>3} conc={ratio['concurrency']:>2}: ours vs {ratio['variant']}: throughput "
              f"x{ratio['throughput_ours_over_variant']:.3f}   p99 x{ratio['p99_ours_over_variant']:.2f}   "
              f"max {ratio['max_ms_ours']:.1f} ms vs {ratio['max_ms_variant']:.1f} ms")
    for cell in report["results"]:
        if not cell["requests"]:
            print(f"  ! {cell['server']} rows={cell['rows']} conc={cell['concurrency']}: no request completed "
                  "in the window (a stall longer than --duration?); goals reading this cell are not judged")
        if cell["errors"] or cell["stuck_connections"]:
            print(f"  ! {cell['server']} rows={cell['rows']} conc={cell['concurrency']}: {cell['errors']} errors "
                  f"{cell['statuses']}, {cell['stuck_connections']} stuck; first: {cell['first_error']}")
    serving_ray.print_ray_ratios(report.get("ray_ratios") or [])
    if report.get("ray_cluster"):
        info = report["ray_cluster"]
        origin = f"private, started in {info['start_s']:.1f} s" if info["private"] else "given"
        print(f"Ray: cluster {info['address']} ({origin}); a Ray server's cpu% is the whole cluster's (GCS, "
              f"raylet, controller, proxy, replicas); cluster RSS after run {info['rss_mb']:.0f} MB")
    print_accounting(report["results"])
    print("req/cpu-s = requests per CPU-second of the server's processes (robust to CPU stolen by other jobs).")
    print("cpu% columns are % of ONE core during the measured window; cli/busy = load generator's share of "
          "all CPU the machine used then; oth = CPU of other jobs on the machine (noise).")
    print_issue_report(report)


def print_accounting(results: list[dict[str, Any]]) -> None:
    """Each server's processes by kind, per request (medians over passes): CPU, run-queue wait and
    context switches; then, for each ``ours-<variant>``, ours minus it per kind (capture's cost where)."""
    if not any(cell.get("per_role") for cell in results):
        return
    print()
    print("Per kind of process (medians over passes): cpu% of one core; CPU and run-queue wait in µs per request;")
    print("voluntary / involuntary context switches per 1,000 requests (all threads); thr = CPU of threads other")
    print("than the main one; main runq / main vol = the main thread's alone.")
    header = (f"{'rows':>4} {'conc':>4} {'server':<14} {'process':<12} {'cpu%':>6} {'cpu µs/req':>10} "
              f"{'thr µs/req':>10} {'runq µs/req':>11} {'main runq':>9} {'vol/1k':>8} {'main vol':>8} {'invol/1k':>8}")
    print(header)
    print("-" * len(header))
    for cell in results:
        if cell.get("rows_per_predict_call") == cell.get("rows_per_predict_call"):  # not NaN
            print(f"{cell['rows']:>4} {cell['concurrency']:>4} {cell['server']:<14} rows per predict call "
                  f"{cell['rows_per_predict_call']:.1f}")
        for role, f in cell.get("per_role", {}).items():
            print(f"{cell['rows']:>4} {cell['concurrency']:>4} {cell['server']:<14} {role:<12} {f['cpu_pct']:>6.1f} "
                  f"{f['cpu_us_per_req']:>10.1f} {f['threads_us_per_req']:>10.1f} {f['runq_us_per_req']:>11.1f} "
                  f"{f['main_runq_us_per_req']:>9.1f} {f['vol_per_1k']:>8.0f} {f['main_vol_per_1k']:>8.0f} "
                  f"{f['invol_per_1k']:>8.0f}")
    cells: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for cell in results:
        cells.setdefault((cell["rows"], cell["concurrency"]), {})[cell["server"]] = cell
    for (rows, conc), group in cells.items():
        ours = group.get("ours")
        for name, other in group.items():
            if ours is None or not name.startswith("ours-") or not other.get("per_role"):
                continue
            diffs = []
            for role in sorted(set(ours["per_role"]) | set(other["per_role"])):
                a, b = ours["per_role"].get(role), other["per_role"].get(role)
                cpu = (a["cpu_us_per_req"] if a else 0.0) - (b["cpu_us_per_req"] if b else 0.0)
                diffs.append(f"{role} {cpu:+.1f}")
            print(f"  rows={rows:>3} conc={conc:>2}: ours minus {name}, cpu µs/req: {', '.join(diffs)}")


def print_issue_report(report: dict[str, Any]) -> None:
    """Issue 10's table (req/s · p99 ms, medians over passes), ours against each peer, the goals."""
    print()
    print(f"Issue 10 table ({report.get('passes', 1)} interleaved passes, medians; req/s · p99 ms):")
    for line in serving_goals.table(report):
        print(line)
    rows = report.get("peer_ratios") or []
    if rows:
        print()
        print("Ours against each peer (throughput ours/theirs, p99 theirs/ours; > 1: ours is better):")
        for ratio in rows:
            print(f"  rows={ratio['rows']:>3} conc={ratio['concurrency']:>2} vs {ratio['peer']:<14} "
                  f"throughput x{ratio['throughput']:.2f}   p99 x{ratio['p99']:.2f}")
    print()
    print("Goals of issue 10 (figures of this run only):")
    for line in serving_goals.goal_lines(report.get("goals") or []):
        print(line)


def median_cell(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell's passes as one: the median of each figure (the first pass's for the rest)."""
    if len(cells) == 1:
        return cells[0]
    out = dict(cells[0])
    for key, value in cells[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("rows", "concurrency"):
            out[key] = statistics.median(c[key] for c in cells)
    out["passes"] = [{k: c[k] for k in ("rps", "p99_ms", "max_ms", "requests", "per_role") if k in c} for c in cells]
    roles = {role for c in cells for role in c.get("per_role", {})}
    out["per_role"] = {role: {key: statistics.median(c["per_role"][role][key] for c in cells if role in c["per_role"])
                              for key in next(c["per_role"][role] for c in cells if role in c["per_role"])}
                       for role in sorted(roles)}
    return out


def variant_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each ``ours-<variant>`` against ``ours`` in the same cell (e.g. what capture costs)."""
    cells: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for cell in results:
        cells.setdefault((cell["rows"], cell["concurrency"]), {})[cell["server"]] = cell
    out = []
    for (rows, conc), group in cells.items():
        ours = group.get("ours")
        for name, other in group.items():
            if ours is None or not name.startswith("ours-"):
                continue
            out.append({"rows": rows, "concurrency": conc, "variant": name,
                        "throughput_ours_over_variant": ours["rps"] / other["rps"] if other["rps"] else float("nan"),
                        "p99_ours_over_variant": ours["p99_ms"] / other["p99_ms"] if other["p99_ms"] else float("nan"),
                        "max_ms_ours": ours["max_ms"], "max_ms_variant": other["max_ms"]})
    return out


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for cell in results:
        cells.setdefault((cell["rows"], cell["concurrency"]), {})[cell["server"]] = cell
    out = []
    for (rows, conc), pair in cells.items():
        if "ours" in pair and "peer" in pair:
            ours, peer = pair["ours"], pair["peer"]
            out.append({"rows": rows, "concurrency": conc,
                        "throughput_ours_over_theirs": ours["rps"] / peer["rps"] if peer["rps"] else float("inf"),
                        "p99_theirs_over_ours": peer["p99_ms"] / ours["p99_ms"] if ours["p99_ms"] else float("nan"),
                        "cpu_efficiency_ours_over_theirs": ours["req_per_server_cpu_s"] / peer["req_per_server_cpu_s"]})
    return out


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def start_ray_servers(workdir: Path) -> list[dict[str, Any]]:
    """``--engine ray``: a private Ray cluster (unless RAY_ADDRESS), Serve's trivial ceiling, and our
    deployment with 1 and 2 replicas through `mlflow deployments create -t lifecycle:/ray`."""
    cluster = serving_ray.Cluster()
    CLEANUP.ray_cluster = cluster
    print("  starting a Ray cluster (ray start --head --num-cpus 2) ..." if not cluster.address
          else f"  using the Ray cluster at {cluster.address} ...", file=sys.stderr)
    cluster.start(Path(sys.executable).parent)
    servers = [serving_ray.start_trivial()]
    for replicas in (1, 2):
        CLEANUP.ray_created.append(f"bench-ray{replicas}")
        servers.append(serving_ray.start_ray_ours(mlflow_bin(), f"models:/{MODEL_NAME}/1", replicas, workdir))
    for server in servers:
        server["engine"] = "ray"
        print(f"  {server['name']} up in {server['cold_start_s']:.2f} s at {server['url']}", file=sys.stderr)
    return servers


def ray_cluster_info() -> dict[str, Any]:
    cluster = CLEANUP.ray_cluster
    pids = cluster.pids()
    return {"address": cluster.address, "private": cluster.proc is not None, "start_s": cluster.start_s,
            "rss_mb": sum(procfs.rss_bytes(pid) for pid in pids) / 2**20}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def cell_list(text: str) -> list[tuple[int, int]]:
    """``1x1,1x8,100x32``: (rows, concurrency) pairs."""
    try:
        cells = [(int(rows), int(conc)) for rows, conc in (item.lower().split("x") for item in text.split(",")
                                                            if item.strip())]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of ROWSxCONCURRENCY, e.g. 1x1,100x32") from None
    if not cells or min(min(cell) for cell in cells) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of ROWSxCONCURRENCY with positive integers")
    return cells


DEFAULT_CELLS = "1x1,1x8,1x32,1x64,100x32"  # issue 10's cells


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="worker processes of each server (default 1)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell (default 5)")
    parser.add_argument("--cells", type=cell_list, default=cell_list(DEFAULT_CELLS),
                        help=f"ROWSxCONCURRENCY cells (default {DEFAULT_CELLS}, issue 10's)")
    parser.add_argument("--concurrency", type=int_list, help="with --rows: every pair instead of --cells "
                        "(the other defaults to 1,8,32 concurrency or 1,100 rows)")
    parser.add_argument("--rows", type=int_list, help="rows per request; with --concurrency: every pair instead of --cells")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="load generator processes per cell, connections split among them (default 1)")
    parser.add_argument("--ours-config", action="append", default=[], metavar="KEY=VALUE",
                        help="extra -C for our deployment (repeatable), e.g. capture=false")
    parser.add_argument("--ours-variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="one more deployment of ours with these -C (repeatable), e.g. nocap:capture=false")
    parser.add_argument("--passes", type=int, default=2, help="measure every cell this many times (median shown; "
                        "default 2)")
    parser.add_argument("--no-nocap", action="store_true",
                        help="do not add ours with capture off (nocap:capture=false) to the run")
    parser.add_argument("--no-peer", action="store_true", help="do not start `mlflow models serve`")
    parser.add_argument("--no-mlserver", action="store_true", help="do not start MLServer (plain and batching)")
    parser.add_argument("--mlserver-venv", type=Path, default=serving_mlserver.default_venv(),
                        help="MLServer's own virtualenv, made and installed there when missing (default %(default)s)")
    parser.add_argument("--shadow", action="store_true",
                        help="also measure our primary's latency with a shadow version off and on, alternating, "
                             "--passes on cells per load point (same run, same load; see shadow_cells)")
    parser.add_argument("--idle-wait", type=float, default=0.0,
                        help="after the load, wait this long and measure every server's memory again (idle)")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="ray: also our deployment on Ray Serve (1 and 2 replicas) and Serve's own ceiling "
                             "(a trivial endpoint), on a private Ray cluster unless RAY_ADDRESS is set")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs) after the run")
    args = parser.parse_args(argv)
    if args.rows or args.concurrency:
        args.cells = [(rows, conc) for rows in args.rows or [1, 100] for conc in args.concurrency or [1, 8, 32]]
    if not args.no_nocap and not any(v.partition(":")[0] == "nocap" for v in args.ours_variant):
        args.ours_variant.append("nocap:capture=false")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_path = Path(args.out).resolve() if args.out else None
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-serving-bench-"))
    CLEANUP.workdir, CLEANUP.keep = workdir, args.keep
    atexit.register(CLEANUP.run)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MLFLOW_DEPLOY_HOME"] = str(workdir / "deploy-home")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH (as if activated).
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.chdir(workdir)
    try:
        t0 = time.monotonic()
        # Before anything is timed: a first run installs MLServer (minutes), later runs reuse it.
        mlserver_exe = (None if args.no_mlserver
                        else serving_mlserver.ensure_venv(args.mlserver_venv, serving_mlserver.pins()))
        print(f"workdir {workdir}; training and registering {MODEL_NAME} ...", file=sys.stderr)
        frame = train_and_register()
        print(f"  done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        servers = []
        if not args.no_peer:
            print("  starting peer (mlflow models serve) ...", file=sys.stderr)
            servers.append(start_peer(args.workers))
            print(f"  peer up in {servers[-1]['cold_start_s']:.2f} s", file=sys.stderr)
        if mlserver_exe is not None:
            model_dir = download_model(workdir)
            for batching in (False, True):
                print(f"  starting MLServer {serving_mlserver.VERSION} ({'adaptive batching' if batching else 'plain'}, "
                      f"parallel_workers={args.workers}) ...", file=sys.stderr)
                servers.append(start_mlserver(mlserver_exe, model_dir, args.workers, batching, workdir))
                print(f"  {servers[-1]['name']} up in {servers[-1]['cold_start_s']:.2f} s", file=sys.stderr)
        print("  starting ours (mlflow deployments create) ...", file=sys.stderr)
        servers.append(start_ours(args.workers, args.ours_config))
        print(f"  ours up in {servers[-1]['cold_start_s']:.2f} s", file=sys.stderr)
        for variant in args.ours_variant:
            name, _, items = variant.partition(":")
            extra = args.ours_config + [x for x in items.split(",") if x]
            servers.append(start_ours(args.workers, extra, name))
            print(f"  {servers[-1]['name']} ({','.join(extra)}) up in {servers[-1]['cold_start_s']:.2f} s",
                  file=sys.stderr)
        if args.engine == "ray":
            servers += start_ray_servers(workdir)
        predictions = compare_predictions(frame, [server for server in servers if not server.get("trivial")])
        for server in servers:
            if server.get("engine") != "ray":
                server["memory"] = {"idle, before load": memory_of(server["pgid"], process_roles(server))}
        results = []
        spec_dir = workdir / "client-specs"
        spec_dir.mkdir()
        for rows, conc in args.cells:
            bodies = {protocol: make_bodies(frame, rows, protocol) for protocol in ("mlflow", "v2")}
            passes: dict[str, list[dict[str, Any]]] = {}
            for n_pass in range(args.passes):
                # Interleaved, and in the other order on odd passes: no server always goes first.
                for server in servers if n_pass % 2 == 0 else servers[::-1]:
                    cell = measure(server, bodies[server.get("protocol", "mlflow")], conc, args.duration,
                                   args.client_procs, spec_dir, rows)
                    passes.setdefault(server["name"], []).append(cell)
                    print(f"  {server['name']:<14} rows={rows:<4} conc={conc:<3} {cell['rps']:8.1f} req/s  "
                          f"p50 {cell['p50_ms']:7.2f} ms  p99 {cell['p99_ms']:7.2f} ms  "
                          f"max {cell['max_ms']:7.1f} ms  errors {cell['errors']}", file=sys.stderr)
            results.extend(median_cell(passes[server["name"]]) for server in servers)
        ours = next(server for server in servers if server["name"] == "ours")
        shadow = shadow_cells(ours, frame, args, spec_dir) if args.shadow else None
        for server in servers:
            if server.get("engine") == "ray":
                continue  # replicas are Ray's actors, not a process group of ours
            server.setdefault("memory", {})["after load"] = memory_of(server["pgid"], process_roles(server))
            server["rss_mb"] = server["memory"]["after load"]["rss_mb"]
        if args.idle_wait:
            # An idle deployment: its capture converter exits after a while with nothing to convert.
            print(f"  idle for {args.idle_wait:g} s before measuring memory again ...", file=sys.stderr)
            time.sleep(args.idle_wait)
            for server in servers:
                if server.get("engine") != "ray":
                    server["memory"][f"idle {args.idle_wait:g} s"] = memory_of(server["pgid"], process_roles(server))
        report = {"shadow": shadow, "workers": args.workers, "duration_s": args.duration, "cpu_count": os.cpu_count(),
                  "passes": args.passes, "cells": args.cells,
                  "servers": servers, "predictions": predictions, "results": results,
                  "ratios": ratios(results), "variant_ratios": variant_ratios(results),
                  "peer_ratios": serving_goals.peer_ratios(results),
                  "ray_ratios": serving_ray.ray_ratios(results) if args.engine == "ray" else [],
                  "ray_cluster": ray_cluster_info() if args.engine == "ray" else None,
                  "total_s": time.monotonic() - t0,
                  "ours_config": args.ours_config, "commit": _commit()}
        report["goals"] = serving_goals.judge(report)
        if args.keep:
            report["workdir"] = str(workdir)
        print_report(report)
        if out_path:
            out_path.write_text(json.dumps(report, indent=2))
            print(f"wrote {out_path}")
        return 0 if predictions["equal"] else 1
    finally:
        CLEANUP.run()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_client":
        sys.exit(client_process(sys.argv[2]))
    sys.exit(main())
