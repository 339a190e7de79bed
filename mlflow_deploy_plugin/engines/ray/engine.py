"""The Ray Serve engine on the CLI side: one Serve application per deployment.

- **Which cluster**: ``-C ray_address``, else ``$RAY_ADDRESS``, else the cluster ``ray start --head``
  recorded on this machine. With none, the engine refuses and says how to start one: it never starts
  a throw-away cluster that would vanish with the CLI process.
- **Where it answers**: Serve's HTTP proxy, one per cluster (``-C host``/``-C port`` set it when the
  plugin is the first to start Serve; default 127.0.0.1:8000). Each deployment is the application
  named after it with route prefix ``/<name>``, so its URL is ``http://host:port/<name>`` and the
  usual ``/invocations``, ``/ping``, ``/health``, ``/version``, ``/deployment`` and ``/metrics`` hang below it.
- **Scaling**: ``-C num_replicas``, or Serve's autoscaling (``-C min_replicas``/``max_replicas``/
  ``target_ongoing_requests``), ``-C num_cpus`` per replica. ``-C max_ongoing_requests`` (default
  2 x ``max_queue``, :func:`max_ongoing_requests`) is how many requests Serve hands a replica at once:
  Serve's own default (5) kept the rest in its router, retrying with backoff of up to 0.5 s, so at
  32 concurrent clients one replica answered ~13 req/s (even a trivial endpoint) instead of ~140.
- **Auth**: with ``-C auth_token_env``, the token is read from that variable on the machine running
  the command and only its SHA-256 goes to the replicas (a constructor argument), which check each
  ``Authorization: Bearer`` against it in constant time: no secret in Serve's state or logs. The
  hash is also the deployment's user_config, so a change from where the token is not exported (the
  agent on the cluster following an alias) keeps it (``keeps_token``). A
  deployment without a token is refused on a cluster whose Serve proxy listens beyond loopback.
  No TLS: Serve's proxy speaks plain HTTP (terminate TLS in front of it).
- **Updates**: ``serve.run`` of the new application version with ``max_surge_percent=100``: the new
  replicas start beside the old ones and take over once all are up, so no request meets an empty
  deployment. A version that cannot load fails its replicas' constructor (Serve keeps the old
  replicas of a failed surge rollout); the engine then deploys the old spec again, which surges
  fresh replicas of it beside the survivors, and reports the error. A retired replica answers
  everything it holds, then flushes its capture, before Serve stops it (``shutdown.py``).
- **State**: the spec of what runs is the Serve deployment's ``user_config``, so ``status`` reads
  everything (state, version, split, replicas) from the cluster itself: any machine connected to
  the cluster sees the same. The deployment folder (``$MLFLOW_DEPLOY_HOME``) keeps what the core
  keeps for every engine: the spec, history, model copies and captured traffic.
- **Agent**: a detached actor per deployment (``agent_host.py``) while the spec needs one.
- **Per-version figures**: every replica pushes its Prometheus exposition to a named actor
  (``metrics_hub.py``); :meth:`RayEngine.metrics_texts` hands the agent all of them, so a canary is
  judged on every replica's requests, with no token (the agent holds only its hash).
- **Bounded**: no Ray call has a deadline of its own (``ray.get_actor`` and ``ray.kill`` wait for
  the GCS; Serve's client waits for its controller's control loop, which a stuck or swamped
  controller never runs). Each one the engine makes runs through :func:`bounded_ray_call`, so every
  verb (``get``, ``list``, ``delete``, ``update``, the agent's passes) ends: past its budget with
  :class:`~mlflow_deploy_plugin.engines.base.EngineUnavailable` (``TEMPORARILY_UNAVAILABLE``),
  naming what did not answer and what to do. Only ``ray.init`` runs unbounded (it times out by
  itself; :func:`resolve_address` first checks that the address answers at all).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray import serve

from mlflow_deploy_plugin.bounded_exit import Overran, call_within, wait_until_interrupted
from mlflow_deploy_plugin.engines.base import (
    CHANGE_DONE,
    CHANGE_FAILED,
    CHANGE_IN_PROGRESS,
    FAILED,
    RUNNING,
    STARTING,
    STOPPED,
    UNHEALTHY,
    Engine,
    EngineError,
    EngineStatus,
    EngineUnavailable,
    InterruptedChange,
)
from mlflow_deploy_plugin.engines.ray.ingress import INGRESS_NAME, LifecycleIngress
from mlflow_deploy_plugin.engines.ray.metrics_hub import find_hub, hub_name
from mlflow_deploy_plugin.engines.ray.replica_deaths import actor_info, replica_deaths, unexpected
from mlflow_deploy_plugin.engines.ray.shutdown import (
    DRAIN_POLL_S,
    FOREGROUND_EXIT_MARGIN_S,
    foreground_exit_budget_s,
    graceful_shutdown_timeout_s,
)
from mlflow_deploy_plugin.errors import InvalidRequest
from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, SpecError, is_loopback_host
from mlflow_deploy_plugin.state import StateStore

_logger = logging.getLogger(__name__)
T = TypeVar("T")
NAMESPACE = "mlflow-deploy"  # our own actors (agents); Serve keeps its own in "serve"
DEFAULT_HTTP_PORT = 8000  # Serve's own default
DEFAULT_NUM_CPUS = 1.0  # Serve's own default per replica
DEFAULT_TARGET_ONGOING_REQUESTS = 2.0  # Serve's own AutoscalingConfig default
_CONSTRUCTOR_RETRIES = 2  # a version that cannot load fails fast instead of being retried 20 times
# One request to Serve's controller (its details; a deploy or delete request, which it only queues
# for its control loop) or to the GCS (an actor lookup or kill, the node list): milliseconds while
# they run, seconds when two busy cores hold them up. Past this, one of them is stuck or swamped:
# the command says so instead of hanging.
RAY_CALL_S = 30.0
AGENT_STOP_S = 40.0  # the agent finishes its cycle (AgentHost.stop waits 30 s, then kills it)
NO_CLUSTER = (
    "No Ray cluster to deploy to: set RAY_ADDRESS or -C ray_address=<host:port>, or start one on this "
    "machine with `ray start --head` (add --num-cpus N to cap what it uses). The lifecycle:/ray target "
    "never starts a throw-away cluster that would stop with this command.")


def resolve_address(configured: str | None) -> str:
    """The cluster to talk to; InvalidRequest (saying how to start one) when there is none."""
    address = configured or os.environ.get("RAY_ADDRESS")
    if not address:
        try:  # the cluster `ray start --head` last started on this machine, as `ray status` finds it
            from ray._private.services import find_bootstrap_address

            address = find_bootstrap_address(None)
        except Exception:
            address = None
    if not address:
        raise InvalidRequest(NO_CLUSTER)
    if not address.startswith("ray://"):
        # ray.init retries a dead address for a minute: say it at once instead.
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3):
                pass
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"No Ray cluster answers at {address} ({exc}). {NO_CLUSTER}") from None
    return address


def bounded_ray_call(call: Callable[[], T], what: str, budget_s: float, address: str | None) -> T:
    """``call()``'s result (or its exception) within ``budget_s`` (:func:`call_within`: the call runs
    on a daemon thread, left behind if it overruns); past it, :class:`EngineUnavailable` saying that
    the Ray cluster at ``address`` did not answer ``what`` (what the call was doing) and what to do."""
    try:
        return call_within(call, budget_s, what)
    except Overran:
        where = f"at {address}" if address else "this process is connected to"
        raise EngineUnavailable(
            f"The Ray cluster {where} did not answer within {budget_s:g}s while {what}: Serve's controller or "
            "the cluster's GCS is stuck or overloaded (`serve status` and `ray status` on the cluster show "
            "which; the controller's log is under the cluster's session logs, `/tmp/ray/session_latest/logs/serve`): "
            "retry the command once they answer.") from None


def _short(message: str, limit: int = 600) -> str:
    """The informative end of a Serve error (its messages carry whole replica tracebacks)."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:limit]
    return (lines[-1] if lines else message or "")[:limit]


