"""The engine contract: what runs a deployment, behind one interface.

The deployment core (``deployments.py``) decides *what* should serve (a resolved, validated
:class:`~mlflow_deploy_plugin.spec.DeploymentSpec`) and records why; an engine decides *how* it runs:
processes on this machine (``local``), or later a Ray Serve application (``ray``). Everything an
engine must do is below, so a new engine is one class, picked from the target URI in one place
(:func:`get_engine`), and tested by the same contract suite as the others
(``tests/test_engine_contract.py``).

Engines keep their own state under the deployment's folder; the spec and history are the core's.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlflow_deploy_plugin.errors import InvalidRequest, Unavailable
from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec
from mlflow_deploy_plugin.state import STATUS_FAILED as FAILED
from mlflow_deploy_plugin.state import STATUS_RUNNING as RUNNING
from mlflow_deploy_plugin.state import STATUS_STARTING as STARTING
from mlflow_deploy_plugin.state import STATUS_STOPPED as STOPPED
from mlflow_deploy_plugin.state import STATUS_UNHEALTHY as UNHEALTHY
from mlflow_deploy_plugin.state import StateStore

# The states every engine reports (one vocabulary, defined beside the status files in state.py).
STATES = (STARTING, RUNNING, UNHEALTHY, FAILED, STOPPED)
SERVING_STATES = (RUNNING, UNHEALTHY)  # the service answers requests (maybe with fewer workers)


class EngineError(RuntimeError):
    """The engine could not do what was asked; the message says why.

    ``cause``: when a process of the deployment was killed by SIGKILL on the way, what killed it
    (the local engine's ``oom``, ``killed`` or ``killed (cause unknown)``, see ``engines/local/oom.py``),
    recorded as the history entry's ``cause`` like a ``crashed`` entry's.
    """

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class EngineUnavailable(EngineError, Unavailable):
    """What runs the deployments (a Ray cluster's GCS, Serve's controller) did not answer in time:
    a temporary condition, reported as ``TEMPORARILY_UNAVAILABLE`` (an :class:`Unavailable`), and as
    an :class:`EngineError` to the core's handling of a failed change."""


@dataclass(frozen=True)
class EngineStatus:
    """What an engine says about one deployment: common fields, plus its own in ``details``."""

    state: str  # starting | running | unhealthy | failed | stopped
    url: str | None = None
    model_version: str | None = None
    restarts: int = 0
    last_error: str | None = None
    traffic: tuple[tuple[str, float], ...] = ()  # (version, percent) actually served
    healthy: bool = False
    started_at: float | None = None
    details: dict[str, Any] = field(default_factory=dict)  # engine-specific: pids, ports, replicas

    @property
    def serving(self) -> bool:
        return self.state in SERVING_STATES and bool(self.url)


# How far the engine got with a change nobody recorded (InterruptedChange.outcome).
CHANGE_DONE = "done"  # the engine runs it: the record is what is missing
CHANGE_FAILED = "failed"  # the engine could not run it: what was recorded must serve again
CHANGE_IN_PROGRESS = "in_progress"  # the engine is still rolling it out: look again later


@dataclass(frozen=True)
class InterruptedChange:
    """A change the engine took that the deployment's folder does not record.

    Whoever made it (the agent following an alias, a CLI ``update``) died between the engine's
    switch and the spec write that follows it: ``running`` is the spec the engine runs (or is
    rolling out), which differs from the folder's.
    """

    running: DeploymentSpec
    outcome: str  # CHANGE_DONE | CHANGE_FAILED | CHANGE_IN_PROGRESS
    error: str | None = None  # why it failed (CHANGE_FAILED)


class Engine(abc.ABC):
    """Runs deployments. Every method takes names or specs, never MLflow objects."""

    name: str

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def prepare_start(self, name: str) -> None:
        """Get ready to :meth:`start` deployment ``name`` while the caller still resolves its model
        (nothing of the deployment is touched yet). Followed by ``start`` or :meth:`cancel_start`.
        Default: nothing to prepare."""
        return None

    def cancel_start(self, name: str) -> None:
        """Undo :meth:`prepare_start` when no ``start`` follows (the create failed); idempotent."""
        return None

    @abc.abstractmethod
    def start(self, spec: DeploymentSpec, timeout_s: float) -> EngineStatus:
        """Start ``spec`` (already written to the store) and wait until it serves; EngineError if not."""

    @abc.abstractmethod
    def update(self, spec: DeploymentSpec, reason: str, timeout_s: float) -> EngineStatus:
        """Swap a running deployment to ``spec`` with zero downtime; on EngineError the old keeps serving."""

    @abc.abstractmethod
    def stop(self, name: str, timeout_s: float) -> None:
        """Stop gracefully (in-flight requests finish), forcefully after ``timeout_s``. Idempotent."""

    @abc.abstractmethod
    def status(self, name: str) -> EngineStatus:
        """What runs now (``stopped`` for a deployment the engine knows nothing of)."""

    def url(self, name: str) -> str | None:
        """Where ``name`` answers (None when it does not run), for callers that need nothing else of
        :meth:`status`; an engine whose status costs more than its URL answers it cheaper."""
        return self.status(name).url

    @abc.abstractmethod
    def run_foreground(self, spec: DeploymentSpec, on_ready: Callable[[EngineStatus], None]) -> EngineStatus:
        """Serve ``spec`` in this process's foreground until interrupted (``run-local``), calling
        ``on_ready`` once it serves; the final status (``failed`` with ``last_error`` if it could not)."""

    def remove_leftovers(self, name: str) -> list[str]:
        """Remove what the engine may hold of a deployment ``name`` that neither this machine's
        state home nor the engine's shared state knows any more (a ``run-local`` that gave up before
        its clean-up finished), saying what was removed. Default: nothing (the local engine's
        processes all belong to a deployment folder)."""
        return []

    @abc.abstractmethod
    def agent_handle(self, name: str) -> str | None:
        """Where the deployment's background agent runs (it is hosted by the engine, restarted if
        it dies, and exists only while the spec needs one), or None when none runs."""

    def discover(self) -> dict[str, DeploymentSpec]:
        """The deployments this engine runs, by name, read from the engine's own shared state (a
        cluster several machines deploy to), whichever machine's state home created them.

        The core lists them beside its own folders, so another machine sees the same deployments.
        Default: none (the local engine's deployments exist only in this machine's folders).
        """
        return {}

    def metrics_texts(self, name: str) -> list[str] | None:
        """The Prometheus expositions of every replica of ``name`` when the engine collects them
        itself (Ray: its proxy routes a scrape to one replica only), for the canary's per-version
        figures. Default None: the deployment's own ``/metrics`` already covers every worker (the
        local engine's workers share a multiprocess registry), so the caller scrapes that."""
        return None

    def interrupted_change(self, name: str, stored: DeploymentSpec) -> InterruptedChange | None:
        """The change the engine took for ``name`` that the folder's spec ``stored`` does not
        record (its maker died between the engine's switch and the spec write), if any.

        The core (:meth:`Deployments.resume_interrupted`) then finishes it: records what runs, or
        serves ``stored`` again if the change failed. Called under the deployment's lock (no change
        of it is in progress), by its agent on each pass and by every change before it starts.
        Default None: the local engine's supervisor writes the spec itself as a new generation
        takes over, so the two cannot differ.
        """
        return None

    def keeps_token(self, name: str) -> bool:
        """Whether the running deployment ``name`` keeps what checks its bearer token by itself (the
        Ray engine: the token's hash on the cluster), so a change made where the token is not
        exported (the agent following an alias, on the cluster) keeps the token it runs with.
        Default: False, and the core requires the token in the environment of every change."""
        return False

    def check_config(self, config: DeploymentConfig) -> None:
        """Refuse (InvalidRequest) settings this engine cannot honour, before anything changes.

        By default: the `-C` keys that belong to another engine only, so a key is never silently
        ignored (``-C num_replicas=2`` on the local engine would otherwise do nothing).
        """
        defaults = DeploymentConfig()
        for engine, keys in ENGINE_ONLY_KEYS.items():
            if engine == self.name:
                continue
            for key in sorted(keys):
                if getattr(config, key) != getattr(defaults, key):
                    raise InvalidRequest(
                        f"-C {key} applies to the {engine} engine only (target lifecycle:/{engine}); "
                        f"this deployment runs on lifecycle:/{self.name}.")


ENGINES = ("local", "ray")
# `-C` keys that only one engine understands (the others refuse them in check_config).
ENGINE_ONLY_KEYS = {
    "ray": frozenset({"ray_address", "num_replicas", "min_replicas", "max_replicas",
                      "target_ongoing_requests", "max_ongoing_requests", "num_cpus"}),
}


def engine_name(target_uri: str) -> str:
    """The engine a target URI names: ``lifecycle`` and ``lifecycle:/local`` -> local, ..."""
    scheme, _, rest = (target_uri or "").partition(":")
    name = rest.strip("/") or "local"
    if scheme != "lifecycle" or name not in ENGINES:
        raise InvalidRequest(
            f"Unsupported target URI {target_uri!r}. Engines of the lifecycle target: "
            "`lifecycle` or `lifecycle:/local` (supervised processes on this machine), "
            "`lifecycle:/ray` (Ray Serve).")
    return name


def get_engine(target_uri: str, store: StateStore) -> Engine:
    """The engine for ``target_uri``: the one place a target URI becomes an engine."""
    name = engine_name(target_uri)
    if name == "ray":
        try:
            from mlflow_deploy_plugin.engines.ray import RayEngine
        except ImportError as exc:
            if not (exc.name or "").startswith("ray"):
                raise
            raise InvalidRequest(
                "The Ray Serve engine (lifecycle:/ray) needs the [ray] extra: "
                f"pip install 'mlflow-deploy-plugin[ray]' (it installs ray[serve]; {exc}).") from None
        return RayEngine(store)
    from mlflow_deploy_plugin.engines.local import LocalEngine

    return LocalEngine(store)
