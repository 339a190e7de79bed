"""Drift monitoring: reference data, drift methods and exact statistics, the Evidently report, the drift job.

Importing this package is cheap: each name below is imported from its module on first use (PEP 562),
so a command that only needs a submodule (`mlflow-deploy history`, which registers the shadow
commands, or ``monitoring.drift_process``) does not pay for MLflow and SciPy (seconds of CPU), and
Evidently (~5 s more) is only loaded when a report is rendered.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_MODULE_OF = {
    "METHODS": "drift_methods", "ColumnMethod": "drift_methods", "Floors": "drift_methods",
    "methods_to_spec": "drift_methods", "parse_floors": "drift_methods", "parse_methods": "drift_methods",
    "ColumnDrift": "drift_stats", "DriftResult": "drift_stats", "column_kind": "drift_stats",
    "compute_drift": "drift_stats",
    "render_evidently_report": "evidently_report",
    "predict_reference": "reference", "read_table_uri": "reference", "resolve_reference_data": "reference",
    "DriftOutcome": "report_job", "DriftSettings": "report_job", "run_drift_report": "report_job",
    "select_current": "report_job",
}

if TYPE_CHECKING:
    from .drift_methods import METHODS, ColumnMethod, Floors, methods_to_spec, parse_floors, parse_methods
    from .drift_stats import ColumnDrift, DriftResult, column_kind, compute_drift
    from .evidently_report import render_evidently_report
    from .reference import predict_reference, read_table_uri, resolve_reference_data
    from .report_job import DriftOutcome, DriftSettings, run_drift_report, select_current


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once
    return value


__all__ = [
    "METHODS",
    "ColumnDrift",
    "ColumnMethod",
    "DriftOutcome",
    "DriftResult",
    "DriftSettings",
    "Floors",
    "column_kind",
    "compute_drift",
    "methods_to_spec",
    "parse_floors",
    "parse_methods",
    "predict_reference",
    "read_table_uri",
    "render_evidently_report",
    "resolve_reference_data",
    "run_drift_report",
    "select_current",
]
