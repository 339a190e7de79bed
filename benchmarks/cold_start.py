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

With ``--timeline``, every process of the start marks its steps (``mlflow_deploy_plugin/timeline.py``,
``$MLFLOW_DEPLOY_TIMELINE``): the CLI's (plugin imported, create entered, model resolved, spec
written, supervisor spawned, model copy made), the supervisor's and the worker's (imports, model
load, smoke test, go, serving); each run prints them against the launch, by process.
``--importtime`` runs every process with ``PYTHONPROFILEIMPORTTIME=1`` (slower: a diagnostic, not a
measure) and prints the worker's costliest imports.

    .venv/bin/python benchmarks/cold_start.py [--runs 2] [--config warm_standby=false ...]
    .venv/bin/python benchmarks/cold_start.py --runs 6 --tree /work/main --tree . --timeline

Wall figures depend on the machine's load (printed); CPU seconds much less. ``--tree`` (repeated)
alternates checkouts run by run (``PYTHONPATH`` of the create and everything it starts) and prints
the medians of each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
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


def one_run(home: Path, name: str, config: list[str], deadline_s: float, env: dict[str, str]) -> dict[str, Any]:
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    argv = [mlflow_bin, "deployments", "create", "-t", "lifecycle", "--name", name, "-m", f"models:/{MODEL_NAME}/1"]
    for item in config:
        argv += ["-C", item]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launch_uptime, t0, launch_epoch = uptime_s(), time.monotonic(), time.time()
    # Its output to a file, not a pipe nobody reads while we poll: -X importtime fills a pipe's 64 KiB.
    err_path = home.parent / f"{name}-create.err"
    with open(err_path, "wb") as err_file:
        cli = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err_file, env=env)
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
        cli.wait(timeout=deadline_s)
    err = err_path.read_text(errors="replace")
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
        "launch_epoch": launch_epoch, "worker_log": worker_log, "cli_stderr": err,
    }
    quiet = {key: value for key, value in env.items()  # the delete is not part of the timeline
             if key not in ("MLFLOW_DEPLOY_TIMELINE", "PYTHONPROFILEIMPORTTIME")}
    subprocess.run([mlflow_bin, "deployments", "delete", "-t", "lifecycle", "--name", name],
                   capture_output=True, timeout=deadline_s, check=False, env=quiet)
    return result


def print_timeline(path: Path, launch_epoch: float, first_200: float | None, created: float | None) -> None:
    """The marks of ``$MLFLOW_DEPLOY_TIMELINE`` against the launch, with the gap since the previous one."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        print("       (no timeline written: is the tree's code the one with mlflow_deploy_plugin/timeline.py?)")
        return
    marks = []
    for line in lines:
        at, pid, step = line.split(" ", 2)
        marks.append((float(at) - launch_epoch, int(pid), step))
    marks += [(first_200 or 0.0, 0, "bench: first 200 on /ping"), (created or 0.0, 0, "bench: create returned")]
    previous = 0.0
    for at, pid, step in sorted(marks):
        print(f"       {at:6.3f} s  (+{at - previous:5.3f})  {pid or '':>7}  {step}")
        previous = at


def print_importtime(log: str, label: str, top: int = 15) -> None:
    """The costliest imports (cumulative microseconds) ``-X importtime`` logged in ``log``."""
    rows = []
    for line in log.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if match:
            rows.append((int(match.group(2)), int(match.group(1)), len(match.group(3)), match.group(4)))
    if not rows:
        return
    print(f"       {label}: {len(rows)} modules, top-level imports by cumulative time:")
    outer = min(depth for _, _, depth, _ in rows)
    for cumulative, _, _, module in sorted((r for r in rows if r[2] <= outer + 2), reverse=True)[:top]:
        print(f"         {cumulative / 1e6:6.3f} s  {module}")


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
    parser.add_argument("--tree", action="append", default=[], metavar="PATH",
                        help="a checkout to run (PYTHONPATH); repeated: alternated run by run, medians of each")
    parser.add_argument("--timeline", action="store_true", help="print each run's timeline of marks")
    parser.add_argument("--importtime", action="store_true",
                        help="PYTHONPROFILEIMPORTTIME=1 in every process (slower); prints the worker's top imports")
    args = parser.parse_args()
    trees = [str(Path(tree).resolve()) for tree in args.tree] or [None]
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
        results: dict[str | None, list[dict[str, Any]]] = {tree: [] for tree in trees}
        for run in range(args.runs):
            tree = trees[run % len(trees)]
            env = dict(os.environ)
            if tree is not None:
                env["PYTHONPATH"] = tree
            timeline = work / f"timeline-{run}.txt"
            if args.timeline:
                env["MLFLOW_DEPLOY_TIMELINE"] = str(timeline)
            if args.importtime:
                env["PYTHONPROFILEIMPORTTIME"] = "1"
            r = one_run(home, f"cold{run}", args.config, args.deadline, env)
            results[tree].append(r)
            cpu = r["cpu_s"]
            if tree is not None:
                print(f"tree {tree}")
            print(f"run {run + 1}: supervisor started {r['supervisor_started_s']:.2f} s, worker started "
                  f"{r['worker_started_s']:.2f} s, first 200 {r['first_200_s']:.2f} s, create returned "
                  f"{r['create_returned_s']:.2f} s (+{r['create_returned_s'] - r['first_200_s']:.2f} s); CPU s: "
                  f"cli {cpu['cli']:.2f}, supervisor {cpu['supervisor'] or 0:.2f}, worker {cpu['worker'] or 0:.2f}; "
                  f"load {os.getloadavg()[0]:.1f}")
            print(f"       worker: {r['worker_phases']}")
            if args.timeline:
                print_timeline(timeline, r["launch_epoch"], r["first_200_s"], r["create_returned_s"])
            if args.importtime:
                print_importtime(r["worker_log"], "worker")
                print_importtime(r["cli_stderr"], "cli")
        for tree, runs in results.items():
            if not runs:
                continue
            def median(key: str, runs: list[dict[str, Any]] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            def median_cpu(who: str, runs: list[dict[str, Any]] = runs) -> float:
                return statistics.median(r["cpu_s"][who] or 0.0 for r in runs)

            print(f"medians of {len(runs)} runs{f' of {tree}' if tree else ''}: first 200 {median('first_200_s'):.2f} s, "
                  f"create returned {median('create_returned_s'):.2f} s; CPU s: cli {median_cpu('cli'):.2f}, "
                  f"supervisor {median_cpu('supervisor'):.2f}, worker {median_cpu('worker'):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
