"""The Ray side of ``benchmarks/serving.py --engine ray``: a cluster, our Ray deployments, Serve's ceiling.

Started beside the local engine and `mlflow models serve` of the same run, measured in the same
cells by the same load generator:

- ``ray-1r`` and ``ray-2r``: `mlflow deployments create -t lifecycle:/ray` of the same model with
  ``-C num_replicas=1`` and ``2`` (``-C num_cpus=0.5`` each, so both fit a 2-CPU cluster beside the
  trivial app);
- ``ray-trivial``: a Serve deployment that answers a constant JSON to any request, behind the same
  proxy: the ceiling of Serve's HTTP proxy and request routing on this machine, which no Ray
  deployment can pass, so the others read against it. It gets the ``max_ongoing_requests`` our
  deployments get by default (2 x max_queue, ``engines/ray/engine.py``): with Serve's own default
  (5) the router, not the proxy, capped it (~13 req/s at 32 clients), below what ours then reach.

The cluster: ``$RAY_ADDRESS`` if set (its Serve proxy must already listen, e.g. `serve start`), else a
private one (``ray start --head --block --num-cpus 2`` on free ports and a temp dir, its own proxy on a
free loopback port), stopped at the end by its own process tree, never by `ray stop` (which would
stop every Ray cluster on the machine, the test suites' included).

The CPU a cell charges to a Ray server is that of the whole private cluster (GCS, raylet, Serve's
controller and proxy, every replica): what serving on Ray costs here. With an outside cluster it
is not measured (nan).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import procfs  # benchmarks/procfs.py

TARGET = "lifecycle:/ray"
TRIVIAL_APP = "bench-trivial"
REPLICA_CPUS = "0.5"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (Ray's actor workers run in sessions of their own, so
    the cluster is found by parentage, not by process group)."""
    children: dict[int, list[int]] = {}
    for child, fields in procfs.live_processes():
        children.setdefault(int(fields[1]), []).append(child)
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


class Cluster:
    """A private local Ray cluster with Serve's proxy on a free loopback port (or the given one)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.temp: Path | None = None
        self.address = os.environ.get("RAY_ADDRESS") or ""
        self.start_s = float("nan")

    def start(self, bin_dir: Path, cpus: int = 2) -> str:
        if self.address:
            return self.address
        # Ray puts unix sockets under its temp dir: keep the path short (the socket path limit is 107).
        self.temp = Path(tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"))
        port = _free_port()
        log = open(self.temp / "ray-start.log", "wb")  # noqa: SIM115 - lives as long as the cluster
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus", str(cpus), "--disable-usage-stats",
             "--include-dashboard=false", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
             "--temp-dir", str(self.temp)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 180
        while b"Ray runtime started" not in (self.temp / "ray-start.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {(self.temp / 'ray-start.log').read_text()[-2000:]}")
            time.sleep(0.1)
        self.address = f"127.0.0.1:{port}"
        subprocess.run([str(bin_dir / "serve"), "start", "--address", self.address, "--http-host", "127.0.0.1",
                        "--http-port", str(_free_port())], check=True, capture_output=True, timeout=180)
        self.start_s = time.monotonic() - t0
        os.environ["RAY_ADDRESS"] = self.address  # our CLI calls and this process join it
        return self.address

    def pids(self) -> list[int]:
        return descendants(self.proc.pid) if self.proc is not None else []

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            import ray

            if ray.is_initialized():
                ray.shutdown()
        if self.proc is None:
            return
        family = self.pids()
        self.proc.terminate()  # `ray start --block` stops what it started
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # whatever outlived its raylet
        self.proc = None
        print("stopped the benchmark's Ray cluster", file=sys.stderr)


def join() -> None:
    """This process joins the cluster as a driver, quietly (the replicas' access logs stay in the
    cluster's log files instead of interleaving with the benchmark's output)."""
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ["RAY_ADDRESS"], namespace="mlflow-deploy-bench", log_to_driver=False,
                 logging_level=logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def serve_http() -> tuple[str, int]:
    """Host and port of the cluster's Serve proxy."""
    from ray import serve
    from ray.serve.context import _get_global_client

    join()
    serve.start()  # attaches to the running controller (starts one only on a bare outside cluster)
    http = _get_global_client().get_serve_details().get("http_options") or {}
    host = str(http.get("host") or "127.0.0.1")
    return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), int(http.get("port") or 8000)


