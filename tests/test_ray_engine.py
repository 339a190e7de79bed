"""The Ray Serve engine through the real `mlflow deployments -t lifecycle:/ray` CLI, on a real cluster.

The engine contract (start, update, split, failed loads, agent) runs in test_engine_contract.py;
here: what a user sees from the CLI: no cluster, replicas, predict, an update under load, capture
and per-version figures from every replica, delete; token auth with only the token's hash on the
cluster, a V2 client, and the agent on the cluster (drift reports on its schedule, following an
alias when a webhook pokes it, its actor killed and restarted by Ray, a switch interrupted between
Serve's change and the spec write finished); a shadow version whose rows pair with the primary's,
predicted in a process of its own that, killed, is replaced and written to the history;
list/get/delete from a second machine (another MLFLOW_DEPLOY_HOME) through the cluster's own
state; run-local on the cluster, ended by Ctrl-C, and by a second Ctrl-C while Serve's controller
is stuck (SIGSTOP); a replica killed with SIGKILL replaced while the deployment keeps
answering.

A Ray deployment costs a minute of replica start-up on two busy cores, and every rolling update
another, so features share deployments: the tests that only read share one (the ``shared`` module
fixture); the update under load and the replica kill share one of two replicas; the agent's
features share the token deployment. The verbs each test is about run through the real CLI
(create, update, delete, run-local, a second machine's list/get/delete); reads and checks around
them use the plugin's client in process (``_client``): a CLI subprocess is ~5 s of CPU in imports.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import Env, Registry, free_port, split_payload, wait_for
from mlflow.deployments import get_deploy_client
from mlflow.exceptions import MlflowException
from notify_receiver import Receiver

from mlflow_deploy_plugin.bounded_exit import BACKSTOP_S, EXIT_GRACE_S
from mlflow_deploy_plugin.capture import read_capture
from mlflow_deploy_plugin.engines.base import get_engine
from mlflow_deploy_plugin.lifecycle import traffic_stats
from mlflow_deploy_plugin.registry import resolve_model_uri
from mlflow_deploy_plugin.state import StateStore, read_history_file, read_or_create_secret

RAY = "lifecycle:/ray"
# The first test to use the cluster pays for starting it (and Serve) in its set-up, which pytest-timeout
# counts: leave room for that on two busy cores.
pytestmark = pytest.mark.timeout(600)


def test_without_a_cluster_create_says_how_to_start_one(env: Env, tmp_path: Path) -> None:
    # No RAY_ADDRESS and no `ray start` recorded in this (empty) temp dir: refuse, never start one.
    bare = env.environ(TMPDIR=str(tmp_path), RAY_TMPDIR=str(tmp_path))
    bare.pop("RAY_ADDRESS", None)
    proc = env.cli("create", "-t", RAY, "--name", "nocluster", "-m", "models:/any/1", check=False, env=bare)
    assert proc.returncode != 0
    assert "INVALID_PARAMETER_VALUE" in proc.stderr and "ray start --head" in proc.stderr, proc.stderr
    dead = env.cli("create", "-t", RAY, "--name", "nocluster", "-m", "models:/any/1", "-C",
                   f"ray_address=127.0.0.1:{free_port()}", check=False, env=bare)
    assert dead.returncode != 0 and "No Ray cluster answers at 127.0.0.1:" in dead.stderr, dead.stderr
    assert not (env.home / "deployments" / "nocluster").exists()  # refused before anything was written


def _client(home: Path | None = None):
    """The plugin's deployment client in this process (as MLflow loads it), for the reads and the
    calls whose CLI round trip proves nothing the CLI tests do not (a `mlflow deployments`
    subprocess costs ~5 s of CPU in imports, 20 s of wall time on two busy cores); ``home``: the
    state home of another machine."""
    if home is None:
        return get_deploy_client(RAY)
    from mlflow_deploy_plugin.deployments import Deployments
    from mlflow_deploy_plugin.target import LifecycleDeploymentClient

    client = LifecycleDeploymentClient(RAY)
    client.deployments = Deployments(RAY, store=StateStore(home))
    return client


# Between two requests of one load client. Paced, not flat out: requests in flight all through a
# rollout or a replica's replacement is what is tested, and flat-out clients on two busy cores took
# the CPU the new replicas start with (an update under unpaced load took 123 s, its create 55 s).
LOAD_PAUSE_S = 0.1


def _delete(name: str) -> None:
    """Clean-up in process (the deployment client's delete, on the Ray engine), for tests not about
    the `delete` verb: a failure is warned, never hiding the test's own; the session's end stops
    the cluster, and what ran on it."""
    try:
        _client().delete_deployment(name)
    except Exception as exc:
        import warnings

        warnings.warn(f"in-process delete of {name!r} failed: {exc!r}", stacklevel=2)


def _load(url: str, payload: dict, clients: int, deadline_s: float) -> tuple[list[tuple[float, int, str]],
                                                                               threading.Event, list[threading.Thread]]:
    """``clients`` threads posting ``payload`` in a loop (``LOAD_PAUSE_S`` apart) until the event is
    set (or ``deadline_s`` passed): outcomes as (when sent, status, X-Model-Version); status 0 is
    no answer at all."""
    outcomes: list[tuple[float, int, str]] = []
    stop = threading.Event()
    deadline = time.monotonic() + deadline_s  # bounded even if the test body fails to stop them

    def client() -> None:
        session = requests.Session()
        while not stop.is_set() and time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                response = session.post(f"{url}/invocations", json=payload, timeout=60)
                outcomes.append((sent, response.status_code, response.headers.get("x-model-version", "")))
            except requests.RequestException:
                outcomes.append((sent, 0, ""))
            stop.wait(LOAD_PAUSE_S)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    return outcomes, stop, threads


def _stop_load(stop: threading.Event, threads: list[threading.Thread]) -> None:
    stop.set()
    for thread in threads:
        thread.join(timeout=90)


# One deployment of two replicas for the update under load and the replica kill (its start-up is the
# cost). The ceiling only stops a hung test; every wait inside has its own bound.
@pytest.mark.timeout(900)
def test_replicas_update_under_load_capture_kill_delete(env: Env, registry: Registry, ray_cluster: str) -> None:
    name = "ray-churn"
    # The agent signing notifications runs on the cluster, which has not this shell's variables.
    refused = env.cli("create", "-t", RAY, "--name", "ray-nosecret", "-m", f"models:/{registry.model}/1", "-C",
                      "notify=http://127.0.0.1:9/hook", "-C", "notify_secret_env=SECRET_OF_THIS_SHELL", check=False,
                      env=env.environ(SECRET_OF_THIS_SHELL="s3cret"))
    assert refused.returncode != 0 and "SECRET_OF_THIS_SHELL is not set on the Ray cluster" in refused.stderr, \
        refused.stderr
    # Notified (the deployment's own secret signs): the replica killed below reaches the receiver.
    receiver = Receiver(free_port(), "")
    env.cli("create", "-t", RAY, "--name", name, "-m", f"models:/{registry.model}/1",
            "-C", "num_replicas=2", "-C", "num_cpus=0.5", "-C", "max_ongoing_requests=64",
            "-C", f"notify=http://127.0.0.1:{receiver.port}/hook")
    receiver.secret = read_or_create_secret(StateStore(env.home).paths(name).notify_key)
    receiver.start()
    deploy_client = _client()
    try:
        view = deploy_client.get_deployment(name)
        assert (view["status"], view["engine"], view["model_version"]) == ("running", "ray", "1")
        assert view["url"].endswith(f"/{name}")
        assert len(view["worker_pids"]) == 2  # two replicas, two processes
        engine = get_engine(RAY, StateStore(env.home))
        assert engine.status(name).details["max_ongoing_requests"] == 64  # the -C key reached Serve
        url = view["url"]
        features = registry.features.iloc[:3]
        assert len(deploy_client.predict(name, features)["predictions"]) == 3

        # Load from a few clients through the rolling update: every request must succeed.
        outcomes, stop, clients = _load(url, split_payload(features), 3, 600)
        try:
            wait_for(lambda: len(outcomes) > 10, 60, "traffic before the update")
            env.cli("update", "-t", RAY, "--name", name, "-m", f"models:/{registry.model}/2")
            count = len(outcomes)
            wait_for(lambda: len(outcomes) > count + 10, 60, "traffic after the update")
        finally:
            _stop_load(stop, clients)
        failed = [outcome for outcome in outcomes if outcome[1] != 200]
        assert not failed, f"{len(failed)} of {len(outcomes)} requests failed during the update: {failed[:3]}"
        assert outcomes[0][2] == "1" and outcomes[-1][2] == "2"
        assert deploy_client.get_deployment(name)["model_version"] == "2"

        # Every replica captured into the deployment's one folder: all answers are there.
        capture = env.home / "deployments" / name / "capture"
        wait_for(lambda: len(read_capture(str(capture))["_request_id"].unique()) >= len(outcomes), 60,
                 "every answered request in the capture folder", interval_s=0.5)
        # The per-version figures the agent judges a canary on cover every replica, the retired v1
        # replicas included (their last push as they stopped): each answer counted once, under its
        # version (the proxy's /metrics would show one replica's).
        answered = {version: sum(1 for _, _, v in outcomes if v == version) for version in ("1", "2")}
        answered["1"] += 1  # the `predict` call

        def counted() -> dict[str, float]:
            figures = traffic_stats.parse_all(engine.metrics_texts(name) or [])
            return {version: entry.requests for version, entry in figures.items() if entry.requests}

        wait_for(lambda: counted() == answered, 60, f"the replicas' figures to count {answered}", interval_s=0.5)

        _a_replica_killed_is_replaced_while_the_other_answers(deploy_client, name, url, registry, receiver)
    finally:
        env.cli("delete", "-t", RAY, "--name", name)
        receiver.stop()
    assert name not in [view["name"] for view in deploy_client.list_deployments()]
    assert requests.get(f"{url}/ping", timeout=10).status_code == 404  # the proxy stays; the route is gone


def _a_replica_killed_is_replaced_while_the_other_answers(deploy_client, name: str, url: str,
                                                          registry: Registry, receiver: Receiver) -> None:
    """SIGKILL one of the two replicas under a request loop: Serve replaces it, the other answers;
    the crash and the deployment serving in full again reach the -C notify receiver, signed."""
    view = deploy_client.get_deployment(name)
    replicas = view["replicas"]
    assert [r["state"] for r in replicas] == ["RUNNING", "RUNNING"], replicas
    # The update retired the two v1 replicas: Serve lists them as dead, but no replica crashed.
    assert int(view["restarts"]) == 0, view.get("dead_replicas")
    outcomes, stop, clients = _load(url, split_payload(registry.features.iloc[:2]), 2, 240)
    try:
        wait_for(lambda: len(outcomes) > 10, 60, "traffic before the kill")
        victim = replicas[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        def replaced() -> bool:
            view = deploy_client.get_deployment(name)
            now, crashed = view["replicas"], int(view["restarts"])
            return crashed >= 1 and len(now) == 2 and all(r["state"] == "RUNNING" for r in now) \
                and victim not in [r["pid"] for r in now]

        wait_for(replaced, 180, "Serve to replace the killed replica and count it in restarts", interval_s=1)
        deaths = deploy_client.get_deployment(name)["dead_replicas"]
        causes = [death["cause"] for death in deaths if death["pid"] == victim]
        print(f"kill: the killed replica's cause {causes}; every recent death {deaths}")
        assert len(causes) == 1 and causes[0] not in ("retired", "unknown"), deaths  # worker_died
        recovered_at = time.monotonic()
        count = len(outcomes)
        wait_for(lambda: len(outcomes) > count + 10, 60, "traffic after the replacement")
    finally:
        _stop_load(stop, clients)
    during = [status for sent, status, _ in outcomes if killed_at <= sent < recovered_at]
    after = [status for sent, status, _ in outcomes if sent >= recovered_at]
    failed = [status for _, status, _ in outcomes if status != 200]
    print(f"kill: {len(outcomes)} requests, {len(during)} while replaced, failed: {failed}")
    # Only what was in flight on the killed replica may fail (one request per client); the other
    # replica answered meanwhile and the replacement serves.
    assert len(failed) <= len(clients), failed
    assert during.count(200) >= 1 and after and set(after) == {200}

    def told() -> list[dict]:
        return [body for body in receiver.bodies("/hook") if body["event"] in ("crashed", "worker_recovered")]

    wait_for(lambda: [body["event"] for body in told()] == ["crashed", "worker_recovered"], 180,
             "crashed and worker_recovered delivered to the receiver", interval_s=1)
    crashed = told()[0]["details"]
    assert crashed["pid"] == victim and crashed["cause"] not in ("retired", "unknown"), crashed
    assert not receiver.rejected, receiver.rejected  # every delivery's signature verified


def _input_file(env: Env, frame) -> str:
    path = env.root / "ray-input.json"
    frame.to_json(path, orient="records")  # what `predict -I` reads (pd.read_json)
    return str(path)


def _driver(address: str) -> None:
    """Join the test cluster from this process (a read-only look at its state)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, namespace="mlflow-deploy-tests", log_to_driver=False)


