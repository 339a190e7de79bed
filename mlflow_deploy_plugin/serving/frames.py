"""Stacking many small request frames, which both batching and capture do on every request."""

from __future__ import annotations

import numpy as np
import pandas as pd

# Set on frames known to hold only float64 columns (the parser's fast path builds them), so hot
# paths can skip `frame.dtypes`, which builds a Series and costs ~50 us per call.
FLOAT64_ATTR = "mlflow_deploy_all_float64"


def mark_float64(frame: pd.DataFrame) -> pd.DataFrame:
    """Record that every column of ``frame`` is float64."""
    frame.attrs[FLOAT64_ATTR] = True
    return frame


def is_float64(frame: pd.DataFrame) -> bool:
    """Whether every column of ``frame`` is float64 (cheap for frames marked by the parser)."""
    if frame.attrs.get(FLOAT64_ATTR):
        return True
    return all(dtype == np.float64 for dtype in frame.dtypes)


def stack_frames(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate frames row-wise; same-shaped float frames via numpy (~20x faster than pd.concat).

    ``pd.concat`` of a few dozen one-row frames costs more than predicting them, and holds the
    GIL while it does: on the request path that is latency for everyone.
    """
    first = frames[0]
    if len(frames) == 1:
        return first
    if all(is_float64(f) and f.columns.equals(first.columns) for f in frames):
        return mark_float64(pd.DataFrame(np.vstack([f.to_numpy() for f in frames]), columns=first.columns))
    return pd.concat(frames, ignore_index=True)
