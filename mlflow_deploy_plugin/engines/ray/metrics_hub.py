"""Every replica's Prometheus figures in one place: a small named actor per deployment.

Serve's proxy routes each request, a ``GET /metrics`` included, to whichever replica it picks, so a
scrape through the proxy reads one replica's counters: a canary judged on that would see part of
its traffic (and counters that jump as the proxy picks another replica). Instead every replica
pushes its own exposition (``ServingMetrics.render``) here every :data:`PUSH_INTERVAL_S` and once
more as it shuts down, and the engine (:meth:`RayEngine.metrics_texts`) hands the agent the
latest exposition of every replica the deployment ever had: the counters summed over them only
grow, through replica restarts and rolling updates alike, as a canary's "since the baseline"
arithmetic needs.

No token is involved: the figures travel inside the cluster, where the agent (which holds only
the token's hash) runs. Reaching this actor takes joining the cluster, which already grants far
more than reading request counters.

The actor is detached and restartable; a restart loses the pushes of replicas that are gone (the
live ones push again within seconds), which at worst makes a canary window start over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

NAMESPACE = "mlflow-deploy"  # the engine's own actors (agents, hubs); Serve keeps its own
PUSH_INTERVAL_S = 2.0
MAX_REPLICAS_KEPT = 1000  # a bound on memory over many rolling updates (about 20 kB per replica)
_logger = logging.getLogger(__name__)


def hub_name(deployment: str) -> str:
    return f"metrics:{deployment}"


@ray.remote(num_cpus=0, max_restarts=-1)
class MetricsHub:
    """The latest Prometheus exposition of each replica of one deployment, by replica id."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}  # replica id -> (pushed at, exposition)

    def push(self, replica_id: str, text: str) -> None:
        self.texts[replica_id] = (time.time(), text)
        if len(self.texts) > MAX_REPLICAS_KEPT:
            oldest = min(self.texts, key=lambda key: self.texts[key][0])
            del self.texts[oldest]

    def collect(self) -> list[str]:
        """Each replica's latest exposition (those of replicas gone included: counters never shrink)."""
        return [text for _, text in self.texts.values()]


def get_hub(deployment: str) -> Any:
    """The deployment's hub, created if it does not exist yet (by whichever side comes first)."""
    hub: Any = MetricsHub  # a Ray actor class (ray.remote), typed by Ray as the plain class
    return hub.options(name=hub_name(deployment), namespace=NAMESPACE, lifetime="detached",
                       get_if_exists=True).remote()


def find_hub(deployment: str) -> Any | None:
    try:
        return ray.get_actor(hub_name(deployment), namespace=NAMESPACE)
    except ValueError:
        return None


class Pusher:
    """A replica's side: pushes ``render()`` to the hub every :data:`PUSH_INTERVAL_S` on a daemon
    thread (off the request path), and once more on :meth:`close`."""

    def __init__(self, deployment: str, replica_id: str, render: Callable[[], str]) -> None:
        self.deployment, self.replica_id, self.render = deployment, replica_id, render
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="metrics-push", daemon=True)
        self.thread.start()

    def push(self) -> Any:
        return get_hub(self.deployment).push.remote(self.replica_id, self.render())

    def _run(self) -> None:
        while not self.stopping.wait(PUSH_INTERVAL_S):
            try:
                self.push()
            except Exception as exc:  # the hub restarting, the cluster shutting down: try again later
                _logger.debug("metrics push failed: %s", exc)

    def close(self, timeout_s: float = 5.0) -> None:
        self.stopping.set()
        try:
            ray.get(self.push(), timeout=timeout_s)  # the last figures before the replica goes
        except Exception as exc:
            _logger.debug("final metrics push failed: %s", exc)
