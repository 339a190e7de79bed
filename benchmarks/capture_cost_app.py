"""What capture costs the serving process under concurrency: the real app, in one process, capture on vs off.

``benchmarks/capture_cost.py`` times :meth:`CaptureWriter.record` alone; this drives the whole
ASGI app exactly as a local worker builds it (:func:`serving.service.build_service` with the
converter external, batching on by default, ``gc.freeze()`` and a 1 ms switch interval as in
``serving/worker.py``) on a uvloop event loop, with ``--concurrency`` closed-loop clients calling
the app's ASGI interface directly (no sockets: uvicorn's HTTP parsing costs the same either way),
JSON ``dataframe_split`` bodies of ``--rows`` rows (default 1) on ``/invocations`` for a
20-feature LogisticRegression.
It prints the CPU per request of the process and of each of its threads, capture on and off, in
interleaved rounds (medians), so the difference is what capture costs per request::

    PYTHONPATH=. .venv/bin/python benchmarks/capture_cost_app.py [--concurrency 32] [--rows 1] [--requests 6000] [--rounds 3]

Nothing converts the spool in this process (as in a worker, whose supervisor runs the converter),
so a run keeps its requests under the writer's buffer bound.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

COLUMNS = [f"f{i}" for i in range(20)]


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, by thread name (from /proc)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid), "other")
        name = name.split("_")[0] if name.startswith(("predict", "parse")) else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def save_model(folder: Path) -> Path:
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(2000, len(COLUMNS))), columns=COLUMNS)
    labels = (frame["f0"] + frame["f1"] > 0).astype(int)
    model = LogisticRegression(max_iter=1000).fit(frame, labels)
    path = folder / "model"
    mlflow.sklearn.save_model(model, str(path), signature=infer_signature(frame, model.predict(frame)),
                              input_example=frame.head(2))
    return path


def build(folder: Path, model_path: Path, capture: bool) -> Any:
    from mlflow_deploy_plugin.serving.service import build_service
    from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef

    name = "cap" if capture else "nocap"
    spec = DeploymentSpec(f"bench-{name}", ModelRef("models:/bench/1", "bench", "1"),
                          DeploymentConfig(capture=capture))
    root = folder / name
    root.mkdir()
    service = build_service(spec, lambda _model: model_path, str(root / "capture"), root / "capture.key",
                            capture_converter="external")
    service.state.ready = True
    return service


def _exchange(body: bytes) -> tuple[Any, Any, Any]:
    """ASGI receive and send for one request with ``body``, and what reads the answer's status."""
    sent, status = [False], [0]

    async def receive() -> dict[str, Any]:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # never: the app reads the body once
        return {}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status[0] = message["status"]

    return receive, send, lambda: status[0]


async def drive(app: Any, bodies: list[bytes], requests: int, concurrency: int) -> None:
    headers = [(b"content-type", b"application/json"), (b"host", b"127.0.0.1")]
    left = [requests]

    async def client(index: int) -> None:
        i = index
        while left[0] > 0:
            left[0] -= 1
            body = bodies[i % len(bodies)]
            i += concurrency
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/invocations", "raw_path": b"/invocations", "query_string": b"",
                     "root_path": "", "headers": [*headers, (b"content-length", str(len(body)).encode())],
                     "client": ("127.0.0.1", 5000 + index), "server": ("127.0.0.1", 8000)}
            receive, send, status = _exchange(body)
            await app(scope, receive, send)
            if status() != 200:
                raise RuntimeError(f"status {status()}")

    await asyncio.gather(*(client(i) for i in range(concurrency)))


def measure(service: Any, bodies: list[bytes], requests: int, concurrency: int) -> dict[str, float]:
    import uvloop

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(drive(service.app, bodies, 200, concurrency))  # warm-up
        before_threads, before_cpu, before_wall = thread_cpu(), time.process_time(), time.perf_counter()
        loop.run_until_complete(drive(service.app, bodies, requests, concurrency))
        wall = time.perf_counter() - before_wall
        cpu = time.process_time() - before_cpu
        after_threads = thread_cpu()
    finally:
        loop.close()
    result = {"cpu_us": cpu / requests * 1e6, "rps": requests / wall}
    for name, seconds in after_threads.items():
        result[f"{name}_us"] = (seconds - before_threads.get(name, 0.0)) / requests * 1e6
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rows", type=int, default=1, help="rows per request body (default 1)")
    parser.add_argument("--requests", type=int, default=6000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians shown")
    parser.add_argument("--only", choices=("on", "off"), help="measure one side only (e.g. under a profiler)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(1)
    bodies = [json.dumps({"dataframe_split": {"columns": COLUMNS, "data": rng.normal(size=(args.rows, 20)).tolist()}}).encode()
              for _ in range(64)]
    with tempfile.TemporaryDirectory(prefix="capture-cost-app-") as tmp:
        folder = Path(tmp)
        model_path = save_model(folder)
        sides = [side for side in ("on", "off") if args.only in (None, side)]
        services = {side: build(folder, model_path, side == "on") for side in sides}
        gc.collect()
        gc.freeze()  # as the worker does before serving
        sys.setswitchinterval(0.001)
        results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        try:
            for _ in range(args.rounds):
                for side in sides:
                    results[side].append(measure(services[side], bodies, args.requests, args.concurrency))
        finally:
            for service in services.values():
                if service.capture is not None:
                    service.capture.close(timeout_s=0.2)
    keys = sorted({key for runs in results.values() for run in runs for key in run},
                  key=lambda k: (k != "rps", k != "cpu_us", k))
    print(f"c={args.concurrency}, {args.requests} {args.rows}-row JSON requests x {args.rounds} rounds, medians "
          "(CPU us per request; rps: in-process, client included)")
    print(f"{'':<22}" + "".join(f"{side:>12}" for side in sides))
    for key in keys:
        values = [statistics.median(run.get(key, 0.0) for run in results[side]) for side in sides]
        print(f"{key:<22}" + "".join(f"{value:>12.1f}" for value in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
