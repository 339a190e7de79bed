"""How long capture stalls the thread that serves: record() cost and GIL waits, capture on vs off.

A stand-in for a worker's event loop records one-row requests (20 float features, as the parser
builds them) into a real :class:`CaptureWriter` at a fixed rate and measures, for each request,
how late it woke up (time waiting for the GIL held by other threads shows up here) and how long
``record()`` took. The writer writes real Parquet files under a temp folder. Cheap and robust to
a busy machine when run interleaved (only ratios of one run count):

    .venv/bin/python benchmarks/capture_stall.py [--rate 2000] [--duration 10] [--capture on|off]

Run it with PYTHONPATH pointing at two checkouts to compare writers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np
import pandas as pd

from mlflow_deploy_plugin.capture import CapturedRequest, CaptureWriter, read_capture
from mlflow_deploy_plugin.serving.frames import mark_float64


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="requests per second (default 2000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--capture", choices=["on", "off"], default="on")
    args = parser.parse_args()
    columns = [f"f{i}" for i in range(20)]
    rng = np.random.default_rng(0)
    frames = [mark_float64(pd.DataFrame(rng.random((1, 20)), columns=columns)) for _ in range(256)]
    with tempfile.TemporaryDirectory(prefix="capture-stall-") as tmp:
        writer = CaptureWriter(tmp, "stall") if args.capture == "on" else None
        lags, costs = [], []
        period = 1.0 / args.rate
        start = time.perf_counter()
        cpu0 = time.process_time()
        n = 0
        while True:
            due = start + n * period
            now = time.perf_counter()
            if now - start >= args.duration:
                break
            if due > now:
                time.sleep(due - now)
            woke = time.perf_counter()
            lags.append(max(0.0, woke - due))
            frame = frames[n % len(frames)]
            answer = CapturedRequest(f"{n:032x}", time.time(), "1", 200, 1.0, frame, np.array([n % 2]))
            if writer is not None:
                writer.record(answer)
            costs.append(time.perf_counter() - woke)
            n += 1
        cpu = time.process_time() - cpu0
        if writer is not None:
            writer.close(timeout_s=60)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        written = len(read_capture(tmp)) if writer is not None else 0
    # Lateness beyond the previous request's own cost: what other threads (GIL) or the OS took.
    print(json.dumps({
        "capture": args.capture, "requests": n, "written_rows": written, "pid": os.getpid(),
        "lag_ms": {"p50": _pct(lags, .5) * 1e3, "p99": _pct(lags, .99) * 1e3, "max": max(lags) * 1e3},
        "record_us": {"p50": _pct(costs, .5) * 1e6, "p99": _pct(costs, .99) * 1e6, "max": max(costs) * 1e6},
        "process_cpu_s": round(cpu, 3), "children_cpu_s": round(children.ru_utime + children.ru_stime, 3),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
