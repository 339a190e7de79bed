"""What the benchmarks read of /proc: one place that parses ``/proc/<pid>/stat``, ``statm``,
``status`` and ``smaps_rollup`` (Linux only)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (so ``[0]`` is the state, ``[1]``
    the parent pid, ``[2]`` the process group, ``[11]``/``[12]`` user/system CPU in clock ticks);
    None if the process is gone. The name is skipped by its last ``)``: it may hold spaces and ``)``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def live_processes() -> Iterator[tuple[int, list[str]]]:
    """Every process of the machine that is not a zombie, with its :func:`stat_fields`."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := stat_fields(entry)) is not None and fields[0] != "Z":
            yield int(entry), fields


def cpu_s(fields: list[str]) -> float:
    """User + system CPU seconds of a process, from its :func:`stat_fields`."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int | str) -> int:
    """Resident set size of a process (``/proc/<pid>/statm``), 0 if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int | str) -> int:
    """Proportional set size of a process (``/proc/<pid>/smaps_rollup``): pages shared with other
    processes count their share only, so a worker forked after imports costs what it adds. 0 if gone."""
    return _kib_field(f"/proc/{pid}/smaps_rollup", "Pss:")


def process_name(pid: int | str) -> str:
    """What a process runs, in a word: the module of ``python -m MODULE`` (its last part), else the
    program's or script's file name; "" if it is gone."""
    try:
        argv = [arg.decode(errors="replace") for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if arg]
    except OSError:
        return ""
    if len(argv) > 2 and argv[1] == "-m":
        return argv[2].rsplit(".", 1)[-1]
    scripts = [arg for arg in argv[1:2] if not arg.startswith("-")]
    return Path(scripts[0] if scripts and "python" in Path(argv[0]).name else argv[0] if argv else "").name


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set size of a process since its exec (``VmHWM`` of ``/proc/<pid>/status``), 0 if
    it is gone. Not ``ru_maxrss``: Linux carries that across exec, so a benchmark's child spawned by a
    parent that has just generated its data would report at least the parent's peak."""
    return _kib_field(f"/proc/{pid}/status", "VmHWM:")


def _kib_field(path: str, key: str) -> int:
    """The ``key  <n> kB`` line of a /proc file, in bytes; 0 if the process is gone or has none."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def thread_counters(pid: int | str) -> dict[str, float] | None:
    """A process's scheduling counters summed over its live threads (``/proc/<pid>/task/*``):
    ``voluntary`` / ``involuntary`` context switches (from each thread's ``status``: the process's
    own ``status`` counts its main thread only), ``run_s`` (CPU time) and ``runq_s`` (time spent
    runnable but waiting for a CPU) from each thread's ``schedstat``. None if the process is gone.
    ``main_run_s`` / ``main_runq_s`` / ``main_voluntary``: the main thread's alone (the rest is other
    threads', e.g. a writer thread's). A thread that exited takes its counts with it (its CPU still
    shows in :func:`cpu_s`)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    out = {"voluntary": 0.0, "involuntary": 0.0, "run_s": 0.0, "runq_s": 0.0, "threads": 0.0,
           "main_run_s": 0.0, "main_runq_s": 0.0, "main_voluntary": 0.0}
    for tid in tids:
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            run_ns, wait_ns = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[:2]
        except (OSError, ValueError):
            continue  # the thread exited meanwhile
        main = tid == str(pid)
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                out["voluntary"] += int(line.split()[1])
                if main:
                    out["main_voluntary"] += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                out["involuntary"] += int(line.split()[1])
        out["run_s"] += int(run_ns) / 1e9
        out["runq_s"] += int(wait_ns) / 1e9
        out["threads"] += 1
        if main:
            out["main_run_s"] += int(run_ns) / 1e9
            out["main_runq_s"] += int(wait_ns) / 1e9
    return out