def start_trivial() -> dict[str, Any]:
    """Serve's own ceiling: a deployment answering a constant JSON, behind the same proxy."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    from mlflow_deploy_plugin.engines.ray.engine import max_ongoing_requests
    from mlflow_deploy_plugin.spec import DeploymentConfig

    @serve.deployment(ray_actor_options={"num_cpus": float(REPLICA_CPUS)},
                      max_ongoing_requests=max_ongoing_requests(DeploymentConfig()))
    class Trivial:
        async def __call__(self, request: Request) -> Response:
            await request.body()
            return Response(b'{"predictions": [0]}', media_type="application/json")

    join()
    t0 = time.monotonic()
    serve.run(Trivial.bind(), name=TRIVIAL_APP, route_prefix=f"/{TRIVIAL_APP}")  # type: ignore[attr-defined]
    host, port = serve_http()
    return {"name": "ray-trivial", "url": f"http://{host}:{port}/{TRIVIAL_APP}", "port": port,
            "path": f"/{TRIVIAL_APP}/invocations", "cold_start_s": time.monotonic() - t0, "trivial": True}


def start_ray_ours(mlflow_bin: str, model_uri: str, replicas: int, log_dir: Path) -> dict[str, Any]:
    """One of our deployments on the cluster, through the real CLI; ``create`` returns once every
    replica runs, so its duration is the cold start."""
    from mlflow.deployments import get_deploy_client

    name = f"bench-ray{replicas}"
    log_path = log_dir / f"{name}-create.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        done = subprocess.run(
            [mlflow_bin, "deployments", "create", "-t", TARGET, "--name", name, "-m", model_uri,
             "-C", f"num_replicas={replicas}", "-C", f"num_cpus={REPLICA_CPUS}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=600)
    cold = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"create -t {TARGET} failed: {log_path.read_text()[-2000:]}")
    view = get_deploy_client(TARGET).get_deployment(name)
    url = str(view["url"])
    port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    return {"name": f"ray-{replicas}r", "deployment": name, "url": url, "port": port,
            "path": f"/{name}/invocations", "cold_start_s": cold, "create_cli_s": cold,
            "replica_pids": [r["pid"] for r in view["replicas"]]}


def ray_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell: each Ray server's throughput against the local engine (``ours``), the peer, and the
    proxy's ceiling (``ray-trivial``)."""
    cells: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for cell in results:
        cells.setdefault((cell["rows"], cell["concurrency"]), {})[cell["server"]] = cell
    out = []
    for (rows, conc), group in cells.items():
        for name in ("ray-1r", "ray-2r"):
            ray_cell = group.get(name)
            if ray_cell is None:
                continue
            row: dict[str, Any] = {"rows": rows, "concurrency": conc, "server": name, "rps": ray_cell["rps"]}
            for other, key in (("ours", "over_local"), ("peer", "over_peer"), ("ray-trivial", "of_ceiling")):
                if other in group and group[other]["rps"]:
                    row[key] = ray_cell["rps"] / group[other]["rps"]
            if "ray-1r" in group and name == "ray-2r" and group["ray-1r"]["rps"]:
                row["over_1r"] = ray_cell["rps"] / group["ray-1r"]["rps"]
            out.append(row)
    return out


def print_ray_ratios(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print("Ray (throughput ratios; over_local = against `-t lifecycle` (ours), over_peer = against "
          "`mlflow models serve`, of_ceiling = share of the Serve proxy's ceiling (ray-trivial), "
          "over_1r = 2 replicas against 1):")
    for row in rows:
        parts = [f"{key} x{row[key]:.2f}" for key in ("over_local", "over_peer", "of_ceiling", "over_1r") if key in row]
        print(f"  rows={row['rows']:>3} conc={row['concurrency']:>2} {row['server']:<6} {row['rps']:8.1f} req/s   "
              + "   ".join(parts))
