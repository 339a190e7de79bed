"""Registry moves (aliases or stages) and the audit trail every move leaves behind.

Every transition the plugin makes or follows is recorded three ways: in the deployment's
history (`mlflow-deploy history NAME`), as the version's ``lifecycle.last_event`` tag and as a
line appended to the version's description, so the MLflow UI tells the story too.
"""

from __future__ import annotations

import logging
import warnings
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_deploy_plugin.lifecycle.policy import Policy
from mlflow_deploy_plugin.state import StateStore

_logger = logging.getLogger(__name__)
_MAX_DESCRIPTION_LINES = 40


class RegistryRoles:
    """Champion/challenger moves for one policy, in its registry world (aliases or stages)."""

    def __init__(self, client: MlflowClient, policy: Policy) -> None:
        self.client = client
        self.policy = policy

    def _stage(self, version: str, stage: str, archive_existing: bool = False) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated, still supported
            self.client.transition_model_version_stage(self.policy.model, version, stage,
                                                       archive_existing_versions=archive_existing)

    def set_challenger(self, version: str) -> None:
        if self.policy.registry == "alias":
            self.client.set_registered_model_alias(self.policy.model, self.policy.challenger, version)
        else:
            self._stage(version, self.policy.challenger)

    def clear_challenger(self, version: str) -> None:
        """Take the challenger role from ``version``, unless it no longer holds it: a person who
        meanwhile moved the alias to another version, or this version to another stage (say, to
        Production in the UI), keeps that change."""
        if self.policy.registry == "alias":
            try:
                holder = self.client.get_model_version_by_alias(self.policy.model, self.policy.challenger)
            except MlflowException:
                return
            if str(holder.version) == str(version):
                self.client.delete_registered_model_alias(self.policy.model, self.policy.challenger)
        else:
            stage = self.client.get_model_version(self.policy.model, version).current_stage or ""
            if stage.lower() == self.policy.challenger.lower():
                self._stage(version, "None")

    def promote(self, version: str) -> None:
        """Make ``version`` champion; with stages, the previous Production version is archived."""
        if self.policy.registry == "alias":
            self.client.set_registered_model_alias(self.policy.model, self.policy.champion, version)
            self.clear_challenger(version)
        else:
            self._stage(version, self.policy.champion, archive_existing=True)

    def demote(self, bad_version: str, good_version: str, archive: bool) -> None:
        """Give the champion role back to ``good_version``; ``archive`` also retires ``bad_version``."""
        if self.policy.registry == "alias":
            self.client.set_registered_model_alias(self.policy.model, self.policy.champion, good_version)
            if archive:
                self.client.set_model_version_tag(self.policy.model, bad_version, "lifecycle.archived", "true")
        else:
            self._stage(good_version, self.policy.champion)
            self._stage(bad_version, "Archived" if archive else "None")


def record(store: StateStore | None, client: MlflowClient, deployment: str | None, event: str, *,
           model_name: str, version: str, reason: str, actor: str,
           evidence: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
           op: str | None = None) -> None:
    """Leave the audit trail of one lifecycle step (history, version tag, version description).

    ``op`` names the controller's operation the step belongs to (kept in the history event, so a
    step resumed after a crash can tell that its record is written already). ``store`` None writes
    no history event (the tags and description only).
    """
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if store is not None and deployment is not None:
        store.append_history(deployment, event, model={"model_name": model_name, "model_version": version},
                             reason=reason, actor=actor, evidence=evidence, **({"op": op} if op else {}))
    line = f"{stamp} {event}: {reason} (by {actor}{f', deployment {deployment}' if deployment else ''})"
    try:
        client.set_model_version_tag(model_name, version, "lifecycle.last_event", line[:5000])
        for key, value in (tags or {}).items():
            client.set_model_version_tag(model_name, version, key, str(value)[:5000])
        description = client.get_model_version(model_name, version).description or ""
        lines = [*description.splitlines(), f"- {line}"][-_MAX_DESCRIPTION_LINES:]
        client.update_model_version(model_name, version, description="\n".join(lines))
    except Exception as exc:  # the audit trail must never block the transition it describes
        _logger.warning("Could not write the audit trail on %s v%s: %s", model_name, version, exc)
