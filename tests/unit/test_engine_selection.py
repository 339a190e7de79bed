"""The target URI picks the engine in one place; the MLflow-facing client reports bad URIs clearly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from mlflow_deploy_plugin.engines.base import engine_name, get_engine
from mlflow_deploy_plugin.engines.local import LocalEngine
from mlflow_deploy_plugin.errors import InvalidRequest
from mlflow_deploy_plugin.spec import DeploymentConfig
from mlflow_deploy_plugin.state import StateStore


@pytest.mark.parametrize("uri", ["lifecycle", "lifecycle:/local", "lifecycle:local", "lifecycle:/local/"])
def test_local_engine_uris(uri: str, tmp_path: Path) -> None:
    assert engine_name(uri) == "local"
    engine = get_engine(uri, StateStore(tmp_path))
    assert isinstance(engine, LocalEngine) and engine.store.home == tmp_path


def _without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as it would be without the [ray] extra: `import ray` fails."""
    for module in [m for m in sys.modules if m.startswith("mlflow_deploy_plugin.engines.ray.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "ray", None)


def test_ray_says_which_extra_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _without_ray(monkeypatch)
    with pytest.raises(InvalidRequest, match=r"\[ray\] extra"):
        get_engine("lifecycle:/ray", StateStore(tmp_path))


@pytest.mark.parametrize("config, message", [
    ({"num_replicas": "2"}, "num_replicas applies to the ray engine only"),
    ({"num_cpus": "0.5"}, "num_cpus applies to the ray engine only"),
    ({"ray_address": "127.0.0.1:6379"}, "ray_address applies to the ray engine only"),
])
def test_the_local_engine_refuses_the_ray_keys(tmp_path: Path, config: dict, message: str) -> None:
    from mlflow_deploy_plugin.deployments import Deployments

    with pytest.raises(InvalidRequest, match=message):
        Deployments(store=StateStore(tmp_path)).new_spec("d", "models:/m/1", config)


@pytest.mark.parametrize("config, message", [
    ({"workers": "2"}, "use -C num_replicas"),
    ({"num_replicas": "2", "max_replicas": "3"}, "use one or the other"),
    ({"min_replicas": "2"}, "Autoscaling needs -C max_replicas"),
    ({"min_replicas": "3", "max_replicas": "2"}, "exceeds -C max_replicas=2"),
])
def test_the_ray_engine_refuses_settings_it_cannot_honour(tmp_path: Path, config: dict, message: str) -> None:
    pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
    from mlflow_deploy_plugin.config import parse_config

    engine = get_engine("lifecycle:/ray", StateStore(tmp_path))
    with pytest.raises(InvalidRequest, match=message):
        engine.check_config(parse_config(config))  # refused before any cluster is contacted


def test_the_ray_engine_refuses_tls(tmp_path: Path) -> None:
    # Refused, never silently ignored: Serve's proxy serves plain HTTP (TLS goes in front of it).
    pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
    from mlflow_deploy_plugin.spec import DeploymentConfig

    engine = get_engine("lifecycle:/ray", StateStore(tmp_path))
    with pytest.raises(InvalidRequest, match="tls_cert is not supported on lifecycle:/ray"):
        engine.check_config(DeploymentConfig(tls_cert="c.pem", tls_key="k.pem", auth_token_env="TOKEN"))


@pytest.mark.parametrize("uri", ["lifecycle:/k8s", "sagemaker", "lifecycle:/", "other:/local"])
def test_unknown_engines_list_the_known_ones(uri: str) -> None:
    if uri == "lifecycle:/":
        assert engine_name(uri) == "local"
        return
    with pytest.raises(InvalidRequest) as info:
        engine_name(uri)
    assert "lifecycle:/local" in info.value.message and "lifecycle:/ray" in info.value.message


def test_the_deployment_client_raises_mlflow_exceptions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DEPLOY_HOME", str(tmp_path))
    from mlflow_deploy_plugin.target import LifecycleDeploymentClient

    with monkeypatch.context() as without_ray:
        _without_ray(without_ray)
        with pytest.raises(MlflowException) as info:
            LifecycleDeploymentClient("lifecycle:/ray")
    assert info.value.error_code == "INVALID_PARAMETER_VALUE" and "[ray]" in info.value.message
    client = LifecycleDeploymentClient("lifecycle:/local")
    assert client.list_deployments() == []
    with pytest.raises(MlflowException) as missing:
        client.get_deployment("nope")
    assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(MlflowException) as bad_name:
        client.get_deployment("../etc")
    assert bad_name.value.error_code == "INVALID_PARAMETER_VALUE"
    client.delete_deployment("nope")  # deleting what does not exist is not an error, as MLflow's own targets
    with pytest.raises(MlflowException) as bad_flavor:
        client.create_deployment("x", "models:/m/1", flavor="onnx")
    assert bad_flavor.value.error_code == "INVALID_PARAMETER_VALUE"


def test_one_unreadable_spec_does_not_hide_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow_deploy_plugin.deployments import Deployments
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef

    store = StateStore(tmp_path)
    store.write_spec(DeploymentSpec("good", ModelRef("models:/m/1", "m", "1")))
    store.write_spec(DeploymentSpec("bad", ModelRef("models:/m/1", "m", "1")))
    store.paths("bad").spec.write_text('{"schema_version": 99, "name": "bad"}')
    views = {view["name"]: view for view in Deployments(store=store).describe_all()}
    assert views["good"]["status"] == "stopped"
    assert views["bad"]["status"] == "unreadable" and "schema_version=99" in views["bad"]["last_error"]


def test_update_checks_the_policy_as_create_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from mlflow_deploy_plugin.deployments import Deployments
    from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    client.create_model_version("m", source=str(tmp_path), run_id=None)
    client.set_registered_model_alias("m", "champion", "1")
    policy = tmp_path / "policy.yaml"
    policy.write_text("model: m\npromotion:\n  gates:\n    metrics: ['accuracy >= 0.9']\n")
    store = StateStore(tmp_path / "home")
    store.write_spec(DeploymentSpec("d", ModelRef("models:/m@champion", "m", "1"),
                                    DeploymentConfig(policy=str(policy))))
    with pytest.raises(InvalidRequest, match="must serve -m models:/m@champion"):
        Deployments(store=store).update("d", model_uri="models:/m/1")  # would pin what the policy moves
    assert [e["event"] for e in store.read_history("d")] == []  # refused before anything changed


def test_rollback_target_is_a_version_of_the_same_model_that_still_exists(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from mlflow_deploy_plugin.deployments import Deployments
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    for model in ("m", "other"):
        client.create_registered_model(model)
        for _ in range(3):
            client.create_model_version(model, source=str(tmp_path), run_id=None)
    store = StateStore(tmp_path / "home")
    store.write_spec(DeploymentSpec("d", ModelRef("models:/m@champion", "m", "3")))
    for model, version in (("m", "1"), ("m", "2"), ("other", "2"), ("m", "3")):
        store.append_history("d", "updated", model={"model_name": model, "model_version": version})
    deployments = Deployments(store=store)
    assert deployments.previous_good_version("d") == "2"
    client.delete_model_version("m", "2")  # deleted since it served: not a place to go back to
    assert deployments.previous_good_version("d") == "1"
    # A rollback to v1 that could not make it serve (undone) rules v1 out; one undone for a
    # registry failure does not blame the target.
    store.append_history("d", "rollback_failed", model={"model_name": "m", "model_version": "3"},
                         evidence={"target": "1", "target_failed": False})
    assert deployments.previous_good_version("d") == "1"
    store.append_history("d", "rollback_failed", model={"model_name": "m", "model_version": "3"},
                         evidence={"target": "1", "target_failed": True})
    assert deployments.previous_good_version("d") is None


def test_the_ray_engine_refuses_node_local_capture_on_a_multi_node_cluster() -> None:
    pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
    from mlflow_deploy_plugin.engines.ray.engine import check_capture_location

    default = DeploymentConfig()
    check_capture_location(default, 1)  # one node: every replica sees the deployment's folder
    with pytest.raises(InvalidRequest, match=r"3 nodes: .*-C capture_uri"):
        check_capture_location(default, 3)
    check_capture_location(DeploymentConfig(capture_uri="s3://bucket/capture"), 3)
    check_capture_location(DeploymentConfig(capture=False), 3)


def test_a_serve_application_ahead_of_the_folder_is_an_interrupted_change() -> None:
    """What a switch killed between Serve's change and the spec write leaves, as the Ray engine
    reads it from Serve's application details (the spec Serve targets is its user_config)."""
    pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
    import json

    from mlflow_deploy_plugin.engines.base import CHANGE_DONE, CHANGE_FAILED, CHANGE_IN_PROGRESS
    from mlflow_deploy_plugin.engines.ray.engine import divergence
    from mlflow_deploy_plugin.engines.ray.ingress import INGRESS_NAME
    from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef

    folder = DeploymentSpec(name="d", model=ModelRef("models:/m@champion", "m", "1"), engine="ray",
                            created_at=1000.0, updated_at=1000.0)
    switched = folder.replace(model=ModelRef("models:/m@champion", "m", "2"), updated_at=2000.0)

    def app(spec: DeploymentSpec | None, status: str, deployed_at: float = 2000.0, message: str = "") -> dict:
        user_config = {"spec": json.loads(json.dumps(spec.to_dict()))} if spec else {}
        return {"status": status, "last_deployed_time_s": deployed_at, "message": message,
                "deployments": {INGRESS_NAME: {"deployment_config": {"user_config": user_config}}}}

    stored = DeploymentSpec.from_dict(json.loads(json.dumps(folder.to_dict())))  # as read from the file
    assert divergence(app(folder, "RUNNING"), stored) is None  # Serve runs what the folder says
    assert divergence(None, stored) is None  # nothing runs: `up` starts it, not this
    assert divergence(app(None, "RUNNING"), stored) is None  # not a lifecycle deployment
    other = switched.replace(created_at=1500.0)  # another deployment of that name (deleted, created again)
    assert divergence(app(other, "RUNNING"), stored) is None

    done = divergence(app(switched, "RUNNING"), stored)
    assert done is not None and done.outcome == CHANGE_DONE and done.running == switched
    failed = divergence(app(switched, "DEPLOY_FAILED", message="Traceback...\nValueError: cannot load"), stored)
    assert failed is not None and failed.outcome == CHANGE_FAILED and failed.error == "ValueError: cannot load"
    rolling = divergence(app(switched, "DEPLOYING"), stored, now=2000.0 + 10)
    assert rolling is not None and rolling.outcome == CHANGE_IN_PROGRESS
    stuck = divergence(app(switched, "DEPLOYING"), stored, now=2000.0 + switched.config.startup_timeout_s + 1)
    assert stuck is not None and stuck.outcome == CHANGE_FAILED and "startup_timeout_s" in (stuck.error or "")


def test_run_local_serves_with_the_engine_its_target_uri_names() -> None:
    """MLflow hands a plugin's run_local no target URI; the plugin reads the one it was called with
    (an engine that does not exist is refused by name, before anything runs)."""
    from mlflow.deployments import run_local

    with pytest.raises(MlflowException, match=r"Unsupported target URI 'lifecycle:/nonesuch'"):
        run_local(target="lifecycle:/nonesuch", name="x", model_uri="models:/m/1")
    from mlflow_deploy_plugin.target import _run_local_target

    assert _run_local_target() == "lifecycle"  # called directly: the default engine


def test_a_ray_replica_leaves_the_request_id_header_to_serves_proxy() -> None:
    """Serve's proxy appends ``x-request-id`` (the id it gave the request, which the app used) to
    every response: the replica's app must not send its own too, or clients read "id, id"."""
    pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from mlflow_deploy_plugin.engines.ray.ingress import LeaveRequestIdToServe

    def answer(request):
        return JSONResponse({"id": request.headers["x-request-id"]},
                            headers={"x-request-id": request.headers["x-request-id"], "x-model-version": "1"})

    client = TestClient(LeaveRequestIdToServe(Starlette(routes=[Route("/invocations", answer, methods=["POST"])])))
    response = client.post("/invocations", headers={"x-request-id": "serve-made-this"})
    assert response.status_code == 200 and response.json() == {"id": "serve-made-this"}
    assert "x-request-id" not in response.headers and response.headers["x-model-version"] == "1"


def test_a_ray_replica_takes_its_whole_queue_from_serve(tmp_path: Path) -> None:
    """Serve hands a replica 2 x max_queue requests at once by default (not Serve's 5, which kept
    the backlog in its router instead of the replica's batcher); -C max_ongoing_requests sets it,
    is validated like every key, is the Ray engine's own, and bounds the autoscaling target."""
    pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
    from mlflow_deploy_plugin.config import parse_config
    from mlflow_deploy_plugin.engines.ray.engine import RayEngine, max_ongoing_requests

    assert max_ongoing_requests(parse_config({})) == 512
    assert max_ongoing_requests(parse_config({"max_queue": "10"})) == 20
    assert max_ongoing_requests(parse_config({"max_ongoing_requests": "64", "max_queue": "10"})) == 64
    for bad in ("0", "many", "1.5"):
        with pytest.raises(InvalidRequest, match="max_ongoing_requests"):
            parse_config({"max_ongoing_requests": bad})
    with pytest.raises(InvalidRequest, match=r"-C max_ongoing_requests applies to the ray engine only"):
        get_engine("lifecycle", StateStore(tmp_path)).check_config(parse_config({"max_ongoing_requests": "64"}))
    # Refused before any cluster is contacted (none runs for this test).
    ray_engine = RayEngine(StateStore(tmp_path))
    with pytest.raises(InvalidRequest, match=r"target_ongoing_requests=100 exceeds the 64 requests") as refused:
        ray_engine.check_config(parse_config({"max_replicas": "2", "target_ongoing_requests": "100",
                                              "max_ongoing_requests": "64"}))
    assert "at most 64" in refused.value.message and refused.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.parametrize("keys", [{"max_replicas": "3"}, {"min_replicas": "1", "max_replicas": "3"}])
def test_ray_autoscaling_refuses_a_default_target_above_max_ongoing_requests(keys: dict[str, str],
                                                                             tmp_path: Path) -> None:
    """Autoscaling without -C target_ongoing_requests gets Serve's default target (2); with
    -C max_ongoing_requests=1 a replica never runs 2 requests, so it is refused like an explicit
    target above the limit, naming both keys and what to set (before any cluster is contacted)."""
    pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
    from ray.serve.config import AutoscalingConfig

    from mlflow_deploy_plugin.config import parse_config
    from mlflow_deploy_plugin.engines.ray.engine import (
        DEFAULT_TARGET_ONGOING_REQUESTS,
        RayEngine,
        check_autoscaling_target,
        target_ongoing_requests,
    )
    from mlflow_deploy_plugin.target import _as_mlflow_errors

    assert AutoscalingConfig().target_ongoing_requests == DEFAULT_TARGET_ONGOING_REQUESTS  # Serve's own default
    assert target_ongoing_requests(parse_config(keys)) == 2.0
    engine = RayEngine(StateStore(tmp_path))
    with pytest.raises(InvalidRequest) as refused:
        engine.check_config(parse_config({**keys, "max_ongoing_requests": "1"}))
    message = refused.value.message
    assert "-C max_ongoing_requests=1 is below the autoscaling target" in message
    assert "target_ongoing_requests=2" in message and "Serve's default" in message
    assert "Set -C target_ongoing_requests to at most 1" in message
    assert "raise -C max_ongoing_requests to at least 2" in message
    # What MLflow's client gets: an MlflowException with INVALID_PARAMETER_VALUE and that message.
    with pytest.raises(MlflowException, match="max_ongoing_requests=1 is below") as reported, _as_mlflow_errors():
        engine.check_config(parse_config({**keys, "max_ongoing_requests": "1"}))
    assert reported.value.error_code == "INVALID_PARAMETER_VALUE"
    # A target that fits the limit passes (the check alone: check_config goes on to the cluster).
    check_autoscaling_target(parse_config({**keys, "max_ongoing_requests": "1", "target_ongoing_requests": "1"}))
    check_autoscaling_target(parse_config({**keys, "max_ongoing_requests": "2"}))
