"""Verdicts written by report jobs become Prometheus gauges on the next scrape (in process)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mlflow_deploy_plugin.serving.metrics import ServingMetrics
from mlflow_deploy_plugin.state import StateStore
from mlflow_deploy_plugin.verdicts import read_verdicts, record_verdict


def _samples(metrics: ServingMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_verdicts_show_as_gauges_and_in_history(tmp_path: Path) -> None:
    paths = StateStore(tmp_path).paths("svc")
    paths.root.mkdir(parents=True)
    metrics = ServingMetrics(paths.root)
    assert not [k for k in _samples(metrics) if "drift" in k[0]]  # no file yet: no gauges, no error

    record_verdict(paths, "drift", "3", model_name="m", status="drifted", share=0.6, drifted_columns=3)
    record_verdict(paths, "drift", "4", model_name="m", status="insufficient_data", share=None)
    record_verdict(paths, "quality", "3", model_name="m", status="ok", figures={"accuracy": 0.8, "f1_macro": 0.7},
                   labelled_rows=150, window_end="2026-01-02T00:00:00Z")
    # A re-run of an older window is announced but does not replace the newer figures.
    record_verdict(paths, "quality", "3", model_name="m", status="ok", figures={"accuracy": 0.99},
                   labelled_rows=10, window_end="2026-01-01T00:00:00Z")
    record_verdict(paths, "shadow", "5", model_name="m", agreement=0.97, requests=400,
                   figures={"mean_abs_difference": 0.01})
    samples = _samples(metrics)
    d3 = (("deployment", "svc"), ("model_version", "3"))
    assert samples[("mlflow_deploy_drift_share", d3)] == 0.6
    assert samples[("mlflow_deploy_drift_detected", d3)] == 1.0
    no_verdict = (("deployment", "svc"), ("model_version", "4"))
    assert ("mlflow_deploy_drift_share", no_verdict) not in samples  # no share: no gauge, never a 0
    assert ("mlflow_deploy_drift_detected", no_verdict) not in samples
    assert ("mlflow_deploy_drift_checked_timestamp_seconds", no_verdict) in samples
    assert samples[("mlflow_deploy_quality", (("deployment", "svc"), ("figure", "accuracy"), ("model_version", "3")))] == 0.8
    assert samples[("mlflow_deploy_quality_labelled_rows", d3)] == 150
    s5 = (("deployment", "svc"), ("model_version", "5"))
    assert samples[("mlflow_deploy_shadow_agreement", s5)] == 0.97
    assert samples[("mlflow_deploy_shadow_requests", s5)] == 400
    assert samples[("mlflow_deploy_shadow_figure", (("deployment", "svc"), ("figure", "mean_abs_difference"),
                                                    ("model_version", "5")))] == 0.01
    events = StateStore(tmp_path).read_history("svc")
    assert [e["event"] for e in events] == ["drift_verdict", "drift_verdict", "quality_verdict", "quality_verdict",
                                            "shadow_verdict"]
    assert events[0]["model"] == {"model_name": "m", "model_version": "3"} and events[0]["share"] == 0.6

    paths.verdicts.write_text("{not json")  # torn by hand: the scrape still answers, without verdicts
    assert read_verdicts(paths) == {"drift": {}, "quality": {}, "shadow": {}, "quality_estimate": {}}
    assert ("mlflow_deploy_drift_share", d3) not in _samples(metrics)