def _cluster_state_bytes(address: str) -> bytes:
    """What the cluster keeps and reports about Serve: its status and details as a client reads
    them, every value of Serve's internal KV store (the controller's checkpoints: deployment
    configs, constructor arguments, replica state) and of the default KV namespace, and every
    log file of the session (the replicas', the controller's, the proxy's)."""
    import ray
    from ray import serve
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list
    from ray.serve._private.storage.kv_store import SERVE_INTERNAL_KV_NAMESPACE
    from ray.serve.context import _get_global_client

    _driver(address)
    parts = [json.dumps(dataclasses.asdict(serve.status()), default=str).encode(),
             json.dumps(_get_global_client().get_serve_details(), default=str).encode()]
    for namespace in (SERVE_INTERNAL_KV_NAMESPACE, None):
        for key in _internal_kv_list(b"", namespace=namespace):
            parts.append(key + b"=" + (_internal_kv_get(key, namespace=namespace) or b""))
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    parts.extend(path.read_bytes() for path in logs.rglob("*") if path.is_file())
    return b"\n".join(parts)


def _agent_pid(engine, name: str) -> int | None:
    """The agent process's pid, as the engine reports it (``ray actor agent:NAME (agent pid N)``)."""
    handle = engine.agent_handle(name)
    return int(handle.rsplit("agent pid ", 1)[1].rstrip(")")) if handle else None


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


