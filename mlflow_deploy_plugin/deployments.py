"""The deployment core: create, update, transition, delete and roll back, whatever the engine.

Every way a deployment changes goes through :class:`Deployments`: the ``mlflow deployments``
target (``target.py``, which only translates to MLflow's exceptions and return shapes), the
``mlflow-deploy`` CLI and the lifecycle controller (which moves deployments on its own). So each change
is validated, resolved against the registry, run by the engine, recorded in the history and
reflected in the registry's serving tags in exactly one way.

Errors are the domain errors of ``errors.py``; nothing here knows about click or HTTP status codes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin import timeline
from mlflow_deploy_plugin.config import parse_config
from mlflow_deploy_plugin.engines.base import (
    CHANGE_DONE,
    CHANGE_FAILED,
    FAILED,
    STOPPED,
    Engine,
    EngineError,
    EngineStatus,
    InterruptedChange,
    get_engine,
)
from mlflow_deploy_plugin.errors import (
    AlreadyExists,
    Busy,
    DeploymentError,
    InvalidRequest,
    InvalidState,
    NotFound,
    Unavailable,
)
from mlflow_deploy_plugin.spec import (
    FLAVOR,
    DeploymentConfig,
    DeploymentSpec,
    ModelRef,
    SpecError,
    TrafficShare,
)
from mlflow_deploy_plugin.state import (
    DeploymentPaths,
    StateStore,
    append_history_file,
    file_lock,
    read_json,
    validate_name,
)

_logger = logging.getLogger(__name__)
_ACCEPTED_FLAVORS = {None, "", FLAVOR, "pyfunc"}
LOCK_TIMEOUT_S = 120.0  # how long a change waits for another command on the same deployment
UP_LOCK_TIMEOUT_S = 5.0  # `up` skips a deployment another command is busy with (the next run retries)
SPOOL_CONVERT_TIMEOUT_S = 300.0  # delete converts what a stop left in the capture spool, within this
# History events whose version must never be served again by an automatic rollback.
BAD_EVENTS = ("rejected", "rolled_back", "follow_failed", "update_failed", "gates_failed")


def check_name(name: str) -> str:
    try:
        return validate_name(name)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def check_flavor(flavor: str | None) -> None:
    if flavor not in _ACCEPTED_FLAVORS:
        raise InvalidRequest(f"Flavor {flavor!r} is not supported by the lifecycle target: it serves the "
                             f"{FLAVOR} flavor (omit --flavor).")


def check_notify_secret(config: DeploymentConfig) -> None:
    """``notify_secret_env`` must name a set variable here: the agent inherits this environment."""
    if config.notify_secret_env and not os.environ.get(config.notify_secret_env):
        raise InvalidRequest(
            f"notify_secret_env={config.notify_secret_env} names an environment variable that is unset or "
            "empty here: export it (notifications are signed with it), or leave notify_secret_env unset to "
            "sign with a secret kept in the deployment's notify.key.")


def shown_config(config: DeploymentConfig) -> dict[str, Any]:
    """The config as `get` shows it: notify URLs without their path (Slack's carries its secret)."""
    shown = config.to_dict()
    if config.notify:
        from mlflow_deploy_plugin.lifecycle.notify import parse_targets

        with contextlib.suppress(ValueError):
            shown["notify"] = ",".join(("slack+" if t.format == "slack" else "") + t.shown
                                       for t in parse_targets(config.notify))
    return shown


def token_for(config: DeploymentConfig) -> str | None:
    """The bearer token the service requires, read from the environment variable the config names."""
    if not config.auth_token_env:
        return None
    token = os.environ.get(config.auth_token_env)
    if not token:
        raise InvalidRequest(
            f"auth_token_env={config.auth_token_env} names an environment variable that is unset or "
            "empty here: export it (the service and `predict` both read the token from it).")
    return token


def traffic_summary(spec: DeploymentSpec) -> str:
    """``v1 90%, v2 10%``: what serves, in the words `get` and the history use."""
    return ", ".join(f"v{share.model.model_version} {share.percent:g}%" for share in spec.shares())


def shadow_summary(spec: DeploymentSpec) -> str | None:
    """``v5 (models:/churn@challenger), 100% mirrored``: the shadow version `get` shows, or None."""
    if spec.shadow is None:
        return None
    return (f"v{spec.shadow.model_version} ({spec.shadow.requested_uri}), "
            f"{spec.config.shadow_sample_rate * 100:g}% of captured requests mirrored")


def _notify_from_here(store: StateStore, spec: DeploymentSpec, archived: Path, written_at: float) -> None:
    """Send the last events of a deployment that has no agent any more (``deleted``, ``create_failed``,
    written at ``written_at``) to its ``-C notify`` / policy receivers from this process: at most a few
    seconds, never raising. A receiver no agent had a cursor for starts at that event."""
    if not (spec.config.notify or spec.config.policy):
        return
    from mlflow_deploy_plugin.lifecycle.notifier import deliver_pending

    deliver_pending(store, spec.name, paths=DeploymentPaths(archived), since=written_at - 1.0)


def _engine_failed(message: str, exc: EngineError) -> InvalidState:
    """The change failed (``message``) on ``exc``: INVALID_STATE, unless the engine said it was a
    temporary condition (:class:`~mlflow_deploy_plugin.engines.base.EngineUnavailable`, a cluster
    that did not answer in time), whose code is kept so a caller knows to retry."""
    return InvalidState(message, error_code=getattr(exc, "error_code", None))


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")


def _resolve(model_uri: str) -> ModelRef:
    """A registry URI pinned to a version; registry failures become domain errors (an unreachable
    registry is Unavailable, never NotFound)."""
    from mlflow.exceptions import MlflowException

    from mlflow_deploy_plugin.registry import resolve_model_uri

    try:
        return resolve_model_uri(model_uri)
    except MlflowException as exc:
        kind = {"RESOURCE_DOES_NOT_EXIST": NotFound, "TEMPORARILY_UNAVAILABLE": Unavailable}.get(
            str(exc.error_code), InvalidRequest)
        raise kind(exc.message) from None


def _check_policy_fits(policy_path: str, model_uri: str, model: ModelRef) -> None:
    """A policy moves the champion role: the deployment must follow that role of that model."""
    from mlflow_deploy_plugin.lifecycle.policy import load_policy

    policy = load_policy(policy_path)
    expected = policy.role_uri("champion")
    if policy.model != model.model_name or model_uri.lower() != expected.lower():
        raise InvalidRequest(
            f"Policy {policy_path} manages {policy.model}'s champion; a deployment it drives must serve "
            f"-m {expected} (got -m {model_uri}).")


class Deployments:
    """The deployments of one engine under one state home."""

    def __init__(self, target_uri: str = "lifecycle", store: StateStore | None = None,
                 engine: Engine | None = None) -> None:
        self.store = store or StateStore()
        self.engine = engine or get_engine(target_uri, self.store)

    @contextlib.contextmanager
    def _locked(self, name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """The deployment's own lock: one create, change, delete or `up` of it at a time."""
        try:
            with file_lock(self.store.paths(check_name(name)).lock, timeout_s):
                yield
        except TimeoutError:
            raise Busy(f"Deployment {name!r} is being changed by another command (its lock was held for more "
                       f"than {timeout_s:.0f}s); retry when that command has finished.") from None

    # -- reading -------------------------------------------------------------------------------

    def spec(self, name: str) -> DeploymentSpec:
        """The stored spec of ``name``; NotFound when there is no such deployment."""
        check_name(name)
        try:
            spec = self.store.read_spec(name)
        except SpecError as exc:
            raise InvalidState(f"Deployment {name!r} has an unreadable spec ({exc}); delete and re-create it.") \
                from None
        if spec is None:
            spec = self.engine.discover().get(name)  # created from another machine, on a shared cluster
        if spec is None:
            raise NotFound(f"No deployment named {name!r} (target lifecycle). `mlflow deployments list -t "
                           "lifecycle` shows the deployments there are.")
        if spec.engine != self.engine.name:
            # Another engine's status files mean nothing here: never read or stop it through this one.
            raise InvalidRequest(f"Deployment {name!r} runs on the {spec.engine} engine: use "
                                 f"-t lifecycle:/{spec.engine}.")
        return spec

    def describe(self, spec: DeploymentSpec, status: EngineStatus | None = None) -> dict[str, Any]:
        """What `get` and `list` show for one deployment."""
        status = status if status is not None else self.engine.status(spec.name)
        details = status.details
        return {
            "name": spec.name,
            "flavor": spec.flavor,
            "engine": self.engine.name,
            "model_uri": spec.model.requested_uri,
            "model_name": spec.model.model_name,
            "model_version": status.model_version or spec.model.model_version,
            "status": status.state,
            "url": status.url,
            "pid": details.get("pid"),
            "worker_pids": details.get("worker_pids"),
            "port": details.get("port"),
            "host": details.get("host"),
            "restarts": status.restarts,
            "started_at": _iso(status.started_at),
            "last_error": status.last_error or self._lifecycle_error(spec.name),
            "created_at": _iso(spec.created_at),
            "updated_at": _iso(spec.updated_at),
            "traffic": traffic_summary(spec),
            "shadow": shadow_summary(spec),
            "config": shown_config(spec.config),
            # Engine-specific, when the engine says: replica health (and how recent dead ones died), the
            # machine that created it, requests that killed their worker, workers the OOM killer
            # killed, capture a killed worker lost.
            **{key: details[key] for key in ("replicas", "dead_replicas", "created_from", "bad_requests",
                                             "oom_kills", "capture_lost")
               if details.get(key) is not None},
        }

    def _lifecycle_error(self, name: str) -> str | None:
        """What keeps the lifecycle controller from doing its job: not following the registry, or a
        policy file that cannot be used (the last valid policy stays in force meanwhile)."""
        state = read_json(self.store.paths(name).root / "lifecycle_state.json") or {}
        errors = []
        if state.get("follow_error"):
            errors.append(f"not following the registry: {state['follow_error']}")
        if state.get("policy_error"):
            errors.append(f"policy file unusable, the last valid policy stays in force: {state['policy_error']}")
        for key in ("cycle_failure", "op_failure"):  # see lifecycle/controller.py: retried with backoff
            if state.get(key):
                errors.append(str(state[key]))
        return "; ".join(errors) or None

    def get(self, name: str) -> dict[str, Any]:
        return self.describe(self.spec(name))

    def describe_all(self) -> list[dict[str, Any]]:
        views: list[dict[str, Any]] = []
        for name in sorted(set(self.store.names()) | set(self.engine.discover())):
            try:
                views.append(self.describe(self.spec(name)))
            except NotFound:
                continue  # deleted meanwhile
            except InvalidRequest:
                continue  # another engine's deployment: its own target lists it
            except InvalidState as exc:  # one unreadable spec must not hide the others
                _logger.warning("%s", exc.message)
                views.append({"name": name, "status": "unreadable", "last_error": exc.message})
        return views

    def history(self, name: str) -> list[dict[str, Any]]:
        return self.store.read_history(check_name(name))

    # -- changes -------------------------------------------------------------------------------

    def new_spec(self, name: str, model_uri: str, config: Mapping[str, Any] | None = None,
                 flavor: str | None = None) -> DeploymentSpec:
        """Validate and resolve what ``create`` or ``run-local`` would run (changes nothing)."""
        return self._resolved_spec(name, model_uri, self._checked_config(name, config, flavor))

    def _checked_config(self, name: str, config: Mapping[str, Any] | None, flavor: str | None) -> DeploymentConfig:
        """What a new deployment is checked for before its model is resolved (no registry asked)."""
        check_name(name)
        check_flavor(flavor)
        parsed = parse_config(config)
        self.engine.check_config(parsed)
        token_for(parsed)
        check_notify_secret(parsed)
        return parsed

    def _resolved_spec(self, name: str, model_uri: str, parsed: DeploymentConfig) -> DeploymentSpec:
        timeline.mark("cli: config checked, resolving")
        model = _resolve(model_uri)
        if parsed.policy:
            _check_policy_fits(parsed.policy, model_uri, model)
        import mlflow

        return DeploymentSpec(name=name, model=model, config=parsed, engine=self.engine.name,
                              shadow=_resolve(parsed.shadow) if parsed.shadow else None,
                              tracking_uri=mlflow.get_tracking_uri())

    def create(self, name: str, model_uri: str, config: Mapping[str, Any] | None = None,
               flavor: str | None = None) -> dict[str, Any]:
        """Resolve ``model_uri`` to a version, start its service and wait until it is healthy."""
        parsed = self._checked_config(name, config, flavor)
        # The engine gets ready while the registry is asked (the local one starts the supervisor's
        # interpreter: ~0.1 s of the cold start, now beside the resolve instead of after it).
        self.engine.prepare_start(name)
        try:
            return self._create(name, self._resolved_spec(name, model_uri, parsed))
        finally:
            self.engine.cancel_start(name)  # nothing left to undo once started

    def _create(self, name: str, spec: DeploymentSpec) -> dict[str, Any]:
        timeline.mark("cli: model resolved, spec made")
        with contextlib.ExitStack() as held:
            try:
                with self.store.global_lock():
                    if self.store.exists(name):
                        raise AlreadyExists(f"Deployment {name!r} already exists. Use `mlflow deployments update` "
                                            "to change it or delete it first.")
                    if self.store.paths(name).root.exists():
                        self.store.archive(name)  # leftovers of a deleted one (late writes): start clean
                    # Held until the supervisor is up: `mlflow-deploy up` (cron, boot) never starts a
                    # second one of a deployment being created.
                    held.enter_context(self._locked(name, UP_LOCK_TIMEOUT_S))
                    self.store.write_spec(spec)
                    timeline.mark("cli: spec written")
            except TimeoutError:
                raise Busy("Deployments are being created or deleted by another command (the global lock was "
                           "held too long); retry when it has finished.") from None
            try:
                status = self.engine.start(spec, spec.config.startup_timeout_s)
            except EngineError as exc:
                written_at = time.time()
                self.store.append_history(name, "create_failed", model=spec.model.to_dict(), error=str(exc))
                held.close()
                with self.store.global_lock():
                    archived = self.store.archive(name)
                _notify_from_here(self.store, spec, archived, written_at)  # no agent ever ran to send it
                raise _engine_failed(str(exc), exc) from None
        timeline.mark("cli: engine says running")
        self.store.append_history(name, "created", model=spec.model.to_dict(), reason="create", url=status.url,
                                  **({"shadow": spec.shadow.to_dict()} if spec.shadow else {}))
        self._tag_served(spec, None, status)
        timeline.mark("cli: history and serving tag written")
        return self.describe(spec, status)

    def update(self, name: str, model_uri: str | None = None, config: Mapping[str, Any] | None = None,
               flavor: str | None = None, actor: str = "cli") -> dict[str, Any]:
        """Swap to a new model URI and/or config with zero downtime (see :meth:`transition`)."""
        check_flavor(flavor)
        reason = "update" if model_uri or config else "redeploy"
        return self.transition(name, model_uri=model_uri, config=config, reason=reason, actor=actor,
                               check_policy=True)

    def transition(self, name: str, *, model_uri: str | None = None, config: Mapping[str, Any] | None = None,
                   traffic: list[tuple[str, float]] | None = None, reason: str, actor: str,
                   evidence: dict[str, Any] | None = None, only_if_changed: bool = False,
                   check_policy: bool = False, record_failure: bool = True) -> dict[str, Any]:
        """Move deployment ``name`` to a model URI and/or a traffic split, recording why.

        ``model_uri`` defaults to the URI the deployment follows (re-resolved: an alias or stage
        that moved is followed). ``traffic`` is a list of (model URI, percent) served side by side
        (a canary); None serves the one resolved version. Zero downtime; if a version cannot load
        or fails its smoke test, what serves keeps serving and InvalidState says why.

        ``only_if_changed`` (for automatic followers): do nothing when, by the time the lock is
        held, the deployment already serves exactly this; a decision taken on a spec read before
        another change landed (a rollback, a person's update) must not redeploy or be recorded.
        ``check_policy`` (a person's update): the policy must fit the result, exactly as on create.
        ``record_failure=False`` (the lifecycle controller, which records a failed step once and
        retries it): a failed engine update is not written to the history here.
        """
        self._refuse_foreign(name, "update it")
        with self._locked(name):
            self._resume_locked(name, actor)  # a change interrupted before: record it first
            old = self.spec(name)
            parsed = parse_config(config, base=old.config)
            if parsed.auth_token_env != old.config.auth_token_env:
                # Workers read the token from the supervisor's environment, fixed at create.
                raise InvalidRequest(
                    f"auth_token_env cannot change on update ({old.config.auth_token_env} -> "
                    f"{parsed.auth_token_env}): the service reads its token from the environment it was "
                    "created in. Delete and create the deployment again to change or rotate the token.")
            if parsed.notify_secret_env != old.config.notify_secret_env:
                # Like the token: the agent reads the secret from the environment fixed at create.
                raise InvalidRequest(
                    f"notify_secret_env cannot change on update ({old.config.notify_secret_env} -> "
                    f"{parsed.notify_secret_env}): the agent reads it from the environment the deployment was "
                    "created in. Delete and create the deployment again to change it.")
            self.engine.check_config(parsed)
            if not self.engine.keeps_token(name):
                token_for(parsed)
            requested = model_uri or old.model.requested_uri
            model = _resolve(requested)
            if check_policy and parsed.policy:
                _check_policy_fits(parsed.policy, requested, model)
            shares = []
            for uri, percent in traffic or []:
                share_model = _resolve(uri)
                # Each share remembers what the deployment follows, so a canary ends on that URI.
                shares.append(TrafficShare(ModelRef(requested, share_model.model_name, share_model.model_version,
                                                    share_model.run_id, share_model.source), float(percent)))
            # The shadow is re-resolved like the model: a shadow of models:/churn@challenger follows the alias.
            shadow = _resolve(parsed.shadow) if parsed.shadow else None
            new = old.replace(model=model, config=parsed, traffic=tuple(shares), shadow=shadow,
                              updated_at=time.time())
            if only_if_changed and (new.model, new.config, new.traffic, new.shadow) == (
                    old.model, old.config, old.traffic, old.shadow):
                return self.describe(old)
            split = traffic_summary(new) if shares else None
            try:
                if self.engine.status(name).state in (FAILED, STOPPED):
                    self.store.write_spec(new)  # nothing is serving: start afresh with the new spec
                    status = self.engine.start(new, parsed.startup_timeout_s)
                else:
                    status = self.engine.update(new, reason, parsed.startup_timeout_s)
            except EngineError as exc:
                if record_failure:
                    self.store.append_history(name, "update_failed", model=model.to_dict(), reason=reason,
                                              actor=actor, error=str(exc), traffic=split,
                                              **({"cause": exc.cause} if exc.cause is not None else {}))
                raise _engine_failed(
                    f"Update of {name!r} to {split or model.version_uri} failed; version "
                    f"{old.model.model_version} keeps serving. Reason: {exc}", exc) from None
        self.store.append_history(name, "updated", model=model.to_dict(), reason=reason, actor=actor,
                                  from_version=old.model.model_version, url=status.url, traffic=split,
                                  evidence=evidence, **({"shadow": new.shadow.to_dict()} if new.shadow else {}))
        self._tag_served(new, old, status)
        return self.describe(self.spec(name), status)

    def resume_interrupted(self, name: str, actor: str = "agent", lock_timeout_s: float = 1.0) -> str | None:
        """Finish a change of ``name`` that its maker left half done; what was done, or None.

        A change switches the engine first and writes the spec and history after; whoever made it
        (the agent following an alias, a CLI ``update``) may die in between. The engine then runs
        (or rolls out) a spec the folder does not record, and the agent, comparing the registry
        with the folder's stale spec, would never act on it. Here, under the deployment's lock (so
        no change is in progress): what the engine took is recorded as if its maker had lived
        (spec, ``updated`` event, serving tags); a change the engine could not run is recorded as
        ``update_failed`` and the recorded spec is served again; one still rolling out is left
        for the next look. Skipped (None) while another command holds the lock: it is the one
        changing the deployment.
        """
        if self._interrupted(name) is None:  # the usual answer, without taking the lock
            return None
        try:
            with self._locked(name, lock_timeout_s):
                return self._resume_locked(name, actor)
        except Busy:
            return None

    def _interrupted(self, name: str) -> tuple[DeploymentSpec, InterruptedChange] | None:
        """The folder's spec and the change the engine took beyond it, when it is done or failed."""
        try:
            stored = self.store.read_spec(name)
        except SpecError:
            return None
        if stored is None or stored.engine != self.engine.name:
            return None
        change = self.engine.interrupted_change(name, stored)
        if change is None or change.outcome not in (CHANGE_DONE, CHANGE_FAILED):
            return None
        return stored, change

    def _resume_locked(self, name: str, actor: str) -> str | None:
        found = self._interrupted(name)
        if found is None:
            return None
        stored, change = found
        running = change.running
        split = traffic_summary(running) if running.traffic else None
        if change.outcome == CHANGE_DONE:
            self.store.write_spec(running)
            reason = (f"resumed: the change to {split or running.model.version_uri} was interrupted after "
                      f"the {self.engine.name} engine took it and before it was recorded; recorded now")
            self.store.append_history(name, "updated", model=running.model.to_dict(), reason=reason, actor=actor,
                                      from_version=stored.model.model_version, traffic=split, resumed=True,
                                      **({"shadow": running.shadow.to_dict()} if running.shadow else {}))
            status = self.engine.status(name)
            try:
                self._tag_served(running, stored, status)
            except Exception as exc:  # the registry down: the spec and history are what must agree
                _logger.warning("Serving tags of %s not updated after resuming: %s", name, exc)
            _logger.warning("Deployment %s: %s", name, reason)
            return reason
        reason = (f"resumed: the change to {split or running.model.version_uri} was interrupted and then failed "
                  f"on the {self.engine.name} engine; serving v{stored.model.model_version} again")
        self.store.append_history(name, "update_failed", model=running.model.to_dict(), reason=reason, actor=actor,
                                  error=change.error, traffic=split, resumed=True)
        _logger.warning("Deployment %s: %s (%s)", name, reason, change.error)
        try:
            self.engine.update(stored, reason, stored.config.startup_timeout_s)
        except EngineError as exc:
            _logger.error("Deployment %s: serving v%s again failed too: %s", name, stored.model.model_version, exc)
        return reason

    def _foreign(self, name: str) -> DeploymentSpec | None:
        """The spec of a deployment the engine runs that another machine's state home created (a
        shared Ray cluster): this machine has no folder for it (history, capture, model copies)."""
        if self.store.exists(check_name(name)):
            return None
        return self.engine.discover().get(name)

    def _refuse_foreign(self, name: str, what: str) -> None:
        if self._foreign(name) is not None:
            owner = self.engine.status(name).details.get("created_from") or "another machine"
            raise InvalidRequest(
                f"Deployment {name!r} was created from {owner}, whose state home keeps its history, captured "
                f"traffic and model copies: {what} there. From here: list, get, predict and delete.")

    def delete(self, name: str) -> bool:
        """Stop the service gracefully and forget the deployment (captured data and history are
        archived). Returns False when there was no such deployment, which is not an error.

        A deployment another machine created on a shared cluster is stopped from here too (nothing to
        archive here; that machine's folder keeps its history and shows it stopped)."""
        check_name(name)
        foreign = self._foreign(name)
        if foreign is not None:
            with self.store.global_lock():
                self.engine.stop(name, foreign.config.timeout_s + 15)
            untagged = self._untag(name, foreign.tagged_versions())
            if untagged:
                _logger.warning("Deleted %s, but its registry serving tags stay: %s", name, untagged)
            return True
        with self.store.global_lock(), self._locked(name):
            if not self.store.exists(name):
                # Nothing here or in the engine's shared state; what a clean-up that gave up left
                # (a run-local on Ray: its metrics actor) goes all the same, and is said.
                removed = self.engine.remove_leftovers(name)
                if removed:
                    _logger.warning("No deployment %r here or on the %s engine; removed what was left of it: %s",
                                    name, self.engine.name, "; ".join(removed))
                return bool(removed)
            try:
                spec = self.store.read_spec(name)
            except SpecError:
                spec = None  # unreadable: still stop what runs and archive the folder
            if spec is not None and spec.engine != self.engine.name:
                raise InvalidRequest(f"Deployment {name!r} runs on the {spec.engine} engine: use "
                                     f"-t lifecycle:/{spec.engine}.")
            timeout = (spec.config.timeout_s if spec else 60.0) + 15
            self.engine.stop(name, timeout)
            left = self._convert_spool(name)
            written_at = time.time()
            self.store.append_history(name, "deleted", model=spec.model.to_dict() if spec else None,
                                      reason="delete", **({"capture_spool_kept": left} if left else {}))
            archive = self.store.archive(name)
        if spec is not None:
            untagged = self._untag(name, spec.tagged_versions())
            if untagged:
                # Said where a user looks later: the archived history (`mlflow-deploy history`).
                append_history_file(archive / "history.jsonl", "untag_failed", reason=untagged)
            _notify_from_here(self.store, spec, archive, written_at)  # its agent stopped before `deleted` was written
        return True

    def _convert_spool(self, name: str) -> str | None:
        """Convert what a stop left in the capture spool (a stop killed before its last pass): no
        later start would. Returns why something is left (archived with the capture), if it is."""
        spool = self.store.paths(name).capture / ".spool"
        try:
            waiting = [p.name for p in spool.iterdir() if not p.name.startswith(".")]
        except OSError:
            return None
        if not waiting:
            return None
        _logger.info("Converting the capture spool of %s that its stop left (%d writer folders).", name, len(waiting))
        try:
            done = subprocess.run([sys.executable, "-m", "mlflow_deploy_plugin.capture.converter", str(spool),
                                   "--drain"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=SPOOL_CONVERT_TIMEOUT_S, check=False)
            problem = done.stderr.strip()[-500:] if done.returncode else None
        except subprocess.TimeoutExpired:
            problem = f"not converted within {SPOOL_CONVERT_TIMEOUT_S:.0f}s"
        with contextlib.suppress(OSError):
            if not any(not p.name.startswith(".") for p in spool.iterdir()):
                return None
        reason = (f"capture spool not fully converted ({problem or 'see the converter log'}); it is kept in the "
                  "archive, under capture/.spool")
        _logger.warning("Deleting %s: %s", name, reason)
        return reason

    def up(self, retry_failed: bool = False) -> list[dict[str, Any]]:
        """Bring every deployment back to running (after a reboot, after everything was killed).

        Idempotent and safe to run at any time, from cron or at boot: a deployment that runs is
        left alone, one another command is busy with is skipped (the next run retries), and the
        supervisor lock guarantees a deployment never gets two supervisors. A deployment that
        ``failed`` (its version could not stay up) is started again only with ``retry_failed``.
        Returns one ``{"name", "action", "detail"}`` per deployment; action is one of
        ``running``, ``started``, ``skipped``, ``failed``.
        """
        results = []
        for name in self.store.names():
            try:
                results.append({"name": name, **self._up_one(name, retry_failed)})
            except DeploymentError as exc:
                skipped = isinstance(exc, Busy | InvalidRequest)  # busy now, or a token missing here
                results.append({"name": name, "action": "skipped" if skipped else "failed",
                                "detail": exc.message})
        return results

    def _up_one(self, name: str, retry_failed: bool) -> dict[str, str]:
        with self._locked(name, UP_LOCK_TIMEOUT_S):
            spec = self.spec(name)
            status = self.engine.status(name)
            if status.details.get("supervisor_alive", status.serving):
                return {"action": "running", "detail": f"{status.state} at {status.url}"}
            if status.state == FAILED and not retry_failed:
                return {"action": "skipped", "detail": f"failed: {status.last_error} (--retry-failed starts it)"}
            token_for(spec.config)  # a token the service needs must be in this environment
            try:
                started = self.engine.start(spec, spec.config.startup_timeout_s)
            except EngineError as exc:
                self.store.append_history(name, "restart_failed", model=spec.model.to_dict(), reason="up",
                                          error=str(exc))
                raise _engine_failed(str(exc), exc) from None
            self.store.append_history(name, "restarted", model=spec.model.to_dict(), reason="up", url=started.url,
                                      was=status.state)
            return {"action": "started", "detail": f"{started.state} at {started.url}"}

    def previous_good_version(self, name: str) -> str | None:
        """The version of the served model served before the current one, never rejected or rolled
        back (nor a rollback target that could not serve), that still exists in the registry."""
        spec = self.spec(name)
        bad = {spec.model.model_version}
        served: list[str] = []
        for event in self.store.read_history(name):
            model = event.get("model") or {}
            version = model.get("model_version")
            if version is None or model.get("model_name", spec.model.model_name) != spec.model.model_name:
                continue
            if event["event"] in ("created", "updated") and not event.get("traffic"):
                served.append(str(version))
            if event.get("traffic"):
                continue  # a canary split: its record names the champion, which did not fail
            if event["event"] in BAD_EVENTS:
                bad.add(str(version))
            evidence = event.get("evidence") or {}
            if event["event"] == "rollback_failed" and evidence.get("target_failed") and evidence.get("target"):
                bad.add(str(evidence["target"]))  # a rollback could not make it serve
        for version in reversed(served):
            if version not in bad and self._exists(spec.model.model_name, version):
                return version
        return None

    def previous_stint_end(self, name: str) -> float | None:
        """When the version serving now last stopped serving before its current stint, or None if
        this is its first. A version may serve, be replaced and come back: rows it answered before
        that time belong to an earlier stint and are other evidence."""
        spec = self.spec(name)
        serving: tuple[str, str] | None = None
        ended: float | None = None
        for event in self.store.read_history(name):
            model = event.get("model") or {}
            if event.get("event") not in ("created", "updated") or event.get("traffic") or not model:
                continue
            key = (str(model.get("model_name")), str(model.get("model_version")))
            if key != serving:
                if serving == spec.model.key:
                    ended = float(event.get("time") or 0)
                serving = key
        return ended if serving == spec.model.key else None

    @staticmethod
    def _exists(model_name: str, version: str) -> bool:
        """Whether the registry still has the version (deleted ones cannot be rolled back to).

        Only "does not exist" means no: a registry that cannot be reached raises, so a network
        error is never mistaken for a missing version.
        """
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            MlflowClient().get_model_version(model_name, version)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def rollback(self, name: str, *, to_version: str, reason: str, actor: str,
                 evidence: dict[str, Any] | None = None, keep_reference: bool = False,
                 from_version: str | None = None) -> dict[str, Any]:
        """Serve ``to_version`` again. With ``keep_reference`` the deployment keeps following its
        alias or stage (which the caller has moved back already); otherwise it is pinned.
        ``from_version`` is what the caller decided to leave (default: what serves now)."""
        spec = self.spec(name)
        uri = spec.model.requested_uri if keep_reference else f"models:/{spec.model.model_name}/{to_version}"
        why = f"rolled back from v{from_version or spec.model.model_version} to v{to_version}: {reason}"
        return self.transition(name, model_uri=uri, reason=why, actor=actor, evidence=evidence)

    def predict(self, name: str, body: str, timeout_s: float | None = None) -> str:
        """POST a JSON ``body`` to the deployment's ``/invocations``; the answer's text."""
        import requests

        from mlflow_deploy_plugin.deployment_http import deployment_session

        spec = self.spec(name)
        status = self.engine.status(name)
        if not status.serving:
            raise InvalidState(f"Deployment {name!r} is {status.state}; it cannot predict. "
                               f"Last error: {status.last_error}")
        headers = {"Content-Type": "application/json"}
        token = token_for(spec.config)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            # Over TLS, trust the deployment's own certificate (often self-signed) rather than none.
            with deployment_session(status.url, spec.config.tls_cert) as session:
                response = session.post(f"{status.url}/invocations", data=body, headers=headers,
                                        timeout=timeout_s or spec.config.timeout_s + 10)
        except requests.RequestException as exc:
            raise InvalidState(f"Deployment {name!r} at {status.url} did not answer: {exc}") from None
        if response.status_code != 200:
            try:
                error = response.json()
            except ValueError:
                error = {"message": response.text[:500]}
            raise DeploymentError(f"Deployment {name!r} answered {response.status_code}: {error.get('message')}",
                                  error_code=error.get("error_code") or InvalidRequest.error_code)
        return response.text

    def run_local(self, name: str, model_uri: str, config: Mapping[str, Any] | None = None,
                  flavor: str | None = None, say: Callable[[str], None] = print) -> None:
        """Serve ``model_uri`` in the foreground (supervised like a deployment) until interrupted."""
        spec = self.new_spec(name, model_uri, config, flavor)
        final = self.engine.run_foreground(spec, lambda status: say(
            f"Serving {spec.model.version_uri} (from {model_uri}) at {status.url} - press Ctrl-C to stop."))
        if final.state == FAILED:
            raise InvalidState(f"run-local of {model_uri} failed: {final.last_error}")

    # -- registry tags -------------------------------------------------------------------------

    def _tag_served(self, new: DeploymentSpec, old: DeploymentSpec | None, status: EngineStatus) -> None:
        """Tag every served version (and the shadow) with where it runs; untag what no longer does."""
        from mlflow import MlflowClient

        from mlflow_deploy_plugin.registry import set_serving_tag

        if old is not None:
            gone = old.tagged_versions() - new.tagged_versions()
            if gone:
                self._untag(new.name, gone)
        client = MlflowClient()
        for share in new.shares():
            where = status.url or ""
            if share.model.key != new.model.key:
                where = f"{where} ({share.percent:g}% canary)"
            set_serving_tag(client, share.model, new.name, where)
        if new.shadow is not None and new.shadow.key not in new.served_versions():
            set_serving_tag(client, new.shadow, new.name, f"{status.url or ''} (shadow)")

    def _untag(self, name: str, versions: set[tuple[str, str]]) -> str | None:
        """Clear the serving tags of ``versions``; a summary of what could not be cleared, if any."""
        from mlflow import MlflowClient

        from mlflow_deploy_plugin.registry import clear_serving_tag

        failures = []
        client = MlflowClient()
        for model_name, version in sorted(versions):
            error = clear_serving_tag(client, model_name, version, name)
            if error:
                failures.append(f"{model_name} v{version}: {error}")
        return "; ".join(failures) or None
