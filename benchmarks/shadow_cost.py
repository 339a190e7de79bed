"""What a shadow version costs the serving worker in CPU, per mirrored request, split by thread and step.

``benchmarks/serving.py --shadow`` shows the primary's p99 with the shadow off and on, but on a busy
machine wall-clock latency is noisy. This counts CPU time instead, in process, over the real parts:
a service built as a local worker builds it (``build_service`` with ``start_shadow_process``: the
shadow predicts in a real child process), the real ASGI app called directly on an asyncio loop
(``--concurrency`` requests in flight, each client pausing ``--gap-ms`` between requests as a
client's round trip would; 1-row ``dataframe_split`` bodies, 20 features, LogisticRegression), with
Prometheus in multiprocess mode as in a worker. Each cell runs in a fresh process (the metrics
registry is global), the shadow off and on, and reports per request:

- ``loop``: CPU of the event-loop thread (the request path, including the capture record and the
  shadow's ``submit``), and the other threads of the worker by name (the copy channel's sender,
  the thread reading the shadow's events, the predict and parse pools, the capture writer);
- ``worker``: the whole worker process (``time.process_time``; the shadow's child is not in it);
- the shadow-on cell's step split (``--split``, timed with per-thread CPU clocks, so a separate run:
  the timers cost CPU themselves): ``submit`` on the request path, the sender's ``encode`` and
  ``write`` of messages, the event reader's ``read`` (unpickle) and ``handle`` (metrics);
  Its calls per request are the pipe messages each way (each one wakes a thread of the worker, which
  then wants the GIL the event loop holds).

    PYTHONPATH=. .venv/bin/python benchmarks/shadow_cost.py [--requests 3000] [--concurrency 1 8 32]

Run it with PYTHONPATH pointing at two checkouts to compare them. Figures are CPU microseconds per
request; "on - off" is what mirroring costs the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

N_FEATURES = 20
VARIANTS = 64


def save_models(folder: Path) -> None:
    """Two LogisticRegressions answering differently (v1 served, v2 the shadow), saved as MLflow models."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(2000, N_FEATURES)), columns=[f"f{i}" for i in range(N_FEATURES)])
    for version, labels in (("1", frame["f0"] > 0), ("2", frame["f0"] + frame["f1"] > 0)):
        model = LogisticRegression(max_iter=500).fit(frame, labels.astype(int))
        mlflow.sklearn.save_model(model, str(folder / f"v{version}"),
                                  signature=infer_signature(frame, model.predict(frame)),
                                  input_example=frame.head(3), pip_requirements=["mlflow", "scikit-learn"])
    frame.head(VARIANTS).to_json(folder / "rows.json", orient="split")


def _thread_clocks() -> dict[str, list[int]]:
    """Each live thread's CPU clock id, by name (without the pool's number)."""
    clocks: dict[str, list[int]] = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        name = thread.name.rstrip("0123456789_").rstrip("-") or thread.name
        with contextlib.suppress(OSError):  # the thread ended
            clocks.setdefault(name, []).append(time.pthread_getcpuclockid(thread.ident))
    return clocks


def _thread_cpu_ns(clocks: dict[str, list[int]]) -> dict[str, int]:
    out = {}
    for name, ids in clocks.items():
        total = 0
        for clock in ids:
            with contextlib.suppress(OSError):  # the thread ended
                total += time.clock_gettime_ns(clock)
        out[name] = total
    return out


