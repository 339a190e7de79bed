"""The engine contract (``engines/base.py``), written once and run against every engine.

Each engine gets the same specs and must report the same things: a new engine (Ray Serve) is added
to ``ENGINE_TARGETS`` and must pass this file unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from conftest import Env, Registry, wait_for

from mlflow_deploy_plugin.engines.base import FAILED, RUNNING, STOPPED, Engine, EngineError, get_engine
from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef, TrafficShare
from mlflow_deploy_plugin.state import StateStore

ENGINE_TARGETS = ["lifecycle:/local", "lifecycle:/ray"]


@pytest.fixture(params=ENGINE_TARGETS)
def engine(request: pytest.FixtureRequest, env: Env) -> Iterator[Engine]:
    if request.param == "lifecycle:/ray":
        request.getfixturevalue("ray_cluster")  # a real local cluster, once per session
    engine = get_engine(request.param, StateStore(env.home))
    started: list[str] = []
    engine.started = started  # type: ignore[attr-defined]  # names to stop whatever a test does
    yield engine
    for name in started:
        engine.stop(name, 30)


def _ref(registry: Registry, version: str, uri: str | None = None) -> ModelRef:
    return ModelRef(uri or f"models:/{registry.model}/{version}", registry.model, version)


def _start(engine: Engine, spec: DeploymentSpec):
    spec = spec.replace(engine=engine.name)
    engine.store.write_spec(spec)
    engine.started.append(spec.name)  # type: ignore[attr-defined]
    return engine.start(spec, 180)


def _served_version(url: str, registry: Registry) -> str:
    from conftest import split_payload

    response = requests.post(f"{url}/invocations", json=split_payload(registry.features.iloc[:2]), timeout=30)
    assert response.status_code == 200, response.text
    return response.headers["x-model-version"]


def test_unknown_deployment_is_stopped_and_stop_is_idempotent(engine: Engine) -> None:
    status = engine.status("never-created")
    assert status.state == STOPPED and not status.serving and status.url is None
    engine.stop("never-created", 5)
    assert engine.agent_handle("never-created") is None


def test_start_update_split_stop(engine: Engine, registry: Registry) -> None:
    spec = DeploymentSpec("contract", _ref(registry, "1"), DeploymentConfig(warm_standby=False))
    status = _start(engine, spec)
    assert (status.state, status.model_version, status.healthy) == (RUNNING, "1", True)
    assert status.serving and requests.get(f"{status.url}/ping", timeout=5).status_code == 200
    assert _served_version(status.url, registry) == "1"
    assert engine.agent_handle("contract") is None  # pinned, nothing scheduled: no background work

    status = engine.update(spec.replace(model=_ref(registry, "2"), generation=2), "contract test", 180)
    assert status.model_version == "2" and engine.status("contract").model_version == "2"
    assert _served_version(status.url, registry) == "2"

    split = spec.replace(model=_ref(registry, "1"), traffic=(TrafficShare(_ref(registry, "1"), 70.0),
                                                             TrafficShare(_ref(registry, "2"), 30.0)))
    status = engine.update(split, "canary", 180)
    assert status.traffic == (("1", 70.0), ("2", 30.0)) == engine.status("contract").traffic

    url = status.url
    engine.stop("contract", 30)
    after = engine.status("contract")
    assert after.state == STOPPED and not after.serving
    assert _nothing_answers(f"{url}/ping")


def _nothing_answers(url: str) -> bool:
    """Nothing serves at ``url``: its port is closed (local), or the shared proxy in front of it
    (Ray Serve's, which serves every application of the cluster) knows no such route."""
    try:
        return requests.get(url, timeout=5).status_code == 404
    except requests.ConnectionError:
        return True


def test_a_version_that_cannot_load_leaves_the_old_one_serving(engine: Engine, registry: Registry) -> None:
    spec = DeploymentSpec("contract-broken", _ref(registry, "1"), DeploymentConfig(warm_standby=False))
    status = _start(engine, spec)
    broken = ModelRef(f"models:/{registry.broken_model}/1", registry.broken_model, "1")
    with pytest.raises(EngineError):
        engine.update(spec.replace(model=broken), "broken", 120)
    after = engine.status("contract-broken")
    assert after.state == RUNNING and after.model_version == "1"
    assert _served_version(status.url, registry) == "1"


def test_a_model_that_never_loads_fails_start(engine: Engine, registry: Registry) -> None:
    broken = ModelRef(f"models:/{registry.broken_model}/1", registry.broken_model, "1")
    with pytest.raises(EngineError, match="failed to start"):
        _start(engine, DeploymentSpec("contract-never", broken, DeploymentConfig(warm_standby=False)))
    assert engine.status("contract-never").state in (FAILED, STOPPED)


def test_floating_reference_gets_an_agent(engine: Engine, registry: Registry) -> None:
    spec = DeploymentSpec("contract-agent", _ref(registry, "1", f"models:/{registry.model}@champion"),
                          DeploymentConfig(warm_standby=False, poll_interval_s=60))
    _start(engine, spec)
    wait_for(lambda: engine.agent_handle("contract-agent"), 30, "the agent of a deployment that follows an alias")
