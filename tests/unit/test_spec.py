"""The typed deployment spec: round trip, defaults, files written by older versions, bad values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlflow_deploy_plugin.config import CONFIG_KEYS, parse_config
from mlflow_deploy_plugin.spec import (
    SCHEMA_VERSION,
    DeploymentConfig,
    DeploymentSpec,
    ModelRef,
    SpecError,
    TrafficShare,
    load_spec,
)
from mlflow_deploy_plugin.state import StateStore

CHAMPION = ModelRef("models:/churn@champion", "churn", "3", "run1", "models:/m-abc")

# A deployment.json as the code before the typed spec wrote it (no schema_version).
SCHEMA_0 = {
    "name": "churn", "flavor": "python_function", "engine": "local", "generation": 4,
    "model": {"requested_uri": "models:/churn@champion", "model_name": "churn", "model_version": "3",
              "run_id": "run1", "source": "models:/m-abc", "version_uri": "models:/churn/3"},
    "config": {"port": 5001, "host": "127.0.0.1", "workers": 2, "timeout_s": 60.0, "max_body_mb": 32.0,
               "auth_token_env": None, "max_batch_rows": 4096, "startup_timeout_s": 180.0, "max_restarts": 5,
               "warm_standby": True, "poll_interval_s": 10.0, "policy": None, "capture": True,
               "capture_sample_rate": 1.0, "capture_retention_days": None, "capture_uri": None,
               "reference_data": None, "drift_min_rows": 200, "drift_methods": None,
               "drift_schedule": "*/5 * * * *", "drift_experiment": None},
    "traffic": [{"model": {"requested_uri": "models:/churn@champion", "model_name": "churn",
                           "model_version": "3", "run_id": None, "source": "", "version_uri": "models:/churn/3"},
                 "percent": 90.0},
                {"model": {"requested_uri": "models:/churn@champion", "model_name": "churn",
                           "model_version": "4", "run_id": None, "source": "", "version_uri": "models:/churn/4"},
                 "percent": 10.0}],
    "tracking_uri": "sqlite:///mlflow.db", "created_at": 1700000000.0, "updated_at": 1700000100.5,
}


def test_round_trip_through_the_store(tmp_path: Path) -> None:
    spec = DeploymentSpec("churn", CHAMPION, parse_config({"workers": "2", "drift_schedule": "*/5 * * * *"}),
                          traffic=(TrafficShare(CHAMPION, 90.0),
                                   TrafficShare(ModelRef(CHAMPION.requested_uri, "churn", "4"), 10.0)),
                          tracking_uri="sqlite:///x.db", created_at=1.0, updated_at=2.0)
    store = StateStore(tmp_path)
    store.write_spec(spec)
    assert store.read_spec("churn") == spec
    on_disk = json.loads(store.paths("churn").spec.read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION
    assert on_disk["model"]["version_uri"] == "models:/churn/3"


def test_defaults_live_in_one_place() -> None:
    spec = DeploymentSpec("d", CHAMPION)
    assert spec.config == DeploymentConfig() == parse_config({})
    for key in CONFIG_KEYS:
        assert getattr(spec.config, key.name) == key.default, key.name
    assert spec.shares() == [TrafficShare(CHAMPION, 100.0)]
    assert spec.served_versions() == {("churn", "3")}


def test_files_written_before_the_schema_version_still_load(tmp_path: Path) -> None:
    path = tmp_path / "deployment.json"
    path.write_text(json.dumps(SCHEMA_0))
    spec = load_spec(path)
    assert spec is not None
    assert (spec.name, spec.generation, spec.config.workers, spec.config.port) == ("churn", 4, 2, 5001)
    assert spec.model == CHAMPION
    assert [(s.model.model_version, s.percent) for s in spec.shares()] == [("3", 90.0), ("4", 10.0)]
    assert spec.served_versions() == {("churn", "3"), ("churn", "4")}
    # Saving it again writes the current schema and nothing is lost.
    assert DeploymentSpec.from_dict(spec.to_dict()) == spec


def test_minimal_old_file_gets_the_defaults() -> None:
    spec = DeploymentSpec.from_dict({"name": "d", "model": SCHEMA_0["model"], "config": {"workers": 3}})
    assert spec.config.workers == 3 and spec.config.timeout_s == 60.0 and spec.traffic == ()


def test_int_where_a_float_is_expected_is_accepted() -> None:
    spec = DeploymentSpec.from_dict(dict(SCHEMA_0, config={"timeout_s": 5}, created_at=1700000000))
    assert spec.config.timeout_s == 5.0 and isinstance(spec.config.timeout_s, float)


@pytest.mark.parametrize(("change", "message"), [
    ({"config": {"workers": "two"}}, "config.workers='two' should be int"),
    ({"config": {"capture": "yes"}}, "config.capture='yes' should be bool"),
    ({"config": {"workers": True}}, "config.workers=True should be int"),
    ({"model": {"model_name": "churn"}}, "model lacks requested_uri, model_version"),
    ({"model": None}, "model should be an object"),
    ({"name": ""}, "name is missing"),
    ({"traffic": [{"model": SCHEMA_0["model"], "percent": 150}]}, "traffic[0].percent=150.0 should be from 0 to 100"),
    ({"schema_version": SCHEMA_VERSION + 1}, "newer than this mlflow-deploy-plugin understands"),
])
def test_bad_values_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        DeploymentSpec.from_dict(dict(SCHEMA_0, **change))
    assert message in str(info.value)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "deployment.json"
    path.write_text("{not json")
    with pytest.raises(SpecError, match=str(path)):
        load_spec(path)
    assert load_spec(tmp_path / "missing.json") is None


def test_unknown_config_keys_from_a_newer_version_are_ignored() -> None:
    spec = DeploymentSpec.from_dict(dict(SCHEMA_0, config=dict(SCHEMA_0["config"], future_key=1)))
    assert spec.config.workers == 2


@pytest.mark.parametrize(("uri", "floating"), [
    ("models:/m/3", False), ("models:/m@champion", True), ("models:/m/Production", True), ("models:/m/latest", True),
])
def test_floating_references(uri: str, floating: bool) -> None:
    assert ModelRef(uri, "m", "3").is_floating is floating


def test_a_torn_history_line_is_skipped_and_never_glued_to_the_next_event(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    store = StateStore(tmp_path)
    store.append_history("churn", "created", reason="create")
    with open(store.paths("churn").history, "a") as handle:
        handle.write('{"time": 1, "event": "upda')  # a crash mid-write
    store.append_history("churn", "updated", reason="after the crash")
    with caplog.at_level("WARNING"):
        events = store.read_history("churn")
    assert [e["event"] for e in events] == ["created", "updated"]
    assert "Skipping unreadable line 2" in caplog.text


def test_history_writers_take_turns(tmp_path: Path) -> None:
    """An append waits while another writer holds the history file (its torn-line check and its write
    must see the same end of file), and goes through once that writer is done."""
    import fcntl
    import os
    import threading

    store = StateStore(tmp_path)
    store.append_history("churn", "created", reason="create")
    path = store.paths("churn").history
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b'{"time": 1, "event": "upda')  # another writer, mid-line
        writer = threading.Thread(target=store.append_history, args=("churn", "updated"), daemon=True)
        writer.start()
        writer.join(timeout=1.0)
        assert writer.is_alive(), "an append went through while another writer held the history file"
        os.write(fd, b'ted"}\n')  # that writer finishes its line
    finally:
        os.close(fd)  # releases the lock
    writer.join(timeout=30)
    assert not writer.is_alive()
    assert [e["event"] for e in store.read_history("churn")] == ["created", "updated", "updated"]