# One deployment for several features (its start-up is the cost); the bound leaves room for the
# cluster's start or stop, which pytest-timeout counts to the first or last Ray test.
@pytest.mark.timeout(900)
def test_token_auth_v2_and_the_agent_on_the_cluster(env: Env, registry: Registry, ray_cluster: str) -> None:
    """One deployment, several features: token auth with only the token's hash on the cluster, a
    real V2 client, and the agent actor (no token) running scheduled drift reports on the captured
    traffic, following an alias when a webhook pokes it, looking again when Ray restarts its actor,
    and finishing a switch that was interrupted between Serve's change and the spec write."""
    from mlflow import MlflowClient

    name, alias = "ray-auth", "ray-auth-follow"  # an alias of its own: the shared ones stay put
    client = MlflowClient(env.tracking_uri)
    client.set_registered_model_alias(registry.model, alias, "1")
    token = f"ray-token-{os.urandom(12).hex()}"
    with_token = env.environ(RAY_TEST_TOKEN=token)
    # poll_interval_s=3600: after its first look at start, only a webhook (or a restart) makes the
    # agent look at the registry within this test.
    env.cli("create", "-t", RAY, "--name", name, "-m", f"models:/{registry.model}@{alias}",
            "-C", "auth_token_env=RAY_TEST_TOKEN", "-C", "num_cpus=0.5", "-C", "poll_interval_s=3600",
            "-C", "drift_schedule=* * * * *", "-C", "drift_min_rows=20", env=with_token)
    try:
        url = _client().get_deployment(name)["url"]
        payload = split_payload(registry.features.iloc[:2])

        def post(token: str | None) -> requests.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return requests.post(f"{url}/invocations", json=payload, timeout=30, headers=headers)

        refused = post(None)
        assert refused.status_code == 401 and refused.json()["error_code"] == "UNAUTHENTICATED"
        assert post(token + "x").status_code == 401
        granted = post(token)
        assert granted.status_code == 200, granted.text
        assert requests.get(f"{url}/ping", timeout=30).status_code == 200  # probes stay open

        # Traffic for the agent's scheduled drift reports (rows of the reference data, 5 per request),
        # first: the report (on the next minute, a child process of the agent) runs while the checks
        # below do.
        session = requests.Session()
        for start in range(0, 200, 5):
            answer = session.post(f"{url}/invocations", json=split_payload(registry.features.iloc[start:start + 5]),
                                  headers={"Authorization": f"Bearer {token}"}, timeout=30)
            assert answer.status_code == 200, answer.text
        # `predict` sends the token it reads from the same variable; without it, it says so (in
        # this process, where the variable is not set: the same code as the CLI's, minus its imports).
        predicted = env.cli("predict", "-t", RAY, "--name", name, "-I",
                            _input_file(env, registry.features.iloc[:2]), env=with_token)
        assert "predictions" in predicted.stdout
        assert "RAY_TEST_TOKEN" not in os.environ
        with pytest.raises(MlflowException, match="RAY_TEST_TOKEN"):
            _client().predict(name, registry.features.iloc[:2])

        state = _cluster_state_bytes(ray_cluster)
        assert name.encode() in state and b"RAY_TEST_TOKEN" in state  # the right state was read
        assert hashlib.sha256(token.encode()).hexdigest().encode() in state  # what the replicas check
        assert token.encode() not in state, "the token itself sits in Serve's state"
        assert token.encode()[-12:] not in state

        # A real V2 client through Serve's proxy (the route prefix is the client's base path), with the token.
        _v2_infer_matches_invocations(url, registry, {"Authorization": f"Bearer {token}"}, post(token))

        # The agent runs drift reports on its schedule, reading the replicas' captured traffic. Before
        # the alias moves: a report judges the rows the version serving *now* answered.
        experiment = wait_for(lambda: client.get_experiment_by_name(f"drift/{name}"), 120,
                              "the agent's drift experiment", interval_s=1)
        reports = wait_for(lambda: [r for r in client.search_runs([experiment.experiment_id])
                                    if r.info.status == "FINISHED" and "drift_share" in r.data.metrics
                                    and int(r.data.params.get("rows_current", 0)) >= 20], 180,
                           "a scheduled drift report on captured rows", interval_s=2)
        assert reports[0].data.tags["drift.status"] in ("ok", "drifted"), reports[0].data.tags

        # A registry webhook pokes the agent on the cluster: `mlflow-deploy watch` verifies the
        # delivery and pokes the deployments serving the model; the agent (polling hourly) follows
        # the alias at once, without the token, and the token still holds.
        folder = env.home / "deployments" / name
        history = folder / "history.jsonl"
        client.set_registered_model_alias(registry.model, alias, "2")
        with _watcher(env) as port:
            _deliver_alias_webhook(port, registry.model, alias, "2")
            wait_for(lambda: post(token).headers.get("x-model-version") == "2", 180,
                     "the agent on the cluster to follow the alias to v2 when poked", interval_s=0.5)
        assert post(None).status_code == 401
        followed = wait_for(lambda: [e for e in read_history_file(history) if e["event"] == "updated"
                                     and e["model"]["model_version"] == "2"], 60, "the follow to v2 recorded",
                            interval_s=0.5)
        assert followed[0]["actor"] == "webhook", followed  # the poke, not a poll

        # The alias moves back with no webhook: the agent does not look before its next poll. Its
        # actor killed (the actor's worker, not the agent), Ray restarts it, the new actor starts a
        # new agent, whose first look follows the alias back to v1. The old agent stops without
        # starting a local supervisor (a Ray deployment's agent host is its actor).
        client.set_registered_model_alias(registry.model, alias, "1")
        engine = get_engine(RAY, StateStore(env.home))
        agent = _agent_pid(engine, name)
        assert agent is not None
        os.kill(_parent_pid(agent), signal.SIGKILL)
        wait_for(lambda: (_agent_pid(engine, name) or agent) != agent, 180,
                 "Ray to restart the agent's actor and the actor to start a new agent", interval_s=1)
        wait_for(lambda: post(token).headers.get("x-model-version") == "1", 180,
                 "the restarted agent to follow the alias back to v1", interval_s=0.5)
        assert not (folder / "logs" / "supervisor.log").exists(), "the orphaned agent started a local supervisor"

        # A switch interrupted between Serve's change and the spec write, made deterministic: with
        # the agent stopped, Serve is switched to v2 the way the agent's update does it, and the
        # spec write never comes (what a killed agent leaves: Serve at v2, the folder at v1). The
        # alias then moves to v2 (what the agent was following), so the registry asks for what Serve
        # runs and only the folder is behind. The agent started again (as Ray's restart of its actor
        # does) records the switch Serve took, as resumed; without that it would see the folder
        # behind the alias and make an update of its own (an `updated` event not marked resumed).
        # (No rollout back to v1: each costs a replica start.)
        store = StateStore(env.home)
        wait_for(lambda: store.read_spec(name).model.model_version == "1", 60, "the follow back recorded",
                 interval_s=0.5)
        engine._stop_agent(name)
        stored = store.read_spec(name)
        v2 = dataclasses.replace(resolve_model_uri(f"models:/{registry.model}/2", client),
                                 requested_uri=stored.model.requested_uri)
        paths = store.paths(name)
        engine._deploy(stored.replace(model=v2, updated_at=time.time()), paths.models, str(paths.capture),
                       engine._token_hash(name), 300)
        assert post(token).headers["x-model-version"] == "2" and store.read_spec(name) == stored
        client.set_registered_model_alias(registry.model, alias, "2")
        updates_before = len([e for e in read_history_file(history) if e["event"] == "updated"])
        engine._keep_agent(stored)
        recorded = wait_for(lambda: [e for e in read_history_file(history) if e["event"] == "updated"]
                            [updates_before:], 120, "the agent to record the interrupted switch", interval_s=0.5)
        assert [(e["event"], e["model"]["model_version"], e.get("resumed")) for e in recorded] == \
            [("updated", "2", True)], recorded
        assert store.read_spec(name).model.model_version == "2"
        assert engine._cluster_spec(name) == store.read_spec(name)  # Serve and the folder agree
        assert post(token).headers["x-model-version"] == "2"
    finally:
        _delete(name)  # in process: the CLI's delete is tested elsewhere in this file
        client.delete_registered_model_alias(registry.model, alias)
    assert name not in [view["name"] for view in _client().list_deployments()]


