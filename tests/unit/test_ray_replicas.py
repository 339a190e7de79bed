"""The Ray engine's view of its replicas' ends, in process (no cluster): how long Serve lets a retiring
replica finish, and which dead replicas count as restarts.

The actor table entries are built by Ray's own parser (``GlobalState._gen_actor_info``) from the
protobuf the GCS keeps, with the death causes the GCS records: ``ray.kill`` (how Serve ends every
replica it stops), a worker process that died (``kill -9``), a node lost, the OOM killer.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")

from ray._private.state import GlobalState  # noqa: E402
from ray.core.generated import common_pb2, gcs_pb2  # noqa: E402

from mlflow_deploy_plugin.config import parse_config  # noqa: E402
from mlflow_deploy_plugin.engines.ray import ingress, shutdown  # noqa: E402
from mlflow_deploy_plugin.engines.ray.engine import RayEngine  # noqa: E402
from mlflow_deploy_plugin.engines.ray.replica_deaths import (  # noqa: E402
    KNOWN_LIMIT,
    RETIRED,
    UNKNOWN,
    death_of,
    replica_deaths,
    unexpected,
)
from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef  # noqa: E402
from mlflow_deploy_plugin.state import StateStore  # noqa: E402

Died = common_pb2.ActorDiedErrorContext
KILLED_BY_RAY_KILL = "The actor is dead because it was killed by `ray.kill`."


def actor_entry(actor_id: str, state: str = "DEAD", **cause: Any) -> dict[str, Any]:
    """An actor table entry as ``ray._private.state.actors(actor_id)`` returns it."""
    data = gcs_pb2.ActorTableData(actor_id=bytes.fromhex(actor_id), state=gcs_pb2.ActorTableData.ActorState.Value(state),
                                  death_cause=common_pb2.ActorDeathCause(**cause))
    return GlobalState()._gen_actor_info(data)


def killed(reason: int, message: str = "") -> dict[str, Any]:
    return {"actor_died_error_context": Died(reason=reason, error_message=message)}


def test_serve_retiring_a_replica_is_no_restart_a_crash_is() -> None:
    """A rolling update of two replicas retires two (Serve's ray.kill): restarts stays 0. A replica
    whose process was killed, whose node died, or that the OOM killer took, counts."""
    assert death_of(actor_entry("01" * 16, **killed(Died.RAY_KILL, KILLED_BY_RAY_KILL))) == RETIRED
    assert death_of(actor_entry("01" * 16, **killed(Died.UNSPECIFIED, KILLED_BY_RAY_KILL))) == RETIRED
    assert death_of(actor_entry("02" * 16, **killed(Died.WORKER_DIED, "worker process exited"))) == "worker_died"
    assert death_of(actor_entry("03" * 16, **killed(Died.NODE_DIED))) == "node_died"
    assert death_of(actor_entry("04" * 16, oom_context=common_pb2.OomContext(error_message="OOM"))) == "out_of_memory"
    # Serve lists a replica as dead as it sends the kill: until the GCS has it dead, nothing is known.
    assert death_of(actor_entry("05" * 16, state="ALIVE")) == UNKNOWN
    assert death_of(actor_entry("06" * 16)) == UNKNOWN  # dead, no cause recorded
    assert death_of(None) == UNKNOWN and death_of({}) == UNKNOWN  # not in the actor table

    # Serve's recent_dead_replicas after an update (two retired) and a kill -9 of one replica.
    table = {"aa" * 16: actor_entry("aa" * 16, **killed(Died.RAY_KILL, KILLED_BY_RAY_KILL)),
             "bb" * 16: actor_entry("bb" * 16, **killed(Died.RAY_KILL, KILLED_BY_RAY_KILL)),
             "cc" * 16: actor_entry("cc" * 16, **killed(Died.WORKER_DIED))}
    dead = [{"replica_id": "r1", "actor_id": "aa" * 16, "pid": 11, "state": "STOPPED"},
            {"replica_id": "r2", "actor_id": "bb" * 16, "pid": 12, "state": "STOPPED"}]
    after_update = replica_deaths(dead, table.get)
    assert unexpected(after_update) == 0
    assert [death["cause"] for death in after_update] == [RETIRED, RETIRED]
    dead.append({"replica_id": "r3", "actor_id": "cc" * 16, "pid": 13, "state": "STOPPED"})
    after_kill = replica_deaths(dead, table.get)
    assert unexpected(after_kill) == 1
    assert after_kill[-1] == {"replica_id": "r3", "pid": 13, "cause": "worker_died"}


def test_a_death_the_cluster_cannot_explain_is_not_counted_and_never_fails_get() -> None:
    def unreachable(actor_id: str) -> dict[str, Any] | None:
        raise ConnectionError("GCS unavailable")

    dead = [{"replica_id": "r1", "actor_id": "aa" * 16, "pid": 11}, {"replica_id": "r2", "pid": None}]
    deaths = replica_deaths(dead, unreachable)
    assert [death["cause"] for death in deaths] == [UNKNOWN, UNKNOWN] and unexpected(deaths) == 0


def test_a_dead_actors_cause_is_read_from_the_cluster_once() -> None:
    """Every status (each `get`, each of the agent's passes) lists Serve's dead replicas: a cause the
    actor table gave is remembered by actor id (it never changes); one not known yet is asked again."""
    table = {"aa" * 16: actor_entry("aa" * 16, **killed(Died.RAY_KILL, KILLED_BY_RAY_KILL)),
             "bb" * 16: actor_entry("bb" * 16, **killed(Died.WORKER_DIED)),
             "cc" * 16: actor_entry("cc" * 16, state="ALIVE")}  # Serve's kill not landed yet
    asked: list[str] = []

    def actor_table(actor_id: str) -> dict[str, Any] | None:
        asked.append(actor_id)
        return table.get(actor_id)

    dead = [{"replica_id": f"r{i}", "actor_id": actor_id, "pid": i} for i, actor_id in enumerate(table)]
    known: dict[str, str] = {}
    first = replica_deaths(dead, actor_table, known)
    assert [death["cause"] for death in first] == [RETIRED, "worker_died", UNKNOWN] and len(asked) == 3
    asked.clear()
    table["cc" * 16] = actor_entry("cc" * 16, **killed(Died.RAY_KILL, KILLED_BY_RAY_KILL))
    again = replica_deaths(dead, actor_table, known)
    assert asked == ["cc" * 16], "only the replica whose end was not known yet is read again"
    assert [death["cause"] for death in again] == [RETIRED, "worker_died", RETIRED] and unexpected(again) == 1
    asked.clear()
    assert replica_deaths(dead, actor_table, known) == again and asked == []
    # Bounded: the oldest causes go first (their replicas left Serve's list of 10 long before).
    many = [{"replica_id": "r", "actor_id": f"{i:032x}"} for i in range(KNOWN_LIMIT + 5)]
    replica_deaths(many, lambda actor_id: actor_entry(actor_id, **killed(Died.WORKER_DIED)), known)
    assert len(known) == KNOWN_LIMIT and f"{KNOWN_LIMIT + 4:032x}" in known and "aa" * 16 not in known


def test_the_url_is_the_proxys_address_and_the_route(tmp_path: Path) -> None:
    """What `status().url` and the cheaper `url()` both give (no replica deaths read for it)."""
    app = {"route_prefix": "/dep", "deployments": {ingress.INGRESS_NAME: {"replicas": [
        {"state": "STARTING", "node_ip": "10.0.0.9"}, {"state": "RUNNING", "node_ip": "10.0.0.7"}]}}}
    assert RayEngine._url("dep", app, {"host": "127.0.0.1", "port": 8123}) == "http://127.0.0.1:8123/dep"
    assert RayEngine._url("dep", app, {"host": "0.0.0.0"}) == "http://10.0.0.7:8000/dep"  # a serving replica's node
    assert RayEngine._url("dep", {}, {}) == "http://127.0.0.1:8000/dep"


def test_status_is_built_from_one_read_of_serves_details(tmp_path: Path) -> None:
    """`status` reads Serve's details once: the application and the proxy's http_options come from
    that one read (they were read twice, a controller round trip each). Built here from a recorded
    details object; a second read of them fails the test (whatever cluster this process joined
    before: the test runs in any order)."""
    spec = DeploymentSpec(name="dep", model=ModelRef("models:/m/3", "m", "3"), engine="ray", created_at=1.0,
                          updated_at=2.0, config=parse_config({}))
    details = {  # the shape of ServeController.get_serve_details() (Ray 2.60), trimmed
        "http_options": {"host": "127.0.0.1", "port": 8123},
        "applications": {"dep": {
            "name": "dep", "route_prefix": "/dep", "status": "RUNNING", "message": "",
            "last_deployed_time_s": 1700000000.0,
            "deployments": {ingress.INGRESS_NAME: {
                "status": "HEALTHY", "target_num_replicas": 2,
                "deployment_config": {"max_ongoing_requests": 512, "user_config": {"spec": spec.to_dict()}},
                "replicas": [{"replica_id": "r1", "state": "RUNNING", "pid": 101, "node_ip": "10.0.0.7"},
                             {"replica_id": "r2", "state": "STARTING", "pid": 102, "node_ip": "10.0.0.7"}],
                "recent_dead_replicas": [{"replica_id": "r0", "actor_id": "aa" * 16, "pid": 100}]}}}}}
    engine = RayEngine(StateStore(tmp_path))
    engine._death_causes["aa" * 16] = RETIRED  # known already: no actor-table read either

    def read_again() -> dict:
        raise AssertionError("Serve's details were read again")

    engine._details = read_again  # type: ignore[method-assign]
    status = engine._to_status("dep", details["applications"]["dep"], details["http_options"])
    assert (status.state, status.healthy, status.model_version, status.restarts) == ("running", True, "3", 0)
    assert status.url == "http://127.0.0.1:8123/dep"
    assert (status.details["host"], status.details["port"]) == ("127.0.0.1", 8123)
    assert status.details["worker_pids"] == [101] and status.details["target_replicas"] == 2
    assert status.details["dead_replicas"] == [{"replica_id": "r0", "pid": 100, "cause": RETIRED}]


def test_a_retiring_replica_has_until_every_request_it_holds_is_answered_and_its_capture_flushed() -> None:
    """graceful_shutdown_timeout_s covers: one drain poll, timeout_s (every request it holds is
    answered by then, 504 at worst: test_load_shedding shows a held model cannot delay it), what
    timeout_s does not cover, and the destructor's own bounds. Neither max_ongoing_requests nor the
    batch size enters it: the queue's wait is inside timeout_s."""
    config = parse_config({"timeout_s": "60"})
    bound = shutdown.graceful_shutdown_timeout_s(config)
    # The writer joins 1 s longer; a shadow process closes first (ShadowedCapture.close: at most 15 s).
    assert ingress.DESTRUCTOR_S >= ingress.SHADOW_CLOSE_S + ingress.CAPTURE_CLOSE_S + 1 + ingress.METRICS_CLOSE_S
    assert bound == shutdown.DRAIN_POLL_S + 60 + shutdown.HANDLING_MARGIN_S + ingress.DESTRUCTOR_S
    for more in ({"max_ongoing_requests": "4096"}, {"max_queue": "2048"}, {"max_batch_rows": "1"}):
        assert shutdown.graceful_shutdown_timeout_s(parse_config({"timeout_s": "60", **more})) == bound
    assert shutdown.graceful_shutdown_timeout_s(parse_config({"timeout_s": "5"})) == bound - 55
    # The drain poll counted is the one the engine sets (Serve's default, 2 s).
    from ray.serve._private.constants import DEFAULT_GRACEFUL_SHUTDOWN_WAIT_LOOP_S

    assert shutdown.DRAIN_POLL_S == DEFAULT_GRACEFUL_SHUTDOWN_WAIT_LOOP_S


def test_the_serve_deployment_carries_the_shutdown_bound_and_the_autoscaling_target(tmp_path: Path) -> None:
    """What the engine hands Serve (the bound application, built without a cluster)."""
    engine = RayEngine(StateStore(tmp_path))
    for keys in ({"timeout_s": "10"}, {"timeout_s": "10", "max_replicas": "3"},
                 {"max_replicas": "3", "target_ongoing_requests": "8", "max_ongoing_requests": "16"}):
        config = parse_config(keys)
        spec = DeploymentSpec(name="d", model=ModelRef("models:/m/1", "m", "1"), engine="ray", created_at=1.0,
                              updated_at=1.0, config=config)
        serve_config = engine._application(spec, tmp_path / "models", str(tmp_path / "capture"),
                                           None)._bound_deployment._deployment_config
        assert serve_config.graceful_shutdown_timeout_s == shutdown.graceful_shutdown_timeout_s(config)
        assert serve_config.graceful_shutdown_wait_loop_s == shutdown.DRAIN_POLL_S
        autoscaling = serve_config.autoscaling_config
        assert (autoscaling is None) == (config.max_replicas is None)
        if autoscaling is not None:
            assert autoscaling.target_ongoing_requests == float(keys.get("target_ongoing_requests", 2))
            assert autoscaling.target_ongoing_requests <= serve_config.max_ongoing_requests


def test_a_ray_call_that_never_returns_ends_the_verb_as_temporarily_unavailable() -> None:
    """Every Ray call of the engine runs through ``bounded_ray_call``: its result or its own exception
    (a missing actor's ValueError is how a lookup says "none"), and past its budget an EngineUnavailable
    naming the cluster and what did not answer, which the target reports as TEMPORARILY_UNAVAILABLE
    (retry later) and the core's failed changes keep (not INVALID_STATE)."""
    from mlflow.exceptions import MlflowException

    from mlflow_deploy_plugin.deployments import _engine_failed
    from mlflow_deploy_plugin.engines.base import EngineError
    from mlflow_deploy_plugin.engines.ray.engine import bounded_ray_call
    from mlflow_deploy_plugin.target import _as_mlflow_errors

    assert bounded_ray_call(lambda: {"applications": {}}, "reading", 30, "127.0.0.1:6379") == {"applications": {}}
    with pytest.raises(ValueError, match="no actor"):
        bounded_ray_call(lambda: (_ for _ in ()).throw(ValueError("no actor")), "looking up", 30, None)
    never = threading.Event()
    try:
        with pytest.raises(MlflowException) as caught, _as_mlflow_errors():
            bounded_ray_call(never.wait, "reading Serve's applications from its controller", 0.3, "127.0.0.1:6379")
        assert caught.value.error_code == "TEMPORARILY_UNAVAILABLE"
        message = caught.value.message
        assert message.startswith("TEMPORARILY_UNAVAILABLE: The Ray cluster at 127.0.0.1:6379 did not answer within "
                                  "0.3s while reading Serve's applications from its controller"), message
        assert "`serve status`" in message and "retry the command" in message, message
        with pytest.raises(EngineError) as failed:  # the core's handling of a failed change still applies
            bounded_ray_call(never.wait, "handing Serve's controller the application 'dep'", 0.1, None)
        assert "The Ray cluster this process is connected to did not answer" in str(failed.value)
        assert _engine_failed(f"Update failed: {failed.value}", failed.value).error_code == "TEMPORARILY_UNAVAILABLE"
        assert _engine_failed("Update failed", EngineError("a replica crashed")).error_code == "INVALID_STATE"
    finally:
        never.set()  # the threads left behind return


def _ray_status(dead: list[tuple[str, str]], running: list[str], *, target: int = 2, healthy: bool = True) -> Any:
    """An EngineStatus as RayEngine._to_status builds it: dead replicas (id, cause), running ids."""
    from mlflow_deploy_plugin.engines.base import RUNNING, UNHEALTHY, EngineStatus

    return EngineStatus(
        state=RUNNING if healthy else UNHEALTHY, healthy=healthy,
        details={"dead_replicas": [{"replica_id": rid, "pid": 100 + i, "cause": cause} for i, (rid, cause) in enumerate(dead)],
                 "replicas": [{"replica_id": rid, "state": "RUNNING", "pid": 1} for rid in running],
                 "target_replicas": target})


def test_a_crashed_ray_replica_and_its_replacement_are_written_to_the_history(tmp_path: Path) -> None:
    """Serve replaces a replica killed with kill -9 by itself: nothing wrote it to the history, so a
    -C notify receiver never heard of a crash on Ray, nor of its end (the local engine writes
    crashed / worker_recovered). Deaths before the watch, retirements and causes not known yet are
    no events; one crash is written once, its recovery once the target count runs healthy again."""
    from mlflow_deploy_plugin.engines.ray.replica_faults import ReplicaFaults
    from mlflow_deploy_plugin.lifecycle.notify import EVENT_KINDS

    store = StateStore(tmp_path)
    clock = iter([1000.0, 1010.0, 1020.0, 1030.0, 1040.0])
    faults = ReplicaFaults(lambda event, **details: store.append_history("d", event, **details), lambda: next(clock))
    # Before the watch: an old crash is not news.
    assert faults.observe(_ray_status([("old", "worker_died")], ["a", "b"])) == []
    # An update retired two replicas (no fault); a kill -9 whose cause the GCS has not written yet.
    assert faults.observe(_ray_status([("old", "worker_died"), ("a", RETIRED), ("b", "retired"), ("c", UNKNOWN)],
                                      ["d", "e"])) == []
    # Now its cause is known; Serve is starting the replacement (one of two running).
    assert faults.observe(_ray_status([("a", RETIRED), ("b", RETIRED), ("c", "worker_died")], ["e"],
                                      healthy=False)) == ["crashed"]
    assert faults.observe(_ray_status([("a", RETIRED), ("b", RETIRED), ("c", "worker_died")], ["e"])) == []
    assert faults.observe(_ray_status([("a", RETIRED), ("b", RETIRED), ("c", "worker_died")], ["e", "f"])) == [
        "worker_recovered"]
    events = [e for e in store.read_history("d")]
    assert [e["event"] for e in events] == ["crashed", "worker_recovered"]
    crashed, recovered = events
    assert crashed["cause"] == "worker_died" and crashed["replica_id"] == "c" and crashed["restarts"] == 1
    assert "Ray replica c (pid 102) died: worker_died" in crashed["error"]
    assert recovered["fault"] == "crashed" and recovered["down_s"] == 20.0 and recovered["replicas"] == 2
    assert "crashed" in EVENT_KINDS["faults"] and "worker_recovered" in EVENT_KINDS["healed"]


def test_ray_replicas_crashing_again_and_again_are_written_once_per_five_minutes(tmp_path: Path) -> None:
    """A version that crashes at every start (Serve starts it again and again) writes one crashed
    event per 5 minutes, counting the crashes since the last one, not one per replica."""
    from mlflow_deploy_plugin.engines.ray.replica_faults import ReplicaFaults

    store = StateStore(tmp_path)
    now = [0.0]
    faults = ReplicaFaults(lambda event, **details: store.append_history("d", event, **details), lambda: now[0])
    faults.observe(_ray_status([], ["a"], target=1))
    dead: list[tuple[str, str]] = []
    for index in range(8):  # a crash every 60 s
        now[0] += 60.0
        dead.append((f"r{index}", "worker_died"))
        faults.observe(_ray_status(dead[-10:], [], target=1, healthy=False))
    crashed = [e for e in store.read_history("d") if e["event"] == "crashed"]
    assert [(e["replica_id"], e["replaced"], e["restarts"]) for e in crashed] == [("r0", 1, 1), ("r5", 5, 6)]
    now[0] += 60.0
    faults.observe(_ray_status(dead[-10:], ["new"], target=1))
    recovered = [e for e in store.read_history("d") if e["event"] == "worker_recovered"]
    assert [(e["replica_id"], e["crashes"], e["down_s"]) for e in recovered] == [("r0", 8, 480.0)]
