"""The Ray engine's view of its replicas' ends, in process (no cluster): how long Serve lets a retiring
replica finish.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")

from mlflow_deploy_plugin.config import parse_config  # noqa: E402
from mlflow_deploy_plugin.engines.ray import ingress, shutdown  # noqa: E402
from mlflow_deploy_plugin.engines.ray.engine import RayEngine  # noqa: E402
from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef  # noqa: E402
from mlflow_deploy_plugin.state import StateStore  # noqa: E402


def test_a_retiring_replica_has_until_every_request_it_holds_is_answered_and_its_capture_flushed() -> None:
    """graceful_shutdown_timeout_s covers: one drain poll, timeout_s (every request it holds is
    answered by then, 504 at worst: test_load_shedding shows a held model cannot delay it), what
    timeout_s does not cover, and the destructor's own bounds. Neither max_ongoing_requests nor the
    batch size enters it: the queue's wait is inside timeout_s."""
    config = parse_config({"timeout_s": "60"})
    bound = shutdown.graceful_shutdown_timeout_s(config)
    assert ingress.DESTRUCTOR_S >= ingress.CAPTURE_CLOSE_S + 1 + ingress.METRICS_CLOSE_S  # the writer joins 1 s longer
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