WEBHOOK_SECRET = "ray-webhook-secret"


@contextlib.contextmanager
def _watcher(env: Env) -> Iterator[int]:
    """`mlflow-deploy watch` (the webhook receiver) on a free port, stopped on exit; yields the port."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow-deploy"), "watch", "--port", str(port)],
                            env=env.environ(MLFLOW_DEPLOY_WEBHOOK_SECRET=WEBHOOK_SECRET), cwd=env.root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is None and requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok, 90,
                 "the webhook receiver", interval_s=0.5)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _deliver_alias_webhook(port: int, model: str, alias: str, version: str) -> None:
    """What the tracking server sends when an alias moves (``model_version_alias.created``), signed
    the way MLflow signs it (the tracking server's own sending is tested in test_lifecycle_e2e.py)."""
    from mlflow_deploy_plugin.lifecycle.webhooks import (
        DELIVERY_ID_HEADER,
        RECEIVER_PATH,
        SIGNATURE_HEADER,
        TIMESTAMP_HEADER,
        sign_delivery,
    )

    body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "2026-01-01T00:00:00Z",
                       "data": {"name": model, "alias": alias, "version": version}}).encode()
    delivery, stamp = str(uuid.uuid4()), str(int(time.time()))
    response = requests.post(f"http://127.0.0.1:{port}{RECEIVER_PATH}", data=body, timeout=30, headers={
        "Content-Type": "application/json", DELIVERY_ID_HEADER: delivery, TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign_delivery(WEBHOOK_SECRET, delivery, stamp, body)})
    assert response.status_code == 200, response.text


