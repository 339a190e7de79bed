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
    try:
        # The frame's blocks (~0.3 us; `frame.dtypes` builds a Series: ~20 us, paid per request by
        # the frames MLflow's own parsers build, e.g. Parquet bodies). Every column is in one block.
        blocks = frame._mgr.blocks
    except AttributeError:  # another pandas internals layout: the public (slower) way
        return all(dtype == np.float64 for dtype in frame.dtypes)
    return all(block.dtype == np.float64 for block in blocks)


def stack_frames(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate frames row-wise; same-shaped float frames via numpy (~20x faster than pd.concat).

    ``pd.concat`` of a few dozen one-row frames costs more than predicting them, and holds the
    GIL while it does: on the request path that is latency for everyone.
    """
    first = frames[0]
    if len(frames) == 1:
        return first
    if all(is_float64(f) and f.columns.equals(first.columns) for f in frames):
        # Fill a column-major array frame by frame: each copy is short, so other threads (the
        # event loop) get the GIL between them, and every column ends up contiguous, which makes
        # the later Arrow conversion of captured rows zero-copy.
        total = sum(len(f) for f in frames)
        out = np.empty((len(first.columns), total), dtype=np.float64)
        start = 0
        for frame in frames:
            rows = len(frame)
            out[:, start:start + rows] = frame.to_numpy().T
            start += rows
        return mark_float64(pd.DataFrame(out.T, columns=first.columns, copy=False))
    return pd.concat(frames, ignore_index=True)
