"""A bad edit of a deployment's policy file keeps the last valid policy in force, and says so."""

from __future__ import annotations

from pathlib import Path

from mlflow_deploy_plugin.deployments import Deployments
from mlflow_deploy_plugin.lifecycle.controller import LifecycleController
from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef
from mlflow_deploy_plugin.state import StateStore

VALID = "model: m\npromotion:\n  gates:\n    metrics: ['accuracy >= 0.9']\n"


def test_a_bad_policy_edit_keeps_the_last_valid_policy(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(VALID)
    store = StateStore(tmp_path / "home")
    spec = DeploymentSpec("d", ModelRef("models:/m@champion", "m", "1"), DeploymentConfig(policy=str(policy_file)))
    store.write_spec(spec)
    controller = LifecycleController(store, "d")
    state: dict = {}
    assert controller.policy(spec, state).promotion.gates.metrics[0].metric == "accuracy"

    policy_file.write_text(VALID.replace(">=", "=>"))  # a typo, saved by hand
    for _ in range(2):  # every cycle uses the last valid policy; the error is recorded once
        policy = controller.policy(spec, state)
        assert policy is not None and policy.promotion.gates.metrics[0].threshold == 0.9
    assert "did you mean '>='" in state["policy_error"]
    events = [e for e in store.read_history("d") if e["event"].startswith("policy_")]
    assert [e["event"] for e in events] == ["policy_invalid"]
    assert "the last valid policy stays in force" in events[0]["reason"]
    controller._save(state)
    assert "policy file unusable" in Deployments(store=store).get("d")["last_error"]  # what `get` shows

    policy_file.unlink()  # moved away: the same
    assert controller.policy(spec, state) is not None and "cannot read" in state["policy_error"]

    policy_file.write_text(VALID)
    assert controller.policy(spec, state) is not None and "policy_error" not in state
    assert [e["event"] for e in store.read_history("d") if e["event"].startswith("policy_")] == [
        "policy_invalid", "policy_invalid", "policy_valid"]


def test_a_manual_change_mid_canary_ends_the_canary_and_stands(tmp_path: Path, monkeypatch) -> None:
    import mlflow

    from mlflow_deploy_plugin.lifecycle.policy import parse_policy

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source=str(tmp_path), run_id=None)
    client.set_registered_model_alias("m", "champion", "1")
    client.set_registered_model_alias("m", "challenger", "2")
    policy = parse_policy(VALID + "  canary: {percent: 10}\n")
    store = StateStore(tmp_path / "home")
    canary = {"version": "2", "champion": "1", "started_at": 0.0, "baselines": {}}

    controller = LifecycleController(store, "d")
    # The policy split v1 90% / v2 10%; then an operator updates the deployment to v3 by hand.
    by_hand = DeploymentSpec("d", ModelRef("models:/m/3", "m", "3"))
    store.write_spec(by_hand)
    state = {"canary": dict(canary)}
    controller._canary(by_hand, policy, state, "registry-poll")
    assert "canary" not in state
    ended = [e for e in store.read_history("d") if e["event"] == "canary_ended"]
    assert len(ended) == 1 and "changed by hand" in ended[0]["reason"] and "v3 100%" in ended[0]["reason"]
    assert store.read_spec("d") == by_hand  # nothing switched back
    assert "challenger" not in client.get_registered_model("m").aliases
    assert client.get_model_version("m", "2").tags["lifecycle.promotion"] == "canary_ended"
