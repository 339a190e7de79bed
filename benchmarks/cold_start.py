"""Where a cold start goes: `mlflow deployments create` launched -> first 200 -> `create` returned.

Self-contained: a throw-away folder (SQLite tracking store, artifacts, $MLFLOW_DEPLOY_HOME), the
scikit-learn example model (``examples/train.py``) registered, then, ``--runs`` times, a real
``mlflow deployments create -t lifecycle`` subprocess timed from its launch, /ping polled every
10 ms, and the deployment deleted. Each run prints a timeline and CPU seconds per process:

- the ``mlflow`` CLI: how long MLflow's own CLI takes to import (measured apart:
  ``python -c "import mlflow.cli"``), when our plugin spawned the supervisor, and the CPU of the
  whole CLI process;
- the supervisor (stdlib only) and the worker: when each started (``/proc/<pid>/stat``), and the
  worker's own phases as it logs them ("Ready after ...": imports, model fetch/load/smoke test and
  app, go and serving);
- first 200 on /ping, and when ``create`` returned.

    .venv/bin/python benchmarks/cold_start.py [--runs 2] [--config warm_standby=false ...]

Wall figures depend on the machine's load (printed); CPU seconds much less. Run it with
PYTHONPATH pointing at two checkouts to compare them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import procfs  # benchmarks/procfs.py

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "breast_cancer"
TICK = os.sysconf("SC_CLK_TCK")


def uptime_s() -> float:
    """Seconds since boot: the clock /proc/<pid>/stat start times count on."""
    return float(Path("/proc/uptime").read_text().split()[0])


def started_at(pid: int, launch_uptime: float) -> float | None:
    """When ``pid`` started, in seconds after the launch (10 ms resolution)."""
    fields = procfs.stat_fields(pid)
    return None if fields is None else int(fields[19]) / TICK - launch_uptime


def cpu_of(pid: int | None) -> float | None:
    fields = procfs.stat_fields(pid) if pid else None
    return None if fields is None else procfs.cpu_s(fields)


def status(home: Path, name: str) -> dict[str, Any]:
    try:
        return json.loads((home / "deployments" / name / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=1.0) as response:
            return response.status == 200
    except OSError:
        return False


def one_run(home: Path, name: str, config: list[str], deadline_s: float) -> dict[str, Any]:
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    argv = [mlflow_bin, "deployments", "create", "-t", "lifecycle", "--name", name, "-m", f"models:/{MODEL_NAME}/1"]
    for item in config:
        argv += ["-C", item]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launch_uptime, t0 = uptime_s(), time.monotonic()
    cli = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_200 = created = None
    sup_pid = worker_pid = None
    cpu: dict[str, float | None] = {}
    try:
        while time.monotonic() - t0 < deadline_s:
            raw = status(home, name)
            sup_pid = sup_pid or raw.get("pid")
            worker_pid = worker_pid or next(iter(raw.get("worker_pids") or []), None)
            if first_200 is None and raw.get("url") and ping(raw["url"]):
                first_200 = time.monotonic() - t0
                cpu = {"supervisor": cpu_of(sup_pid), "worker": cpu_of(worker_pid)}
            if created is None and cli.poll() is not None:
                created = time.monotonic() - t0
            if first_200 is not None and created is not None:
                break
            time.sleep(0.01)
    finally:
        out, err = cli.communicate(timeout=deadline_s)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cli.returncode != 0:
        raise RuntimeError(f"create failed ({cli.returncode}): {err[-2000:]}")
    logs = home / "deployments" / name / "logs"
    worker_log = "".join(p.read_text(errors="replace") for p in sorted(logs.glob("worker-1-*.log")))
    ready = re.search(r"Ready after .*", worker_log)
    result = {
        "first_200_s": first_200, "create_returned_s": created,
        "supervisor_started_s": started_at(sup_pid, launch_uptime) if sup_pid else None,
        "worker_started_s": started_at(worker_pid, launch_uptime) if worker_pid else None,
        "cpu_s": {"cli": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), **cpu},
        "worker_phases": ready.group(0) if ready else None,
    }
    subprocess.run([mlflow_bin, "deployments", "delete", "-t", "lifecycle", "--name", name],
                   capture_output=True, timeout=deadline_s, check=False)
    return result


def cli_import_cost() -> dict[str, float]:
    """What importing MLflow's CLI costs on its own (before our plugin runs at all)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import mlflow.cli"], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": time.monotonic() - t0,
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="-C for create")
    parser.add_argument("--deadline", type=float, default=300.0, help="bound of one create (s)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlflow-cold-start-"))
    home = work / "deploy-home"
    os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", MLFLOW_DEPLOY_HOME=str(home),
                      GIT_PYTHON_REFRESH="quiet")
    os.chdir(work)
    try:
        sys.path.insert(0, str(ROOT / "examples"))
        import train  # examples/train.py

        train.train(MODEL_NAME)
        imports = cli_import_cost()
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; `import mlflow.cli` alone: "
              f"{imports['wall_s']:.2f} s wall, {imports['cpu_s']:.2f} s CPU")
        for run in range(args.runs):
            r = one_run(home, f"cold{run}", args.config, args.deadline)
            cpu = r["cpu_s"]
            print(f"run {run + 1}: supervisor started {r['supervisor_started_s']:.2f} s, worker started "
                  f"{r['worker_started_s']:.2f} s, first 200 {r['first_200_s']:.2f} s, create returned "
                  f"{r['create_returned_s']:.2f} s (+{r['create_returned_s'] - r['first_200_s']:.2f} s); CPU s: "
                  f"cli {cpu['cli']:.2f}, supervisor {cpu['supervisor'] or 0:.2f}, worker {cpu['worker'] or 0:.2f}; "
                  f"load {os.getloadavg()[0]:.1f}")
            print(f"       worker: {r['worker_phases']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
