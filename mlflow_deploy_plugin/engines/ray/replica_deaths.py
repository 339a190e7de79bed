"""Which of a deployment's dead replicas died unexpectedly (a crash, a kill), which Serve retired.

``get``'s ``restarts`` means crashes to its readers. Serve's own record of dead replicas
(``recent_dead_replicas`` in its details) holds every replica that stopped, for whatever reason: a
rolling update retiring the old ones, a downscale, a crash. Serve appends each one as it finishes
stopping, its state rewritten to STOPPED (``serve/_private/deployment_state.py:5733-5737``), and a
``ReplicaDetails`` carries no stop reason (``serve/schema.py:1343-1398``: ids, node, pid, log file,
state, start time). So after a normal update of two replicas the count was 2.

Ray's actor table does tell: each replica is an actor, and the GCS keeps how each actor died
(``ActorTableData.death_cause``, read by ``ray._private.state.actors``, ``_private/state.py:238-273``).
Serve ends every replica it stops, gracefully or not, with ``ray.kill`` (after the graceful
shutdown, ``deployment_state.py:1598-1620``; at the deadline, ``:1883-1888``), which the GCS records
as ``ActorDiedErrorContext.RAY_KILL``. A replica process that died on its own (``kill -9``, a segfault,
the OOM killer: ``WORKER_DIED`` or an ``oom_context``) or with its node (``NODE_DIED``) keeps that
cause: Serve's later ``ray.kill`` of a dead actor changes nothing.

What cannot be told apart: a replica Serve stopped because its health checks failed (hung, its
event loop blocked) goes through the same stop (``deployment_state.py:5336-5346``), so it reads
as retired; Serve marks the deployment UNHEALTHY meanwhile (``last_error``). Likewise a
``ray.kill`` by hand. Serve keeps only the last ``RAY_SERVE_RETAINED_DEAD_REPLICAS`` (10) dead
replicas per deployment (``constants.py:735``), in its controller's memory: ``restarts`` counts
crashes among those. A driver connected through Ray Client (``ray://``) cannot read the actor
table: every cause then reads ``unknown`` and ``restarts`` 0 (``dead_replicas`` still lists them).

A dead actor's cause never changes and actor ids are never reused, so the engine remembers each
cause it has read (``known``): the actor table is asked once per dead replica, not on every status
(up to 10 requests per deployment each time). ``unknown`` is not remembered: the kill may not have
landed yet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

_logger = logging.getLogger(__name__)

RETIRED = "retired"  # stopped by Serve (update, downscale, delete, failed health checks) or ray.kill
UNKNOWN = "unknown"  # the cluster does not say (yet): Serve records a replica before the kill lands
EXPECTED = frozenset({RETIRED, UNKNOWN})
KNOWN_LIMIT = 1024  # causes remembered per engine: Serve lists at most 10 dead replicas per deployment


def death_of(actor: dict[str, Any] | None) -> str:
    """How a replica's actor ended, from its actor table entry (``ray._private.state.actors``):
    :data:`RETIRED`, :data:`UNKNOWN`, or the crash's kind (``worker_died``, ``node_died``,
    ``out_of_memory``, ...)."""
    if not actor or actor.get("State") != "DEAD":
        return UNKNOWN  # not dead yet in the GCS (Serve's ray.kill in flight), or no longer listed
    cause = actor.get("DeathCause")  # an ActorDeathCause (common.proto)
    context = cause.WhichOneof("context") if cause is not None else None
    if cause is None or context is None:
        return UNKNOWN
    if context == "oom_context":
        return "out_of_memory"
    if context != "actor_died_error_context":
        return context.removesuffix("_context")  # creation_task_failure, runtime_env_failed, ...
    died = cause.actor_died_error_context
    value = died.DESCRIPTOR.fields_by_name["reason"].enum_type.values_by_number.get(died.reason)
    reason = value.name if value is not None else f"REASON_{died.reason}"
    # Rays that set no reason for ray.kill said so only in the message.
    if reason == "RAY_KILL" or (reason == "UNSPECIFIED" and "ray.kill" in died.error_message):
        return RETIRED
    return reason.lower()


def replica_deaths(dead_replicas: list[dict[str, Any]],
                   actor_info: Callable[[str], dict[str, Any] | None],
                   known: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Each of Serve's ``recent_dead_replicas`` with how it died (``cause``); ``actor_info`` reads
    an actor's table entry by hex id (None when it cannot). ``known`` (actor id -> cause), when
    given, is read before the actor table and keeps every cause found other than ``unknown``."""
    deaths = []
    for replica in dead_replicas:
        actor_id = replica.get("actor_id")
        cause = known.get(actor_id) if known is not None and actor_id else None
        if cause is None:
            try:
                info = actor_info(actor_id) if actor_id else None
            except Exception as exc:  # the GCS unreachable for a moment: say unknown, never fail `get`
                _logger.debug("reading actor %s failed: %s", actor_id, exc)
                info = None
            cause = death_of(info)
            if known is not None and actor_id and cause != UNKNOWN:
                if len(known) >= KNOWN_LIMIT:
                    del known[next(iter(known))]  # the oldest: its replica left Serve's list long ago
                known[actor_id] = cause
        deaths.append({"replica_id": replica.get("replica_id"), "pid": replica.get("pid"), "cause": cause})
    return deaths


def unexpected(deaths: list[dict[str, Any]]) -> int:
    """How many of ``deaths`` (:func:`replica_deaths`) were not Serve's own doing."""
    return sum(1 for death in deaths if death["cause"] not in EXPECTED)


def actor_info(actor_id: str) -> dict[str, Any] | None:
    """The GCS actor table entry of ``actor_id`` (hex) on the connected cluster, None if unknown."""
    from ray._private.state import actors

    return actors(actor_id=actor_id) or None
