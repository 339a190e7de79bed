"""What the benchmarks read of /proc: one place that parses ``/proc/<pid>/stat`` (Linux only)."""

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
