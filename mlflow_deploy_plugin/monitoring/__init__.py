"""Drift monitoring: reference data, drift methods and exact statistics, the Evidently report, the drift job.

Importing this package is cheap: Evidently (~5 s to import) is only loaded when a report is rendered.
"""

from .drift_methods import METHODS, ColumnMethod, Floors, methods_to_spec, parse_floors, parse_methods
from .drift_stats import ColumnDrift, DriftResult, column_kind, compute_drift
from .evidently_report import render_evidently_report
from .reference import predict_reference, read_table_uri, resolve_reference_data
from .report_job import DriftOutcome, DriftSettings, run_drift_report, select_current

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