class RayEngine(Engine):
    """Each deployment is a Ray Serve application on the cluster this process connects to."""

    name = "ray"

    def __init__(self, store: StateStore) -> None:
        super().__init__(store)
        self._address: str | None = None
        self._death_causes: dict[str, str] = {}  # actor id -> cause (replica_deaths.py): never changes

    # -- the contract --------------------------------------------------------------------------

    def check_config(self, config: DeploymentConfig) -> None:
        super().check_config(config)
        if config.workers != 1:
            raise InvalidRequest("-C workers is the local engine's: on lifecycle:/ray use -C num_replicas, "
                                 "or -C min_replicas/max_replicas for autoscaling.")
        autoscaling = (config.min_replicas, config.max_replicas, config.target_ongoing_requests) != (None,) * 3
        if autoscaling and config.num_replicas is not None:
            raise InvalidRequest("-C num_replicas fixes the replica count; -C min_replicas/max_replicas/"
                                 "target_ongoing_requests turn on autoscaling: use one or the other.")
        if autoscaling and config.max_replicas is None:
            raise InvalidRequest("Autoscaling needs -C max_replicas (and optionally -C min_replicas, "
                                 "default 1, and -C target_ongoing_requests, default 2).")
        if autoscaling:
            check_autoscaling_target(config)
        if config.max_replicas is not None and (config.min_replicas or 1) > config.max_replicas:
            raise InvalidRequest(f"-C min_replicas={config.min_replicas} exceeds -C max_replicas="
                                 f"{config.max_replicas}.")
        # Serve's proxy speaks plain HTTP: TLS belongs in front of it (a load balancer, an ingress).
        for key in ("tls_cert", "tls_key"):
            if getattr(config, key):
                raise InvalidRequest(f"-C {key} is not supported on lifecycle:/ray: Serve's HTTP proxy serves "
                                     "plain HTTP; terminate TLS in front of it (a load balancer or ingress), "
                                     "or use the local engine (`-t lifecycle`) for HTTPS.")
        self._connect(config.ray_address)
        nodes = self._call(ray.nodes, "listing the cluster's nodes (GCS)")
        check_capture_location(config, sum(1 for node in nodes if node.get("Alive")))
        self._check_notify_secret(config)
        http = self._http_options()
        if http is not None:
            serve_host = str(http.get("host") or "127.0.0.1")
            if not config.auth_token_env and not is_loopback_host(serve_host):
                # One proxy serves every application: without a token this one would be open there.
                raise InvalidRequest(f"Serve on this Ray cluster listens on {serve_host} (not loopback), where "
                                     "this deployment would be served without auth: set -C auth_token_env.")
            if not config.is_loopback and serve_host != config.host:
                raise InvalidRequest(
                    f"Serve on this Ray cluster already listens on {serve_host} (one HTTP proxy per cluster, "
                    f"shared by every application): -C host={config.host} cannot move it; drop -C host.")
        if http is not None and config.port is not None and int(http["port"]) != config.port:
            raise InvalidRequest(
                f"Serve on this Ray cluster already listens on port {http['port']} (one HTTP proxy per "
                f"cluster, shared by every application); drop -C port or use -C port={http['port']}.")

    def _check_notify_secret(self, config: DeploymentConfig) -> None:
        """Refuse ``-C notify_secret_env`` naming a variable the cluster's processes do not have.

        The agent that signs the notifications runs on the cluster (``agent_host.py``), in the
        environment the cluster's processes got from ``ray start``, not in this shell's: the local
        engine's agent inherits the creating shell's, so the CLI's own check (set here) passed, and
        on Ray every delivery then waited for a secret the agent never had. One zero-CPU task asks.
        """
        name = config.notify_secret_env
        if not name:
            return
        probe: Any = _env_is_set  # a Ray remote function, typed by Ray as the plain function
        present = self._call(lambda: ray.get(probe.remote(name), timeout=RAY_CALL_S),
                             f"asking a process of the cluster whether {name} is set", RAY_CALL_S + 5.0)
        if not present:
            raise InvalidRequest(
                f"notify_secret_env={name} is not set on the Ray cluster: the deployment's agent, which signs "
                "the notifications, runs there with the environment `ray start` was given, not this shell's. "
                f"Export {name} before `ray start` on the cluster's nodes, or leave out notify_secret_env: "
                "the deployment's own secret (notify.key in its folder) signs them.")

    def start(self, spec: DeploymentSpec, timeout_s: float) -> EngineStatus:
        self._connect(spec.config.ray_address)
        self._ensure_serve(spec.config)
        running = self._cluster_spec(spec.name)
        if self._app(spec.name) is not None and (running is None or running.created_at != spec.created_at):
            raise EngineError(f"The Ray cluster already runs an application named {spec.name!r} that is not "
                              "this deployment; delete it there (`serve shutdown` or the other machine's "
                              "`mlflow deployments delete`) or choose another name.")
        paths = self.store.paths(spec.name)
        token = token_sha256(spec.config)
        self._forget_metrics(spec.name)  # a new deployment's counters start at zero
        try:
            status = self._deploy(spec, paths.models, str(paths.capture), token, timeout_s)
        except EngineError as exc:
            self._delete(spec.name, timeout_s)
            raise EngineError(f"Deployment {spec.name!r} failed to start: {exc}") from None
        self._keep_agent(spec)
        return status

    def update(self, spec: DeploymentSpec, reason: str, timeout_s: float) -> EngineStatus:
        self._connect(spec.config.ray_address)
        old = self._cluster_spec(spec.name)
        paths = self.store.paths(spec.name)
        # The token as exported here (so an update rotates it), else the hash the replicas check now
        # (the agent, on the cluster, follows an alias without the token).
        token = token_sha256(spec.config, current=self._token_hash(spec.name))
        try:
            status = self._deploy(spec, paths.models, str(paths.capture), token, timeout_s)
        except EngineError as exc:
            if old is not None:
                # The old replicas survive a failed surge rollout and keep serving; deploying the old
                # spec again makes it the target once more (Serve gives every serve.run a new code
                # version, so it surges fresh replicas of it before retiring the survivors).
                try:
                    self._deploy(old, paths.models, str(paths.capture), token, timeout_s)
                except EngineError as restore:
                    raise EngineError(f"{exc}; restoring the previous version failed too: {restore}") from None
            raise
        # What runs now is the deployment's spec (the local supervisor writes it when a generation
        # takes over): without this the folder kept the created version, and the agent, reading
        # it, switched to the alias's version again and again.
        self.store.write_spec(spec)
        self._keep_agent(spec)
        return status

    def stop(self, name: str, timeout_s: float) -> None:
        if not self._joined(self._known_address(name)):
            return  # no cluster named anywhere, or it is gone with its applications: nothing of ours runs
        self._stop_agent(name)
        self._delete(name, timeout_s)
        self._forget_metrics(name)

    def status(self, name: str) -> EngineStatus:
        address = self._known_address(name)
        if address is None:
            return EngineStatus(STOPPED)
        try:
            self._connect(address)
        except InvalidRequest as exc:
            if self._stored_spec(name) is None:
                return EngineStatus(STOPPED)
            return EngineStatus(FAILED, last_error=f"the Ray cluster is unreachable: {exc.message}")
        details = self._details()  # one read of Serve's state serves the whole answer
        app = _live_app(details, name)
        if app is None:
            return EngineStatus(STOPPED)
        return self._to_status(name, app, details.get("http_options") or {})

    def url(self, name: str) -> str | None:
        """The application's URL, without the rest of :meth:`status` (the replicas' deaths cost an
        actor-table request each): what the agent's controller asks for on each of its passes."""
        if not self._joined(self._known_address(name)):
            return None
        details = self._details()
        app = _live_app(details, name)
        if app is None:
            return None
        return self._url(name, app, details.get("http_options") or {})

    def discover(self) -> dict[str, DeploymentSpec]:
        """Every lifecycle deployment on the cluster (the Serve applications deployed with a spec as
        their user_config), whichever machine created it; none when no cluster answers."""
        try:
            self._connect(None)
        except InvalidRequest:
            return {}
        found = {}
        for name, app in (self._details().get("applications") or {}).items():
            spec = _spec_of(app) if app.get("status") != "DELETING" else None
            if spec is not None and spec.name == name:
                found[name] = spec
        return found

    def agent_handle(self, name: str) -> str | None:
        if self._known_address(name) is None:
            return None
        try:
            self._connect(self._known_address(name))
        except InvalidRequest:
            return None
        actor = self._agent_actor(name)
        if actor is None:
            return None
        try:
            pid = ray.get(actor.pid.remote(), timeout=30)  # bounded by Ray itself
        except Exception:  # restarting (Ray brings it back) or gone
            return None
        return f"ray actor {_agent_name(name)} (agent pid {pid})" if pid else None

    def metrics_texts(self, name: str) -> list[str] | None:
        """Every replica's latest Prometheus exposition, from the deployment's metrics hub
        (``metrics_hub.py``): what the proxy's ``/metrics`` (one replica's, whichever it picks)
        cannot give. Read inside the cluster, so no token is needed."""
        self._connect(self._known_address(name))
        hub = self._find_hub(name)
        if hub is None:
            return []
        return list(ray.get(hub.collect.remote(), timeout=30))  # bounded by Ray itself

    def _find_hub(self, name: str) -> Any | None:
        return self._call(lambda: find_hub(name), f"looking up the metrics actor {hub_name(name)!r} (GCS)")

    def _forget_metrics(self, name: str) -> bool:
        """Kill the deployment's metrics actor; whether there was one."""
        hub = self._find_hub(name)
        if hub is not None:
            self._call(lambda: ray.kill(hub, no_restart=True), f"killing the metrics actor {hub_name(name)!r} (GCS)")
        return hub is not None

    def remove_leftovers(self, name: str) -> list[str]:
        """The metrics actor of a deployment gone from the state home and from Serve: what a
        ``run-local`` that gave up waiting leaves once Serve's controller finished the delete it was
        asked for (the command it printed then finds nothing else to remove). An application still
        being deleted is waited for first (its replicas' last push would create the actor again)."""
        if not self._joined(self._known_address(name)):
            return []
        app = (self._details().get("applications") or {}).get(name)
        if app is not None and _plain(app.get("status")) == "DELETING":
            self._wait_deleted(name, _graceful_s(app) + FOREGROUND_EXIT_MARGIN_S)
        elif app is not None:
            return []  # an application of that name that is not a lifecycle deployment: not ours to touch
        if not self._forget_metrics(name):
            return []
        return [f"the metrics actor {hub_name(name)!r} on the Ray cluster at {self._address}"]

    def run_foreground(self, spec: DeploymentSpec, on_ready: Callable[[EngineStatus], None]) -> EngineStatus:
        """Run ``spec`` on the cluster until Ctrl-C, then delete it: ``run-local`` leaves no state.

        The way out is bounded as a whole (:meth:`_leave_foreground`): FAILED, saying what may be
        left on the cluster and how to remove it, when Serve did not confirm the delete in time."""
        self._connect(spec.config.ray_address)
        self._ensure_serve(spec.config)
        if self._app(spec.name) is not None:
            return EngineStatus(FAILED, last_error=f"the Ray cluster already runs an application named "
                                                   f"{spec.name!r}; choose another --name")
        failure: str | None = None
        with tempfile.TemporaryDirectory(prefix="mlflow-deploy-run-local-") as scratch:
            try:
                status = self._deploy(spec, Path(scratch) / "models", str(Path(scratch) / "capture"),
                                      token_sha256(spec.config), spec.config.startup_timeout_s)
                on_ready(status)
                wait_until_interrupted()
            except EngineError as exc:
                failure = str(exc)
            except KeyboardInterrupt:
                pass  # Ctrl-C while serving, or while the replicas still start: deleted all the same
            finally:
                left = self._leave_foreground(spec.name, foreground_exit_budget_s(spec.config))
        if left is not None:
            return EngineStatus(FAILED, last_error=f"{failure}; {left}" if failure else left)
        return EngineStatus(FAILED, last_error=failure) if failure else EngineStatus(STOPPED)

    def _leave_foreground(self, name: str, budget: float) -> str | None:
        """Delete a foreground run's application ``name`` and its metrics hub within ``budget``
        seconds in all (:func:`~mlflow_deploy_plugin.engines.ray.shutdown.foreground_exit_budget_s`):
        None once both are gone, else what may be left and the command that removes it (also on
        stderr). A second Ctrl-C stops waiting at once: KeyboardInterrupt, after saying the same.

        Each Ray call runs bounded (:func:`call_within`): Serve's controller answers its details and
        the delete request when its control loop gets to them, and a GCS request waits for the GCS;
        on two loaded cores either took longer than any wait this process can promise."""
        deadline = time.monotonic() + budget

        def left() -> float:
            return deadline - time.monotonic()

        step = "asking Serve's controller to delete the application"
        try:  # the announcement too: a Ctrl-C right after it still says what may be left
            print(f"Stopping: deleting the Serve application {name!r} (its replicas answer what they hold; at "
                  f"most {budget:g}s; Ctrl-C stops waiting).", file=sys.stderr, flush=True)
            call_within(lambda: serve.delete(name, _blocking=False), left(), step)
            step = "waiting for Serve to delete the application (its replicas draining)"
            while call_within(lambda: self._app_or_deleting(name), left(), step):
                if left() <= 0:
                    raise Overran(step, budget)
                time.sleep(0.2)
            step = "removing the application's metrics actor"
            call_within(lambda: self._forget_metrics(name), left(), step)
            return None
        except Overran:
            reason = f"{step} did not finish within {budget:g}s"
        except EngineUnavailable:  # one request inside the step overran its own bound (RAY_CALL_S)
            reason = f"{step} did not finish: the cluster did not answer one request within {RAY_CALL_S:g}s"
        except KeyboardInterrupt:
            print(self._leftover(name, f"interrupted while {step}"), file=sys.stderr, flush=True)
            raise
        except Exception as exc:  # the cluster or Serve's controller gone, a Ray error: say what may remain
            reason = f"{step} failed: {type(exc).__name__}: {_short(str(exc))}"
        message = self._leftover(name, reason)
        print(message, file=sys.stderr, flush=True)
        return message

    def _leftover(self, name: str, reason: str) -> str:
        address = self._address or os.environ.get("RAY_ADDRESS") or "<the cluster's address>"
        return (f"run-local: {reason}. The Serve application {name!r} (and its metrics actor "
                f"{hub_name(name)!r}) may still be on the Ray cluster at {address}; remove them with: "
                f"RAY_ADDRESS={address} mlflow deployments delete -t lifecycle:/ray --name {name}")

    # -- cluster plumbing ----------------------------------------------------------------------

    def _stored_spec(self, name: str) -> DeploymentSpec | None:
        try:
            return self.store.read_spec(name)
        except SpecError:
            return None

    def _known_address(self, name: str) -> str | None:
        """The cluster a deployment lives on, as far as this machine knows; None when none is named."""
        spec = self._stored_spec(name)
        address = (spec.config.ray_address if spec else None) or self._address or os.environ.get("RAY_ADDRESS")
        if address:
            return address
        try:
            from ray._private.services import find_bootstrap_address

            return find_bootstrap_address(None)
        except Exception:
            return None

    def _joined(self, address: str | None) -> bool:
        """Whether this process is joined to the cluster at ``address``: False when none is named or
        it cannot be reached (see :meth:`_connect`)."""
        if address is None:
            return False
        try:
            self._connect(address)
        except InvalidRequest:
            return False
        return True

    def _connect(self, configured: str | None) -> None:
        """Join the cluster as a driver (once per process; a process talks to one cluster)."""
        if ray.is_initialized():
            if configured and self._address and configured != self._address:
                raise InvalidRequest(f"This process is connected to the Ray cluster at {self._address}; "
                                     f"-C ray_address={configured} names another (one cluster per command).")
            return
        address = resolve_address(configured)
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        self._address = address

    @staticmethod
    def _client() -> Any:
        # Serve's controller client: the one place that reads cluster-wide Serve state (http options,
        # applications, deployment configs, replicas). Private to Serve; pinned by ray>=2.60.
        from ray.serve.context import _get_global_client

        return _get_global_client()

    def _serve_running(self) -> bool:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        try:
            self._call(lambda: ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE),
                       "looking up Serve's controller (GCS)")
        except ValueError:
            return False
        return True

    def _call(self, call: Callable[[], T], what: str, budget_s: float = RAY_CALL_S) -> T:
        """``call()`` bounded (:func:`bounded_ray_call`), on the cluster this process joined."""
        return bounded_ray_call(call, what, budget_s, self._address or os.environ.get("RAY_ADDRESS"))

    def _http_options(self) -> dict[str, Any] | None:
        if not self._serve_running():
            return None
        return dict(self._read_details().get("http_options") or {})

    def _ensure_serve(self, config: DeploymentConfig) -> None:
        if not self._serve_running():
            # Starts the controller and the proxies: the deployment's start-up budget, not one request's.
            self._call(lambda: serve.start(http_options={"host": config.host,
                                                         "port": config.port or DEFAULT_HTTP_PORT}),
                       "starting Serve (its controller and HTTP proxy)", config.startup_timeout_s)

    def _details(self) -> dict[str, Any]:
        if not self._serve_running():
            return {}
        return self._read_details()

    def _read_details(self) -> dict[str, Any]:
        # Serve's client is made on first use, which asks the controller too: bounded with the read.
        return dict(self._call(lambda: self._client().get_serve_details(),
                               "reading Serve's applications from its controller"))

    def _app(self, name: str) -> dict[str, Any] | None:
        return _live_app(self._details(), name)

    def _cluster_spec(self, name: str) -> DeploymentSpec | None:
        app = self._app(name)
        return _spec_of(app) if app else None

    def interrupted_change(self, name: str, stored: DeploymentSpec) -> InterruptedChange | None:
        """The spec Serve runs for ``name`` when it is not the folder's ``stored`` one.

        :meth:`update` makes the new spec Serve's target, waits for the rollout, and only then writes
        it to the folder: whoever died in between (the agent's process, its actor, a CLI) left Serve
        at the new spec and the folder at the old. Serve keeps the spec it targets as the
        application's user_config, so the two compare exactly. One read of Serve's details: cheap
        enough for every pass of the agent. A rollout still running counts as failed once it has
        run longer than ``startup_timeout_s`` (what :meth:`update` would have waited).
        """
        if not self._joined(stored.config.ray_address or self._known_address(name)):
            return None
        return divergence(self._app(name), stored)

    def keeps_token(self, name: str) -> bool:
        return self._known_address(name) is not None and self._token_hash(name) is not None

    def _token_hash(self, name: str) -> str | None:
        """The hash of the bearer token the running application's replicas check, if any."""
        try:
            self._connect(self._known_address(name))
        except InvalidRequest:
            return None
        app = self._app(name)
        return _user_config(app).get("auth_sha256") if app else None

    def _application(self, spec: DeploymentSpec, models_dir: Path, capture_dir: str, token: str | None) -> Any:
        config = spec.config
        actor_options: dict[str, Any] = {"num_cpus": DEFAULT_NUM_CPUS if config.num_cpus is None else config.num_cpus}
        # Who created it: another machine's `get` says where its history and capture live.
        owner = {"host": socket.gethostname(), "home": str(self.store.home)}
        options: dict[str, Any] = {
            # The token's hash is no secret: kept here so a later change can keep it (keeps_token).
            "name": INGRESS_NAME, "user_config": {"spec": spec.to_dict(), "owner": owner, "auth_sha256": token},
            "ray_actor_options": actor_options, "max_surge_percent": 100,
            "max_constructor_retry_count": _CONSTRUCTOR_RETRIES,
            "max_ongoing_requests": max_ongoing_requests(config),
            # A retiring replica answers all it holds, then flushes (shutdown.py says why this suffices).
            "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s(config),
            "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
        }
        if config.max_replicas is not None:
            options["autoscaling_config"] = {
                "min_replicas": 1 if config.min_replicas is None else config.min_replicas,
                "max_replicas": config.max_replicas,
                "target_ongoing_requests": target_ongoing_requests(config),
            }
        else:
            options["num_replicas"] = config.num_replicas or 1
        deployment: Any = serve.deployment(LifecycleIngress)  # Serve's overloads confuse mypy
        return deployment.options(**options).bind(spec.to_dict(), str(models_dir), capture_dir, token)

    def _deploy(self, spec: DeploymentSpec, models_dir: Path, capture_dir: str, token: str | None,
                timeout_s: float) -> EngineStatus:
        """Make ``spec`` the application's target (replicas checking the token hash ``token``) and
        wait until every replica runs it."""
        application = self._application(spec, models_dir, capture_dir, token)
        self._call(lambda: serve._run(application, _blocking=False, name=spec.name, route_prefix=f"/{spec.name}"),
                   f"handing Serve's controller the application {spec.name!r}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            details = self._details()
            app = _live_app(details, spec.name)
            if app is not None and _spec_of(app) == spec:  # Serve marks it DEPLOYING as it takes it
                if app.get("status") == "RUNNING":
                    return self._to_status(spec.name, app, details.get("http_options") or {})
                if app.get("status") == "DEPLOY_FAILED":
                    raise EngineError(_short(_app_message(app)))
            time.sleep(0.2)
        raise EngineError(f"Deployment {spec.name!r} did not become ready within startup_timeout_s="
                          f"{timeout_s:g}s on the Ray cluster (not enough CPUs for its replicas? `ray status` "
                          "shows what is free; an update needs room for the new replicas beside the old).")

    def _delete(self, name: str, timeout_s: float) -> None:
        app = self._app(name)
        if app is None:
            return
        # Serve lets each replica drain and flush for its graceful_shutdown_timeout_s (the value its
        # replicas were started with): wait for that, not only for the caller's timeout.
        self._call(lambda: serve.delete(name, _blocking=False),
                   f"asking Serve's controller to delete the application {name!r}")
        self._wait_deleted(name, max(timeout_s, _graceful_s(app)) + FOREGROUND_EXIT_MARGIN_S)

    def _wait_deleted(self, name: str, budget_s: float) -> None:
        """Wait until Serve no longer lists application ``name`` (asked to delete it), at most
        ``budget_s`` plus one read's own bound: past it, Serve finishes the delete by itself."""
        deadline = time.monotonic() + budget_s
        while self._app_or_deleting(name) and time.monotonic() < deadline:
            time.sleep(0.2)

    def _app_or_deleting(self, name: str) -> bool:
        return name in (self._details().get("applications") or {})

    def _to_status(self, name: str, app: dict[str, Any], http: dict[str, Any]) -> EngineStatus:
        """The status of application ``app`` as Serve's details give it, ``http`` the proxy's
        http_options from the same read (a second read of Serve's details cost a controller round
        trip per status call, and could describe another moment than ``app``)."""
        spec = _spec_of(app)
        deployment = _ingress(app)
        # Serve's own view of each replica (RUNNING, STARTING, UPDATING, RECOVERING, STOPPING), as plain
        # values so `get` prints them readably (Serve's details hold enums).
        replicas = [{"replica_id": r.get("replica_id"), "state": _plain(r.get("state")), "pid": r.get("pid"),
                     "node_ip": r.get("node_ip")} for r in deployment.get("replicas") or []]
        serving = [r for r in replicas if r["state"] == "RUNNING"]
        # Serve lists every replica that stopped (retired by an update too); restarts counts crashes.
        deaths = replica_deaths(list(deployment.get("recent_dead_replicas") or []), self._actor_info,
                                self._death_causes)
        serve_status = _plain(app.get("status"))
        if serve_status == "RUNNING":
            state = RUNNING
        elif serve_status in ("DEPLOYING", "UNHEALTHY", "DEPLOY_FAILED"):
            state = (RUNNING if serve_status == "DEPLOYING" else UNHEALTHY) if serving else (
                STARTING if serve_status == "DEPLOYING" else FAILED)
        else:
            state = STOPPED
        return EngineStatus(
            state=state,
            url=self._url(name, app, http),
            model_version=spec.model.model_version if spec else None,
            restarts=unexpected(deaths),
            last_error=_short(_app_message(app)) or None,
            traffic=tuple((share.model.model_version, share.percent) for share in spec.traffic) if spec else (),
            healthy=state == RUNNING and deployment.get("status") == "HEALTHY",
            started_at=app.get("last_deployed_time_s"),
            details={"engine": "ray", "ray_address": self._address, "serve_status": serve_status,
                     "created_from": _owner_of(app),
                     "replicas": replicas, "worker_pids": [r["pid"] for r in serving],
                     "dead_replicas": deaths,
                     "target_replicas": deployment.get("target_num_replicas"),
                     "max_ongoing_requests": (deployment.get("deployment_config") or {}).get("max_ongoing_requests"),
                     "host": http.get("host"), "port": http.get("port")},
        )

    def _actor_info(self, actor_id: str) -> dict[str, Any] | None:
        return self._call(lambda: actor_info(actor_id), f"reading replica actor {actor_id}'s end (GCS)")

    @staticmethod
    def _url(name: str, app: dict[str, Any], http: dict[str, Any]) -> str:
        """Where the application answers: Serve's proxy (``http``: its http_options) and route."""
        host = http.get("host") or "127.0.0.1"
        if host in ("0.0.0.0", "::"):  # listening everywhere: a running replica's node answers
            serving = [r for r in _ingress(app).get("replicas") or [] if _plain(r.get("state")) == "RUNNING"]
            host = serving[0].get("node_ip") if serving and serving[0].get("node_ip") else "127.0.0.1"
        return f"http://{host}:{http.get('port', DEFAULT_HTTP_PORT)}{app.get('route_prefix') or '/' + name}"

    # -- the agent actor -----------------------------------------------------------------------

    def _agent_actor(self, name: str) -> Any | None:
        try:
            return self._call(lambda: ray.get_actor(_agent_name(name), namespace=NAMESPACE),
                              f"looking up the agent actor {_agent_name(name)!r} (GCS)")
        except ValueError:
            return None

    def _keep_agent(self, spec: DeploymentSpec) -> None:
        """Run the agent actor while the spec needs one (follow, schedule, policy), none otherwise."""
        if not spec.needs_agent:
            self._stop_agent(spec.name)
            return
        if self._agent_actor(spec.name) is not None:
            return
        from mlflow_deploy_plugin.engines.ray.agent_host import AgentHost

        # The cluster this process joined, however it joined (a driver that called ray.init itself
        # left no address here): the agent's engine connects to it by that address.
        address = self._address or ray.get_runtime_context().gcs_address
        env = {"MLFLOW_DEPLOY_HOME": str(self.store.home), "RAY_ADDRESS": address or ""}
        if spec.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = spec.tracking_uri
        host: Any = AgentHost  # a Ray actor class (ray.remote), typed by Ray as the plain class
        actor = host.options(name=_agent_name(spec.name), namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True).remote(str(self.store.paths(spec.name).root), env, read_status)
        ray.get(actor.pid.remote(), timeout=120)  # constructed: the agent process runs

    def _stop_agent(self, name: str) -> None:
        actor = self._agent_actor(name)
        if actor is None:
            return
        with contextlib.suppress(Exception):  # already dying: the kill below ends it either way
            ray.get(actor.stop.remote(), timeout=AGENT_STOP_S)  # bounded by Ray itself
        self._call(lambda: ray.kill(actor, no_restart=True), f"killing the agent actor {_agent_name(name)!r} (GCS)")


@functools.lru_cache(maxsize=8)
def _engine_for(home: str) -> RayEngine:
    return RayEngine(StateStore(Path(home)))


def read_status(home: str, name: str) -> EngineStatus:
    """Deployment ``name``'s status under state home ``home``, from a process of the cluster: the agent
    host's replica watch (``agent_host.py``, ``replica_faults.py``), handed this function by
    :meth:`RayEngine._keep_agent`. One engine per home, so the death causes it read are kept."""
    return _engine_for(home).status(name)


@ray.remote(num_cpus=0)
def _env_is_set(name: str) -> bool:
    """Whether a process of the cluster (where the agent runs) has ``name`` set, non-empty."""
    return bool(os.environ.get(name))


def max_ongoing_requests(config: DeploymentConfig) -> int:
    """How many requests Serve hands one replica at once: ``-C max_ongoing_requests``, else
    2 x ``max_queue``.

    A replica's app bounds its own backlog: ``max_queue`` requests wait for the model while the batch
    taken from that queue (at most ``max_queue`` requests) is predicted, and the next one is refused
    at once with 503 + ``Retry-After``, as on the local engine. Serve's default (5) let a replica hold
    only 5: the batcher never saw a backlog to coalesce, and the rest waited in Serve's router, which
    retries a full replica with backoff of up to 0.5 s (``RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S``): at
    32 concurrent clients, one replica (even of a trivial endpoint) answered ~13 req/s, p99 2.4 s.
    """
    return config.max_ongoing_requests or 2 * config.max_queue


def target_ongoing_requests(config: DeploymentConfig) -> float:
    """The autoscaler's target per replica: ``-C target_ongoing_requests``, else Serve's default."""
    return DEFAULT_TARGET_ONGOING_REQUESTS if config.target_ongoing_requests is None \
        else config.target_ongoing_requests


def check_autoscaling_target(config: DeploymentConfig) -> None:
    """Refuse an autoscaling target above ``max_ongoing_requests`` (InvalidRequest), the default
    target included.

    Serve keeps its default target (2) whatever ``max_ongoing_requests`` is (the fields not given
    come from ``AutoscalingConfig.default()``, ``serve/_private/config.py:640-671``; the config
    validates only the replica counts, ``serve/config.py:713-737``) and, where it compares the two
    (applying a config file's overrides), only logs "Autoscaling will never happen, because
    'max_ongoing_requests' is less than 'target_ongoing_requests'"
    (``serve/_private/application_state.py:2054-2063``): a replica never
    runs more than ``max_ongoing_requests`` requests, so the target is met only by requests queued
    in Serve's routers, which already wait for a replica. Serve's semantics are the default target,
    not one derived from ``max_ongoing_requests``; picking one silently would scale at a load the
    user never chose, so the check says which key to change instead.
    """
    limit, target = max_ongoing_requests(config), target_ongoing_requests(config)
    if target <= limit:
        return
    if config.target_ongoing_requests is None:
        raise InvalidRequest(
            f"-C max_ongoing_requests={limit} is below the autoscaling target (target_ongoing_requests="
            f"{target:g}, Serve's default when -C target_ongoing_requests is not given): a replica never "
            "runs more requests than max_ongoing_requests, so Serve would scale out only once requests "
            f"queue in its router. Set -C target_ongoing_requests to at most {limit}, or raise "
            f"-C max_ongoing_requests to at least {target:g}.")
    given = "" if config.max_ongoing_requests else ", default 2 x max_queue"
    raise InvalidRequest(
        f"-C target_ongoing_requests={target:g} exceeds the {limit} requests Serve hands a replica at "
        f"once (-C max_ongoing_requests{given}): a replica never runs that many, so Serve would scale out "
        f"only once requests queue in its router. Lower -C target_ongoing_requests to at most {limit}, "
        "or raise -C max_ongoing_requests.")


def check_capture_location(config: DeploymentConfig, alive_nodes: int) -> None:
    """Refuse the node-local capture default on a multi-node cluster (InvalidRequest).

    Replicas capture where they run: with the default, the deployment's folder on this machine's
    disk, which replicas on other nodes do not see (each would fill its own node's copy of the
    path, and the drift reports read one of them).
    """
    if config.capture and not config.capture_uri and alive_nodes > 1:
        raise InvalidRequest(
            f"This Ray cluster has {alive_nodes} nodes: replicas on other nodes cannot write captured traffic "
            "into the deployment's folder on this machine (the default). Set -C capture_uri to a place every "
            "node reaches (s3://bucket/prefix, gs://..., hdfs://..., or a path on a mount shared by every "
            "node), or -C capture=false. See docs/scaling.md.")


def token_sha256(config: DeploymentConfig, current: str | None = None) -> str | None:
    """The SHA-256 (hex) of the bearer token, read here from the variable ``auth_token_env`` names,
    else ``current`` (the hash a running application checks).

    Only this digest goes to the cluster (a replica's constructor argument): a token handed to
    replicas through a runtime_env would sit in the cluster's state, readable by anyone who can
    list its actors or read Serve's details.
    """
    if not config.auth_token_env:
        return None
    token = os.environ.get(config.auth_token_env)
    if not token and current:
        return current
    if not token:
        raise InvalidRequest(f"auth_token_env={config.auth_token_env} names an environment variable that is "
                             "unset or empty here: export it (replicas check requests against its hash).")
    return hashlib.sha256(token.encode()).hexdigest()


def divergence(app: dict[str, Any] | None, stored: DeploymentSpec,
               now: float | None = None) -> InterruptedChange | None:
    """How Serve's application ``app`` (its details) differs from the folder's spec ``stored``:
    None when it runs ``stored``, is not this deployment (another one's, or none), or is not ours."""
    running = _spec_of(app) if app else None
    if app is None or running is None or running == stored or running.created_at != stored.created_at:
        return None
    status = _plain(app.get("status"))
    if status == "RUNNING":
        return InterruptedChange(running, CHANGE_DONE)
    if status == "DEPLOY_FAILED":
        return InterruptedChange(running, CHANGE_FAILED, _short(_app_message(app)) or "Serve: DEPLOY_FAILED")
    since = app.get("last_deployed_time_s")
    timeout = running.config.startup_timeout_s
    if status == "DEPLOYING" and since and (time.time() if now is None else now) - float(since) > timeout:
        return InterruptedChange(running, CHANGE_FAILED,
                                 f"the rollout did not finish within startup_timeout_s={timeout:g}s")
    return InterruptedChange(running, CHANGE_IN_PROGRESS)


def _agent_name(name: str) -> str:
    return f"agent:{name}"


def _live_app(details: dict[str, Any], name: str) -> dict[str, Any] | None:
    """Application ``name`` in Serve's ``details``, unless absent or being deleted."""
    app = (details.get("applications") or {}).get(name)
    return app if app and app.get("status") != "DELETING" else None


def _graceful_s(app: dict[str, Any]) -> float:
    """The drain Serve grants the application's replicas (their graceful_shutdown_timeout_s)."""
    return float((_ingress(app).get("deployment_config") or {}).get("graceful_shutdown_timeout_s") or 0.0)


def _ingress(app: dict[str, Any]) -> dict[str, Any]:
    return (app.get("deployments") or {}).get(INGRESS_NAME) or {}


def _user_config(app: dict[str, Any]) -> dict[str, Any]:
    return dict((_ingress(app).get("deployment_config") or {}).get("user_config") or {})


def _spec_of(app: dict[str, Any]) -> DeploymentSpec | None:
    """The spec the application was deployed with (its user_config), or None if it is not ours."""
    user_config = _user_config(app)
    try:
        return DeploymentSpec.from_dict(user_config["spec"])
    except (KeyError, SpecError):
        return None


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)


def _owner_of(app: dict[str, Any]) -> str | None:
    """``host:/state/home`` of the machine whose folder holds the deployment (history, capture)."""
    owner = _user_config(app).get("owner") or {}
    return f"{owner.get('host')}:{owner.get('home')}" if owner else None


def _app_message(app: dict[str, Any]) -> str:
    return str(app.get("message") or _ingress(app).get("message") or "")
