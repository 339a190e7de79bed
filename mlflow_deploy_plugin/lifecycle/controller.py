"""The decisions of one deployment's lifecycle: follow the registry, promote, roll back.

One :meth:`LifecycleController.cycle` looks at the registry and the service once and takes the steps
that are due:

- **follow**: a deployment of ``models:/m@alias``, ``/Stage`` or ``/latest`` switches (zero
  downtime) when that reference moves; a version that cannot load is remembered and never
  retried until the reference moves again, and the old version keeps serving;
- **promote** (with a policy): a newly registered version is checked against the gates, made
  challenger, tried as a shadow on a copy of live traffic (``promotion.shadow``: nobody receives its
  answers; judged on the pairs, :mod:`.shadow_stage`), then on a canary share of live traffic, then
  made champion, or rejected saying which gate failed and by how much;
- **drift** (with a policy): when the served version is ``drifted`` in K consecutive reports,
  tag it, roll back to the previous good version, or archive it.

Every step is recorded (:func:`.transitions.record`). With ``dry_run`` nothing is changed: each
step that would be taken is reported instead. State that must survive restarts (versions seen,
the canary in progress, versions that failed to load, the operation in progress) lives in
``lifecycle_state.json``.

**Operations, persisted step by step.** What changes the deployment or the registry on the
policy's behalf (start a canary, promote, reject, roll back) is an *operation*: a short list of
named steps (registry move, traffic switch, audit record), each idempotent. The operation is
written to the state file before its first step, and each step is marked done as soon as it is.
After a crash the next controller goes on from the first step not done; while an operation is in
progress nothing else moves. A step that fails is recorded once in the history (``step_failed``),
retried with exponential backoff (``poll_interval_s`` × 2^n, at most :data:`BACKOFF_CAP_S`; a
webhook delivery, which proves the registry answers, cuts the wait short) and,
when it finally succeeds, recorded once more (``step_recovered``); `get` shows the wait meanwhile.
A transient error (:func:`..registry.is_transient`: the registry or network did not answer) is
retried until it passes: it is never a verdict. Any other error is tried :data:`MAX_ATTEMPTS`
times; then the operation is undone by its compensating operation (a canary that cannot start or a
promotion that cannot finish becomes a rejection that gives the champion role and all traffic back
to the champion; a rollback that cannot finish gives the role back to the version that serves).
Someone who changes the deployment while an operation waits wins: the operation is abandoned,
recorded (``op_abandoned``), and nothing is switched back.

**A failed pass.** Anything else that fails a whole pass (a registry search while the tracking
server is down) is recorded once (``registry_unavailable``, or ``lifecycle_error`` for an error
that is not transient), shown by `get`, retried with the same backoff, and its end recorded once
(``lifecycle_resumed``). A transient error never marks a candidate as considered, never fails its
gates and never marks a version as unable to serve.

A controller, not an "engine": in this package an engine is what runs a deployment
(``engines/``); the controller decides what should run and asks the deployment core for it.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_deploy_plugin.deployments import Deployments, traffic_summary
from mlflow_deploy_plugin.errors import DeploymentError
from mlflow_deploy_plugin.lifecycle import traffic_stats
from mlflow_deploy_plugin.lifecycle.canary import CanaryQuality, CanaryStats, evaluate_canary
from mlflow_deploy_plugin.lifecycle.canary_drift import CanaryDriftCheck
from mlflow_deploy_plugin.lifecycle.gates import evaluate_gates
from mlflow_deploy_plugin.lifecycle.policy import Policy, PolicyError, parse_policy
from mlflow_deploy_plugin.lifecycle.transitions import RegistryRoles, record
from mlflow_deploy_plugin.registry import is_transient, resolve_model_uri
from mlflow_deploy_plugin.spec import DeploymentSpec
from mlflow_deploy_plugin.state import StateStore, read_json, write_json_atomic

_logger = logging.getLogger(__name__)

# Backoff after a failed step or pass: poll_interval_s * 2^(attempts - 1), at most this.
BACKOFF_CAP_S = 120.0
# A step failing for a reason that is not transient is tried this many times, then undone.
MAX_ATTEMPTS = 6
# Steps whose failure, once MAX_ATTEMPTS is reached, undoes their operation (a failing audit
# record never undoes what it describes: it is retried).
_UNDOABLE_STEPS = ("challenger", "registry", "traffic")


def backoff_s(attempts: int, base_s: float) -> float:
    """Seconds to wait after the ``attempts``-th failure in a row."""
    return min(BACKOFF_CAP_S, max(base_s, 1.0) * 2 ** max(0, attempts - 1))


def _error_text(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    return str(message if isinstance(message, str) and message else f"{type(exc).__name__}: {exc}")[:2000]


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")


class _ChangedByHand(Exception):
    """The deployment was changed by someone else while an operation was in progress."""


class LifecycleController:
    """Lifecycle decisions for deployment ``name`` (see the module docstring)."""

    def __init__(self, store: StateStore, name: str, *, policy: Policy | None = None, dry_run: bool = False,
                 follow: bool = True, state_name: str = "lifecycle_state.json",
                 say: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.name = name
        self.paths = store.paths(name)
        self.policy_override = policy
        self.dry_run = dry_run
        self.say = say or _logger.info
        self.client = MlflowClient()
        self.follow = follow  # off where another process (the deployment's agent) follows
        self.planned: list[str] = []  # what a dry run would have done
        self._state_path = self.paths.root / state_name
        self._deployments: Deployments | None = None
        self._drift_checks = CanaryDriftCheck(store, name)
        self._look_now = False  # this pass was asked for by a webhook: no backoff wait

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def deployments(self) -> Deployments:
        """The deployment core for this deployment's engine (never the MLflow-facing client)."""
        if self._deployments is None:
            spec = self.store.read_spec(self.name)
            self._deployments = Deployments(f"lifecycle:/{spec.engine if spec else 'local'}", store=self.store)
        return self._deployments

    def _state(self) -> dict[str, Any]:
        return read_json(self._state_path) or {}

    def _save(self, state: dict[str, Any]) -> None:
        if not self.dry_run:
            write_json_atomic(self._state_path, state)

    def _history(self, event: str, **details: Any) -> None:
        if not self.dry_run:
            self.store.append_history(self.name, event, **details)

    def _act(self, description: str, action: Callable[[], Any]) -> Any:
        """Run one change, or in a dry run say what it would be."""
        if self.dry_run:
            self.planned.append(description)
            self.say(f"[dry-run] would {description}")
            return None
        self.say(description)
        started = time.monotonic()
        result = action()
        # The end too: a log that shows only the start of a change that never landed tells nothing.
        _logger.info("done in %.1fs: %s", time.monotonic() - started, description[:200])
        return result

    def policy(self, spec: DeploymentSpec, state: dict[str, Any] | None = None) -> Policy | None:
        """The deployment's policy. A bad edit of the file keeps the last valid policy in force:
        the error is recorded once (history, ``get``) and following never stops because of it."""
        if self.policy_override is not None:
            return self.policy_override
        path = spec.config.policy
        if not path:
            return None
        state = state if state is not None else {}
        try:
            text = Path(path).read_text(encoding="utf-8")
            policy = parse_policy(text, source=path)
        except (OSError, PolicyError) as exc:
            error = str(exc) if isinstance(exc, PolicyError) else f"cannot read {path}: {exc.strerror or exc}"
            if state.get("policy_error") != error:
                state["policy_error"] = error
                self._act(f"record that the policy file is unusable ({error})", lambda: self.store.append_history(
                    self.name, "policy_invalid", reason=f"{error}; the last valid policy stays in force",
                    actor="policy"))
            last = state.get("policy_last_valid")
            return parse_policy(last, source=f"{path} (last valid)") if last else None
        if state.pop("policy_error", None) is not None:
            self._act("record that the policy file is usable again", lambda: self.store.append_history(
                self.name, "policy_valid", reason=f"{path} is valid again", actor="policy"))
        state["policy_last_valid"] = text
        return policy

    # -- one pass ------------------------------------------------------------------------------

    def cycle(self, actor: str = "registry-poll") -> None:
        """Look once and take the steps that are due. Never raises for a failed pass: the failure
        is recorded once, shown by `get` and the pass retried with backoff (module docstring)."""
        spec = self.store.read_spec(self.name)
        if spec is None:
            return
        state = self._state()
        started = time.time()
        # A webhook delivery means the registry answers again: it cuts any backoff short.
        self._look_now = actor.startswith("webhook")
        paused = state.get("cycle_failure_info")
        if paused and started < paused["next_at"] and not self._look_now:
            return  # backing off after a failed pass
        try:
            self._pass(spec, state, actor)
        except Exception as exc:
            self._pass_failed(spec, state, exc)
            self._save(state)
            return
        if paused:
            state.pop("cycle_failure_info")
            state.pop("cycle_failure", None)
            self._history("lifecycle_resumed", actor=actor, reason=(
                f"the lifecycle pass works again after {paused['attempts']} failed attempt(s) since "
                f"{_iso(paused['since'])} (last error: {paused['error']})"))
        state["last_cycle_at"] = started  # the start of the last complete pass
        self._save(state)

    def _pass(self, spec: DeploymentSpec, state: dict[str, Any], actor: str) -> None:
        policy = self.policy(spec, state)
        if state.get("op") and not self._run_op(state):
            return  # an operation is in progress: nothing else moves until it is done
        spec = self.store.read_spec(self.name) or spec
        if state.get("canary") and (policy is None or policy.promotion.canary is None):
            self._end_orphan_canary(state, actor)
        if state.get("shadow") and (policy is None or policy.promotion.shadow is None):
            self._end_orphan_shadow(state, actor)
        if policy is not None:
            self._shadow(spec, policy, state, actor)
            if state.get("op"):
                return
            spec = self.store.read_spec(self.name) or spec
        if policy is not None:
            self._canary(spec, policy, state, actor)
            if state.get("op"):
                return
            spec = self.store.read_spec(self.name) or spec
        trying = state.get("canary") or state.get("shadow")  # a challenger on trial: nothing else moves
        if self.follow and not trying:
            self._follow(spec, state, actor)
            spec = self.store.read_spec(self.name) or spec
        if policy is not None and policy.promotion.enabled and not trying:
            self._promotions(spec, policy, state, actor)
        trying = state.get("canary") or state.get("shadow")
        if policy is not None and not trying and not state.get("op"):
            self._drift(self.store.read_spec(self.name) or spec, policy, state, actor)
        if policy is not None and policy.quality is not None and not trying and not state.get("op"):
            self._quality(self.store.read_spec(self.name) or spec, policy, state, actor)

    def _pass_failed(self, spec: DeploymentSpec, state: dict[str, Any], exc: Exception) -> None:
        now = time.time()
        transient = is_transient(exc)
        error = _error_text(exc)
        info = state.get("cycle_failure_info")
        if info is None:
            info = state["cycle_failure_info"] = {"since": now, "attempts": 0}
            if transient:
                _logger.warning("Lifecycle pass of %s failed (transient): %s", self.name, error)
            else:
                _logger.exception("Lifecycle pass of %s failed", self.name, exc_info=exc)
            self._history("registry_unavailable" if transient else "lifecycle_error", actor="lifecycle", reason=(
                f"{'the model registry did not answer' if transient else 'the lifecycle pass failed'}: {error}; "
                "nothing is decided on it: the pass is retried with backoff"), transient=transient)
        info["attempts"] += 1
        delay = backoff_s(info["attempts"], spec.config.poll_interval_s)
        info.update(error=error, transient=transient, next_at=now + delay)
        what = "the model registry does not answer" if transient else "the lifecycle pass fails"
        state["cycle_failure"] = (f"{what} since {_iso(info['since'])} ({info['attempts']} attempt(s)): {error}; "
                                  f"next try in {delay:.0f}s")
        self.say(f"Lifecycle pass of {self.name} failed: {error} (next try in {delay:.0f}s)")

    # -- operations ----------------------------------------------------------------------------

    def _start_op(self, state: dict[str, Any], policy: Policy, kind: str, version: str, *, actor: str,
                  reason: str, evidence: dict[str, Any] | None = None, **details: Any) -> bool:
        """Persist a new operation, then run it; True once it is done."""
        spec = self.store.read_spec(self.name)
        state["op"] = {
            "id": uuid.uuid4().hex[:12], "kind": kind, "version": str(version), "actor": actor, "reason": reason,
            "evidence": evidence, "created_at": time.time(), "done": [],
            "spec_updated_at": spec.updated_at if spec else None,
            "roles": {"model": policy.model, "registry": policy.registry, "champion": policy.champion,
                      "challenger": policy.challenger, "source": policy.source},
            **details,
        }
        self._save(state)
        return self._run_op(state)

    def _run_op(self, state: dict[str, Any]) -> bool:
        """Go on with the operation in progress from its first step not done; True once none is left."""
        while (op := state.get("op")) is not None:
            failure = op.get("failure")
            if failure and time.time() < failure["next_at"] and not self._look_now:
                return False
            try:
                for step, what, action in self._steps(op, state):
                    if step in op["done"]:
                        continue
                    self._check_unchanged(op)
                    try:
                        self._act(what, action)
                    except _ChangedByHand:
                        raise
                    except Exception as exc:
                        if self._step_failed(state, op, step, what, exc):
                            break  # undone: the compensating operation runs next
                        return False
                    op["done"].append(step)
                    self._step_succeeded(state, op, step, what)
                    self._save(state)
                else:
                    state.pop("op")
                    state.pop("op_failure", None)
                    self._save(state)
            except _ChangedByHand as change:
                state.pop("op")
                state.pop("op_failure", None)
                self._history("op_abandoned", actor=op["actor"], op=op["id"], reason=(
                    f"{self._title(op)} abandoned after step(s) {', '.join(op['done']) or 'none'}: {change}; "
                    "that change stands"), model={"model_name": op["roles"]["model"], "model_version": op["version"]})
                self._save(state)
        return True

    def _title(self, op: dict[str, Any]) -> str:
        version, kind = op["version"], op["kind"]
        return {"canary": f"the canary start of v{version}", "promote": f"the promotion of v{version}",
                "shadow": f"the shadow start of v{version}",
                "reject": f"the rejection of v{version}",
                "rollback": f"the rollback of v{version} to v{op.get('target')}",
                "undo_promote": f"undoing the promotion of v{version}",
                "undo_rollback": f"undoing the rollback of v{version}"}.get(kind, f"{kind} of v{version}")

    def _steps(self, op: dict[str, Any], state: dict[str, Any]) -> list[tuple[str, str, Callable[[], Any]]]:
        """The steps of an operation, in order: (name, what it does, the action). Each is idempotent."""
        roles_policy = Policy(**op["roles"])
        roles = RegistryRoles(self.client, roles_policy)
        model, version, champion, kind = roles_policy.model, op["version"], op.get("champion"), op["kind"]

        def audit(event: str, reason: str, tags: dict[str, str], evidence: Any = None) -> Callable[[], None]:
            return lambda: self._record_once(op, event, reason, tags, op.get("evidence") if evidence is None
                                             else evidence)

        def switch(reason: str, **kwargs: Any) -> Callable[[], None]:
            if op.get("end_shadow") and kind in ("canary", "promote", "reject"):
                kwargs["config"] = {"shadow": None}  # the shadow stage ends in the same swap
            return lambda: self._switch(op, reason, **kwargs)

        steps: list[tuple[str, str, Callable[[], Any]]] = []
        if op.get("with_challenger"):
            steps += [
                ("challenger", f"make {model} v{version} {roles_policy.challenger} (gates passed)",
                 lambda: roles.set_challenger(version)),
                ("record_challenger", f"record that {model} v{version} passed its gates",
                 audit("challenger", op["gates_summary"], {"lifecycle.gates": "passed"}, op["gates_evidence"])),
            ]
        if kind == "shadow":
            steps += [
                ("traffic", f"mirror {self.name}'s requests to v{version} as a shadow", switch(
                    op["reason"], config={"shadow": f"models:/{model}/{version}",
                                          "shadow_sample_rate": float(op["sample_rate"])})),
                ("shadow", f"start the shadow clock of v{version}", lambda: self._begin_shadow(op, state)),
            ]
        if kind == "canary":
            percent = float(op["percent"])
            steps += [
                ("traffic", f"send {percent:g}% of {self.name}'s traffic to v{version}", switch(
                    op["reason"], traffic=[(f"models:/{model}/{champion}", 100 - percent),
                                           (f"models:/{model}/{version}", percent)])),
                ("canary", f"start the canary clock of v{version}", lambda: self._begin_canary(op, state)),
            ]
        elif kind == "promote":
            steps += [
                ("registry", f"promote {model} v{version} to {roles_policy.champion}", lambda: roles.promote(version)),
                ("traffic", f"serve v{version} with 100% of {self.name}'s traffic",
                 switch(f"promoted v{version}: {op['reason']}", model_uri=op["target_uri"])),
                ("record", f"record the promotion of v{version}",
                 audit("promoted", op["reason"], {"lifecycle.promotion": "champion"})),
            ]
        elif kind in ("reject", "undo_promote"):
            if kind == "reject":
                steps.append(("registry", f"remove {model} v{version} from {roles_policy.challenger}",
                              lambda: roles.clear_challenger(version)))
            elif champion:
                steps.append(("registry", f"give {roles_policy.champion} back to v{champion}",
                              lambda: roles.demote(version, champion, False)))
            steps += [
                ("traffic", f"serve only the champion on {self.name}",
                 switch(f"rejected v{version}: {op['reason']}", model_uri=op.get("undo_uri"))),
                ("record", f"record the rejection of v{version}",
                 audit("rejected", op["reason"], {"lifecycle.promotion": "rejected"})),
            ]
        elif kind == "rollback":
            target = op["target"]
            if op.get("keep_reference"):
                steps.append(("registry", f"move {roles_policy.role_uri('champion')} back to v{target}",
                              lambda: roles.demote(version, target, bool(op.get("archive")))))
            event = "rolled_forward" if op.get("forward") else "rolled_back"
            tags = {f"lifecycle.{event}": f"to v{target}", **({"lifecycle.archived": "true"}
                                                             if op.get("archive") else {})}
            steps += [
                ("traffic", f"serve v{target} on {self.name}", switch(op["why"], model_uri=op["uri"])),
                ("record", f"record the {event.replace('_', ' ')} of v{version}", audit(event, op["why"], tags)),
            ]
        elif kind == "undo_rollback":
            target = op["target"]
            if op.get("keep_reference"):
                steps.append(("registry", f"give {roles_policy.role_uri('champion')} back to v{version}",
                              lambda: roles.demote(target, version, False)))
            # A target that could not serve (the traffic step failed) is remembered as bad, so the
            # next drifted streak rolls back further or says there is nowhere to go, instead of
            # trying the same broken version again; a registry failure is not the target's fault.
            steps.append(("record", f"record that the rollback of v{version} was undone",
                          audit("rollback_failed", op["reason"], {"lifecycle.rollback_failed": op["reason"]},
                                {**(op.get("evidence") or {}), "target": target,
                                 "target_failed": op.get("failed_step") == "traffic"})))
        return steps

    def _check_unchanged(self, op: dict[str, Any]) -> None:
        """Raise _ChangedByHand when someone else changed the deployment since the operation last did."""
        spec = self.deployments.spec(self.name)
        if op.get("spec_updated_at") in (None, spec.updated_at):
            return
        last = next((e for e in reversed(self.store.read_history(self.name)) if e["event"] == "updated"), None)
        if last is not None and (last.get("evidence") or {}).get("op") == op["id"]:
            op["spec_updated_at"] = spec.updated_at  # our own switch; the crash came before it was marked done
            return
        raise _ChangedByHand(f"the deployment was changed meanwhile (it now serves {traffic_summary(spec)})")

    def _switch(self, op: dict[str, Any], reason: str, **kwargs: Any) -> None:
        """The traffic step: a transition that does nothing when it is already what serves."""
        evidence = {**(op.get("evidence") or {}), "op": op["id"]}
        # A failed switch is recorded once by the operation (step_failed), not at every retry; a
        # person's rollback (``manual``) is not retried, so the deployment core records it.
        self.deployments.transition(self.name, reason=reason, actor=op["actor"], evidence=evidence,
                                    only_if_changed=True, record_failure=bool(op.get("manual")), **kwargs)
        op["spec_updated_at"] = self.deployments.spec(self.name).updated_at

    def _record_once(self, op: dict[str, Any], event: str, reason: str, tags: dict[str, str],
                     evidence: dict[str, Any] | None) -> None:
        """The audit step: its history event is written once per operation, even when resumed."""
        written = any(e.get("op") == op["id"] and e["event"] == event for e in self.store.read_history(self.name))
        record(None if written else self.store, self.client, self.name, event, model_name=op["roles"]["model"],
               version=op["version"], reason=reason, actor=op["actor"], evidence=evidence, tags=tags, op=op["id"])

    def _step_failed(self, state: dict[str, Any], op: dict[str, Any], step: str, what: str,
                     exc: Exception) -> bool:
        """Record a failed step (once), schedule its retry; True when the operation was undone."""
        now = time.time()
        transient = is_transient(exc)
        error = _error_text(exc)
        failure = op.get("failure")
        if not failure or failure.get("step") != step:
            failure = op["failure"] = {"step": step, "attempts": 0, "since": now}
            how = ("a transient error: retried with backoff until it passes" if transient else
                   f"retried with backoff; after {MAX_ATTEMPTS} attempts {self._title(op)} is undone"
                   if op["kind"] in ("canary", "shadow", "promote", "rollback") and step in _UNDOABLE_STEPS else
                   "retried with backoff until it passes")
            _logger.warning("%s: could not %s: %s", self._title(op), what, error)
            self._history("step_failed", actor=op["actor"], op=op["id"], step=step, transient=transient,
                          model={"model_name": op["roles"]["model"], "model_version": op["version"]},
                          reason=f"{self._title(op)}: could not {what}: {error}; {how}")
        failure["attempts"] += 1
        spec = self.store.read_spec(self.name)
        delay = backoff_s(failure["attempts"], spec.config.poll_interval_s if spec else 10.0)
        failure.update(error=error, transient=transient, next_at=now + delay)
        state["op_failure"] = (f"{self._title(op)} waits: could not {what} ({failure['attempts']} attempt(s) since "
                               f"{_iso(failure['since'])}): {error}; next try in {delay:.0f}s")
        undone = (not transient and failure["attempts"] >= MAX_ATTEMPTS and step in _UNDOABLE_STEPS
                  and op["kind"] in ("canary", "shadow", "promote", "rollback"))
        if undone:
            self._undo(state, op, f"could not {what} after {failure['attempts']} attempts: {error}", step)
        self._save(state)
        return undone

    def _step_succeeded(self, state: dict[str, Any], op: dict[str, Any], step: str, what: str) -> None:
        failure = op.pop("failure", None)
        state.pop("op_failure", None)
        if failure and failure.get("step") == step:
            self._history("step_recovered", actor=op["actor"], op=op["id"], step=step,
                          model={"model_name": op["roles"]["model"], "model_version": op["version"]},
                          reason=f"{self._title(op)}: {what} done after {failure['attempts']} failed attempt(s) "
                                 f"since {_iso(failure['since'])} (last error: {failure['error']})")

    def _undo(self, state: dict[str, Any], op: dict[str, Any], why: str, step: str) -> None:
        """Replace an operation that cannot finish (at ``step``) by the one that undoes it."""
        common = {"evidence": op.get("evidence"), "actor": op["actor"], "version": op["version"],
                  "id": uuid.uuid4().hex[:12], "created_at": time.time(), "done": [], "roles": op["roles"],
                  "spec_updated_at": op.get("spec_updated_at"), "undo_of": op["id"]}
        if op["kind"] == "canary":
            state["op"] = {**common, "kind": "reject", "reason": f"the canary could not start: {why}",
                           "end_shadow": op.get("end_shadow")}
        elif op["kind"] == "shadow":
            state["op"] = {**common, "kind": "reject", "reason": f"the shadow could not start: {why}",
                           "end_shadow": True}
        elif op["kind"] == "promote":
            state["op"] = {**common, "kind": "undo_promote", "champion": op.get("champion"),
                           "undo_uri": op.get("undo_uri"),
                           "reason": f"the promotion was undone: {why}; v{op.get('champion')} stays champion"}
        else:
            state["op"] = {**common, "kind": "undo_rollback", "target": op["target"],
                           "keep_reference": op.get("keep_reference"), "failed_step": step,
                           "reason": f"the rollback to v{op['target']} was undone: {why}; v{op['version']} keeps serving"}
        state.pop("op_failure", None)

    # -- follow --------------------------------------------------------------------------------

    def _follow(self, spec: DeploymentSpec, state: dict[str, Any], actor: str) -> None:
        requested = spec.model.requested_uri
        if not spec.model.is_floating or spec.traffic:
            return
        try:
            resolved = resolve_model_uri(requested, self.client)
        except MlflowException as exc:
            if is_transient(exc):
                raise  # the pass fails, recorded once and retried: not an answer about the reference
            state["follow_error"] = exc.message
            return
        served = spec.model.model_version
        if resolved.model_version == served:
            state.pop("follow_error", None)
            state.pop("failed_versions", None)
            return
        failed = state.setdefault("failed_versions", {})
        if resolved.model_version in failed:
            return  # known bad: wait for the reference to move again
        failed.clear()  # the reference moved: a version that failed before may be tried again later
        reason = f"followed {requested}: it now points at v{resolved.model_version} (was v{served})"
        try:
            self._act(f"switch {self.name} to v{resolved.model_version} ({reason})",
                      lambda: self.deployments.transition(self.name, reason=reason, actor=actor,
                                                          only_if_changed=True))
        except DeploymentError as exc:
            if is_transient(exc):
                raise  # the registry did not answer: the version is not to blame
            failed[resolved.model_version] = exc.message
            state["follow_error"] = exc.message
            record(self.store, self.client, self.name, "follow_failed", model_name=resolved.model_name,
                   version=resolved.model_version, actor=actor,
                   reason=f"v{resolved.model_version} cannot serve; v{served} keeps serving: {exc.message}",
                   tags={f"lifecycle.load_error.{self.name}": exc.message})

    # -- promotion -----------------------------------------------------------------------------

    def _promotions(self, spec: DeploymentSpec, policy: Policy, state: dict[str, Any], actor: str) -> None:
        # Candidates: versions registered after the deployment was created, each considered once.
        created_ms = spec.created_at * 1000
        served = spec.model.model_version if spec.model.model_name == policy.model else None
        considered = state.setdefault("considered", [])
        if served is not None and served not in considered:
            considered.append(served)  # whatever served once (even by a person's alias move) is not new
        seen = set(considered) | self._versions_with(("rolled_back", "rejected", "gates_failed"))
        candidates = sorted(
            (int(mv.version) for mv in self.client.search_model_versions(f"name='{policy.model}'")
             if mv.creation_timestamp > created_ms and str(mv.version) not in seen
             and str(mv.version) != served),
        )
        for version in candidates:
            try:
                self._consider(str(version), spec, policy, state)
            except Exception as exc:
                if is_transient(exc):
                    raise  # not considered: its gates are evaluated again once the registry answers
                # The candidate itself cannot be evaluated (say, deleted meanwhile): said once.
                state["considered"].append(str(version))
                why = f"the gates could not be evaluated: {_error_text(exc)}"
                self._act(f"reject {policy.model} v{version}: {why}", functools.partial(
                    record, self.store, self.client, self.name, "gates_failed", model_name=policy.model,
                    version=str(version), actor=f"policy {policy.source}", reason=why))
                self._save(state)
            if state.get("canary") or state.get("op"):
                break  # one candidate at a time; later ones wait for this one

    def _consider(self, version: str, spec: DeploymentSpec, policy: Policy, state: dict[str, Any]) -> None:
        champion = spec.model.model_version if spec.model.model_name == policy.model else None
        self.say(f"Evaluating gates of {policy.model} v{version} (champion v{champion})")
        report = evaluate_gates(policy, (policy.model, version), client=self.client, champion_version=champion,
                                cache_dir=self.paths.models)
        summary = report.summary()
        self.say(summary)
        state["considered"].append(version)  # judged: from here on each step is persisted
        if not report.passed:
            self._act(f"reject {policy.model} v{version}: {summary.splitlines()[0]}", lambda: record(
                self.store, self.client, self.name, "gates_failed", model_name=policy.model, version=version,
                reason=summary.replace("\n", "; "), actor=f"policy {policy.source}",
                evidence=report.to_dict(), tags={"lifecycle.gates": "failed", "lifecycle.promotion": "rejected"}))
            self._save(state)
            return
        gates = {"with_challenger": True, "gates_summary": summary.replace("\n", "; "),
                 "gates_evidence": report.to_dict()}
        shadow = policy.promotion.shadow
        if shadow is not None and champion is not None:
            self._start_op(state, policy, "shadow", version, actor=f"policy {policy.source}", champion=champion,
                           sample_rate=shadow.sample_rate, evidence=report.to_dict(), **gates,
                           reason=f"shadow: v{version} answers a copy of {shadow.sample_rate * 100:g}% of the "
                                  "captured requests, returned to nobody (gates passed)")
            return
        self._after_trials(state, spec, policy, version, champion, reason="gates passed", evidence=report.to_dict(),
                           **gates)

    def _after_trials(self, state: dict[str, Any], spec: DeploymentSpec, policy: Policy, version: str,
                      champion: str | None, *, reason: str, evidence: dict[str, Any], **details: Any) -> None:
        """What follows the gates (or a passed shadow stage): the canary, else the promotion."""
        canary = policy.promotion.canary
        if canary is None or champion is None:
            self._start_promotion(state, spec, policy, version, champion, reason=f"{reason} (no canary configured)",
                                  evidence=evidence, **details)
            return
        self._start_op(state, policy, "canary", version, actor=f"policy {policy.source}", champion=champion,
                       percent=canary.percent, evidence=evidence, **details,
                       reason=f"canary: v{version} gets {canary.percent:g}% of live traffic ({reason})")

    def _start_promotion(self, state: dict[str, Any], spec: DeploymentSpec, policy: Policy, version: str,
                         champion: str | None, *, reason: str, evidence: dict[str, Any], **details: Any) -> None:
        requested = spec.model.requested_uri
        floating = spec.model.is_floating
        self._start_op(state, policy, "promote", version, actor=f"policy {policy.source}", reason=reason,
                       evidence=evidence, champion=champion,
                       target_uri=requested if floating else f"models:/{policy.model}/{version}",
                       undo_uri=requested if floating or not champion else f"models:/{policy.model}/{champion}",
                       **details)

    def _begin_canary(self, op: dict[str, Any], state: dict[str, Any]) -> None:
        """The last step of a canary start: the window starts once the split serves, so both versions'
        counters are compared from here on."""
        version, champion = op["version"], op["champion"]
        baselines = {}
        try:
            spec = self.deployments.spec(self.name)
            scraped = self._scrape(spec)
            baselines = {v: scraped[v].to_dict() for v in (version, champion) if v in scraped}
        except Exception as exc:
            _logger.warning("Could not read the canary baseline: %s", exc)
        state["canary"] = {"version": version, "champion": champion, "started_at": time.time(),
                           "baselines": baselines}

    def _begin_shadow(self, op: dict[str, Any], state: dict[str, Any]) -> None:
        """The last step of a shadow start: pairs count from here on."""
        state["shadow"] = {"version": op["version"], "champion": op["champion"], "started_at": time.time()}

    def _end_orphan_shadow(self, state: dict[str, Any], actor: str) -> None:
        """The policy (or its shadow section) went away mid-shadow: stop mirroring."""
        shadow = state.pop("shadow")
        reason = f"shadow of v{shadow['version']} ended: the policy no longer configures a shadow stage"
        self._act(f"stop mirroring to v{shadow['version']} on {self.name} ({reason})", lambda: self.deployments
                  .transition(self.name, config={"shadow": None}, reason=reason, actor=actor))

    def _shadow(self, spec: DeploymentSpec, policy: Policy, state: dict[str, Any], actor: str) -> None:
        """Judge the shadow stage in progress on its pairs; on a verdict, record it and move on."""
        from mlflow_deploy_plugin.lifecycle.shadow_stage import evaluate_shadow
        from mlflow_deploy_plugin.monitoring.shadow_report import compare_window, report_comparison

        shadow_state = state.get("shadow")
        shadow_policy = policy.promotion.shadow
        if not shadow_state or shadow_policy is None:
            return
        version, champion = shadow_state["version"], shadow_state.get("champion")
        if spec.shadow is None or spec.shadow.key != (policy.model, version) or spec.model.model_version != champion:
            # Changed by hand mid-shadow: that change stands; the stage ends, recorded.
            state.pop("shadow")
            roles = RegistryRoles(self.client, policy)
            reason = (f"the deployment was changed by hand while v{version} was in shadow (it now serves "
                      f"{traffic_summary(spec)}, shadow {spec.shadow.model_version if spec.shadow else 'none'}); "
                      "the shadow stage ends and that change stands")

            def end_shadow() -> None:
                roles.clear_challenger(version)
                record(self.store, self.client, self.name, "shadow_ended", model_name=policy.model,
                       version=version, reason=reason, actor=actor, tags={"lifecycle.promotion": "shadow_ended"})

            self._act(f"end the shadow stage of v{version}: {reason}", end_shadow)
            return
        started = datetime.fromtimestamp(shadow_state["started_at"], tz=UTC)
        now = datetime.now(UTC)
        comparison = compare_window(self.name, started, now, store=self.store, shadow_version=version)
        verdict = evaluate_shadow(shadow_policy, comparison, (now - started).total_seconds())
        if verdict.pending:
            return
        summary = verdict.summary().replace("\n", "; ")
        evidence = {**verdict.to_dict(), "comparison": comparison.to_dict()}
        if not self.dry_run:
            try:  # the figures and the HTML in MLflow, the verdict for alerts; never a reason not to decide
                report_comparison(self.store, self.name, comparison, started, now, actor=f"policy {policy.source}",
                                  verdict={"status": verdict.status, "summary": summary})
            except Exception as exc:
                if is_transient(exc):
                    raise  # judged again on the next pass, once the registry answers
                _logger.warning("The shadow report of v%s could not be logged: %s", version, _error_text(exc))
        state.pop("shadow")
        if verdict.passed:
            self._after_trials(state, spec, policy, version, champion, reason=f"shadow passed: {summary}",
                               evidence=evidence, end_shadow=True)
        else:
            self._start_op(state, policy, "reject", version, actor=f"policy {policy.source}",
                           reason=f"shadow failed: {summary}", evidence=evidence, end_shadow=True)

    def _end_orphan_canary(self, state: dict[str, Any], actor: str) -> None:
        """The policy (or its canary section) went away mid-canary: serve the champion alone."""
        canary = state.pop("canary")
        self._drift_checks.stop(canary)
        reason = f"canary of v{canary['version']} ended: the policy no longer configures a canary"
        self._act(f"serve only the champion on {self.name} ({reason})", lambda: self.deployments
                  .transition(self.name, reason=reason, actor=actor))

    def _scrape(self, spec: DeploymentSpec) -> dict[str, traffic_stats.VersionFigures]:
        """Per-version figures of every replica: from the engine when it collects them (Ray), else
        the deployment's own /metrics (with its token)."""
        texts = self.deployments.engine.metrics_texts(self.name)
        if texts is not None:
            return traffic_stats.parse_all(texts)
        return traffic_stats.scrape(self._status_url(), self._token(spec), tls_cert=spec.config.tls_cert)

    def _status_url(self) -> str:
        return self.deployments.engine.url(self.name) or ""

    @staticmethod
    def _token(spec: DeploymentSpec) -> str | None:
        import os

        env = spec.config.auth_token_env
        return os.environ.get(env) if env else None

    def _canary(self, spec: DeploymentSpec, policy: Policy, state: dict[str, Any], actor: str) -> None:
        canary_state = state.get("canary")
        if not canary_state or policy.promotion.canary is None:
            return
        version, champion = canary_state["version"], canary_state.get("champion")
        split = {share.model.model_version for share in spec.traffic}
        if spec.model.model_name != policy.model or not {version, champion} <= split:
            # Someone changed the deployment by hand mid-canary: their change stands. The canary
            # ends, recorded, and nothing is switched back.
            state.pop("canary")
            self._drift_checks.stop(canary_state)
            roles = RegistryRoles(self.client, policy)
            reason = (f"the deployment was changed by hand while v{version} was in canary (it now serves "
                      f"{traffic_summary(spec)}); the canary ends and that change stands")

            def end_canary() -> None:
                roles.clear_challenger(version)
                record(self.store, self.client, self.name, "canary_ended", model_name=policy.model,
                       version=version, reason=reason, actor=actor, tags={"lifecycle.promotion": "canary_ended"})

            self._act(f"end the canary of v{version}: {reason}", end_canary)
            return
        scraped = self._scrape(spec)
        baselines = canary_state.get("baselines") or {version: canary_state.get("baseline")}  # older state

        def window(of: str | None) -> traffic_stats.VersionFigures:
            baseline = baselines.get(of) if of else None
            return traffic_stats.since(scraped.get(of or "") or traffic_stats.VersionFigures(),
                                       traffic_stats.VersionFigures.from_dict(baseline) if baseline else None)

        figures, champion_figures = window(version), window(champion)
        canary_policy = policy.promotion.canary
        elapsed = time.time() - canary_state["started_at"]
        due = figures.requests >= canary_policy.min_requests or elapsed >= canary_policy.max_minutes * 60
        drift_status, drift_detail = self._canary_drift(canary_state, canary_policy.require_no_drift, due=due)
        quality = self._canary_quality(canary_state, due=due) if canary_policy.quality_margin is not None else None
        stats = CanaryStats(requests=int(figures.requests), errors=int(figures.errors),
                            p99_latency_ms=traffic_stats.p99_ms(figures), elapsed_s=elapsed,
                            drift_status=drift_status, drift_detail=drift_detail,
                            champion_requests=int(champion_figures.requests),
                            champion_errors=int(champion_figures.errors), quality=quality)
        verdict = evaluate_canary(canary_policy, stats)
        if verdict.pending:
            return
        summary = verdict.summary().replace("\n", "; ")
        state.pop("canary")
        self._drift_checks.stop(canary_state)
        if verdict.passed:
            self._start_promotion(state, spec, policy, version, champion, reason=f"canary passed: {summary}",
                                  evidence=verdict.to_dict())
        else:
            self._start_op(state, policy, "reject", version, actor=f"policy {policy.source}",
                           reason=f"canary failed: {summary}", evidence=verdict.to_dict())

    def _canary_quality(self, canary_state: dict[str, Any], *, due: bool) -> CanaryQuality | None:
        """Both versions' labelled rows since the canary started (quality_margin), read again at most
        every canary_quality.RECHECK_S; None until first read (or while it cannot be read)."""
        from mlflow_deploy_plugin.lifecycle import canary_quality

        check: dict[str, Any] = canary_state.setdefault("quality_check", {})
        now = time.time()
        if due and now - check.get("checked_at", 0.0) >= canary_quality.RECHECK_S:
            check["checked_at"] = now
            try:
                found = canary_quality.labelled_sides(
                    self.store, self.name, str(canary_state.get("champion")), str(canary_state["version"]),
                    datetime.fromtimestamp(canary_state["started_at"], tz=UTC), datetime.now(UTC))
                check["result"] = found.to_dict()
            except Exception as exc:  # a file being rewritten, say: no figures this time, never a verdict
                _logger.warning("Could not read the labelled rows of the canary of v%s: %s",
                                canary_state["version"], _error_text(exc))
        return CanaryQuality.from_dict(check["result"]) if check.get("result") else None

    def _canary_drift(self, canary_state: dict[str, Any], required: bool, *, due: bool,
                      ) -> tuple[str | None, str | None]:
        """The drift verdict on the challenger's own rows (require_no_drift), and what it rests on."""
        if not required or self.dry_run:
            return None, None
        check = self._drift_checks.status(canary_state, due=due)
        status = check.get("status")
        if status == "failed":
            return status, f"{check.get('error')}; tried again shortly"
        if status is None:
            return None, "the check runs" if check.get("pid") else None
        detail = f"{check.get('rows')} rows the challenger answered since the canary started, run {check.get('run_id')}"
        return status, detail

    # -- drift ---------------------------------------------------------------------------------

    def _drift(self, spec: DeploymentSpec, policy: Policy, state: dict[str, Any], actor: str) -> None:
        if spec.model.model_name != policy.model:
            return
        version = spec.model.model_version
        experiment_name = spec.config.drift_experiment or f"drift/{self.name}"
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return
        k = policy.drift.consecutive_reports
        earlier_stint_end = self.deployments.previous_stint_end(self.name)
        candidates = self.client.search_runs(
            [experiment.experiment_id],
            filter_string=f"params.model_version = '{version}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=max(50, 4 * k))
        # The streak: the latest k reports that judged this version in its current stint and were
        # scheduled (or asked to count with --for-policy). A manual look never triggers an action.
        runs = [run for run in candidates if _counts_for_policy(run, earlier_stint_end)][:k]
        if len(runs) < k or any(run.data.tags.get("drift.status") != "drifted" for run in runs):
            return
        latest = runs[0].info.run_id
        if state.get("drift_handled_run") == latest:
            return
        run_ids = [run.info.run_id for run in runs]
        reason = f"v{version} drifted in {k} consecutive reports (runs {', '.join(run_ids)})"
        evidence = {"report_run_ids": run_ids, "drift_shares": [run.data.metrics.get("drift_share") for run in runs]}
        action = policy.drift.action
        if action == "tag":
            state["drift_handled_run"] = latest
            self._act(f"flag {policy.model} v{version}: {reason}", lambda: record(
                self.store, self.client, self.name, "drift_alert", model_name=policy.model, version=version,
                reason=reason, actor=f"policy {policy.source}", evidence=evidence,
                tags={"lifecycle.drift_alert": reason}))
            return
        plan = self._rollback_plan(spec, reason=reason, policy=policy, archive=action == "archive")
        state["drift_handled_run"] = latest  # decided (the plan may read the registry, which may fail)
        if plan is None:
            self._record_no_rollback(spec, reason, f"policy {policy.source}", evidence)
            return
        self._start_op(state, plan.pop("policy"), "rollback", version, actor=f"policy {policy.source}",
                       reason=reason, evidence=evidence, **plan)

    def _quality(self, spec: DeploymentSpec, policy: Policy, state: dict[str, Any], actor: str) -> None:
        """The policy's quality trigger (lifecycle/quality_drop.py), acted on like drift."""
        from mlflow_deploy_plugin.lifecycle.quality_drop import find_quality_drop

        experiment = self.client.get_experiment_by_name(spec.config.drift_experiment or f"drift/{self.name}")
        if spec.model.model_name != policy.model or experiment is None or policy.quality is None:
            return
        version = spec.model.model_version
        drop = find_quality_drop(self.client, experiment.experiment_id, self.name, version, policy.quality)
        if drop is None or state.get("quality_handled_run") == drop.latest_run_id:
            return
        state["quality_handled_run"] = drop.latest_run_id
        if policy.quality.action == "tag":
            self._act(f"flag {policy.model} v{version}: {drop.reason}", lambda: record(
                self.store, self.client, self.name, "quality_alert", model_name=policy.model, version=version,
                reason=drop.reason, actor=f"policy {policy.source}", evidence=drop.evidence,
                tags={"lifecycle.quality_alert": drop.reason}))
            return
        plan = self._rollback_plan(spec, reason=drop.reason, policy=policy, archive=policy.quality.action == "archive")
        if plan is None:
            self._record_no_rollback(spec, drop.reason, f"policy {policy.source}", drop.evidence)
            return
        self._start_op(state, plan.pop("policy"), "rollback", version, actor=f"policy {policy.source}",
                       reason=drop.reason, evidence=drop.evidence, **plan)

    def _versions_with(self, events: tuple[str, ...]) -> set[str]:
        return {str((event.get("model") or {}).get("model_version")) for event in self.store.read_history(self.name)
                if event["event"] in events}

    # -- rollback ------------------------------------------------------------------------------

    def _rollback_plan(self, spec: DeploymentSpec, *, reason: str, policy: Policy | None,
                       to_version: str | None = None, archive: bool = False) -> dict[str, Any] | None:
        """Where a rollback goes and how (None when there is no previous good version)."""
        model = spec.model
        current = model.model_version
        target = to_version or self.deployments.previous_good_version(self.name)
        if target is None:
            return None
        if policy is None and model.is_floating:
            policy = _policy_for_reference(model.requested_uri)
        # A deployment that follows an alias or stage gets the reference moved back too, otherwise
        # following would undo the rollback at the next poll.
        keep_reference = policy is not None and model.is_floating
        uri = model.requested_uri if keep_reference else f"models:/{model.model_name}/{target}"
        # A person sending the deployment to a newer version than it serves (`rollback --to`, after a
        # false alarm) rolls forward: the version left was not found wanting, so it is not recorded
        # as rolled back (which would keep it from ever being a rollback target again).
        forward = to_version is not None and _newer(target, current)
        return {"target": target, "archive": archive, "keep_reference": keep_reference, "uri": uri,
                "forward": forward,
                "why": f"rolled {'forward' if forward else 'back'} from v{current} to v{target}: {reason}",
                "policy": policy or Policy(model=model.model_name)}

    def _record_no_rollback(self, spec: DeploymentSpec, reason: str, actor: str,
                            evidence: dict[str, Any] | None) -> None:
        current = spec.model.model_version
        self.say(f"No previous good version of {spec.model.model_name} to roll back to; v{current} keeps serving.")
        self._act(f"record that v{current} has no version to roll back to", lambda: record(
            self.store, self.client, self.name, "rollback_impossible", model_name=spec.model.model_name,
            version=current, reason=f"{reason}; no previous good version", actor=actor, evidence=evidence))

    def rollback(self, *, reason: str, actor: str, evidence: dict[str, Any] | None = None,
                 policy: Policy | None = None, to_version: str | None = None, archive: bool = False) -> str | None:
        """Return the deployment to the previous good version (or ``to_version``) now; returns it.

        For a person (`mlflow-deploy rollback`): the same steps as the policy's rollback operation,
        run at once, and an error is raised to the caller rather than retried. A deployment that
        follows an alias or stage gets the reference moved back too.
        """
        spec = self.deployments.spec(self.name)
        plan = self._rollback_plan(spec, reason=reason, policy=policy, to_version=to_version, archive=archive)
        if plan is None:
            self._record_no_rollback(spec, reason, actor, evidence)
            return None
        roles_policy = plan.pop("policy")
        op = {"id": uuid.uuid4().hex[:12], "kind": "rollback", "version": spec.model.model_version, "actor": actor,
              "reason": reason, "evidence": evidence, "done": [], "spec_updated_at": None, "manual": True,
              "roles": {"model": roles_policy.model, "registry": roles_policy.registry,
                        "champion": roles_policy.champion, "challenger": roles_policy.challenger,
                        "source": roles_policy.source}, **plan}
        for _step, what, action in self._steps(op, {}):
            self._act(what, action)
        return str(plan["target"])


def _newer(version: str, than: str) -> bool:
    """Whether registry version ``version`` was registered after ``than`` (versions are integers)."""
    try:
        return int(version) > int(than)
    except ValueError:
        return False


def _counts_for_policy(run: Any, earlier_stint_end: float | None) -> bool:
    """Whether a drift report run belongs to the served version's current streak: not manual, and
    its window holds no row the version answered in an earlier stint."""
    from mlflow_deploy_plugin.monitoring.report_job import TRIGGER_TAG

    if run.data.tags.get(TRIGGER_TAG) in ("manual", "canary"):
        # A look by hand, or a canary's check of a challenger's rows (judged before it served alone).
        # Runs from before the tag existed have none and count, as they did.
        return False
    window_start = run.data.params.get("window_start")
    if earlier_stint_end is None or not window_start:
        return True
    try:
        started = datetime.fromisoformat(window_start).timestamp()
    except ValueError:
        return True
    return started >= earlier_stint_end


def _policy_for_reference(requested_uri: str) -> Policy | None:
    """A minimal policy naming the alias or stage a deployment follows (for manual rollbacks)."""
    from mlflow.store.artifact.utils.models import _parse_model_uri

    parsed = _parse_model_uri(requested_uri)
    if parsed.name is None:
        return None  # models:/<model id>: a logged model, no alias or stage to move
    if parsed.alias:
        return Policy(model=parsed.name, registry="alias", champion=parsed.alias, challenger=f"{parsed.alias}-prev")
    if parsed.stage and parsed.stage.lower() in ("production", "staging"):
        stage = parsed.stage.capitalize()
        return Policy(model=parsed.name, registry="stage", champion=stage,
                      challenger="Staging" if stage == "Production" else "Production")
    return None  # latest: nothing to move back
