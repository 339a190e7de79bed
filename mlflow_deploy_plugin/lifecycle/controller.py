"""The decisions of one deployment's lifecycle: follow the registry, promote, roll back.

One :meth:`LifecycleController.cycle` looks at the registry and the service once and takes the steps
that are due:

- **follow**: a deployment of ``models:/m@alias``, ``/Stage`` or ``/latest`` switches (zero
  downtime) when that reference moves; a version that cannot load is remembered and never
  retried until the reference moves again, and the old version keeps serving;
- **promote** (with a policy): a newly registered version is checked against the gates, made
  challenger, tried on a canary share of live traffic, then made champion, or rejected saying
  which gate failed and by how much;
- **drift** (with a policy): when the served version is ``drifted`` in K consecutive reports,
  tag it, roll back to the previous good version, or archive it.

Every step is recorded (:func:`.transitions.record`). With ``dry_run`` nothing is changed: each
step that would be taken is reported instead. State that must survive restarts (versions seen,
the canary in progress, versions that failed to load) lives in ``lifecycle_state.json``.

A controller, not an "engine": in this package an engine is what runs a deployment
(``engines/``); the controller decides what should run and asks the deployment core for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_deploy_plugin.deployments import Deployments, traffic_summary
from mlflow_deploy_plugin.errors import DeploymentError
from mlflow_deploy_plugin.lifecycle import traffic_stats
from mlflow_deploy_plugin.lifecycle.canary import CanaryStats, evaluate_canary
from mlflow_deploy_plugin.lifecycle.gates import evaluate_gates
from mlflow_deploy_plugin.lifecycle.policy import Policy, PolicyError, parse_policy
from mlflow_deploy_plugin.lifecycle.transitions import RegistryRoles, record
from mlflow_deploy_plugin.registry import resolve_model_uri
from mlflow_deploy_plugin.spec import DeploymentSpec
from mlflow_deploy_plugin.state import StateStore, read_json, write_json_atomic

_logger = logging.getLogger(__name__)


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

    def _act(self, description: str, action: Callable[[], Any]) -> Any:
        """Run one change, or in a dry run say what it would be."""
        if self.dry_run:
            self.planned.append(description)
            self.say(f"[dry-run] would {description}")
            return None
        self.say(description)
        return action()

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
        """Look once and take the steps that are due."""
        spec = self.store.read_spec(self.name)
        if spec is None:
            return
        state = self._state()
        state["last_cycle_at"] = time.time()  # saved at the end: the start of the last complete cycle
        policy = self.policy(spec, state)
        if state.get("canary") and (policy is None or policy.promotion.canary is None):
            self._end_orphan_canary(state, actor)
        if policy is not None:
            self._canary(spec, policy, state, actor)
            spec = self.store.read_spec(self.name) or spec
        if self.follow and not state.get("canary"):
            self._follow(spec, state, actor)
            spec = self.store.read_spec(self.name) or spec
        if policy is not None and policy.promotion.enabled and not state.get("canary"):
            self._promotions(spec, policy, state, actor)
        if policy is not None and not state.get("canary"):
            self._drift(self.store.read_spec(self.name) or spec, policy, state, actor)
        self._save(state)

    # -- follow --------------------------------------------------------------------------------

    def _follow(self, spec: DeploymentSpec, state: dict[str, Any], actor: str) -> None:
        requested = spec.model.requested_uri
        if not spec.model.is_floating or spec.traffic:
            return
        try:
            resolved = resolve_model_uri(requested, self.client)
        except MlflowException as exc:
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
        considered = set(considered) | self._versions_with(("rolled_back", "rejected", "gates_failed"))
        candidates = sorted(
            (int(mv.version) for mv in self.client.search_model_versions(f"name='{policy.model}'")
             if mv.creation_timestamp > created_ms and str(mv.version) not in considered
             and str(mv.version) != served),
        )
        for version in candidates:
            state["considered"].append(str(version))
            self._consider(str(version), spec, policy, state, actor)
            if state.get("canary"):
                break  # one candidate at a time; later ones wait for this canary to end

    def _consider(self, version: str, spec: DeploymentSpec, policy: Policy, state: dict[str, Any],
                  actor: str) -> None:
        champion = spec.model.model_version if spec.model.model_name == policy.model else None
        self.say(f"Evaluating gates of {policy.model} v{version} (champion v{champion})")
        report = evaluate_gates(policy, (policy.model, version), client=self.client, champion_version=champion,
                                cache_dir=self.paths.models)
        summary = report.summary()
        self.say(summary)
        if not report.passed:
            self._act(f"reject {policy.model} v{version}: {summary.splitlines()[0]}", lambda: record(
                self.store, self.client, self.name, "gates_failed", model_name=policy.model, version=version,
                reason=summary.replace("\n", "; "), actor=f"policy {policy.source}",
                evidence=report.to_dict(), tags={"lifecycle.gates": "failed", "lifecycle.promotion": "rejected"}))
            return
        roles = RegistryRoles(self.client, policy)

        def make_challenger() -> None:
            roles.set_challenger(version)
            record(self.store, self.client, self.name, "challenger", model_name=policy.model, version=version,
                   reason=summary.replace("\n", "; "), actor=f"policy {policy.source}",
                   evidence=report.to_dict(), tags={"lifecycle.gates": "passed"})

        self._act(f"make {policy.model} v{version} {policy.challenger} (gates passed)", make_challenger)
        canary = policy.promotion.canary
        if canary is None or champion is None:
            self._promote(version, spec, policy, state, reason="gates passed (no canary configured)",
                          evidence=report.to_dict())
            return
        reason = f"canary: v{version} gets {canary.percent:g}% of live traffic (gates passed)"
        try:
            self._act(f"send {canary.percent:g}% of {self.name}'s traffic to v{version}",
                      lambda: self.deployments.transition(
                          self.name, traffic=[(f"models:/{policy.model}/{champion}", 100 - canary.percent),
                                              (f"models:/{policy.model}/{version}", canary.percent)],
                          reason=reason, actor=f"policy {policy.source}", evidence=report.to_dict()))
        except DeploymentError as exc:
            self._reject(version, policy, f"canary could not start: {exc.message}", {})
            return
        # The window starts once the split serves: both versions' counters from here on are compared.
        baselines = {}
        try:
            scraped = traffic_stats.scrape(self._status_url(), self._token(spec))
            baselines = {v: scraped[v].to_dict() for v in (version, champion) if v in scraped}
        except Exception as exc:
            _logger.warning("Could not read the canary baseline: %s", exc)
        state["canary"] = {"version": version, "champion": champion, "started_at": time.time(),
                           "baselines": baselines}

    def _end_orphan_canary(self, state: dict[str, Any], actor: str) -> None:
        """The policy (or its canary section) went away mid-canary: serve the champion alone."""
        canary = state.pop("canary")
        reason = f"canary of v{canary['version']} ended: the policy no longer configures a canary"
        self._act(f"serve only the champion on {self.name} ({reason})", lambda: self.deployments
                  .transition(self.name, reason=reason, actor=actor))

    def _status_url(self) -> str:
        return self.deployments.engine.status(self.name).url or ""

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
            roles = RegistryRoles(self.client, policy)
            reason = (f"the deployment was changed by hand while v{version} was in canary (it now serves "
                      f"{traffic_summary(spec)}); the canary ends and that change stands")

            def end_canary() -> None:
                roles.clear_challenger(version)
                record(self.store, self.client, self.name, "canary_ended", model_name=policy.model,
                       version=version, reason=reason, actor=actor, tags={"lifecycle.promotion": "canary_ended"})

            self._act(f"end the canary of v{version}: {reason}", end_canary)
            return
        scraped = traffic_stats.scrape(self._status_url(), self._token(spec))
        baselines = canary_state.get("baselines") or {version: canary_state.get("baseline")}  # older state

        def window(of: str | None) -> traffic_stats.VersionFigures:
            baseline = baselines.get(of) if of else None
            return traffic_stats.since(scraped.get(of or "") or traffic_stats.VersionFigures(),
                                       traffic_stats.VersionFigures.from_dict(baseline) if baseline else None)

        figures, champion_figures = window(version), window(champion)
        drift = self.client.get_model_version(policy.model, version).tags.get("drift.status")
        stats = CanaryStats(requests=int(figures.requests), errors=int(figures.errors),
                            p99_latency_ms=traffic_stats.p99_ms(figures),
                            elapsed_s=time.time() - canary_state["started_at"], drift_status=drift,
                            champion_requests=int(champion_figures.requests),
                            champion_errors=int(champion_figures.errors))
        verdict = evaluate_canary(policy.promotion.canary, stats)
        if verdict.pending:
            return
        summary = verdict.summary().replace("\n", "; ")
        state.pop("canary")
        if verdict.passed:
            self._promote(version, spec, policy, state, reason=f"canary passed: {summary}",
                          evidence=verdict.to_dict())
        else:
            self._reject(version, policy, f"canary failed: {summary}", verdict.to_dict())

    def _promote(self, version: str, spec: DeploymentSpec, policy: Policy, state: dict[str, Any], *,
                 reason: str, evidence: dict[str, Any]) -> None:
        roles = RegistryRoles(self.client, policy)
        actor = f"policy {policy.source}"
        self._act(f"promote {policy.model} v{version} to {policy.champion}", lambda: roles.promote(version))
        requested = spec.model.requested_uri
        target_uri = requested if spec.model.is_floating else f"models:/{policy.model}/{version}"
        self._act(f"serve v{version} with 100% of {self.name}'s traffic", lambda: self.deployments
                  .transition(self.name, model_uri=target_uri, reason=f"promoted v{version}: {reason}",
                              actor=actor, evidence=evidence))
        self._act(f"record the promotion of v{version}", lambda: record(
            self.store, self.client, self.name, "promoted", model_name=policy.model, version=version,
            reason=reason, actor=actor, evidence=evidence, tags={"lifecycle.promotion": "champion"}))

    def _reject(self, version: str, policy: Policy, reason: str, evidence: dict[str, Any]) -> None:
        roles = RegistryRoles(self.client, policy)
        actor = f"policy {policy.source}"
        self._act(f"remove {policy.model} v{version} from {policy.challenger}", lambda: roles.clear_challenger(version))
        self._act(f"serve only the champion on {self.name}", lambda: self.deployments
                  .transition(self.name, reason=f"rejected v{version}: {reason}", actor=actor, evidence=evidence))
        self._act(f"record the rejection of v{version}", lambda: record(
            self.store, self.client, self.name, "rejected", model_name=policy.model, version=version,
            reason=reason, actor=actor, evidence=evidence, tags={"lifecycle.promotion": "rejected"}))

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
        state["drift_handled_run"] = latest
        run_ids = [run.info.run_id for run in runs]
        reason = f"v{version} drifted in {k} consecutive reports (runs {', '.join(run_ids)})"
        evidence = {"report_run_ids": run_ids, "drift_shares": [run.data.metrics.get("drift_share") for run in runs]}
        action = policy.drift.action
        if action == "tag":
            self._act(f"flag {policy.model} v{version}: {reason}", lambda: record(
                self.store, self.client, self.name, "drift_alert", model_name=policy.model, version=version,
                reason=reason, actor=f"policy {policy.source}", evidence=evidence,
                tags={"lifecycle.drift_alert": reason}))
            return
        self.rollback(reason=reason, actor=f"policy {policy.source}", evidence=evidence, policy=policy,
                      archive=action == "archive")

    def _versions_with(self, events: tuple[str, ...]) -> set[str]:
        return {str((event.get("model") or {}).get("model_version")) for event in self.store.read_history(self.name)
                if event["event"] in events}

    # -- rollback ------------------------------------------------------------------------------

    def rollback(self, *, reason: str, actor: str, evidence: dict[str, Any] | None = None,
                 policy: Policy | None = None, to_version: str | None = None, archive: bool = False) -> str | None:
        """Return the deployment to the previous good version (or ``to_version``); returns it.

        A deployment that follows an alias or stage gets the reference moved back too, otherwise
        following would undo the rollback at the next poll.
        """
        spec = self.deployments.spec(self.name)
        model = spec.model
        current = model.model_version
        target = to_version or self.deployments.previous_good_version(self.name)
        if target is None:
            self.say(f"No previous good version of {model.model_name} to roll back to; v{current} keeps serving.")
            self._act(f"record that v{current} has no version to roll back to", lambda: record(
                self.store, self.client, self.name, "rollback_impossible", model_name=model.model_name,
                version=current, reason=f"{reason}; no previous good version", actor=actor, evidence=evidence))
            return None
        if policy is None and model.is_floating:
            policy = _policy_for_reference(model.requested_uri)
        keep_reference = False
        if policy is not None and model.is_floating:
            keep_reference = True
            roles = RegistryRoles(self.client, policy)
            self._act(f"move {policy.role_uri('champion')} back to v{target}",
                      lambda: roles.demote(current, target, archive))
        why = f"rolled back from v{current} to v{target}: {reason}"
        self._act(f"serve v{target} on {self.name}", lambda: self.deployments.rollback(
            self.name, to_version=target, reason=reason, actor=actor, evidence=evidence,
            keep_reference=keep_reference, from_version=current))
        self._act(f"record the rollback of v{current}", lambda: record(
            self.store, self.client, self.name, "rolled_back", model_name=model.model_name, version=current,
            reason=why, actor=actor, evidence=evidence,
            tags={"lifecycle.rolled_back": f"to v{target}", **({"lifecycle.archived": "true"} if archive else {})}))
        return target


def _counts_for_policy(run: Any, earlier_stint_end: float | None) -> bool:
    """Whether a drift report run belongs to the served version's current streak: not manual, and
    its window holds no row the version answered in an earlier stint."""
    from mlflow_deploy_plugin.monitoring.report_job import TRIGGER_TAG

    if run.data.tags.get(TRIGGER_TAG) == "manual":
        return False  # runs from before the tag existed have none and count, as they did
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
