"""Inference capture: record answered requests and their predictions to Parquet, and read them back.

Serving records, the drift job and ``mlflow-deploy capture show`` read; what they share is the file
layout. One module per job:

- :mod:`.layout`: where captured traffic lives (``{root}/date=YYYY-MM-DD/part-*.parquet``) and its
  columns; the contract between writer and readers, keep it stable;
- :mod:`.writer`: :class:`CaptureWriter`: the request path encodes a record and appends it to a
  spool, bounded and counted, so serving never waits for (nor shares its GIL with) pandas, Arrow
  or Parquet;
- :mod:`.spool`: the spool's record format, and records back into Arrow tables; :mod:`.batch`:
  its batch record (the requests of one layout that a write takes, encoded once);
- :mod:`.converter`: the process that turns spool segments into Parquet files;
- :mod:`.arrow`: how requests and predictions become Arrow tables (converter process only);
- :mod:`.reader`: :func:`read_capture` of a time window, :func:`open_capture` of the same rows read
  one column at a time (:mod:`.columns`, for the drift job), :func:`parse_since`;
- :mod:`.retention`: :func:`prune_capture` of days older than the retention.

This package may use :mod:`mlflow_deploy_plugin.serving.frames` (a small pure helper) but nothing
else of serving, and nothing of lifecycle or monitoring: those depend on capture, not the reverse.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow_deploy_plugin.capture.arrow import AnsweredRequest, CapturedRequest, prediction_columns
    from mlflow_deploy_plugin.capture.layout import META_COLUMNS, META_SCHEMA, PREDICTION_PREFIX, capture_root
    from mlflow_deploy_plugin.capture.reader import open_capture, parse_since, read_capture
    from mlflow_deploy_plugin.capture.retention import prune_capture
    from mlflow_deploy_plugin.capture.writer import (
        DROP_BUFFER_FULL,
        DROP_CLOSED,
        DROP_CONVERT_ERROR,
        DROP_INVALID,
        DROP_WRITE_ERROR,
        CaptureWriter,
    )

# Loaded on first use (PEP 562), not with the package: the converter process (``python -m
# mlflow_deploy_plugin.capture.converter``) imports this package first and needs none of the
# writer's, the readers' or pandas' modules (see :mod:`.meta`), and a starting serving worker needs
# the writer and the layout only (reading capture back pulls in ``pyarrow.dataset`` and Parquet,
# which would sit on every cold start's critical path).
_WHERE = {
    "AnsweredRequest": "arrow", "CapturedRequest": "arrow", "prediction_columns": "arrow",
    "META_COLUMNS": "layout", "META_SCHEMA": "layout", "PREDICTION_PREFIX": "layout", "capture_root": "layout",
    "open_capture": "reader", "parse_since": "reader", "read_capture": "reader",
    "prune_capture": "retention",
    "DROP_BUFFER_FULL": "writer", "DROP_CLOSED": "writer", "DROP_CONVERT_ERROR": "writer",
    "DROP_INVALID": "writer", "DROP_WRITE_ERROR": "writer", "CaptureWriter": "writer",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # looked up once
    return value


__all__ = [
    "DROP_BUFFER_FULL",
    "DROP_CLOSED",
    "DROP_CONVERT_ERROR",
    "DROP_INVALID",
    "DROP_WRITE_ERROR",
    "META_COLUMNS",
    "META_SCHEMA",
    "PREDICTION_PREFIX",
    "AnsweredRequest",
    "CaptureWriter",
    "CapturedRequest",
    "capture_root",
    "open_capture",
    "parse_since",
    "prediction_columns",
    "prune_capture",
    "read_capture",
]
