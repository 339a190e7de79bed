"""A Ray replica that crashed, and the deployment serving in full again, written to the history.

On the local engine the supervisor writes ``crashed`` when a worker dies and ``worker_recovered``
once its replacement serves (kind ``faults`` / ``healed`` of ``-C notify``). On Ray, Serve replaces a
dead replica by itself and nothing of ours saw it: the ``restarts`` count of ``get`` grew, but no
event reached the history, so a notify receiver never heard of a crash on Ray, nor of its end.

:class:`ReplicaFaults` reads what ``RayEngine.status`` says (Serve's recent dead replicas, each
with how it died, ``replica_deaths.py``; the replicas running and the target) and writes, once per
dead replica:

- ``crashed`` for a replica that died on its own (killed, out of memory, its node gone): error,
  cause, the replica's id and pid, ``restarts`` (crashes this watch has seen), at most one every
  :data:`ANNOUNCE_EVERY_S` (``replaced``: the crashes since the last one written): a version that
  crashes at every start, which Serve starts again and again, must not flood the history and the
  notify receivers. A replica Serve
  retired (update, downscale, failed health checks: these read the same, see ``replica_deaths.py``)
  is no fault. A death whose cause is not known yet is read again on the next pass.
- ``worker_recovered`` (``fault="crashed"``, ``down_s`` since the first crash it heals, ``crashes``)
  once the deployment runs its target number of replicas again, healthy, none of them a crashed one.

Deaths listed when the watch starts are not news (a restarted watch would write them again). The
watch runs in the agent's host actor (``agent_host.py``), i.e. while the deployment has an agent
(``-C notify`` gives it one): only there is someone to tell.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from mlflow_deploy_plugin.engines.base import RUNNING, EngineStatus
from mlflow_deploy_plugin.engines.ray.replica_deaths import EXPECTED, UNKNOWN

_logger = logging.getLogger(__name__)
WATCH_EVERY_S = 10.0  # one read of Serve's details (dead replicas' causes are cached by the engine)
ACTOR = "ray-replica-watch"
ANNOUNCE_EVERY_S = 300.0  # as the local engine's shadow process announces its replacements


class ReplicaFaults:
    """Turns successive statuses of one Ray deployment into ``crashed`` / ``worker_recovered``
    events, written with ``append(event, **details)``."""

    def __init__(self, append: Callable[..., None], clock: Callable[[], float] = time.time) -> None:
        self.append = append
        self.clock = clock
        self.seen: set[str] | None = None  # dead replicas already handled (None: no status read yet)
        self.healing: dict[str, tuple[str, float]] = {}  # crashed replica id -> (error, when seen)
        self.restarts = 0
        self.announced_at = -float("inf")
        self.unannounced = 0  # crashes since the last ``crashed`` written

    def observe(self, status: EngineStatus) -> list[str]:
        """Feed one status; returns the events written."""
        deaths: list[dict[str, Any]] = [d for d in status.details.get("dead_replicas") or [] if d.get("replica_id")]
        listed = {str(d["replica_id"]) for d in deaths}
        if self.seen is None:
            # Settled deaths before the watch came are not news; one still unknown is read again.
            self.seen = {str(d["replica_id"]) for d in deaths if d.get("cause") != UNKNOWN}
            return []
        written: list[str] = []
        now = self.clock()
        for death in deaths:
            replica = str(death["replica_id"])
            cause = death.get("cause") or UNKNOWN
            if replica in self.seen or cause == UNKNOWN:
                continue
            self.seen.add(replica)
            if cause in EXPECTED:
                continue
            self.restarts += 1
            self.unannounced += 1
            error = (f"Ray replica {replica} (pid {death.get('pid')}) died: {cause}; Serve starts another "
                     "in its place")
            _logger.warning("%s", error)
            self.healing[replica] = (error, now)
            if now - self.announced_at < ANNOUNCE_EVERY_S:
                continue
            self.append("crashed", actor=ACTOR, error=error, cause=cause, replica_id=replica, pid=death.get("pid"),
                        restarts=self.restarts, replaced=self.unannounced)
            self.announced_at, self.unannounced = now, 0
            written.append("crashed")
        self.seen &= listed  # Serve lists at most 10; an id that left the list never comes back
        if self.healing and self._serving_in_full(status):
            # One event for every crash it heals (the first one's error, down since the first).
            replica, (error, since) = min(self.healing.items(), key=lambda item: item[1][1])
            self.append("worker_recovered", actor=ACTOR, fault="crashed", error=error[:500], replica_id=replica,
                        down_s=round(now - since, 2), crashes=len(self.healing), replicas=len(_running(status)))
            written.append("worker_recovered")
            self.healing.clear()
        return written

    def _serving_in_full(self, status: EngineStatus) -> bool:
        """Healthy, with as many running replicas as Serve targets, none of them a crashed one."""
        running = _running(status)
        target = status.details.get("target_replicas") or 1
        return (status.state == RUNNING and status.healthy and len(running) >= int(target)
                and not set(running) & set(self.healing))


def _running(status: EngineStatus) -> list[str]:
    """The ids of the replicas Serve says run (its own state names, not the engine's)."""
    return [str(r.get("replica_id")) for r in status.details.get("replicas") or [] if r.get("state") == "RUNNING"]


def watch_replicas(status: Callable[[], EngineStatus], append: Callable[..., None], stopping: Any,
                   every_s: float = WATCH_EVERY_S) -> None:
    """Feed a :class:`ReplicaFaults` ``status()`` every ``every_s`` until ``stopping`` (an Event) is set;
    a status that fails (the cluster busy, Serve restarting) is skipped."""
    faults = ReplicaFaults(append)
    while True:
        try:
            faults.observe(status())
        except Exception as exc:
            _logger.warning("Reading the replicas of the deployment failed (tried again in %.0fs): %s", every_s, exc)
        if stopping.wait(every_s):
            return
