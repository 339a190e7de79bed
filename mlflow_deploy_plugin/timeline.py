"""Cold-start timeline: where a deployment's start goes, step by step, across its processes.

With ``MLFLOW_DEPLOY_TIMELINE=FILE`` in the environment of ``mlflow deployments create`` (the
supervisor and its workers inherit it), every step on the way to the first answer appends one line
``<epoch seconds> <pid> <step>`` to FILE: the CLI's (plugin imported, create entered, model
resolved, spec written, supervisor spawned, model copy made, create returning), the supervisor's
(worker spawned, loaded, go, ready) and the worker's (imports, model load, smoke test, serving).
``benchmarks/cold_start.py --timeline`` sets it and prints the steps against the launch.

Unset (the default), :func:`mark` is one dictionary lookup. Standard library only: the supervisor
imports it.
"""

from __future__ import annotations

import os
import time

ENV = "MLFLOW_DEPLOY_TIMELINE"


def mark(step: str, at: float | None = None) -> None:
    """Append ``step`` with the wall-clock time (or ``at``) and this process's pid, if the timeline is on."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = f"{time.time() if at is None else at:.4f} {os.getpid()} {step}\n".encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:
        return  # a diagnostic: never fail a start over it
    try:
        os.write(fd, line)  # one write to an O_APPEND file: lines of several processes never mix
    finally:
        os.close(fd)


def process_started() -> float:
    """When this process was started (exec), in epoch seconds (the kernel's 10 ms resolution)."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as handle:
            uptime = float(handle.read().split()[0])
    except (OSError, IndexError, ValueError):
        return time.time()
    # Field 22 (starttime, in clock ticks since boot) is the 20th after the command name.
    return time.time() - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))


def mark_process_start(what: str) -> None:
    """Mark when this process was exec'd (``<what> process started``), if the timeline is on."""
    if os.environ.get(ENV):
        mark(f"{what} process started", at=process_started())
