"""How long Serve lets a retiring replica finish: ``graceful_shutdown_timeout_s``, derived, not guessed.

A replica leaves when a rolling update, a downscale or a delete retires it. Serve (ray 2.60) then:

1. calls the replica's ``perform_graceful_shutdown`` and sets the replica's kill deadline to now +
   ``graceful_shutdown_timeout_s`` (``serve/_private/deployment_state.py:2167-2186``, ``stop``),
   killing it once that passes (``:2188-2199``, ``check_stopped``); a replica that finishes sooner
   is killed as soon as it reports so (``:1598-1620``). So the value is a ceiling, not a wait: it
   costs nothing unless a replica is stuck.
2. In the same control-loop step, after that call, tells the routers the new set of running
   replicas (``deployment_state.py:7065-7099``: our surge rollout stops the old replicas in STEP 4,
   ``scale_deployment_replicas`` -> ``_stop_old_replicas``, ``:4454-4457`` and ``:4316-4329``,
   gracefully as they are RUNNING; a downscale's are stopped in STEP 6; STEP 7 broadcasts). Routers
   stop sending to it as the long poll reaches them; what they sent meanwhile is admitted: the replica
   refuses new requests only after its drain (``replica.py:1421-1426``, ``_quiescing`` is set at
   ``:2228``). So the last request arrives a routing lag (milliseconds) after the period starts.
3. Drains: sleeps ``graceful_shutdown_wait_loop_s`` (default 2 s), then counts ongoing requests,
   again and again until there are none (``replica.py:2067-2108``; without direct ingress, off by
   default, there is no minimum draining period, ``:2211-2222``). Then it runs our ``__del__``
   (``:2158-2161``, ``:2277``), all within the same budget (``:2198``).

What bounds the drain is our app, not the queue's depth: a prediction request waits for the model
under ``asyncio.wait_for(..., timeout_s)`` from the moment it joins the model's queue
(``serving/app.py``, ``answer``), so waiting in the queue counts inside ``timeout_s``, and it is
answered 504 then even if the model never returns (the running call is left to its thread; Serve
counts the request as done once answered). A request that finds the queue full (``max_queue``) is
answered 503 at once. So however many requests Serve handed the replica (``max_ongoing_requests``,
default 2 x ``max_queue`` = 512) and whatever the batch size, every request the replica holds ends
within ``timeout_s`` of joining the queue: a full queue does not drain by predicting it.

Outside ``timeout_s`` are only: the routing lag (2.), reading the body from Serve's proxy and
decoding it before the request joins the queue, encoding and capturing the answer after it (small,
bounded by ``max_body_mb``; :data:`HANDLING_MARGIN_S` covers them), the drain noticing the last
answer up to one wait loop late, and the destructor (:data:`ingress.DESTRUCTOR_S`: the capture
writer's flush and the last metrics push). The old value, ``timeout_s + 5``, left the destructor of
a replica that had drained a full queue 5 s minus the wait loop to flush its capture: Serve killed
it mid-flush.

Serve applies the value a replica was started with (``deployment_state.py:951-958``: the replica's
own version's config), so replicas started before a change of this value retire with the old one;
the next update starts replicas with the new one.

The same figure bounds how long ``run-local -t lifecycle:/ray`` waits after Ctrl-C for Serve to
delete its application (:func:`foreground_exit_budget_s`: the drain, plus what Serve takes after it).
"""

from __future__ import annotations

from mlflow_deploy_plugin.engines.ray.ingress import DESTRUCTOR_S
from mlflow_deploy_plugin.spec import DeploymentConfig

# Serve's default graceful_shutdown_wait_loop_s (constants.py:271), set explicitly (the bound below
# counts one of its loops).
DRAIN_POLL_S = 2.0
# The routing lag, body read and decode before a request joins the model's queue, and encode and
# capture after its answer: what of a request's time ``timeout_s`` does not cover.
HANDLING_MARGIN_S = 5.0


def graceful_shutdown_timeout_s(config: DeploymentConfig) -> float:
    """Serve's ``graceful_shutdown_timeout_s`` for a deployment: the longest a retiring replica can
    take to answer everything it holds (``timeout_s`` after the last request joins the model's
    queue, plus what ``timeout_s`` does not cover) and then flush its capture and metrics."""
    return DRAIN_POLL_S + config.timeout_s + HANDLING_MARGIN_S + DESTRUCTOR_S


# Past the replicas' own budget: Serve's controller killing a replica that overran it, removing the
# application in its next steps, and our reads of its details seeing it gone.
FOREGROUND_EXIT_MARGIN_S = 30.0


def foreground_exit_budget_s(config: DeploymentConfig) -> float:
    """How long ``run-local -t lifecycle:/ray`` waits, after Ctrl-C, for Serve to delete its
    application (and for the rest of its way out) before it says what may be left and exits: the
    replicas' drain and flush (:func:`graceful_shutdown_timeout_s`) plus what Serve takes after it."""
    return graceful_shutdown_timeout_s(config) + FOREGROUND_EXIT_MARGIN_S
