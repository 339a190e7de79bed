"""The latest drift, quality and shadow figures of each served version, for Prometheus and alerts.

Report jobs (drift, quality, shadow) run in other processes than the workers that serve /metrics.
Each job, when it has a verdict, calls :func:`record_verdict`, which (1) keeps the figures in the
deployment's small ``verdicts.json`` (read by the workers' collector on every scrape:
:class:`mlflow_deploy_plugin.serving.metrics.VerdictCollector`), and (2) appends a
``<kind>_verdict`` event to the history, which the notifier announces.

``verdicts.json``::

    {"drift":   {"<version>": {"model_name", "status", "share", "drifted_columns", "checked_at", "run_id"}},
     "quality": {"<version>": {"model_name", "status", "figures": {"accuracy": 0.91, ...}, "labelled_rows",
                               "window_end", "checked_at", "run_id"}},
     "quality_estimate": {"<version>": {"model_name", "figures": {"estimated_accuracy": 0.88, ...},
                                        "answered_rows", "calibration_rows", "window_end", "checked_at", "run_id"}},
     "shadow":  {"<version>": {"model_name", "agreement", "requests", "figures": {...}, "checked_at"}}}

A shadow report only has to call ``record_verdict(paths, "shadow", version, model_name=...,
agreement=..., requests=..., figures={...})``: the gauges ``mlflow_deploy_shadow_agreement``,
``mlflow_deploy_shadow_requests`` and ``mlflow_deploy_shadow_figure`` follow.

Standard library and ``state`` only: the workers read it.
"""

from __future__ import annotations

import time
from typing import Any

from mlflow_deploy_plugin.state import (
    DeploymentPaths,
    append_history_file,
    file_lock,
    read_json,
    write_json_atomic,
)

# quality_estimate: CBPE's estimate of a window whose labels have not come (quality/due.py), kept apart
# from the measured figures so an estimate never passes for one.
KINDS = ("drift", "quality", "shadow", "quality_estimate")


def read_verdicts(paths: DeploymentPaths) -> dict[str, dict[str, dict[str, Any]]]:
    """``verdicts.json`` (empty kinds when absent or unreadable: a scrape must never fail on it)."""
    try:
        data = read_json(paths.verdicts)
    except (OSError, ValueError):
        data = None
    data = data if isinstance(data, dict) else {}
    return {kind: dict(data.get(kind) or {}) if isinstance(data.get(kind), dict) else {} for kind in KINDS}


def record_verdict(paths: DeploymentPaths, kind: str, version: str, *, announce: bool = True,
                   **figures: Any) -> None:
    """Keep ``figures`` as the latest ``kind`` verdict of ``version``, and (``announce``) write the
    ``<kind>_verdict`` history event.

    A quality figure set (or estimate) for an older window than the one kept (``window_end``: a re-run
    of a past window after late labels) is announced but does not replace the newer one.
    """
    if kind not in KINDS:
        raise ValueError(f"verdict kind {kind!r} is not one of {', '.join(KINDS)}")
    entry = {"checked_at": time.time(), **figures}
    with file_lock(paths.root / "run" / "verdicts.lock", timeout_s=30):
        data = read_verdicts(paths)
        kept = data[kind].get(str(version)) or {}
        newer_kept = str(kept.get("window_end") or "") > str(entry.get("window_end") or "")
        if not newer_kept:
            data[kind][str(version)] = entry
            write_json_atomic(paths.verdicts, data)
    if announce:
        details = {k: v for k, v in figures.items() if k != "model_name"}
        append_history_file(paths.history, f"{kind}_verdict", actor=f"{kind}-report",
                            model={"model_name": figures.get("model_name"), "model_version": str(version)},
                            **details)
