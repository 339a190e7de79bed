"""Which drift reports count towards a policy's streak: scheduled ones of the current stint."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from mlflow_deploy_plugin.deployments import Deployments
from mlflow_deploy_plugin.lifecycle.controller import _counts_for_policy
from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
from mlflow_deploy_plugin.state import StateStore

STINT = datetime(2026, 11, 27, 12, 0, tzinfo=UTC).timestamp()


def _run(trigger: str | None, window_start: str | None) -> SimpleNamespace:
    tags = {"drift.trigger": trigger} if trigger else {}
    params = {"window_start": window_start} if window_start else {}
    return SimpleNamespace(data=SimpleNamespace(tags=tags, params=params))


def test_manual_reports_never_count_scheduled_and_for_policy_ones_do() -> None:
    inside = "2026-11-27T12:30:00+00:00"
    assert not _counts_for_policy(_run("manual", inside), STINT)
    assert not _counts_for_policy(_run("canary", inside), STINT)  # a challenger's check in its canary
    assert _counts_for_policy(_run("scheduled", inside), STINT)
    assert _counts_for_policy(_run("manual-for-policy", inside), STINT)
    assert _counts_for_policy(_run(None, inside), STINT)  # written before the tag existed


def test_reports_reaching_into_an_earlier_stint_do_not_count() -> None:
    # STINT: when the version last stopped serving before its current stint.
    assert not _counts_for_policy(_run("scheduled", "2026-11-27T11:00:00+00:00"), STINT)
    assert _counts_for_policy(_run("scheduled", "2026-11-27T11:00:00+00:00"), None)  # first stint: all count


def test_previous_stint_end_is_when_the_version_last_stopped_serving(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.write_spec(DeploymentSpec("d", ModelRef("models:/m@champion", "m", "2")))
    history = tmp_path / "deployments" / "d" / "history.jsonl"
    events = [(100, "created", "1", None), (200, "updated", "2", None), (300, "updated", "1", None),
              (400, "updated", "1", "v1 70%, v2 30%"),  # a canary split: not a stint of its own
              (500, "updated", "2", None), (600, "updated", "2", None)]  # a redeploy keeps the stint
    import json

    history.write_text("".join(json.dumps({"time": t, "event": e, "model": {"model_name": "m", "model_version": v},
                                           "traffic": split}) + "\n" for t, e, v, split in events))
    assert Deployments(store=store).previous_stint_end("d") == 300.0  # v2 served 200..300, back at 500
    history.write_text("".join(json.dumps({"time": t, "event": e, "model": {"model_name": "m", "model_version": v},
                                           "traffic": split}) + "\n" for t, e, v, split in events[:2]))
    assert Deployments(store=store).previous_stint_end("d") is None  # its first stint
