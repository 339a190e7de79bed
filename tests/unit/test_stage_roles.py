"""Registry roles in the stage world (`registry: stage`), on a real SQLite registry: taking the
challenger role away never undoes a person's stage transition."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlflow_deploy_plugin.lifecycle.policy import parse_policy
from mlflow_deploy_plugin.lifecycle.transitions import RegistryRoles


@pytest.fixture
def client(tmp_path: Path) -> MlflowClient:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source=str(tmp_path), run_id=None)
    return client


def _stages(client: MlflowClient) -> dict[str, str]:
    return {str(mv.version): mv.current_stage for mv in client.search_model_versions("name='m'")}


def test_clearing_the_challenger_keeps_a_persons_transition(client: MlflowClient) -> None:
    roles = RegistryRoles(client, parse_policy("model: m\nregistry: stage\n"))
    roles.promote("1")
    roles.set_challenger("2")
    roles.set_challenger("3")
    assert _stages(client) == {"1": "Production", "2": "Staging", "3": "Staging"}

    roles.clear_challenger("2")  # rejected by its canary: out of Staging
    assert _stages(client) == {"1": "Production", "2": "None", "3": "Staging"}
    roles.clear_challenger("2")  # a retried step changes nothing more
    assert _stages(client) == {"1": "Production", "2": "None", "3": "Staging"}

    # A person moves v3 to Production in the UI while its canary runs; the canary then ends (or
    # rejects it): the person's transition stands.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage("m", "3", "Production", archive_existing_versions=True)
    roles.clear_challenger("3")
    assert _stages(client) == {"1": "Archived", "2": "None", "3": "Production"}