def _v2_infer_matches_invocations(url: str, registry: Registry, headers: dict[str, str],
                                  invocations: requests.Response) -> None:
    """Triton's `tritonclient.http` against the deployment's V2 routes answers what /invocations
    answered for the same rows (``invocations``: the answer to ``registry.features.iloc[:2]``)."""
    import numpy as np
    import tritonclient.http as tritonhttp

    rows = registry.features.iloc[:2].to_numpy(dtype=np.float64)
    triton = tritonhttp.InferenceServerClient(url=url.split("://", 1)[1], network_timeout=60.0)
    try:
        assert triton.is_server_ready(headers=headers)
        tensor = tritonhttp.InferInput("input-1", list(rows.shape), "FP64")
        tensor.set_data_from_numpy(rows, binary_data=True)
        result = triton.infer(registry.model, [tensor], headers=headers,
                              outputs=[tritonhttp.InferRequestedOutput("output-1", binary_data=True)])
        assert result.get_response()["model_version"] == invocations.headers["x-model-version"]
        assert result.as_numpy("output-1").reshape(-1).tolist() == invocations.json()["predictions"]
    finally:
        triton.close()


def _view(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


@pytest.fixture(scope="module")
def shared(env: Env, registry: Registry, ray_cluster: str) -> Iterator[str]:
    """One deployment (v1, with v2 as its shadow) for the tests that only read from it: a Ray
    deployment's start is the cost. The last of them (the second machine's) deletes it; this deletes
    it too (in process) if that one did not run."""
    name = "ray-shared"
    env.cli("create", "-t", RAY, "--name", name, "-m", f"models:/{registry.model}/1", "-C", "num_cpus=0.5",
            "-C", f"shadow=models:/{registry.model}/2")
    try:
        yield name
    finally:
        _delete(name)


def test_a_shadow_on_ray_gets_a_copy_of_each_request_and_answers_nobody(
        env: Env, registry: Registry, shared: str) -> None:
    """Every replica mirrors the requests it answered to the shadow version after the answer: the
    client gets the primary's answer, and both versions' rows are captured under the request's id,
    the shadow's with role `shadow` (so the pairs join exactly)."""
    view = _client().get_deployment(shared)
    # Serve hands the replica 2 x max_queue requests at once (not its own default of 5).
    assert get_engine(RAY, StateStore(env.home)).status(shared).details["max_ongoing_requests"] == 512
    assert view["shadow"].startswith(f"v2 (models:/{registry.model}/2)"), view["shadow"]
    rows = registry.features.iloc[10:13]
    answer = requests.post(f"{view['url']}/invocations", json=split_payload(rows), timeout=30)
    assert answer.status_code == 200 and answer.headers["x-model-version"] == "1", answer.text
    request_id, capture = answer.headers["x-request-id"], str(env.home / "deployments" / shared / "capture")

    def captured() -> list[tuple[str, str]]:
        frame = read_capture(capture, shadow=True)
        frame = frame[frame["_request_id"] == request_id]
        return sorted(zip(frame["_role"], frame["_model_version"], strict=True))

    wait_for(lambda: captured() == [("primary", "1")] * 3 + [("shadow", "2")] * 3, 60,
             "the primary's and the shadow's rows of the request in the capture", interval_s=0.5)
    served = read_capture(capture)  # what drift and quality read: the answers clients got
    assert set(served[served["_request_id"] == request_id]["_model_version"]) == {"1"}

    # The shadow predicts in a process of its own beside the replica, as beside a local worker: in the
    # replica's process it held the GIL the replica serves with, and a shadow that crashed its
    # process took the primary's replica with it. Killed (kill -9), it is replaced and written to the
    # history (so -C notify hears of it); the primary answers every request all along.
    replica = get_engine(RAY, StateStore(env.home)).status(shared).details["worker_pids"][0]
    children = _shadow_children(replica)
    assert len(children) == 1, f"no shadow process beside replica {replica} (the shadow ran in the replica)"
    history = env.home / "deployments" / shared / "history.jsonl"
    os.kill(children[0], signal.SIGKILL)
    answers = []
    for index in range(20):
        reply = requests.post(f"{view['url']}/invocations", json=split_payload(registry.features.iloc[index:index + 1]),
                              timeout=30)
        answers.append((reply.status_code, reply.headers.get("x-model-version")))
    assert answers == [(200, "1")] * 20, answers
    wait_for(lambda: {"shadow_crashed", "shadow_recovered"} <= {e["event"] for e in read_history_file(history)}, 120,
             "shadow_crashed and shadow_recovered in the history", interval_s=1.0)
    crashed = next(e for e in read_history_file(history) if e["event"] == "shadow_crashed")
    assert crashed["shadow_pid"] == children[0] and crashed["model"]["model_version"] == "2", crashed
    assert _shadow_children(replica) not in ([], children)
    after = requests.post(f"{view['url']}/invocations", json=split_payload(rows), timeout=30)
    request_id = after.headers["x-request-id"]
    wait_for(lambda: captured() == [("primary", "1")] * 3 + [("shadow", "2")] * 3, 60,
             "the pair of a request answered after the shadow was replaced", interval_s=0.5)

    # `mlflow-deploy shadow report` (in process, no MLflow run) pairs what Ray captured, and its
    # verdict is a gauge on the replicas' /metrics.
    from datetime import UTC, datetime, timedelta

    from mlflow_deploy_plugin.monitoring.shadow_report import run_shadow_report

    def pairs() -> int:
        frame = read_capture(capture, shadow=True)
        roles = frame.groupby("_role")["_request_id"].apply(set)
        return len(roles["shadow"] & roles["primary"])

    before = pairs()
    report = run_shadow_report(shared, datetime.now(UTC) - timedelta(hours=1), store=StateStore(env.home),
                               log_to_mlflow=False).comparison
    assert before <= report.requests <= pairs() and report.shadow_version == "2", report
    gauge = f'mlflow_deploy_shadow_agreement{{deployment="{shared}",model_version="2"}}'
    wait_for(lambda: gauge in requests.get(f"{view['url']}/metrics", timeout=30).text, 30,
             "the shadow verdict's gauge on /metrics")


def _shadow_children(pid: int) -> list[int]:
    """The shadow processes whose parent is process ``pid`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"shadow_process" in cmdline:
            found.append(int(entry.name))
    return found


def test_a_second_machine_sees_and_deletes_deployments_through_the_cluster(
        env: Env, registry: Registry, shared: str, tmp_path: Path) -> None:
    """The second machine: same cluster (RAY_ADDRESS) and registry, an empty state home of its own.
    Its `list`, `get` and `delete` go through the real CLI; the other calls, on either machine, in
    process (the same client code, without a CLI's imports each)."""
    name = shared
    other_home = tmp_path / "other-home"
    other = env.environ(MLFLOW_DEPLOY_HOME=str(other_home))
    listed = env.cli("list", "-t", RAY, env=other).stdout
    assert name in listed and "'status': 'running'" in listed and "'model_version': '1'" in listed, listed
    mine, theirs = _client().get_deployment(name), _view(env.cli("get", "-t", RAY, "--name", name, env=other).stdout)
    for key in ("status", "url", "model_uri", "model_name", "model_version", "traffic", "shadow", "created_from"):
        assert theirs[key] == str(mine[key]), key
    assert theirs["created_from"].endswith(f":{env.home}")  # where its history and capture live
    assert len(ast.literal_eval(theirs["replicas"])) == 1
    theirs_client = _client(other_home)
    assert len(theirs_client.predict(name, registry.features.iloc[:2])["predictions"]) == 2

    # Changes stay with the machine whose folder keeps the history and capture: said, not done.
    with pytest.raises(MlflowException, match="was created from"):
        theirs_client.update_deployment(name, model_uri=f"models:/{registry.model}/2")
    assert _client().get_deployment(name)["model_version"] == "1"
    assert not (other_home / "deployments" / name).exists()  # nothing written there

    # Delete works from either machine; the creating one then shows it stopped until it deletes too.
    env.cli("delete", "-t", RAY, "--name", name, env=other)
    assert name not in [view["name"] for view in theirs_client.list_deployments()]
    assert _client().get_deployment(name)["status"] == "stopped"
    with pytest.raises(MlflowException) as gone:
        theirs_client.get_deployment(name)
    assert gone.value.error_code == "RESOURCE_DOES_NOT_EXIST", gone.value
    _client().delete_deployment(name)
    assert name not in [view["name"] for view in _client().list_deployments()]


def _run_local_exit_s() -> float:
    """How long a run-local may take to exit after Ctrl-C: its own bounds (the wait for Serve to
    delete the application, then the exit watchdog and its backstop) and a margin for two busy
    cores. Past it, the bounds failed: the process is asked where each thread is (SIGUSR1)."""
    from mlflow_deploy_plugin.engines.ray.shutdown import foreground_exit_budget_s
    from mlflow_deploy_plugin.spec import DeploymentConfig

    return foreground_exit_budget_s(DeploymentConfig()) + EXIT_GRACE_S + BACKSTOP_S + 30


@contextlib.contextmanager
def _run_local(env: Env, registry: Registry, name: str) -> Iterator[tuple[subprocess.Popen[str], list[str], str]]:
    """`mlflow deployments run-local -t lifecycle:/ray` serving model version 1 as ``name``: the
    process, its output lines (stdout and stderr, as they come) and the URL it serves at."""
    # Ctrl-C as in a terminal: a process started in the background by a non-interactive shell (a CI
    # script, `pytest ... &`) inherits SIGINT ignored, so the child puts its default handler back.
    ctrl_c_works = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", ctrl_c_works, str(Path(sys.executable).parent / "mlflow"), "deployments", "run-local",
         "-t", RAY, "--name", name, "-m", f"models:/{registry.model}/1", "-C", "num_cpus=0.5"],
        env=env.environ(), cwd=env.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        ready = wait_for(lambda: [line for line in lines if line.startswith("Serving ")] or proc.poll() is not None,
                         300, "run-local to serve", interval_s=0.5)
        assert ready is not True and proc.poll() is None, "".join(lines[-30:])
        url = ready[0].split(" at ", 1)[1].split(" - ", 1)[0]
        yield proc, lines, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)


