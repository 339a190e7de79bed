"""Inference capture: record answered requests and their predictions to Parquet, and read them back.

Serving records, the drift job and ``mlflow-deploy capture show`` read; what they share is the file
layout. One module per job:

- :mod:`.layout`: where captured traffic lives (``{root}/date=YYYY-MM-DD/part-*.parquet``) and its
  columns; the contract between writer and readers, keep it stable;
- :mod:`.writer`: :class:`CaptureWriter`: the request path encodes a record and appends it to a
  spool, bounded and counted, so serving never waits for (nor shares its GIL with) pandas, Arrow
  or Parquet;
- :mod:`.spool`: the spool's record format, and records back into Arrow tables;
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

# Each name is imported from its module on first use (PEP 562): a serving worker needs the writer and
# the layout only, and reading capture back (``reader``, ``columns``) pulls in ``pyarrow.dataset`` and
# Parquet, which would otherwise sit on every cold start's critical path.
_MODULE_OF = {
    "AnsweredRequest": "arrow", "CapturedRequest": "arrow", "prediction_columns": "arrow",
    "META_COLUMNS": "layout", "META_SCHEMA": "layout", "PREDICTION_PREFIX": "layout", "capture_root": "layout",
    "open_capture": "reader", "parse_since": "reader", "read_capture": "reader",
    "prune_capture": "retention",
    "DROP_BUFFER_FULL": "writer", "DROP_CLOSED": "writer", "DROP_CONVERT_ERROR": "writer",
    "DROP_INVALID": "writer", "DROP_WRITE_ERROR": "writer", "CaptureWriter": "writer",
}

if TYPE_CHECKING:
    from .arrow import AnsweredRequest, CapturedRequest, prediction_columns
    from .layout import META_COLUMNS, META_SCHEMA, PREDICTION_PREFIX, capture_root
    from .reader import open_capture, parse_since, read_capture
    from .retention import prune_capture
    from .writer import (
        DROP_BUFFER_FULL,
        DROP_CLOSED,
        DROP_CONVERT_ERROR,
        DROP_INVALID,
        DROP_WRITE_ERROR,
        CaptureWriter,
    )


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once
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
