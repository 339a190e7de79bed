"""The few words a local worker and its supervisor exchange (standard library only).

A worker reports on an inherited pipe, one line per event; the supervisor answers on the worker's
stdin. Kept in one module so the two sides cannot drift apart.

Worker -> supervisor (ready pipe):
  ``standby <modules>``  a warm standby finished its imports; it forks the workers asked for on
                   its fork socket (``forkserver.py``), or, started without one, reads a spec path
                   from stdin to serve. ``modules``: the flavors' modules it imported for the models
                   it warmed up for (comma-separated, maybe none)
  ``loaded <modules>``  model loaded and smoke-tested; waiting for ``go`` before accepting
                   connections. ``modules``: the flavors' modules its models need
  ``ready``        accepting connections
  ``draining``     stopped accepting; finishing what it has
  ``error <why>``  could not start (the reason is shown by ``get``)
  ``hung <why>``   its model call has not returned within timeout_s + grace: it answers 503 to
                   what waits on it, takes nothing new and exits; replace it now
Supervisor -> worker (stdin):
  ``<spec path>``  (standby only) serve this generation
  ``go``           the whole generation has loaded: start accepting
"""

from __future__ import annotations

import contextlib
import os

STANDBY = "standby"
LOADED = "loaded"
READY = "ready"
DRAINING = "draining"
ERROR = "error"
HUNG = "hung"
GO = "go"


def report(fd: int, event: str, detail: str | None = None) -> None:
    """Worker side: tell the supervisor ``event`` (one line; newlines in ``detail`` are flattened)."""
    line = f"{event} {detail}" if detail is not None else event
    with contextlib.suppress(OSError):
        os.write(fd, (line.replace("\n", " ") + "\n").encode())


def modules_detail(modules: set[str]) -> str:
    """Worker side: the detail of ``standby`` and ``loaded``: module names, comma-separated."""
    return ",".join(sorted(modules))


def parse_modules(detail: str | None) -> frozenset[str]:
    """Supervisor side: the module names of a ``standby`` or ``loaded`` detail."""
    return frozenset(name for name in (detail or "").split(",") if name)


def parse(line: str) -> tuple[str, str | None]:
    """Supervisor side: ``(event, detail)`` of one reported line."""
    event, _, detail = line.strip().partition(" ")
    return event, (detail or None)