def _exit_code(proc: subprocess.Popen[str], lines: list[str], timeout_s: float, what: str) -> int:
    """``proc``'s exit code once it exits within ``timeout_s``; else an AssertionError with its output
    since it started serving and where each of its threads was (SIGUSR1: run-local dumps its stacks)."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    before = len(lines)
    proc.send_signal(signal.SIGUSR1)
    counted = [before]

    def dumped() -> bool:  # the dump began and stopped growing (it arrives in pieces)
        grew, counted[0] = len(lines) != counted[0], len(lines)
        return not grew and any("most recent call first" in line for line in lines[before:])

    with contextlib.suppress(AssertionError):  # whatever arrived is shown, dump or not
        wait_for(dumped, 30, "the stack dump", interval_s=1.0)
    served = next((i for i, line in enumerate(lines) if line.startswith("Serving ")), 0)
    raise AssertionError(f"run-local still runs {timeout_s:.0f} s after {what}; its output since it served, then "
                         f"its threads' stacks (SIGUSR1):\n" + "".join(lines[served:]))


def test_run_local_on_ray_serves_on_the_cluster_until_interrupted(
        env: Env, registry: Registry, ray_cluster: str) -> None:
    """`mlflow deployments run-local -t lifecycle:/ray` serves on the cluster (Serve's proxy) in the
    foreground, and Ctrl-C deletes the application: nothing is left on the cluster or in the state home."""
    name = "ray-run-local"
    with _run_local(env, registry, name) as (proc, lines, url):
        assert url.endswith(f"/{name}"), url  # Serve's route for it (a local run serves at a port's root)
        answer = requests.post(f"{url}/invocations", json=split_payload(registry.features.iloc[:2]), timeout=30)
        assert answer.status_code == 200 and answer.headers["x-model-version"] == "1", answer.text
        assert name in [view["name"] for view in _client().list_deployments()]  # on the cluster, like any other
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the application is deleted (its replicas drain), then it exits
        code = _exit_code(proc, lines, _run_local_exit_s(), "Ctrl-C")
        assert code == 0, "".join(lines[-30:])
        assert any(line.startswith("Stopping: deleting the Serve application") for line in lines), lines[-30:]
    assert requests.get(f"{url}/ping", timeout=10).status_code == 404  # the route is gone with the app
    assert name not in [view["name"] for view in _client().list_deployments()]
    assert not (env.home / "deployments" / name).exists()


def test_a_second_ctrl_c_ends_run_local_while_serves_controller_is_stuck(
        env: Env, registry: Registry, ray_cluster: str) -> None:
    """With Serve's controller stopped (SIGSTOP: a controller that never answers), the first Ctrl-C's
    delete waits on it; a second Ctrl-C ends run-local at once, non-zero, naming what may be left on
    the cluster and the command that removes it. That command, the controller still stopped, fails
    within its bound (TEMPORARILY_UNAVAILABLE, saying what did not answer) instead of hanging; once
    the controller goes on, the same command removes the application and its metrics actor.

    Here rather than in a test of its own: this is the state a user meets the stuck controller in,
    and a second run-local on the cluster would cost another minute of replica start-up."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    from mlflow_deploy_plugin.engines.ray.engine import RAY_CALL_S
    from mlflow_deploy_plugin.engines.ray.metrics_hub import find_hub

    name = "ray-run-local-stuck"
    try:
        with _run_local(env, registry, name) as (proc, lines, url):
            assert name in [view["name"] for view in _client().list_deployments()]  # joins this process to the cluster
            controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
            controller_pid = ray.get(controller.get_pid.remote(), timeout=60)
            os.kill(controller_pid, signal.SIGSTOP)
            try:
                proc.send_signal(signal.SIGINT)
                wait_for(lambda: any(line.startswith("Stopping: deleting") for line in lines) or proc.poll() is not None,
                         120, "run-local to start deleting", interval_s=0.2)
                assert proc.poll() is None, "".join(lines[-30:])  # it cannot be done: the controller never answered
                # Where it waits, as a test whose run-local hangs asks it (_exit_code): in the bounded delete.
                before = len(lines)
                proc.send_signal(signal.SIGUSR1)
                wait_for(lambda: any(line.rstrip().endswith(" in _leave_foreground") for line in lines[before:]), 60,
                         "run-local's stack dump on SIGUSR1", interval_s=0.2)
                assert proc.poll() is None, "".join(lines[before:])  # a dump, not an end
                proc.send_signal(signal.SIGINT)  # the second Ctrl-C
                # At once: the exit watchdog's grace is the longest the process may take after it.
                code = _exit_code(proc, lines, EXIT_GRACE_S + BACKSTOP_S + 30, "the second Ctrl-C")
                # The command it names, run at once: its read of Serve's state waits at most its bound.
                stuck = env.cli("delete", "-t", RAY, "--name", name, check=False, env=env.environ(RAY_ADDRESS=ray_cluster))
            finally:
                os.kill(controller_pid, signal.SIGCONT)
            output = "".join(lines)
            assert code == 1, output[-3000:]
            address = ray_cluster
            assert "run-local: interrupted while" in output and "may still be on the Ray cluster" in output, output[-3000:]
            assert f"remove them with: RAY_ADDRESS={address} mlflow deployments delete -t lifecycle:/ray --name {name}" \
                   in output, output[-3000:]
        assert stuck.returncode != 0, stuck.stdout + stuck.stderr
        assert "TEMPORARILY_UNAVAILABLE: The Ray cluster at " in stuck.stderr, stuck.stderr[-3000:]
        assert f"did not answer within {RAY_CALL_S:g}s while reading Serve's applications from its controller" \
               in stuck.stderr, stuck.stderr[-3000:]
        assert "retry the command once they answer" in stuck.stderr, stuck.stderr[-3000:]
        # The controller going on, the same command removes what is left: the application (not deleted
        # two minutes after SIGCONT when this was written: run-local's request, from a driver that has
        # exited, was not carried out), or, had Serve deleted it meanwhile, what its replicas left as they
        # shut down (their last metrics push).
        env.cli("delete", "-t", RAY, "--name", name, env=env.environ(RAY_ADDRESS=address))
        wait_for(lambda: name not in [view["name"] for view in _client().list_deployments()], 120,
                 "the application to be gone")
        wait_for(lambda: requests.get(f"{url}/ping", timeout=10).status_code == 404, 60, "its route to be gone")
        assert find_hub(name) is None  # removed after the application was gone (no replica pushes again)
    finally:  # a failed assertion leaves no application on the session's cluster for the next tests
        if name in [view["name"] for view in _client().list_deployments()]:
            env.cli("delete", "-t", RAY, "--name", name, check=False, env=env.environ(RAY_ADDRESS=ray_cluster))


def test_run_locals_way_out_says_what_is_left_once_its_budget_passes(
        ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """The engine's way out of a foreground run, in this process, with Serve's controller stopped
    (SIGSTOP): past its budget it gives up waiting, says on stderr what may be left on the cluster
    and the command that removes it, and returns that (run-local then exits non-zero). When Serve
    finishes that delete itself later, the metrics actor is all that is left: the command it names
    finds no deployment of that name, here or on the cluster, and removes the actor, saying so."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    from mlflow_deploy_plugin.engines.ray.engine import RayEngine
    from mlflow_deploy_plugin.engines.ray.metrics_hub import find_hub, get_hub

    engine = RayEngine(StateStore(tmp_path / "home"))
    engine._connect(ray_cluster)
    controller_pid = ray.get(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE).get_pid.remote(),
                             timeout=60)
    name = "never-deployed"  # nothing to delete: the controller never answers whether it is gone
    os.kill(controller_pid, signal.SIGSTOP)
    try:
        left = engine._leave_foreground(name, 2.0)
    finally:
        os.kill(controller_pid, signal.SIGCONT)
    assert left is not None
    # Which step was waiting depends on whether this process had Serve's client yet (making one asks
    # the controller): either way, the budget ended it.
    assert left.startswith("run-local: ") and "did not finish within 2s" in left, left
    assert f"remove them with: RAY_ADDRESS={ray_cluster} mlflow deployments delete -t lifecycle:/ray --name {name}" \
           in left, left
    assert left in capsys.readouterr().err
    # The controller answers again once resumed (the calls left waiting on it were answered too).
    assert name not in [view["name"] for view in _client().list_deployments()]

    get_hub(name)  # what the replicas' last push leaves when Serve has deleted their application
    wait_for(lambda: find_hub(name) is not None, 60, "the metrics actor to exist")
    with caplog.at_level(logging.WARNING, logger="mlflow_deploy_plugin.deployments"):
        _client().delete_deployment(name)  # the delete the message names (its CLI runs this, in process here)
    assert find_hub(name) is None
    assert f"removed what was left of it: the metrics actor 'metrics:{name}'" in caplog.text, caplog.text
