"""Every `mlflow deployments` verb on `-t lifecycle`, through the real CLI in a subprocess."""

from __future__ import annotations

import json

import requests
from conftest import Env, Registry, wait_for


def test_shared_deployment_serves(env: Env, shared_deployment: dict, registry: Registry) -> None:
    out = env.cli("get", "-t", "lifecycle", "--name", shared_deployment["name"]).stdout
    assert "status: running" in out
    assert "model_version: 1" in out
    assert requests.get(f"{shared_deployment['url']}/health", timeout=5).status_code == 200