class _Split:
    """Per-thread CPU spent in the wrapped steps (installed with --split only: the clocks cost CPU)."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def wrap(self, owner: Any, attr: str, step: str) -> None:
        inner = getattr(owner, attr)
        clock = time.thread_time_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                spent = clock() - started
                with self._lock:
                    self.ns[step] = self.ns.get(step, 0) + spent
                    self.calls[step] = self.calls.get(step, 0) + 1

        setattr(owner, attr, timed)

    def clock_overhead_ns(self) -> float:
        clock = time.thread_time_ns
        started = clock()
        for _ in range(20000):
            clock()
        return (clock() - started) / 20000


def run_cell(folder: Path, mode: str, concurrency: int, requests: int, gap_s: float, split: bool) -> dict[str, Any]:
    """One cell in this (fresh) process: build the service, drive ``requests`` requests, count CPU."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-", dir=folder)
    import logging

    import pandas as pd

    from mlflow_deploy_plugin.engines.local.shadow_process import start_shadow_process
    from mlflow_deploy_plugin.serving import shadow_channel
    from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef

    logging.basicConfig(level=logging.WARNING)
    model = ModelRef("models:/bench/1", "bench", "1")
    if mode == "on":
        spec = DeploymentSpec(name="bench", model=model, shadow=ModelRef("models:/bench/2", "bench", "2"),
                              config=DeploymentConfig(shadow="models:/bench/2"))
    else:
        spec = DeploymentSpec(name="bench", model=model, config=DeploymentConfig())
    stepper = _Split() if split else None
    if stepper is not None and mode == "on":
        from mlflow_deploy_plugin.engines.local import shadow_process

        stepper.wrap(shadow_process.ShadowProcess, "submit", "submit (request path)")
        stepper.wrap(shadow_channel, "encode_frame", "encode (sender)")
        stepper.wrap(shadow_channel, "write_all", "write (sender)")
        stepper.wrap(shadow_channel.FrameReader, "read", "read events (reader)")
        stepper.wrap(shadow_process.ShadowProcess, "_handle", "handle events (reader)")

    from mlflow_deploy_plugin.serving.service import build_service

    capture_dir = tempfile.mkdtemp(prefix=f"capture-{mode}-", dir=folder)
    service = build_service(spec, lambda ref: folder / f"v{ref.model_version}", capture_dir,
                            Path(capture_dir) / "capture.key", capture_converter="external",
                            shadow_starter=start_shadow_process if mode == "on" else None)
    service.state.ready = True
    rows = pd.read_json(folder / "rows.json", orient="split")
    bodies = [json.dumps({"dataframe_split": {"columns": list(rows.columns), "data": [row]}}).encode()
              for row in rows.to_numpy().tolist()]
    app = service.app
    statuses: dict[int, int] = {}

    async def call(body: bytes) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/invocations", "raw_path": b"/invocations", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 5000),
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]}
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[message["status"]] = statuses.get(message["status"], 0) + 1

        await app(scope, receive, send)

    async def client(index: int, count: int) -> None:
        for i in range(count):
            await call(bodies[(index * 7 + i) % len(bodies)])
            if gap_s:
                await asyncio.sleep(gap_s)

    async def drive(total: int) -> None:
        share = total // concurrency
        await asyncio.gather(*(client(i, share) for i in range(concurrency)))

    def settle() -> None:
        deadline = time.monotonic() + 60
        while service.shadow is not None and not service.shadow.idle() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # the last events (every 50 ms) reach the reader thread

    loop = asyncio.new_event_loop()
    loop.run_until_complete(drive(max(200, requests // 10)))  # warm up: imports, caches, first calls
    settle()
    if stepper is not None:
        stepper.ns.clear()
        stepper.calls.clear()
    child = service.shadow.pid if service.shadow is not None else None
    child0 = _child_cpu_s(child)
    clocks = _thread_clocks()
    threads0 = _thread_cpu_ns(clocks)
    process0 = time.process_time_ns()
    main0 = time.thread_time_ns()
    loop.run_until_complete(drive(requests))
    main1 = time.thread_time_ns()
    settle()
    threads1 = _thread_cpu_ns(clocks)
    process1 = time.process_time_ns()
    child1 = _child_cpu_s(child)
    done = requests // concurrency * concurrency
    result: dict[str, Any] = {
        "mode": mode, "concurrency": concurrency, "requests": done, "statuses": statuses,
        "loop_us": (main1 - main0) / done / 1000,
        "worker_us": (process1 - process0) / done / 1000,
        "threads_us": {name: (threads1[name] - threads0.get(name, 0)) / done / 1000
                       for name in threads1 if name != threading.main_thread().name},
        "child_us": None if child0 is None or child1 is None else (child1 - child0) / done * 1e6,
    }
    if stepper is not None:
        overhead = stepper.clock_overhead_ns()
        result["steps_us"] = {step: max(0.0, (ns - stepper.calls[step] * overhead)) / done / 1000
                              for step, ns in stepper.ns.items()}
        result["step_calls_per_request"] = {step: calls / done for step, calls in stepper.calls.items()}
    result["dropped"] = dict(getattr(service.shadow, "dropped", {}) or {})
    service.capture.close(timeout_s=10)
    loop.close()
    return result


def _child_cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    sys.path.insert(0, str(Path(__file__).parent))
    from procfs import cpu_s, stat_fields

    fields = stat_fields(pid)
    return None if fields is None else cpu_s(fields)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per cell (default 3000)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="requests in flight")
    parser.add_argument("--gap-ms", type=float, default=1.0, help="each client's pause between requests (ms)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per cell; the minimum is shown")
    parser.add_argument("--split", action="store_true", help="also time the shadow's steps (a separate run)")
    parser.add_argument("--modes", nargs="+", choices=("off", "on"), default=["off", "on"],
                        help="the cells to run (default both: off, then on)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--cell", nargs=3, metavar=("FOLDER", "MODE", "CONCURRENCY"), help=argparse.SUPPRESS)
    parser.add_argument("--cell-split", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        result = run_cell(Path(args.cell[0]), args.cell[1], int(args.cell[2]), args.requests, args.gap_ms / 1000,
                          args.cell_split)
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="shadow-cost-") as tmp:
        folder = Path(tmp)
        save_models(folder)
        results = []
        for concurrency in args.concurrency:
            for mode in args.modes:
                runs = [_cell(folder, mode, concurrency, args, split=False) for _ in range(args.repeat)]
                best = min(runs, key=lambda r: r["worker_us"])
                if args.split and mode == "on":
                    best["split"] = _cell(folder, mode, concurrency, args, split=True)
                results.append(best)
                _print(best)
    for concurrency in args.concurrency if len(args.modes) == 2 else ():
        off, on = (next(r for r in results if r["concurrency"] == concurrency and r["mode"] == mode)
                   for mode in ("off", "on"))
        print(f"c={concurrency:<3} mirroring costs the worker {on['worker_us'] - off['worker_us']:6.1f} us CPU per "
              f"request ({on['worker_us'] / off['worker_us']:.2f}x), the event loop "
              f"{on['loop_us'] - off['loop_us']:6.1f} us ({on['loop_us'] / off['loop_us']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def _cell(folder: Path, mode: str, concurrency: int, args: argparse.Namespace, split: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--cell", str(folder), mode, str(concurrency),
               "--requests", str(args.requests), "--gap-ms", str(args.gap_ms)]
    done = subprocess.run(command + (["--cell-split"] if split else []), capture_output=True, text=True,
                          timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"cell {mode} c={concurrency} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print(r: dict[str, Any]) -> None:
    threads = "  ".join(f"{name} {us:.1f}" for name, us in sorted(r["threads_us"].items()) if us >= 0.05)
    child = f"  (child {r['child_us']:.1f})" if r.get("child_us") is not None else ""
    print(f"c={r['concurrency']:<3} shadow {r['mode']:<3} worker {r['worker_us']:6.1f} us/req  loop "
          f"{r['loop_us']:6.1f}  {threads}{child}  statuses {r['statuses']}  dropped {r['dropped']}")
    split = r.get("split")
    if split:
        print("          steps (us/req, timed run): " + "  ".join(
            f"{step} {us:.2f}" for step, us in split["steps_us"].items()) + "  [calls/req: " + "  ".join(
            f"{step.split(' ')[0]} {calls:.2f}" for step, calls in split["step_calls_per_request"].items()) + "]")
        print(f"          timed run totals: worker {split['worker_us']:.1f}  loop {split['loop_us']:.1f}  " + "  ".join(
            f"{name} {us:.1f}" for name, us in sorted(split["threads_us"].items()) if us >= 0.05))
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
