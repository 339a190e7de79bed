"""Telling an out-of-memory kill from a ``kill -9`` (standard library only).

A worker killed by SIGKILL looks the same to its parent whoever sent it: a person, a script, or
the kernel's OOM killer. ``/proc/<pid>`` is gone by the time the supervisor reaps it, so the only
witness left is the cgroup's OOM-kill counter, which the kernel bumps before it sends the signal:

- cgroup v2: ``oom_kill`` in ``memory.events`` (hierarchical: kills in child groups count too);
- cgroup v1: ``oom_kill`` in the memory controller's ``memory.oom_control`` (Linux ≥ 4.13).

Workers are children of the supervisor and stay in its cgroup, so the supervisor watches its own
group (or the nearest ancestor that has the memory controller, which is where its memory is
charged). :class:`OomKills` notes each rise of the counter with the time it saw it; a worker's
SIGKILL is ``oom`` when a rise not yet explained by another death was seen within
``WINDOW_S`` before it, else ``killed``. Without a readable counter (no memory controller, an
unusual mount) it is ``killed (cause unknown)``: never a guess.

The counter is the group's, not the worker's: an OOM kill of another process in the same group
(a session scope holds everything started from that shell) within the window followed by a
``kill -9`` of a worker reads as ``oom``. A unit of its own (``mlflow-deploy up``'s systemd unit)
keeps the group to the deployments.

Imported by the supervisor: keep it free of anything but the stdlib.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
WINDOW_S = 30.0  # a counter rise older than this is not what killed a worker reaped now
POLL_S = 1.0  # how often the supervisor reads the counter (also read at each SIGKILL death)

OOM = "oom"
KILLED = "killed"
UNKNOWN = "killed (cause unknown)"

_V2_FILE = "memory.events"
_V1_FILE = "memory.oom_control"


def oom_counter_path(proc_cgroup: str, root: Path = CGROUP_ROOT) -> Path | None:
    """The file counting OOM kills for the cgroup described by ``proc_cgroup`` (the text of
    ``/proc/<pid>/cgroup``), or None if the machine offers none.

    cgroup v2 (``0::/path``) is looked for at ``root`` (unified mount) and ``root/unified``
    (hybrid mount); cgroup v1 under ``root/memory``. Walks up to the nearest ancestor that has the
    file: a group without the memory controller is charged to that ancestor.
    """
    v2: list[tuple[Path, str]] = []
    v1: list[tuple[Path, str]] = []
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, group = rest.partition(":")
        relative = Path(group.strip().lstrip("/"))
        if ".." in relative.parts:  # never a real group path; never read outside the mount
            continue
        if hierarchy == "0" and controllers == "":
            v2 += [(root / relative, _V2_FILE), (root / "unified" / relative, _V2_FILE)]
        elif "memory" in controllers.split(","):
            v1.append((root / "memory" / relative, _V1_FILE))
    for folder, name in v2 + v1:  # v2 first: its file exists only where v2 has the memory controller
        for ancestor in [folder, *folder.parents]:
            if not ancestor.is_relative_to(root):
                break
            if (ancestor / name).is_file():
                return ancestor / name
    return None


def read_oom_kills(path: Path | None) -> int | None:
    """The ``oom_kill`` count in a ``memory.events`` / ``memory.oom_control`` file; None if it
    cannot be read or has no such line."""
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value.strip())
    return None


def own_oom_counter() -> Path | None:
    """The OOM-kill counter of this process's own cgroup (what its children are charged to)."""
    try:
        return oom_counter_path(Path("/proc/self/cgroup").read_text())
    except OSError:
        return None


class OomKills:
    """Attributes SIGKILL deaths to the OOM killer by the rises of one cgroup counter.

    Call :meth:`poll` now and then (every ``POLL_S``) and :meth:`cause_of_sigkill` for each
    worker found dead by SIGKILL that nobody here killed.
    """

    def __init__(self, counter: Path | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.counter = counter
        self.clock = clock
        self._last = read_oom_kills(counter)
        self._rises: list[float] = []  # when each unexplained rise of the counter was seen
        self._next_poll = 0.0

    @property
    def readable(self) -> bool:
        return self._last is not None

    def poll(self, force: bool = False) -> None:
        """Read the counter (at most every ``POLL_S`` unless ``force``) and note any rise."""
        now = self.clock()
        if not force and now < self._next_poll:
            return
        self._next_poll = now + POLL_S
        count = read_oom_kills(self.counter)
        if count is not None and self._last is not None and count > self._last:
            self._rises += [now] * (count - self._last)
        self._last = count
        self._rises = [seen for seen in self._rises if seen >= now - WINDOW_S]

    def cause_of_sigkill(self) -> str:
        """``oom``, ``killed`` or ``killed (cause unknown)`` for a SIGKILL death seen just now.
        Each counter rise explains one death only."""
        self.poll(force=True)
        if not self.readable:
            return UNKNOWN
        if self._rises:
            self._rises.pop(0)
            return OOM
        return KILLED


def describe_sigkill(cause: str) -> str:
    """What a worker's SIGKILL death was, in words a user reading ``get`` or the history acts on."""
    if cause == OOM:
        return ("killed by the kernel's OOM killer (SIGKILL; its cgroup counted an OOM kill): out of memory; "
                "give the deployment more memory or cap what one request may decode (-C max_rows)")
    if cause == KILLED:
        return "killed by signal SIGKILL (not the OOM killer: its cgroup counted no OOM kill)"
    return "killed by signal SIGKILL (cause unknown: no readable cgroup OOM counter on this machine)"
